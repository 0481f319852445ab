"""Stage-bundle comparison: every stage, element by element, in execution order, with a verdict.

``compare_bundles(golden, candidate, profile="f32")`` compares two stage
bundles (paths in the :mod:`parity_jax.bundles.format` format, plain
safetensors or ``.npz`` files, :class:`~parity_jax.bundles.StageBundle`
objects or plain dicts of arrays) and returns a
:class:`~parity_jax.bundles.BundleReport`:

* one :class:`~parity_jax.bundles.StageRow` per common stage, in the model's
  execution order (the bundle's ``stage_order`` metadata, else inferred for
  Qwen stage names; never alphabetical), with
  :func:`parity_jax.arraydiff.diff_stats` statistics, the tolerance rule that
  applied, the breaches, and the rel-L2 growth across the stage;
* for logits, :class:`~parity_jax.bundles.LogitsStats` (per-token KL, argmax
  agreement, top-k overlap);
* the :class:`~parity_jax.bundles.Verdict`: pass, or the first divergent
  stage and whether it is a jump or accumulated drift (rule in
  :mod:`parity_jax.bundles.verdict`).

Bad input (missing or unreadable files, empty bundles, a shape or dtype
mismatch on a stage, stages present on one side only unless
``allow_missing=True``, no common stages) raises a one-line
:class:`~parity_jax.errors.UsageError` before anything is computed.
Path inputs are read one stage at a time, so memory holds two stages, not two
bundles; large stages are reduced in bounded float64 chunks.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from parity_jax.bundles.diff import Breach, check_rule, common_dtype, is_logits, max_ulp_in, stage_stats, ulp_dtype
from parity_jax.bundles.format import BundleReader, StageBundle, load_bundle
from parity_jax.bundles.logits import LogitsStats, logits_stats
from parity_jax.bundles.qwen_graph import is_qwen_stage_name, parse_stage, qwen_stage_sort_key
from parity_jax.bundles.bundle_report import BundleReport, SourceInfo, StageRow
from parity_jax.bundles.tolerance import Profile, ToleranceRule, resolve_profile
from parity_jax.bundles.verdict import StageError, analyse
from parity_jax.arraydiff import DiffStats
from parity_jax.dtypes import is_float_dtype
from parity_jax.errors import UsageError, first_line
from parity_jax.progress import progress

__all__ = ["OneSidedStagesError", "compare_bundles"]


class OneSidedStagesError(UsageError):
  """Stages present on one side only, without ``allow_missing``; :meth:`hint` names the caller's switch."""

  def __init__(self, where: str, n_common: int, switch: str = "allow_missing=True"):
    self.where, self.n_common = where, n_common
    super().__init__(f"stages present on one side only ({where}); {switch} compares the {n_common} common stages")

  def hint(self, switch: str) -> "OneSidedStagesError":
    """The same error naming ``switch`` (a tool's flag) as the way to compare the common stages."""
    return OneSidedStagesError(self.where, self.n_common, switch)


