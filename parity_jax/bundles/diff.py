"""One stage's comparison: the dtype both sides are compared in, the statistics, and the tolerance rule's breaches."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from parity_jax import jsonio
from parity_jax.bundles.logits import LogitsStats
from parity_jax.bundles.qwen_graph import parse_stage
from parity_jax.bundles.tolerance import Profile, ToleranceRule
from parity_jax.arraydiff import DiffAccumulator, DiffStats, check_comparable, diff_stats, ulp_distance
from parity_jax.dtypes import is_float_dtype
from parity_jax.errors import UsageError

__all__ = [
    "Breach",
    "CHUNK_ELEMENTS",
    "boxes",
    "check_rule",
    "common_dtype",
    "is_logits",
    "max_ulp_in",
    "stage_stats",
    "ulp_dtype",
]

CHUNK_ELEMENTS = 1 << 20  # per-chunk element budget for the float64 reductions of a large stage (~8 MiB per temporary)


@dataclasses.dataclass(frozen=True)
class Breach:
  """One threshold a stage violates."""

  metric: str
  value: float | int
  limit: float | int

  def to_dict(self) -> dict[str, Any]:
    return {"metric": self.metric, "value": jsonio.num(self.value), "limit": jsonio.num(self.limit)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Breach":
    return cls(metric=d["metric"], value=jsonio.from_jsonable(d["value"]), limit=jsonio.from_jsonable(d["limit"]))

  def text(self) -> str:
    op = "<" if self.metric.startswith(("cosine", "argmax", "topk")) else ">"
    return f"{self.metric} {_g(self.value)} {op} {_g(self.limit)}"


def _g(x: Any) -> str:
  if isinstance(x, bool):
    return str(x).lower()
  if isinstance(x, int):
    return str(x)
  return f"{x:.3g}"


def _holds_exactly(wide: np.dtype, narrow: np.dtype) -> bool:
  """True when every value of float dtype ``narrow`` is exactly representable in ``wide``."""
  fw, fn = ml_dtypes.finfo(wide), ml_dtypes.finfo(narrow)
  return fw.nmant >= fn.nmant and fw.maxexp >= fn.maxexp and (fw.minexp - fw.nmant) <= (fn.minexp - fn.nmant)


def common_dtype(name: str, gd: np.dtype, cd: np.dtype, profile: Profile) -> np.dtype:
  """The dtype both sides of stage ``name`` are compared in: equal dtypes, or (profiles that widen) the narrowest float holding both exactly."""
  if gd == cd:
    return gd
  strict = f"stage {name!r}: dtype mismatch: golden {gd} vs candidate {cd}"
  if not profile.widen_dtypes:
    raise UsageError(f"{strict} (profile {profile.name!r} compares dtypes strictly; the bf16 profile widens exactly)")
  if not (is_float_dtype(gd) and is_float_dtype(cd)):
    raise UsageError(f"{strict} (only float dtypes can be widened)")
  for wide in (gd, cd, np.dtype(np.float32), np.dtype(np.float64)):
    if _holds_exactly(wide, gd) and _holds_exactly(wide, cd):
      return wide
  raise UsageError(f"{strict} (no float dtype holds both exactly)")


def is_logits(name: str) -> bool:
  """A logits-like stage (``logits`` or ``<anything>.logits``): gets KL, argmax and top-k statistics."""
  return parse_stage(name)[1].split(".")[-1] == "logits"


def ulp_dtype(golden_dtype: np.dtype, candidate_dtype: np.dtype) -> np.dtype:
  """The dtype ULPs are counted in: the narrower of the two (a bf16 candidate against an f32 golden: bf16).

  Counted in the wider dtype, an exactly rounded bf16 value sits ~32000 float32
  ULPs from its float32 original; in bf16 it is 0 ULPs away, which is the
  question a widened comparison asks.
  """
  if not (is_float_dtype(golden_dtype) and is_float_dtype(candidate_dtype)):
    return np.dtype(golden_dtype)
  return min((np.dtype(golden_dtype), np.dtype(candidate_dtype)), key=lambda d: ml_dtypes.finfo(d).nmant)


def max_ulp_in(a: np.ndarray, b: np.ndarray, dtype: np.dtype) -> int:
  """Largest ULP distance in ``dtype`` after rounding both sides to it (nearest even); bounded memory."""
  best = 0
  for _, sl in boxes(a.shape, CHUNK_ELEMENTS):
    with np.errstate(over="ignore", invalid="ignore"):
      x, y = a[sl].astype(dtype), b[sl].astype(dtype)
    if x.size:
      best = max(best, int(ulp_distance(x, y).max()))
  return best


def check_rule(
    rule: ToleranceRule, st: DiffStats, lg: LogitsStats | None, max_ulp: int | None = None
) -> tuple[Breach, ...]:
  """The thresholds of ``rule`` that ``st``/``lg`` violate. A one-sided NaN always breaches.

  ``max_ulp`` overrides ``st.max_ulp`` (a widened comparison counts ULPs in the narrower dtype: :func:`ulp_dtype`).
  """
  max_ulp = st.max_ulp if max_ulp is None else max_ulp
  out: list[Breach] = []
  if st.n_nan_mismatch:
    out.append(Breach("nan_mismatch", st.n_nan_mismatch, 0))
  if rule.bit_exact and st.n_diff:
    out.append(Breach("bit_diff", st.n_diff, 0))
  if rule.max_rel_l2 is not None and not st.rel_l2 <= rule.max_rel_l2:
    out.append(Breach("rel_l2", st.rel_l2, rule.max_rel_l2))
  if rule.min_cosine is not None and not st.cosine >= rule.min_cosine:
    out.append(Breach("cosine", st.cosine, rule.min_cosine))
  if rule.max_abs_diff is not None and not st.max_abs_diff <= rule.max_abs_diff:
    out.append(Breach("max_abs_diff", st.max_abs_diff, rule.max_abs_diff))
  if rule.max_ulp is not None and max_ulp is not None and max_ulp > rule.max_ulp:
    out.append(Breach("max_ulp", max_ulp, rule.max_ulp))
  if rule.max_frac_diff is not None and st.frac_diff > rule.max_frac_diff:
    out.append(Breach("frac_diff", st.frac_diff, rule.max_frac_diff))
  if lg is not None:
    if rule.max_kl is not None and not lg.kl_max <= rule.max_kl:
      out.append(Breach("kl_max", lg.kl_max, rule.max_kl))
    if rule.max_mean_kl is not None and not lg.kl_mean <= rule.max_mean_kl:
      out.append(Breach("kl_mean", lg.kl_mean, rule.max_mean_kl))
    if rule.min_argmax_agreement is not None and lg.argmax_agreement < rule.min_argmax_agreement:
      out.append(Breach("argmax_agreement", lg.argmax_agreement, rule.min_argmax_agreement))
    if rule.min_topk_overlap is not None and lg.topk_overlap_mean < rule.min_topk_overlap:
      out.append(Breach("topk_overlap", lg.topk_overlap_mean, rule.min_topk_overlap))
  return tuple(out)


def boxes(shape: tuple[int, ...], max_elems: int) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
  """Boxes (origin, slices) tiling ``shape`` in C order, each at most ``max_elems`` elements (or one row)."""
  nd = len(shape)
  inner = 1
  k = -1  # no mutate: a sentinel for "no axis is too big"; only its sign is read
  for ax in range(nd - 1, -1, -1):
    if inner * shape[ax] > max_elems:
      k = ax
      break
    inner *= shape[ax]
  if k < 0:
    yield (0,) * nd, tuple(slice(None) for _ in shape)
    return
  step = max(1, max_elems // inner)
  for outer in np.ndindex(*shape[:k]):
    for s in range(0, shape[k], step):
      e = min(s + step, shape[k])
      origin = tuple(outer) + (s,) + (0,) * (nd - k - 1)
      yield origin, tuple(slice(o, o + 1) for o in outer) + (slice(s, e),) + (slice(None),) * (nd - k - 1)


def stage_stats(a: np.ndarray, b: np.ndarray, top_k: int, name: str) -> DiffStats:
  """:func:`compare.diff_stats`, reduced in bounded chunks when the stage is large."""
  if a.size <= CHUNK_ELEMENTS:
    return diff_stats(a, b, top_k=top_k, name=name)
  check_comparable(a, b, name)
  acc = DiffAccumulator(a.shape, a.dtype, top_k=top_k)
  for origin, sl in boxes(a.shape, CHUNK_ELEMENTS):
    acc.update(a[sl], b[sl], origin=origin)
  return acc.result()
