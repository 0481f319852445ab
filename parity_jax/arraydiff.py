"""The comparison core: bit-exact equality and element-wise diff statistics.

Everything here works on host numpy arrays (jax arrays are converted with
``np.asarray``) and is reused by the checkpoint verifier, the forward-pass
stage comparison and the SVF parity gate.

* :func:`bit_equal` -- dtype, shape and raw bytes. NaN payloads and -0.0 vs
  +0.0 count as differences; ``np.array_equal`` would hide both.
* :func:`diff_stats` -- count/fraction of (bitwise) differing elements,
  max|diff| and where, RMS diff, float64 cosine, relative L2, max ULP distance
  and the top-K divergences.
* :class:`DiffAccumulator` -- the same statistics accumulated chunk by chunk,
  so a leaf or a tensor bigger than memory can be compared in bounded memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from parity_jax import jsonio
from parity_jax.dtypes import c_contiguous, is_float_dtype
from parity_jax.errors import ComparisonError

__all__ = [
    "ComparisonError",
    "DiffAccumulator",
    "DiffStats",
    "Divergence",
    "as_numpy",
    "bit_equal",
    "check_comparable",
    "diff_stats",
    "ulp_distance",
]

_INT_OF_WIDTH = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_UINT_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def as_numpy(x: Any) -> np.ndarray:
  """Host numpy view of ``x`` (numpy, jax or anything ``np.asarray`` takes)."""
  return np.asarray(x)


def _flat_bytes(a: np.ndarray) -> np.ndarray:
  """The raw bytes of ``a`` in C order as a uint8 vector (no copy when contiguous)."""
  return c_contiguous(a).reshape(-1).view(np.uint8)


def bit_equal(a: Any, b: Any) -> bool:
  """Value-exact equality: same dtype (byte order included), same shape, same bytes."""
  a, b = as_numpy(a), as_numpy(b)
  if a.dtype != b.dtype or a.shape != b.shape:
    return False
  return bool(np.array_equal(_flat_bytes(a), _flat_bytes(b)))


def check_comparable(a: Any, b: Any, name: str | None = None) -> None:
  """Raises :class:`ComparisonError` (one line) unless shapes and dtypes match."""
  a, b = as_numpy(a), as_numpy(b)
  where = f"{name}: " if name else ""
  if a.shape != b.shape:
    raise ComparisonError(f"{where}shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
  if a.dtype != b.dtype:
    raise ComparisonError(f"{where}dtype mismatch {a.dtype} vs {b.dtype}")
  if a.dtype.kind in "cOUSV" and not is_float_dtype(a.dtype):
    raise ComparisonError(f"{where}unsupported dtype {a.dtype} for element-wise statistics")
  if a.dtype.itemsize not in _UINT_OF_WIDTH:  # e.g. x87 long double: no integer view for bits and ULPs
    raise ComparisonError(f"{where}unsupported dtype {a.dtype} ({a.dtype.itemsize} bytes) for element-wise statistics")


def _bitwise_differs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Element-wise mask of bitwise differences (same dtype and shape assumed)."""
  u = _UINT_OF_WIDTH[a.dtype.itemsize]  # every width diff_stats accepts (bool included: 1 byte)
  return c_contiguous(a).view(u) != c_contiguous(b).view(u)


def _ordered_ints(a: np.ndarray) -> np.ndarray:
  """Maps float bit patterns to int64 so that adjacent floats differ by 1.

  -0.0 and +0.0 both map to 0, so their ULP distance is 0 (they still count as
  a bitwise difference).
  """
  width = a.dtype.itemsize
  i = c_contiguous(a).view(_INT_OF_WIDTH[width]).astype(np.int64)
  int_min = np.int64(-(2 ** (8 * width - 1)))
  return np.where(i < 0, int_min - i, i)


def _ulp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """ULP distance of two same-dtype float arrays as uint64; 0 where either is NaN."""
  oa, ob = _ordered_ints(a), _ordered_ints(b)
  ua, ub = oa.view(np.uint64), ob.view(np.uint64)
  # Modular uint64 subtraction is exact because the true distance is < 2**64.
  d = np.where(oa >= ob, ua - ub, ub - ua)
  d[np.isnan(a.astype(np.float64)) | np.isnan(b.astype(np.float64))] = 0
  return d