class _Source:
  """Uniform read access to one side: a lazy file, an in-memory bundle or a dict."""

  def __init__(self, obj: Any, side: str):
    self.side = side
    self._reader: BundleReader | None = None
    self._arrays: Mapping[str, Any] | None = None
    if isinstance(obj, (str, os.PathLike)):
      path = os.fspath(obj)
      self.label = path
      if path.endswith(".npz"):
        b = load_bundle(path)
        self._arrays, self.names, self.ordered, self.provenance = b, b.names, b.ordered, b.provenance
      else:
        self._reader = BundleReader(path)
        self.names, self.ordered, self.provenance = (
            list(self._reader.names),
            self._reader.has_order,
            self._reader.provenance,
        )
    elif isinstance(obj, StageBundle):
      self.label = "in-memory StageBundle"  # its producer, from the provenance, is shown beside it
      self._arrays, self.names, self.ordered, self.provenance = obj, obj.names, obj.ordered, obj.provenance
    elif isinstance(obj, Mapping):
      self.label = "in-memory dict"
      for k in obj:
        if not isinstance(k, str) or not k:
          raise UsageError(f"{side}: stage names must be non-empty strings, got {k!r}")
      self._arrays, self.names, self.ordered, self.provenance = obj, list(obj), False, {}
    else:
      raise UsageError(f"{side} must be a path, a StageBundle or a dict of arrays, got {type(obj).__name__}")
    if not self.names:
      raise UsageError(f"{side} bundle {self.label} has no stages")

  def shape(self, name: str) -> tuple[int, ...]:
    if self._reader is not None:
      return tuple(self._reader.shape(name))
    return tuple(np.shape(self._arrays[name]))

  def dtype(self, name: str) -> np.dtype:
    if self._reader is not None:
      try:
        return np.dtype(self._reader.dtype(name))
      except KeyError:
        raise UsageError(f"stage {name!r}: {self.side} {self.label} stores a dtype numpy cannot hold") from None
    value = self._arrays[name]
    return (
        np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
    )  # no device copy for jax arrays

  def get(self, name: str) -> np.ndarray:
    if self._reader is not None:
      try:
        return np.asarray(self._reader.get(name))
      except UsageError:
        raise
      except Exception as e:  # noqa: BLE001 -- a truncated or corrupt data section
        raise UsageError(f"stage {name!r}: cannot read it from {self.label}: {first_line(e)}") from None
    return np.asarray(self._arrays[name])

  def close(self) -> None:
    if self._reader is not None:
      self._reader.close()


def _infer_order(names: Sequence[str]) -> tuple[list[str], str]:
  """Execution order for names without ``stage_order`` metadata.

  Qwen stage names are ordered by :func:`qwen_stage_sort_key`; other names
  keep the order the source gave them (after the Qwen names), never sorted
  alphabetically.
  """
  pos = {n: i for i, n in enumerate(names)}
  if all(is_qwen_stage_name(n) for n in names):
    return sorted(names, key=qwen_stage_sort_key), "inferred_qwen"

  def key(n: str) -> tuple:
    return qwen_stage_sort_key(n) if is_qwen_stage_name(n) else (3, pos[n], 0, "")

  return sorted(names, key=key), "inferred_qwen_then_source"


def compare_bundles(
    golden: Any,
    candidate: Any,
    profile: Profile | str | Mapping[str, Any] = "f32",
    top_k: int = 5,
    stages: str | None = None,
    allow_missing: bool = False,
    order: Sequence[str] | None = None,
    progress: bool = False,
) -> BundleReport:
  """Compares every common stage of ``candidate`` against ``golden``.

  Args:
    golden, candidate: paths (stage bundle / plain safetensors / ``.npz``),
      :class:`StageBundle` objects or dicts name -> array.
    profile: ``"f32"``, ``"bf16"``, ``"exact"``, a :class:`Profile`, a profile
      dict or a profile JSON path (see :mod:`parity_jax.bundles.tolerance`).
    top_k: divergences kept per stage.
    stages: optional regular expression; only stage names it matches
      (``re.search``) are compared.
    allow_missing: compare the common stages when some stages exist on one
      side only (they are listed in the report); by default that is an error.
    order: explicit execution order (overrides metadata and inference).
    progress: show a byte progress bar (rate, ETA) on stderr.

  Raises:
    UsageError: bad input, before any statistic is computed.
  """
  prof = resolve_profile(profile)
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise UsageError(f"top_k must be a non-negative integer, got {top_k!r}")
  gs = _Source(golden, "golden")
  try:
    cs = _Source(candidate, "candidate")
  except BaseException:
    gs.close()
    raise
  try:
    return _compare(gs, cs, prof, top_k, stages, allow_missing, order, progress)
  finally:
    gs.close()
    cs.close()


