"""Index geometry shared by the remap spec, the migrator and the verifier.

Pure functions on shapes; nothing here reads data.

* :func:`refinement` -- the common refinement of two shapes related by a
  value-preserving reshape (see :mod:`parity_jax.checkpoint.spec` for why only
  axis splits/merges count as value-preserving), or ``None``.
* :func:`axis_groups` -- which refinement axes make up each axis of a shape.
* :class:`SlabPlan` -- C-order "slabs" of the refinement: boxes of the form
  (single indices on leading axes, one range, full trailing axes). Such a box
  is a contiguous C-order range of elements AND a box in every shape that the
  refinement regroups, so the same slab can be read from the source leaf and
  from the migrated leaf even when a squeeze or reshape lies between them, and
  the bytes arrive in C order (so a streaming sha256 equals
  ``sha256(leaf.tobytes())``).
* :func:`chunk_row_elems` -- how many elements of a stored leaf one "row" of
  storage chunks holds: the unit that must be decoded (or cached) to stream
  the leaf in C order.
* :func:`row_major_chunk_shape` -- the chunk shape the migrator asks orbax to
  write: C-contiguous rows of chunks (leading axes split first), so the
  migrated leaf streams chunk by chunk.
* :func:`flat_range_boxes` -- a C-order element range of a shape as the few
  boxes that tile it (how the distributed migrator reads and writes a range
  of a leaf).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterator, Sequence

Shape = tuple[int, ...]

__all__ = [
    "SlabPlan",
    "axis_groups",
    "chunk_row_elems",
    "flat_range_boxes",
    "normalize_squeeze",
    "refinement",
    "row_major_chunk_shape",
    "squeezed_shape",
]


def _prod(xs: Sequence[int]) -> int:
  return int(math.prod(xs))


def normalize_squeeze(axes: Sequence[int], rank: int) -> tuple[int, ...] | str:
  """Normalised, sorted squeeze axes, or a one-line reason why they do not fit ``rank``."""
  out = []
  for a in axes:
    if not -rank <= a < rank:
      return f"axis {a} is out of range for rank {rank}"
    out.append(a % rank)
  if len(set(out)) != len(out):
    return f"axes {list(axes)} repeat an axis"
  return tuple(sorted(out))


def squeezed_shape(shape: Shape, axes: Sequence[int]) -> Shape:
  drop = set(axes)
  return tuple(d for i, d in enumerate(shape) if i not in drop)


def refinement(a: Shape, b: Shape) -> Shape | None:
  """The coarsest shape R that both ``a`` and ``b`` are axis-merges of, or None.

  ``a`` -> ``b`` is a value-preserving reshape in our sense exactly when R
  exists: every element keeps its C-order position and each axis of either
  shape is a run of adjacent axes of R (size-1 axes are free to appear or
  disappear). ``(2, 12) -> (2, 3, 4)`` and ``(6, 4) -> (2, 12)`` (R = (2, 3, 4))
  qualify; ``(4, 6) -> (6, 4)`` does not (it keeps the bytes but reinterprets
  the axes, a silent transpose-like mix-up).
  """
  a, b = tuple(int(x) for x in a), tuple(int(x) for x in b)
  if _prod(a) != _prod(b):
    return None
  if _prod(a) == 0:
    # No values to preserve; only allow it when the non-trivial axes agree.
    return tuple(d for d in a if d != 1) if [d for d in a if d != 1] == [d for d in b if d != 1] else None
  pa = set(itertools.accumulate((d for d in a if d != 1), lambda x, y: x * y))
  pb = set(itertools.accumulate((d for d in b if d != 1), lambda x, y: x * y))
  chain = sorted(pa | pb)
  out, prev = [], 1
  for p in chain:
    if p % prev:
      return None
    out.append(p // prev)
    prev = p
  return tuple(out)


def axis_groups(shape: Shape, r: Shape) -> list[tuple[int, int]]:
  """For each axis of ``shape``, the half-open range of refinement axes it merges.

  Size-1 axes get an empty range. Raises ValueError if ``shape`` is not an
  axis-merge of ``r``.
  """
  groups, k = [], 0
  for d in shape:
    if d == 1:
      groups.append((k, k))
      continue
    start, acc = k, 1
    while acc < d and k < len(r):
      acc *= r[k]
      k += 1
    if acc != d:
      raise ValueError(f"shape {shape} is not an axis-merge of {r}")
    groups.append((start, k))
  if k != len(r):
    raise ValueError(f"shape {shape} is not an axis-merge of {r}")
  return groups


def chunk_row_elems(shape: Shape, chunk: Shape | None) -> int:
  """Elements in one C-contiguous row of storage chunks (the whole leaf if none).

  A leaf streams in C order without re-decoding when a cache holds one such
  row: the chunks that share the index of the first split axis. If that axis
  is preceded by an axis of size > 1 that the chunks span in full, every chunk
  touches every C-order slab and the row is the whole leaf.
  """
  n = _prod(shape)
  if chunk is None or len(chunk) != len(shape) or n == 0:
    return n
  for i, (d, c) in enumerate(zip(shape, chunk)):
    if d == 1:
      continue
    if c >= d:
      # The first non-trivial axis is not split: a row is the whole leaf,
      # unless nothing after it is split either (single chunk: also whole).
      return n
    return int(c) * _prod(shape[i + 1 :])
  return n


def _largest_divisor_at_most(n: int, limit: int) -> int:
  best, i = 1, 1
  while i * i <= n:
    if n % i == 0:
      for d in (i, n // i):
        if best < d <= limit:
          best = d
    i += 1
  return best


def row_major_chunk_shape(shape: Shape, itemsize: int, target_bytes: int | None) -> Shape:
  """Chunk shape for writing: split leading axes first, keep trailing axes whole.

  Every chunk is then a contiguous C-order range of the leaf, so a reader can
  stream it chunk by chunk in C order. ``target_bytes`` None keeps one chunk.
  Prefers an extent that divides the axis (as orbax does) when that costs at
  most half the target; otherwise the last chunk along the axis is partial.
  """
  shape = tuple(max(1, int(d)) for d in shape)
  if target_bytes is None or not shape:
    return shape
  target = max(1, int(target_bytes) // max(1, int(itemsize)))
  # the first axis whose trailing block fits; the last always does (its trailing block is 1 element). A leaf that
  # fits whole stops at axis 0 with r = shape[0]: one chunk.
  p = next(p for p in range(len(shape)) if _prod(shape[p + 1 :]) <= target)
  r = max(1, min(shape[p], target // _prod(shape[p + 1 :])))
  div = _largest_divisor_at_most(shape[p], r)
  if 2 * div >= r:
    r = div
  return (1,) * p + (r,) + shape[p + 1 :]


@dataclasses.dataclass(frozen=True)
class SlabPlan:
  """C-order slabs of the refinement ``r``: points on axes < k, ``step`` on axis k, full after."""

  r: Shape
  k: int
  step: int

  @classmethod
  def for_target(cls, r: Shape, target_elems: int) -> "SlabPlan":
    """The largest slabs of at most ``target_elems`` elements (at least one row of the last axis)."""
    r = tuple(int(x) for x in r)
    if not r or _prod(r) == 0:
      return cls(r, 0, 1)
    target_elems = max(1, int(target_elems))
    for k in range(len(r)):
      trailing = _prod(r[k + 1 :])
      if trailing <= target_elems:
        return cls(r, k, max(1, min(r[k], target_elems // trailing)))
    return cls(r, len(r) - 1, 1)

  @property
  def slab_elems(self) -> int:
    """Elements in a full slab."""
    if not self.r:
      return 1
    return self.step * _prod(self.r[self.k + 1 :])

  @property
  def n_slabs(self) -> int:
    if not self.r:
      return 1
    if _prod(self.r) == 0:
      return 0
    return _prod(self.r[: self.k]) * -(-self.r[self.k] // self.step)

  def boundaries_are_multiples_of(self, e: int) -> bool:
    """True when every slab boundary is a multiple of ``e`` elements (or the end).

    Then each run of ``e`` elements (a storage chunk row) is read by exactly
    one slab, so no cache is needed to decode it once.
    """
    n = _prod(self.r) if self.r else 1
    if e >= n:
      return self.n_slabs <= 1
    if not self.r:
      return True
    trailing = _prod(self.r[self.k + 1 :])
    block = self.r[self.k] * trailing  # one prefix block
    full = self.step * trailing
    inner_ok = full % e == 0 or self.step >= self.r[self.k]
    return inner_ok and (self.k == 0 or block % e == 0)

  def boundaries_include_multiples_of(self, e: int) -> bool:
    """True when every multiple of ``e`` elements (below the end) is a slab boundary.

    Then no slab straddles a storage chunk row of ``e`` elements: a reader
    that caches one row at a time can drop it before decoding the next.
    """
    n = _prod(self.r) if self.r else 1
    if e <= 0 or e >= n or not self.r:
      return True
    trailing = _prod(self.r[self.k + 1 :])
    block = self.r[self.k] * trailing  # one prefix block; all its ends are slab boundaries
    full = self.step * trailing  # slab boundaries inside a block are multiples of this
    if e % block == 0:
      return True
    if block % full == 0:  # boundaries are exactly the multiples of ``full``
      return e % full == 0
    # The last slab of each block is partial: check the multiples of e over one period of (m * e) mod block.
    period = block // math.gcd(e, block)
    last = min((n - 1) // e, period)
    if last > 1_000_000:
      return False  # conservative: the caller then caches one more row
    return all(((m * e) % block) % full == 0 for m in range(1, last + 1))

  def __iter__(self) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Yields ``(lo, hi)`` corner pairs (hi exclusive) in C order."""
    r = self.r
    if not r:
      yield (), ()
      return
    if _prod(r) == 0:
      return
    k = self.k
    tail_lo = (0,) * (len(r) - k - 1)
    tail_hi = tuple(r[k + 1 :])
    for prefix in itertools.product(*(range(d) for d in r[:k])):
      for j in range(0, r[k], self.step):
        lo = prefix + (j,) + tail_lo
        hi = tuple(p + 1 for p in prefix) + (min(j + self.step, r[k]),) + tail_hi
        yield lo, hi