def ulp_distance(a: Any, b: Any) -> np.ndarray:
  """Element-wise distance in units in the last place, as uint64.

  Defined for floating dtypes only. Positions where either side is NaN get 0;
  callers report NaN mismatches separately.
  """
  a, b = as_numpy(a), as_numpy(b)
  check_comparable(a, b)
  if not is_float_dtype(a.dtype):
    raise ComparisonError(f"ULP distance is defined for floating dtypes, not {a.dtype}")
  return _ulp(a, b)


def _scalar(x: Any) -> float | int | bool:
  if isinstance(x, (np.bool_, bool)):
    return bool(x)
  if isinstance(x, (np.integer, int)):
    return int(x)
  return float(x)


@dataclasses.dataclass(frozen=True)
class Divergence:
  """One element where the two arrays differ."""

  index: tuple[int, ...]
  a: float | int | bool
  b: float | int | bool
  abs_diff: float
  a_bits: str  # hex of the raw element bytes (little-endian integer), shows NaN payloads and -0.0
  b_bits: str

  def to_dict(self) -> dict[str, Any]:
    return {
        "index": list(self.index),
        "a": jsonio.num(self.a),
        "b": jsonio.num(self.b),
        "abs_diff": jsonio.num(self.abs_diff),
        "a_bits": self.a_bits,
        "b_bits": self.b_bits,
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Divergence":
    return cls(
        index=tuple(d["index"]),
        a=jsonio.from_jsonable(d["a"]),
        b=jsonio.from_jsonable(d["b"]),
        abs_diff=float(jsonio.from_jsonable(d["abs_diff"])),
        a_bits=d["a_bits"],
        b_bits=d["b_bits"],
    )


@dataclasses.dataclass(frozen=True)
class DiffStats:
  """Element-wise comparison of ``a`` (reference/golden) against ``b`` (candidate)."""

  shape: tuple[int, ...]
  dtype: str
  size: int
  n_diff: int  # elements whose bytes differ
  frac_diff: float
  max_abs_diff: float
  max_abs_index: tuple[int, ...] | None  # None when nothing differs
  rms_diff: float
  cosine: float  # accumulated in float64, over elements finite on both sides
  rel_l2: float  # ||a - b|| / ||a||; inf when a NaN/inf appears on one side only
  max_ulp: int | None  # None for non-float dtypes
  n_nan_mismatch: int  # elements that are NaN on exactly one side
  top_k: tuple[Divergence, ...]

  @property
  def bit_equal(self) -> bool:
    return self.n_diff == 0

  def to_dict(self) -> dict[str, Any]:
    return {
        "shape": list(self.shape),
        "dtype": self.dtype,
        "size": self.size,
        "n_diff": self.n_diff,
        "frac_diff": self.frac_diff,
        "max_abs_diff": jsonio.num(self.max_abs_diff),
        "max_abs_index": None if self.max_abs_index is None else list(self.max_abs_index),
        "rms_diff": jsonio.num(self.rms_diff),
        "cosine": jsonio.num(self.cosine),
        "rel_l2": jsonio.num(self.rel_l2),
        "max_ulp": self.max_ulp,
        "n_nan_mismatch": self.n_nan_mismatch,
        "top_k": [d.to_dict() for d in self.top_k],
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "DiffStats":
    """The inverse of :meth:`to_dict`."""
    f = lambda key: float(jsonio.from_jsonable(d[key]))  # noqa: E731
    return cls(
        shape=tuple(d["shape"]),
        dtype=d["dtype"],
        size=int(d["size"]),
        n_diff=int(d["n_diff"]),
        frac_diff=float(d["frac_diff"]),
        max_abs_diff=f("max_abs_diff"),
        max_abs_index=None if d["max_abs_index"] is None else tuple(d["max_abs_index"]),
        rms_diff=f("rms_diff"),
        cosine=f("cosine"),
        rel_l2=f("rel_l2"),
        max_ulp=d["max_ulp"],
        n_nan_mismatch=int(d["n_nan_mismatch"]),
        top_k=tuple(Divergence.from_dict(t) for t in d["top_k"]),
    )

  def summary(self) -> str:
    """One line for tables and logs."""
    if self.bit_equal:
      return "bit-identical"
    where = "" if self.max_abs_index is None else f" at {list(self.max_abs_index)}"
    ulp = "" if self.max_ulp is None else f" max_ulp={self.max_ulp}"
    return (
        f"{self.n_diff}/{self.size} differ ({self.frac_diff:.3g}); max|diff|={self.max_abs_diff:.6g}{where};"
        f" rms={self.rms_diff:.3g} rel_l2={self.rel_l2:.3g} cos={self.cosine:.9f}{ulp}"
    )


class DiffAccumulator:
  """Accumulates :class:`DiffStats` over chunks of two same-shaped arrays.

  Each :meth:`update` takes one box of both arrays plus the box's origin in the
  full array, so row chunks, tensorstore storage chunks and whole arrays all
  work. Memory is bounded by the chunk, not the array. Sums are float64.
  """

  def __init__(self, shape: Sequence[int], dtype: Any, top_k: int = 10):
    self.shape = tuple(int(s) for s in shape)
    self.dtype = np.dtype(dtype)
    self.top_k = int(top_k)
    self._is_float = is_float_dtype(self.dtype)
    self._seen = 0
    self._n_diff = 0
    self._n_nan_mismatch = 0
    self._sum_sq_diff = 0.0
    self._dot = 0.0
    self._sq_a = 0.0
    self._sq_b = 0.0
    self._max_ulp = 0
    self._max_abs = 0.0
    self._max_flat = -1  # flat index of the largest |diff| among differing elements
    # (abs_diff, flat_index, Divergence) candidates, kept to the best top_k.
    self._top: list[tuple[float, int, Divergence]] = []

  def update(self, a: Any, b: Any, origin: Sequence[int] | None = None) -> None:
    a, b = as_numpy(a), as_numpy(b)
    check_comparable(a, b)
    if a.dtype != self.dtype:
      raise ComparisonError(f"chunk dtype {a.dtype} does not match {self.dtype}")
    origin = tuple(origin) if origin is not None else (0,) * a.ndim
    if len(origin) != len(self.shape) or a.ndim != len(self.shape):
      raise ComparisonError(f"chunk of rank {a.ndim} at {origin} does not fit shape {self.shape}")
    if any(o < 0 or o + s > full for o, s, full in zip(origin, a.shape, self.shape)):
      raise ComparisonError(f"chunk {a.shape} at {origin} lies outside shape {self.shape}")
    self._seen += a.size
    if a.size == 0:
      return
    differs = _bitwise_differs(a, b)
    n_diff = int(np.count_nonzero(differs))
    self._n_diff += n_diff

    fa = a.astype(np.float64).reshape(-1)
    fb = b.astype(np.float64).reshape(-1)
    both_finite = np.isfinite(fa) & np.isfinite(fb)
    if both_finite.all():
      ca, cb = fa, fb
    else:  # cosine and norms over the elements finite on both sides
      ca, cb = fa[both_finite], fb[both_finite]
    self._dot += float(np.dot(ca, cb))
    self._sq_a += float(np.dot(ca, ca))
    self._sq_b += float(np.dot(cb, cb))
    if n_diff == 0:
      return

    with np.errstate(invalid="ignore", over="ignore"):
      d = np.abs(fa - fb)
    nan_a, nan_b = np.isnan(fa), np.isnan(fb)
    d[fa == fb] = 0.0  # equal infinities, and -0.0 vs +0.0
    d[nan_a & nan_b] = 0.0  # NaN payload differences count in n_diff, not in magnitude
    one_nan = nan_a ^ nan_b
    d[one_nan] = np.inf
    self._n_nan_mismatch += int(np.count_nonzero(one_nan))
    finite = np.isfinite(d)
    self._sum_sq_diff += float(np.dot(d[finite], d[finite])) if finite.any() else 0.0
    if not finite.all():
      self._sum_sq_diff = math.inf

    if self._is_float:
      self._max_ulp = max(self._max_ulp, int(_ulp(a, b).max()))

    flat_differs = differs.reshape(-1)
    masked = np.where(flat_differs, d, -1.0)
    local = int(np.argmax(masked))  # first occurrence of the largest |diff| in this chunk
    flat = self._flat_index(origin, a.shape, local)
    if d[local] > self._max_abs or self._max_flat < 0 or (d[local] == self._max_abs and flat < self._max_flat):
      self._max_abs, self._max_flat = float(d[local]), flat
    self._merge_top(a, b, d, flat_differs, origin)

  def _flat_index(self, origin, chunk_shape, local: int) -> int:
    if not self.shape:
      return 0
    local_idx = np.unravel_index(local, chunk_shape)
    return int(np.ravel_multi_index(tuple(int(o + l) for o, l in zip(origin, local_idx)), self.shape))

  def _merge_top(self, a, b, d, differs, origin) -> None:
    k = self.top_k
    if k <= 0:
      return
    cand = np.flatnonzero(differs)
    if cand.size > k:
      # Largest |diff| first; bitwise-only differences (|diff| == 0) still rank.
      # Ties at the k-th value go to the lowest indices (``cand`` is ascending,
      # and a box's C order is monotone in the full array's flat order), so the
      # result does not depend on how the arrays were chunked.
      dc = d[cand]
      kth = np.partition(dc, dc.size - k)[dc.size - k]
      above = cand[dc > kth]
      ties = cand[dc == kth][: k - above.size]
      cand = np.concatenate([above, ties])
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    width = a.dtype.itemsize
    bits_a_all = flat_a.view(_UINT_OF_WIDTH[width])
    bits_b_all = flat_b.view(_UINT_OF_WIDTH[width])
    for local in cand:
      flat = self._flat_index(origin, a.shape, int(local))
      idx = tuple(int(i) for i in np.unravel_index(flat, self.shape)) if self.shape else ()
      ea, eb = flat_a[local], flat_b[local]
      div = Divergence(
          index=idx,
          a=float(np.float64(ea)) if self._is_float else _scalar(ea),
          b=float(np.float64(eb)) if self._is_float else _scalar(eb),
          abs_diff=float(d[local]),
          a_bits=f"0x{int(bits_a_all[local]):0{2 * width}x}",
          b_bits=f"0x{int(bits_b_all[local]):0{2 * width}x}",
      )
      self._top.append((float(d[local]), flat, div))
    # Deterministic: largest |diff| first, then lowest flat index.
    self._top.sort(key=lambda t: (-t[0], t[1]))
    del self._top[k:]

  @property
  def n_diff(self) -> int:
    return self._n_diff

  def result(self) -> DiffStats:
    size = int(np.prod(self.shape)) if self.shape else 1
    if self._seen != size:
      raise ComparisonError(f"accumulated {self._seen} elements, expected {size} for shape {self.shape}")
    na, nb = math.sqrt(self._sq_a), math.sqrt(self._sq_b)
    if na == 0.0 and nb == 0.0:
      cosine = 1.0
    elif na == 0.0 or nb == 0.0:
      cosine = 0.0
    else:
      cosine = self._dot / (na * nb)
    l2_diff = math.sqrt(self._sum_sq_diff)
    if l2_diff == 0.0:
      rel_l2 = 0.0
    else:
      rel_l2 = l2_diff / na if na > 0 else math.inf
    top = tuple(t[2] for t in self._top)
    max_index = None
    if self._max_flat >= 0:
      max_index = tuple(int(i) for i in np.unravel_index(self._max_flat, self.shape)) if self.shape else ()
    return DiffStats(
        shape=self.shape,
        dtype=str(self.dtype),
        size=size,
        n_diff=self._n_diff,
        frac_diff=self._n_diff / size if size else 0.0,
        max_abs_diff=self._max_abs,
        max_abs_index=max_index,
        rms_diff=math.sqrt(self._sum_sq_diff / size) if size else 0.0,
        cosine=cosine,
        rel_l2=rel_l2,
        max_ulp=(self._max_ulp if self._is_float else None),
        n_nan_mismatch=self._n_nan_mismatch,
        top_k=top,
    )


def diff_stats(a: Any, b: Any, top_k: int = 10, name: str | None = None) -> DiffStats:
  """Element-wise statistics of ``b`` against the reference ``a``.

  Raises :class:`ComparisonError` with a one-line message when the shapes or
  dtypes differ (``name`` is put in front of it).
  """
  a, b = as_numpy(a), as_numpy(b)
  check_comparable(a, b, name)
  acc = DiffAccumulator(a.shape, a.dtype, top_k=top_k)
  acc.update(a, b)
  return acc.result()