def _compare(
    gs: _Source,
    cs: _Source,
    prof: Profile,
    top_k: int,
    stage_filter: str | None,
    allow_missing: bool,
    order: Sequence[str] | None,
    progress: bool,
) -> BundleReport:
  common, only_g, only_c = _common_stages(gs, cs, stage_filter, allow_missing)
  ordered, order_source = _execution_order(common, gs, cs, order)
  plan = _plan(ordered, gs, cs, prof)
  results = _measure(plan, gs, cs, top_k, progress)
  errors = {
      r.name: StageError(rel_l2=r.stats.rel_l2, bit_equal=r.stats.bit_equal, breached=bool(r.breaches)) for r in results
  }
  growth, verdict = analyse([r.name for r in results], errors, prof.jump_factor, prof.noise_floor)
  rows = []
  for i, r in enumerate(results):
    layer, stage = parse_stage(r.name)
    g = growth[r.name]
    rows.append(
        StageRow(
            index=i,
            name=r.name,
            layer=layer,
            stage=stage,
            golden_dtype=str(r.golden_dtype),
            candidate_dtype=str(r.candidate_dtype),
            stats=r.stats,
            rule=r.rule,
            breaches=r.breaches,
            growth=g.growth,
            ref_stage=g.ref_stage,
            jump=g.jump,
            logits=r.logits,
            max_ulp=r.max_ulp,
            ulp_dtype=r.ulp_dtype,
        )
    )
  return BundleReport(
      rows=rows,
      verdict=verdict,
      profile=prof,
      golden=SourceInfo(gs.label, _producer(gs.provenance), len(gs.names), gs.ordered),
      candidate=SourceInfo(cs.label, _producer(cs.provenance), len(cs.names), cs.ordered),
      order_source=order_source,
      only_golden=only_g,
      only_candidate=only_c,
      stage_filter=stage_filter,
      top_k=top_k,
  )


def _common_stages(
    gs: _Source, cs: _Source, stage_filter: str | None, allow_missing: bool
) -> tuple[list[str], list[str], list[str]]:
  """(common stages in golden order, only-golden, only-candidate), after the filter; one-sided stages refused unless allowed."""
  gnames, cnames = list(gs.names), list(cs.names)
  if stage_filter is not None:
    try:
      rx = re.compile(stage_filter)
    except re.error as e:
      raise UsageError(f"stage filter is not a valid regular expression ({e}): {stage_filter!r}") from None
    gnames = [n for n in gnames if rx.search(n)]
    cnames = [n for n in cnames if rx.search(n)]
    if not gnames and not cnames:
      raise UsageError(f"stage filter {stage_filter!r} matches no stage in either bundle")
  gset, cset = set(gnames), set(cnames)
  only_g = [n for n in gnames if n not in cset]
  only_c = [n for n in cnames if n not in gset]
  common = [n for n in gnames if n in cset]
  if not common:
    raise UsageError(f"no common stages: golden has {_few(gnames)}, candidate has {_few(cnames)}")
  if (only_g or only_c) and not allow_missing:
    parts = []
    if only_g:
      parts.append(f"only in golden: {_few(only_g)}")
    if only_c:
      parts.append(f"only in candidate: {_few(only_c)}")
    raise OneSidedStagesError("; ".join(parts), len(common))
  return common, only_g, only_c


def _execution_order(common: list[str], gs: _Source, cs: _Source, order: Sequence[str] | None) -> tuple[list[str], str]:
  """The compared stages in execution order, and where that order came from."""
  if order is not None:
    order = list(order)
    missing = [n for n in common if n not in set(order)]
    if missing:
      raise UsageError(f"explicit order does not list {_few(missing)}")
    return [n for n in order if n in set(common)], "explicit"
  if gs.ordered:
    return list(common), "golden_metadata"
  if cs.ordered:
    pos = {n: i for i, n in enumerate(cs.names)}
    return sorted(common, key=lambda n: pos[n]), "candidate_metadata"
  return _infer_order(common)


