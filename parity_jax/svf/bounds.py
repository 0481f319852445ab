"""Rigorous floating-point error bounds for the SVF formula, and explained mismatches.

Two correct float32 evaluations of the formula (torch with MKL, JAX with XLA)
may sum in different orders, so their float32 results may differ in the last
bits and, rarely, round to different bfloat16 values. This module decides,
element by element and without trusting either side, whether a difference is
such a legitimate rounding tie or a real bug.

Notation (all per tensor; ``u`` is the unit roundoff of the compute dtype,
2**-24 for float32; ``gamma(n) = n*u / (1 - n*u)``; exact arithmetic on the
float inputs ``U, S, V, o`` defines the true values)::

    ss_i = S_i (1 + o_i)        A = sum_i S_i      B = sum_i ss_i      N = A / B
    M_jl = sum_i U_ji ss_i V_li                    y_jl = M_jl * N
    T_jl = sum_i |U_ji ss_i V_li|

Any float evaluation, in any summation order, with or without FMA, satisfies
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 3.1 and 3.5):

* ``fl(1 + o_i)`` and ``fl(S_i * .)``: ``ss^_i = ss_i (1 + t)``, ``|t| <= gamma(2)``.
* ``A^ = fl(sum S_i)``: ``|A^ - A| <= gamma(k-1) sum|S_i|``; ``B^ = fl(sum ss^_i)``:
  ``|B^ - B| <= gamma(k-1) sum|ss^_i| + gamma(2) sum|ss_i| <= gamma(k+1) sum|ss_i|``.
* ``N^ = fl(A^ / B^) = N (1 + nu)`` with ``|nu| <= nu_max = (1 + rA)(1 + u) / (1 - rB) - 1``,
  ``rA = gamma(k-1) sum|S| / |A|``, ``rB = gamma(k+1) sum|ss| / |B|`` (needs ``rB < 1``).
* ``u_scaled^_ji = fl(U_ji ss^_i) = U_ji ss_i (1 + t)``, ``|t| <= gamma(3)``, and the
  dot product gives ``|M^ - M| <= gamma(k) (1 + gamma(3)) T + gamma(3) T <= gamma(k+3) T``.
* ``y^ = fl(M^ N^)``, so
  ``|y^ - y| <= beta = |M N| (nu_max + u + nu_max u) + gamma(k+3) T |N| (1 + nu_max)(1 + u) + floor``,
  where ``floor = (k + 8) 2**-126 max(1, |N|)`` covers flush-to-zero of subnormals (XLA
  CPU flushes them; torch does not).

**Explained mismatch.** Our bf16 value ``a`` and the golden's ``b`` differ. If
both come from correct float32 evaluations ``y^1``, ``y^2`` rounded to nearest,
then ``y^1`` lies in ``a``'s rounding interval, ``y^2`` in ``b``'s, and both
within ``beta`` of ``y``. We compute ``ref`` (``y`` in float64 from the same
inputs, with its own bound ``eps64``: the same formula at ``u = 2**-53``) and
call the element *explained* iff both rounding intervals reach into
``[ref - beta - eps64, ref + beta + eps64]``. When ``a`` and ``b`` are 1 ULP
apart (the usual case) that is exactly: the float64 reference lies within the
float32 error bound of the bf16 rounding midpoint ``mid = (a + b) / 2`` -- a
rounding tie either side could legitimately resolve. Two values 2+ ULPs apart
can only qualify where ``beta`` itself spans several bf16 ULPs: elements near
zero after heavy cancellation (``|y| << T``), where two correct float32
evaluations really do land several bf16 ULPs apart (numpy's BLAS against
XLA at k = 600 shows it). Those are counted separately, and
``rule="one_ulp"`` refuses them (the strict reading). Everything else is
*unexplained*: a real difference in what was computed. The test is necessary
for legitimate rounding, so no correct implementation is ever flagged; a bug
(wrong offset, swapped or transposed factor, wrong normalization) moves
``y^`` by far more than ``beta`` on most elements.

**Stage tolerances.** For the float32 stages the same analysis gives bounds
per element that are cheap enough for every element of a 151936 x 1024
tensor: ``T_jl`` is replaced by its Cauchy-Schwarz bound
``C_jl = ||u_scaled_j||_2 ||V_l||_2 >= T_jl`` (an outer product of row norms,
looser by about pi/2 for random data), and the tolerance between two correct
evaluations is twice the one-sided bound. Stages that are a single IEEE
operation on identical inputs (``scaled_s``, ``u_scaled``) and stages that are
inputs (``offsets_f32``, ``source_f32``) must be bit-identical.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_dtypes
import numpy as np

from parity_jax.arraydiff import ulp_distance
from parity_jax.dtypes import BF16

__all__ = [
    "EXPLAIN_RULES",
    "FormulaConstants",
    "MismatchAccounting",
    "gamma",
    "matmul_tolerance",
    "adapted_tolerance",
    "normalization_tolerance",
    "row_norms",
    "unit_roundoff",
]

_TINY = 2.0**-126  # smallest normal float32 / bfloat16
_U64 = 2.0**-53
_SAFETY = 1.0 + 2.0**-30  # covers the float64 evaluation of the bounds themselves


def unit_roundoff(dtype: Any) -> float:
  """``u = 2**-p`` for a ``p``-bit significand (float32: 2**-24, bfloat16: 2**-8)."""
  return float(ml_dtypes.finfo(np.dtype(dtype)).eps) / 2.0


def gamma(n: int, u: float) -> float:
  """``n u / (1 - n u)``; infinite when ``n u >= 1`` (no bound)."""
  nu = n * u
  return math.inf if nu >= 1.0 else nu / (1.0 - nu)


def _rel_normalization_bound(k: int, u: float, s: np.ndarray, ss: np.ndarray) -> float:
  a = float(np.sum(s))
  b = float(np.sum(ss))
  if a == 0.0 or b == 0.0 or not math.isfinite(a) or not math.isfinite(b):
    return math.inf
  r_a = gamma(max(k - 1, 0), u) * float(np.sum(np.abs(s))) / abs(a)
  r_b = gamma(k + 1, u) * float(np.sum(np.abs(ss))) / abs(b)
  if r_b >= 1.0:
    return math.inf
  return (1.0 + r_a) * (1.0 + u) / (1.0 - r_b) - 1.0


@dataclasses.dataclass(frozen=True)
class FormulaConstants:
  """Per-tensor float64 quantities every element's bound uses."""

  k: int
  u: float  # unit roundoff of the compute dtype
  compute_dtype: str
  ss64: np.ndarray  # S (1 + o) in float64, from the compute-dtype inputs
  n64: float  # the normalization A / B in float64
  nu: float  # |N^ / N - 1| <= nu for any correct compute-dtype evaluation
  nu64: float  # the same for the float64 reference

  @classmethod
  def from_components(cls, s: Any, offsets: Any, compute_dtype: Any = np.float32) -> "FormulaConstants":
    cd = np.dtype(compute_dtype)
    s64 = np.asarray(s).astype(cd).astype(np.float64)
    o64 = np.asarray(offsets).astype(cd).astype(np.float64)
    ss64 = s64 * (1.0 + o64)
    k = int(s64.shape[0])
    a, b = float(np.sum(s64)), float(np.sum(ss64))
    n64 = a / b if b != 0.0 else math.inf
    u = unit_roundoff(cd)
    return cls(
        k=k,
        u=u,
        compute_dtype=str(cd),
        ss64=ss64,
        n64=n64,
        nu=_rel_normalization_bound(k, u, s64, ss64),
        nu64=_rel_normalization_bound(k, _U64, s64, ss64),
    )

  def _floor(self) -> float:
    return (self.k + 8) * _TINY * max(1.0, abs(self.n64))

  def value_bound(
      self, abs_m: np.ndarray, t: np.ndarray, u: float | None = None, nu: float | None = None
  ) -> np.ndarray:
    """One-sided bound ``beta`` on ``|y^ - y|`` given ``|M|`` and ``T`` (arrays)."""
    u = self.u if u is None else u
    nu = self.nu if nu is None else nu
    n = abs(self.n64)
    g = gamma(self.k + 3, u)
    with np.errstate(invalid="ignore", over="ignore"):
      beta = abs_m * n * (nu + u + nu * u) + g * t * n * (1.0 + nu) * (1.0 + u) + self._floor()
    return beta * _SAFETY

  def reference_bound(self, abs_m: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Bound on the float64 reference's own error."""
    return self.value_bound(abs_m, t, u=_U64, nu=self.nu64)


def normalization_tolerance(fc: FormulaConstants) -> float:
  """Largest ``|N^1 - N^2|`` between two correct evaluations: ``2 nu |N|``."""
  return 2.0 * fc.nu * abs(fc.n64) * _SAFETY


def matmul_tolerance(row_norms_a: np.ndarray, row_norms_v: np.ndarray, k: int, u: float) -> np.ndarray:
  """``[rows, n]`` tolerance between two correct dots of identical inputs.

  ``2 gamma(k) ||a_j|| ||V_l||`` (Cauchy-Schwarz bound of ``gamma(k) sum|a_ji V_li|``
  per side) plus the subnormal floor.
  """
  g = gamma(k, u)
  return (2.0 * g * np.outer(row_norms_a, row_norms_v) + 2 * (k + 8) * _TINY) * _SAFETY


def adapted_tolerance(row_norms_us: np.ndarray, row_norms_v: np.ndarray, fc: FormulaConstants) -> np.ndarray:
  """``[rows, n]`` tolerance for ``adapted = fl(M^ N^)`` between two correct evaluations.

  Each side is within ``|M'| |N| (nu + u + nu u) + gamma(k) C |N| (1 + nu)(1 + u)``
  of ``M' N`` (``M'`` the exact dot of the identical ``u_scaled``), with
  ``|M'| <= C = ||u_scaled_j|| ||V_l||``.
  """
  c = np.outer(row_norms_us, row_norms_v)
  n, nu, u = abs(fc.n64), fc.nu, fc.u
  one_side = c * n * (nu + u + nu * u) + gamma(fc.k, u) * c * n * (1.0 + nu) * (1.0 + u) + fc._floor()
  return 2.0 * one_side * _SAFETY


def check_bound(golden: Any, ours: Any, tol: np.ndarray | float) -> tuple[int, float]:
  """``(elements out of tolerance, max |ours - golden| / tol)`` for a ``bound`` stage.

  The tolerance is inclusive: ``|ours - golden| <= tol`` passes, so a value
  exactly at the rigorous bound is a correct evaluation. Identical values
  (NaN payloads aside: NaN on both sides) pass whatever ``tol``; a NaN on one
  side fails. Differences are taken in float64, where they are exact for
  float32 inputs.
  """
  g = np.asarray(golden, dtype=np.float64)
  o = np.asarray(ours, dtype=np.float64)
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    d = np.abs(g - o)
    same = (g == o) | (np.isnan(g) & np.isnan(o))
    ok = same | (d <= tol)
    ratio = np.where(same, 0.0, d / tol)
  worst = float(np.nanmax(np.where(np.isnan(ratio), np.inf, ratio))) if ratio.size else 0.0
  return int(np.count_nonzero(~ok)), worst


EXPLAIN_RULES = ("bound", "one_ulp")


def row_norms(a: np.ndarray) -> np.ndarray:
  """Euclidean norm of every row, in float64 (the Cauchy-Schwarz factors of the bounds)."""
  a = np.asarray(a, dtype=np.float64)
  return np.sqrt(np.einsum("ij,ij->i", a, a))


def _rounding_interval(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``[lo, hi]``: every real value that rounds to bf16 ``x`` (round to nearest; ends included).

  Half-way to each bf16 neighbour; +0 and -0 share ``[-h, h]`` with ``h`` half the
  smallest subnormal. The neighbours of the largest finite value are infinite.
  """
  up = np.nextafter(x, np.array(np.inf, BF16)).astype(np.float64)
  down = np.nextafter(x, np.array(-np.inf, BF16)).astype(np.float64)
  x64 = x.astype(np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    lo = np.where(np.isinf(down), -np.inf, 0.5 * (x64 + down))
    hi = np.where(np.isinf(up), np.inf, 0.5 * (x64 + up))
  return lo, hi


class _Mismatches:
  """The differing elements of one update: positions, both bf16 values, their ULP distance and rounding intervals."""

  def __init__(self, rows: np.ndarray, cols: np.ndarray, g: np.ndarray, o: np.ndarray):
    self.rows, self.cols = rows, cols
    self.g64, self.o64 = g.astype(np.float64), o.astype(np.float64)
    self.finite = np.isfinite(self.g64) & np.isfinite(self.o64)
    self.ulp = ulp_distance(g, o)
    self.lo_g, self.hi_g = _rounding_interval(g)
    self.lo_o, self.hi_o = _rounding_interval(o)


class MismatchAccounting:
  """Explained/unexplained accounting of final bf16 differences, chunk by chunk.

  An element where our bf16 value ``a`` and the golden's ``b`` differ is
  *explained* when both are correct roundings of some value within
  ``beta + eps64`` of the float64 reference (see the module docstring): the
  rounding intervals of ``a`` and of ``b`` both reach into
  ``[ref - beta - eps64, ref + beta + eps64]``. For two adjacent bf16 values
  (1 ULP apart) this is exactly ``|ref - mid| <= beta + eps64`` -- a rounding
  tie either side could resolve. Values 2+ ULPs apart can only qualify where
  the float32 bound itself spans several bf16 ULPs, which happens at elements
  near zero after heavy cancellation (``|y| << T``); ``rule="one_ulp"``
  refuses those too (the strict reading: exactly 1 ULP or unexplained).

  :meth:`update` takes a block of rows in SOURCE orientation (rows of ``U``):
  the golden's and our ``final_bf16`` bit patterns, the matching rows of ``U``
  and the whole ``V`` as ``[n, k]``. Only differing elements cost anything:
  their reference value and ``T`` come from one length-``k`` dot each, after a
  cheap Cauchy-Schwarz pre-check has ruled out pairs too far apart for any bound.
  """

  def __init__(self, fc: FormulaConstants, rule: str = "bound", keep: int = 8, batch_elems: int = 1 << 23):
    if rule not in EXPLAIN_RULES:
      raise ValueError(f"unknown rule {rule!r}")
    if isinstance(batch_elems, bool) or not isinstance(batch_elems, int) or batch_elems < 1:
      raise ValueError(f"batch_elems must be a positive int, got {batch_elems!r}")
    self.fc = fc
    self.rule = rule
    self.keep = keep
    self.batch_elems = batch_elems
    self.n_mismatch = 0
    self.n_explained_tie = 0  # 1 ULP apart (or +0/-0), reference within the bound of the midpoint
    self.n_explained_multi_ulp = 0  # 2+ ULPs apart, both within the bound (cancellation near zero)
    self.n_unexplained = 0
    self.n_nonfinite = 0  # unexplained: NaN/inf on either side
    self.n_outside_bound = 0  # unexplained: not both correct roundings within the bound
    self.n_multi_ulp_refused = 0  # unexplained only under rule="one_ulp"
    self.max_ulp_explained = 0
    self.max_explained_ratio = 0.0  # max over explained elements of (distance to reference) / bound
    self.unexplained_examples: list[dict[str, Any]] = []
    self.explained_examples: list[dict[str, Any]] = []

  @property
  def n_explained(self) -> int:
    return self.n_explained_tie + self.n_explained_multi_ulp

  def update(
      self, golden_bits: np.ndarray, ours_bits: np.ndarray, u_rows: np.ndarray, v_nk: np.ndarray, row_offset: int = 0
  ) -> None:
    """``golden_bits``/``ours_bits``: ``[rows, n]`` uint16 bf16 bit patterns (NaN policies aligned)."""
    rows, cols = np.nonzero(golden_bits != ours_bits)
    if rows.size == 0:
      return
    self.n_mismatch += int(rows.size)
    m = _Mismatches(rows, cols, golden_bits[rows, cols].view(BF16), ours_bits[rows, cols].view(BF16))
    reachable = self._reachable(m, u_rows, v_nk)
    ratio, ref, bound = self._ratios(m, reachable, u_rows, v_nk)
    within = reachable & (ratio <= 1.0)
    tie = m.ulp <= 1
    explained = within & (tie | (self.rule == "bound"))
    self.n_nonfinite += int(np.count_nonzero(~m.finite))
    self.n_explained_tie += int(np.count_nonzero(explained & tie))
    self.n_explained_multi_ulp += int(np.count_nonzero(explained & ~tie))
    self.n_multi_ulp_refused += int(np.count_nonzero(within & ~explained))
    self.n_outside_bound += int(np.count_nonzero(m.finite & ~within))
    self.n_unexplained += int(rows.size) - int(np.count_nonzero(explained))
    if explained.any():
      self.max_explained_ratio = max(self.max_explained_ratio, float(ratio[explained].max()))
      self.max_ulp_explained = max(self.max_ulp_explained, int(m.ulp[explained].max()))
    self._keep_examples(m, explained, ratio, ref, bound, golden_bits, ours_bits, row_offset)

  def _reachable(self, m: "_Mismatches", u_rows: np.ndarray, v_nk: np.ndarray) -> np.ndarray:
    """Cheap necessary condition: the reference interval (width 2 beta') must reach both rounding intervals.

    beta' <= its value at ``|M| = T = C`` (Cauchy-Schwarz), ``C`` the product of the row norms.
    """
    cd = np.dtype(self.fc.compute_dtype)
    ur, uc = np.unique(m.rows), np.unique(m.cols)
    c = row_norms(np.asarray(u_rows)[ur].astype(cd).astype(np.float64) * self.fc.ss64[None, :])[
        np.searchsorted(ur, m.rows)
    ]
    c = c * row_norms(np.asarray(v_nk)[uc].astype(cd).astype(np.float64))[np.searchsorted(uc, m.cols)]
    beta_max = self.fc.value_bound(c, c) + self.fc.reference_bound(c, c)
    with np.errstate(invalid="ignore"):
      gap = np.maximum(m.lo_g - m.hi_o, m.lo_o - m.hi_g)  # > 0 when the two intervals are disjoint
      return m.finite & (gap <= 2.0 * beta_max)

  def _ratios(
      self, m: "_Mismatches", reachable: np.ndarray, u_rows: np.ndarray, v_nk: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per mismatch: (distance of the float64 reference to the farther rounding interval) / bound, the reference, the bound.

    One length-``k`` dot per reachable mismatch, in batches of ``batch_elems``; unreachable ones get ratio inf.
    """
    cd = np.dtype(self.fc.compute_dtype)
    ratio = np.full(m.rows.shape, np.inf)
    ref = np.full(m.rows.shape, np.nan)
    bound = np.full(m.rows.shape, np.nan)
    cand = np.flatnonzero(reachable)
    step = max(1, self.batch_elems // max(1, self.fc.k))
    for start in range(0, cand.size, step):
      sel = cand[start : start + step]
      # the reference sees the inputs as the computation does: rounded to the compute dtype
      uu = np.asarray(u_rows[m.rows[sel]]).astype(cd).astype(np.float64)
      vv = np.asarray(v_nk[m.cols[sel]]).astype(cd).astype(np.float64)
      terms = uu * self.fc.ss64[None, :] * vv
      dot = terms.sum(axis=1)
      t = np.abs(terms).sum(axis=1)
      r = dot * self.fc.n64
      b = self.fc.value_bound(np.abs(dot), t) + self.fc.reference_bound(np.abs(dot), t)
      # distance from the reference to each rounding interval (0 inside it)
      d = np.maximum(
          np.maximum(0.0, np.maximum(m.lo_g[sel] - r, r - m.hi_g[sel])),
          np.maximum(0.0, np.maximum(m.lo_o[sel] - r, r - m.hi_o[sel])),
      )
      ref[sel], bound[sel] = r, b
      with np.errstate(invalid="ignore", divide="ignore"):
        ratio[sel] = d / b
    return ratio, ref, bound

  def _keep_examples(
      self,
      m: "_Mismatches",
      explained: np.ndarray,
      ratio: np.ndarray,
      ref: np.ndarray,
      bound: np.ndarray,
      golden_bits: np.ndarray,
      ours_bits: np.ndarray,
      row_offset: int,
  ) -> None:
    """The first unexplained mismatches, and the explained ones closest to their bound (chunking-independent)."""

    def record(i: int, ok: bool) -> dict[str, Any]:
      r, c = int(m.rows[i]), int(m.cols[i])
      return {
          "index_source": [r + int(row_offset), c],
          "golden": float(m.g64[i]),
          "ours": float(m.o64[i]),
          "golden_bits": f"0x{int(golden_bits[r, c]):04x}",
          "ours_bits": f"0x{int(ours_bits[r, c]):04x}",
          "ulp": int(m.ulp[i]) if m.finite[i] else None,
          "reference_f64": None if math.isnan(ref[i]) else float(ref[i]),
          "bound": None if math.isnan(bound[i]) else float(bound[i]),
          "ratio": None if not math.isfinite(ratio[i]) else float(ratio[i]),
          "explained": ok,
      }

    bad = np.flatnonzero(~explained)
    for i in bad[: max(0, self.keep - len(self.unexplained_examples))]:
      self.unexplained_examples.append(record(int(i), False))
    good = np.flatnonzero(explained)
    if good.size:
      # Ranked by (-ratio, index) over everything seen, so chunking does not change them.
      order = good[np.lexsort((m.rows[good] * golden_bits.shape[1] + m.cols[good], -ratio[good]))][: self.keep]
      pool = self.explained_examples + [record(int(i), True) for i in order]
      pool.sort(key=lambda e: (-e["ratio"], e["index_source"]))
      self.explained_examples = pool[: self.keep]

  def to_dict(self) -> dict[str, Any]:
    return {
        "rule": self.rule,
        "n_mismatch": self.n_mismatch,
        "n_explained": self.n_explained,
        "n_explained_tie": self.n_explained_tie,
        "n_explained_multi_ulp": self.n_explained_multi_ulp,
        "n_unexplained": self.n_unexplained,
        "n_nonfinite": self.n_nonfinite,
        "n_outside_bound": self.n_outside_bound,
        "n_multi_ulp_refused": self.n_multi_ulp_refused,
        "max_ulp_explained": self.max_ulp_explained,
        "max_explained_ratio": self.max_explained_ratio,
        "unit_roundoff": self.fc.u,
        "normalization_rel_bound": self.fc.nu,
        "unexplained_examples": self.unexplained_examples,
        "explained_examples": self.explained_examples,
    }