def box_in(
    shape: Shape, groups: list[tuple[int, int]], r: Shape, lo: Sequence[int], hi: Sequence[int]
) -> tuple[slice, ...]:
  """Maps a slab of the refinement to the same elements as a box of ``shape``.

  Within each group the slab has the pattern (points, one range, full), which
  maps to one contiguous range of the merged axis.
  """
  out = []
  for (a, b), d in zip(groups, shape):
    if a == b:
      out.append(slice(0, d))
      continue
    dims = r[a:b]
    start = 0
    last = 0
    for dim, l, h in zip(dims, lo[a:b], hi[a:b]):
      start = start * dim + l
      last = last * dim + (h - 1)
    out.append(slice(start, last + 1))
  return tuple(out)


def box_shape(box: Sequence[slice]) -> Shape:
  return tuple(s.stop - s.start for s in box)


def flat_offset(lo: Sequence[int], r: Shape) -> int:
  """C-order flat index of the corner ``lo`` of the refinement."""
  off = 0
  for l, d in zip(lo, r):
    off = off * d + l
  return off


def flat_range_boxes(shape: Shape, lo: int, hi: int) -> list[tuple[tuple[slice, ...], int]]:
  """The C-order elements ``[lo, hi)`` of ``shape`` as boxes, each with its flat offset relative to ``lo``.

  Each box is itself a contiguous C-order range, the boxes follow each other
  in C order, and there are at most ``2 * len(shape) - 1`` of them: a partial
  row at the start, whole blocks in the middle, a partial row at the end,
  recursively. A 0-d shape has one element and one box ``()``.
  """
  shape = tuple(int(d) for d in shape)
  lo, hi = int(lo), int(hi)
  out: list[tuple[tuple[slice, ...], int]] = []

  def rec(prefix: tuple[slice, ...], dims: Shape, a: int, b: int, base: int) -> None:
    if a >= b:
      return
    if not dims:
      out.append((prefix, base))
      return
    inner = _prod(dims[1:])
    rest = tuple(slice(0, d) for d in dims[1:])
    i0, r0 = divmod(a, inner)
    i1, r1 = divmod(b, inner)
    if i0 == i1:
      rec(prefix + (slice(i0, i0 + 1),), dims[1:], r0, r1, base)
      return
    at = base
    if r0:
      rec(prefix + (slice(i0, i0 + 1),), dims[1:], r0, inner, at)
      at += inner - r0
      i0 += 1
    if i1 > i0:
      out.append((prefix + (slice(i0, i1),) + rest, at))
      at += (i1 - i0) * inner
    if r1:
      rec(prefix + (slice(i1, i1 + 1),), dims[1:], 0, r1, at)

  if not 0 <= lo <= hi <= (_prod(shape) if shape else 1):
    raise ValueError(f"range [{lo}, {hi}) is outside a leaf of shape {shape}")
  rec((), shape, lo, hi, 0)
  return out