# no mutate: frozen only guards a private plan row that is built once and never written; no behaviour depends on it
@dataclasses.dataclass(frozen=True)  # no mutate
class _Planned:
  name: str
  golden_dtype: np.dtype
  candidate_dtype: np.dtype
  compare_dtype: np.dtype
  rule: ToleranceRule
  want_logits: bool


# no mutate: frozen only guards a private measurement that is built once and never written (as _Planned above)
@dataclasses.dataclass(frozen=True)  # no mutate
class _Measured:
  name: str
  golden_dtype: np.dtype
  candidate_dtype: np.dtype
  stats: DiffStats
  rule: ToleranceRule
  logits: LogitsStats | None
  breaches: tuple[Breach, ...]
  max_ulp: int | None
  ulp_dtype: str


def _plan(ordered: list[str], gs: _Source, cs: _Source, prof: Profile) -> list[_Planned]:
  """Fail fast: shapes, dtypes and rules of every stage, before any statistic."""
  plan = []
  for name in ordered:
    gshape, cshape = gs.shape(name), cs.shape(name)
    if gshape != cshape:
      raise UsageError(f"stage {name!r}: shape mismatch: golden {gshape} vs candidate {cshape}")
    gd, cd = gs.dtype(name), cs.dtype(name)
    cmp_dtype = common_dtype(name, gd, cd, prof)
    if cmp_dtype.kind in "cOUSV" and not is_float_dtype(cmp_dtype):
      raise UsageError(f"stage {name!r}: unsupported dtype {cmp_dtype} for element-wise statistics")
    rule = prof.rule_for(name)
    want_logits = (rule.wants_logits_stats or is_logits(name)) and is_float_dtype(cmp_dtype)
    if want_logits and (len(gshape) < 1 or gshape[-1] == 0):
      if rule.wants_logits_stats:
        raise UsageError(f"stage {name!r}: logits thresholds need a vocabulary axis, shape is {gshape}")
      want_logits = False
    plan.append(_Planned(name, gd, cd, cmp_dtype, rule, want_logits))
  return plan


def _measure(plan: list[_Planned], gs: _Source, cs: _Source, top_k: int, show_progress: bool) -> list[_Measured]:
  """Statistics and breaches per stage, two stages in memory at a time."""

  def nbytes(p: _Planned) -> int:
    return int(np.prod(gs.shape(p.name), dtype=np.int64)) * (p.golden_dtype.itemsize + p.candidate_dtype.itemsize)

  results = []
  with progress(sum(nbytes(p) for p in plan), "compare stages", enabled=show_progress) as bar:
    for i, p in enumerate(plan):
      a, b = gs.get(p.name), cs.get(p.name)
      a = a if a.dtype == p.compare_dtype else a.astype(p.compare_dtype)
      b = b if b.dtype == p.compare_dtype else b.astype(p.compare_dtype)
      st = stage_stats(a, b, top_k, p.name)
      lg = logits_stats(a, b, topk=p.rule.topk) if p.want_logits else None
      udt = ulp_dtype(p.golden_dtype, p.candidate_dtype)
      max_ulp = st.max_ulp if udt == p.compare_dtype or st.max_ulp is None else max_ulp_in(a, b, udt)
      results.append(
          _Measured(
              p.name,
              p.golden_dtype,
              p.candidate_dtype,
              st,
              p.rule,
              lg,
              check_rule(p.rule, st, lg, max_ulp),
              max_ulp,
              str(udt),
          )
      )
      bar.update(nbytes(p))
      bar.set_postfix_str(f"{i + 1}/{len(plan)} stages")
      del a, b
  return results


def _producer(prov: Mapping[str, Any]) -> str | None:
  p = prov.get("producer") if isinstance(prov, Mapping) else None
  return None if p is None else str(p)


def _few(names: Sequence[str], n: int = 4) -> str:
  if not names:
    return "nothing"
  head = ", ".join(names[:n])
  return f"{head} (+{len(names) - n} more)" if len(names) > n else head
