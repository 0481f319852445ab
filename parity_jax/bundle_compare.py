"""Stage-bundle comparison: every stage, element by element, in execution order, with a verdict.

``compare_bundles(golden, candidate, profile="f32")`` compares two stage
bundles (paths in the :mod:`parity_jax.stages` format, plain safetensors or
``.npz`` files, :class:`~parity_jax.stages.StageBundle` objects or plain
dicts of arrays) and returns a :class:`BundleReport`:

* one :class:`StageRow` per common stage, in the model's execution order
  (the bundle's ``stage_order`` metadata, else inferred for Qwen stage names;
  never alphabetical), with :func:`parity_jax.compare.diff_stats` statistics,
  the tolerance rule that applied, the breaches, and the rel-L2 growth across
  the stage;
* for logits, :class:`~parity_jax.logit_stats.LogitsStats` (per-token KL,
  argmax agreement, top-k overlap);
* the :class:`~parity_jax.bisect.Verdict`: pass, or the first divergent
  stage and whether it is a jump or accumulated drift (rule in
  :mod:`parity_jax.bisect`);
* ``to_json()`` / :meth:`BundleReport.from_json` (schema
  ``parity_jax.bundle_report/1``), ``to_text()``, ``plot(path)`` and
  ``_repr_html_()`` for notebooks.

Bad input (missing or unreadable files, empty bundles, a shape or dtype
mismatch on a stage, stages present on one side only unless
``allow_missing=True``, no common stages) raises a one-line
:class:`~parity_jax.errors.UsageError` before anything is computed.
Path inputs are read one stage at a time, so memory holds two stages, not two
bundles; large stages are reduced in bounded float64 chunks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from parity_jax import compare
from parity_jax.bisect import StageError, Verdict, analyse
from parity_jax.compare import DiffAccumulator, DiffStats, Divergence, is_float_dtype
from parity_jax.errors import UsageError
from parity_jax.logit_stats import LogitsStats, logits_stats
from parity_jax.progress import byte_progress
from parity_jax.stage_names import is_qwen_stage_name, parse_stage, qwen_stage_sort_key
from parity_jax.stages import BundleReader, StageBundle, load_bundle
from parity_jax.tolerance import BUILTIN_PROFILES, Profile, Rule, profile_from_dict, resolve_profile

REPORT_SCHEMA = "parity_jax.bundle_report/1"

__all__ = [
    "BUILTIN_PROFILES",
    "Breach",
    "BundleReport",
    "Profile",
    "REPORT_SCHEMA",
    "Rule",
    "SourceInfo",
    "StageRow",
    "compare_bundles",
    "load_report",
]

_CHUNK_ELEMENTS = 1 << 20  # per-chunk element budget for the float64 reductions of a large stage (~8 MiB per temporary)


# ----------------------------------------------------------------------------------------------
# Inputs


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
        self.names, self.ordered, self.provenance = list(self._reader.names), self._reader.has_order, self._reader.provenance
    elif isinstance(obj, StageBundle):
      self.label = f"<StageBundle {obj.provenance.get('producer', '?')}>"
      self._arrays, self.names, self.ordered, self.provenance = obj, obj.names, obj.ordered, obj.provenance
    elif isinstance(obj, Mapping):
      self.label = f"<{type(obj).__name__}>"
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
    return np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype  # no device copy for jax arrays

  def get(self, name: str) -> np.ndarray:
    if self._reader is not None:
      try:
        return np.asarray(self._reader.get(name))
      except UsageError:
        raise
      except Exception as e:  # noqa: BLE001 -- a truncated or corrupt data section
        raise UsageError(f"stage {name!r}: cannot read it from {self.label}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return np.asarray(self._arrays[name])

  def close(self) -> None:
    if self._reader is not None:
      self._reader.close()


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """Where one side came from, for the report header."""

  source: str
  producer: str | None
  n_stages: int
  ordered: bool

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _natural_key(s: str) -> tuple:
  return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


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


# ----------------------------------------------------------------------------------------------
# Dtypes


def _contains(wide: np.dtype, narrow: np.dtype) -> bool:
  """True when every value of float dtype ``narrow`` is exactly representable in ``wide``."""
  fw, fn = ml_dtypes.finfo(wide), ml_dtypes.finfo(narrow)
  return (fw.nmant >= fn.nmant and fw.maxexp >= fn.maxexp
          and (fw.minexp - fw.nmant) <= (fn.minexp - fn.nmant))


def _common_dtype(name: str, gd: np.dtype, cd: np.dtype, profile: Profile) -> np.dtype:
  if gd == cd:
    return gd
  strict = (f"stage {name!r}: dtype mismatch: golden {gd} vs candidate {cd}")
  if not profile.widen_dtypes:
    raise UsageError(f"{strict} (profile {profile.name!r} compares dtypes strictly; the bf16 profile widens exactly)")
  if not (is_float_dtype(gd) and is_float_dtype(cd)):
    raise UsageError(f"{strict} (only float dtypes can be widened)")
  for wide in (gd, cd, np.dtype(np.float32), np.dtype(np.float64)):
    if _contains(wide, gd) and _contains(wide, cd):
      return wide
  raise UsageError(f"{strict} (no float dtype holds both exactly)")


# ----------------------------------------------------------------------------------------------
# Per-stage results


@dataclasses.dataclass(frozen=True)
class Breach:
  """One threshold a stage violates."""

  metric: str
  value: float | int
  limit: float | int

  def to_dict(self) -> dict[str, Any]:
    return {"metric": self.metric, "value": _jf(self.value), "limit": _jf(self.limit)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Breach":
    return cls(metric=d["metric"], value=_unjf(d["value"]), limit=_unjf(d["limit"]))

  def text(self) -> str:
    op = "<" if self.metric.startswith(("cosine", "argmax", "topk")) else ">"
    return f"{self.metric} {_g(self.value)} {op} {_g(self.limit)}"


@dataclasses.dataclass(frozen=True)
class StageRow:
  """The comparison of one stage."""

  index: int  # position in execution order among compared stages
  name: str
  layer: int | None
  stage: str
  golden_dtype: str
  candidate_dtype: str
  stats: DiffStats
  rule: Rule
  breaches: tuple[Breach, ...]
  growth: float | None  # rel-L2 growth over ref_stage (see parity_jax.bisect)
  ref_stage: str | None
  jump: bool
  logits: LogitsStats | None = None

  @property
  def passed(self) -> bool:
    return not self.breaches

  @property
  def rel_l2(self) -> float:
    return self.stats.rel_l2

  def to_dict(self) -> dict[str, Any]:
    return {
        "index": self.index,
        "name": self.name,
        "layer": self.layer,
        "stage": self.stage,
        "golden_dtype": self.golden_dtype,
        "candidate_dtype": self.candidate_dtype,
        "passed": self.passed,
        "breaches": [b.to_dict() for b in self.breaches],
        "rule": self.rule.to_dict(),
        "growth": _jf(self.growth),
        "ref_stage": self.ref_stage,
        "jump": self.jump,
        "stats": self.stats.to_dict(),
        "logits": None if self.logits is None else self.logits.to_dict(),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "StageRow":
    return cls(
        index=int(d["index"]),
        name=d["name"],
        layer=d["layer"],
        stage=d["stage"],
        golden_dtype=d["golden_dtype"],
        candidate_dtype=d["candidate_dtype"],
        stats=_stats_from_dict(d["stats"]),
        rule=_rule_from_report(d["rule"]),
        breaches=tuple(Breach.from_dict(b) for b in d["breaches"]),
        growth=_unjf(d.get("growth")),
        ref_stage=d.get("ref_stage"),
        jump=bool(d.get("jump", False)),
        logits=None if d.get("logits") is None else LogitsStats.from_dict(d["logits"]),
    )


def _jf(x: Any) -> Any:
  if isinstance(x, float):
    if math.isnan(x):
      return "nan"
    if math.isinf(x):
      return "inf" if x > 0 else "-inf"
  return x


def _unjf(x: Any) -> Any:
  return float(x) if isinstance(x, str) else x


def _g(x: Any) -> str:
  if isinstance(x, bool):
    return str(x).lower()
  if isinstance(x, int):
    return str(x)
  return f"{x:.3g}"


def _stats_from_dict(d: Mapping[str, Any]) -> DiffStats:
  def div(t: Mapping[str, Any]) -> Divergence:
    return Divergence(index=tuple(t["index"]), a=_unjf(t["a"]), b=_unjf(t["b"]), abs_diff=float(_unjf(t["abs_diff"])),
                      a_bits=t["a_bits"], b_bits=t["b_bits"])

  return DiffStats(
      shape=tuple(d["shape"]),
      dtype=d["dtype"],
      size=int(d["size"]),
      n_diff=int(d["n_diff"]),
      frac_diff=float(d["frac_diff"]),
      max_abs_diff=float(_unjf(d["max_abs_diff"])),
      max_abs_index=None if d["max_abs_index"] is None else tuple(d["max_abs_index"]),
      rms_diff=float(_unjf(d["rms_diff"])),
      cosine=float(_unjf(d["cosine"])),
      rel_l2=float(_unjf(d["rel_l2"])),
      max_ulp=d["max_ulp"],
      n_nan_mismatch=int(d["n_nan_mismatch"]),
      top_k=tuple(div(t) for t in d["top_k"]),
  )


def _rule_from_report(d: Mapping[str, Any]) -> Rule:
  fields = {f.name for f in dataclasses.fields(Rule)}
  return Rule(**{k: v for k, v in d.items() if k in fields})


def _is_logits(name: str) -> bool:
  return parse_stage(name)[1].split(".")[-1] == "logits"


def check_rule(rule: Rule, st: DiffStats, lg: LogitsStats | None) -> tuple[Breach, ...]:
  """The thresholds of ``rule`` that ``st``/``lg`` violate. A one-sided NaN always breaches."""
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
  if rule.max_ulp is not None and st.max_ulp is not None and st.max_ulp > rule.max_ulp:
    out.append(Breach("max_ulp", st.max_ulp, rule.max_ulp))
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


def _boxes(shape: tuple[int, ...], max_elems: int) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
  """Boxes (origin, slices) tiling ``shape`` in C order, each at most ``max_elems`` elements (or one row)."""
  nd = len(shape)
  inner = 1
  k = -1
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
  if a.size <= _CHUNK_ELEMENTS:
    return compare.diff_stats(a, b, top_k=top_k, name=name)
  compare.check_comparable(a, b, name)
  acc = DiffAccumulator(a.shape, a.dtype, top_k=top_k)
  for origin, sl in _boxes(a.shape, _CHUNK_ELEMENTS):
    acc.update(a[sl], b[sl], origin=origin)
  return acc.result()


# ----------------------------------------------------------------------------------------------
# The report


@dataclasses.dataclass
class BundleReport:
  """Everything :func:`compare_bundles` found; renders as text, JSON, HTML and a PNG."""

  rows: list[StageRow]
  verdict: Verdict
  profile: Profile
  golden: SourceInfo
  candidate: SourceInfo
  order_source: str
  only_golden: list[str] = dataclasses.field(default_factory=list)
  only_candidate: list[str] = dataclasses.field(default_factory=list)
  stage_filter: str | None = None
  top_k: int = 5

  # -- the answer

  @property
  def first_divergent(self) -> str | None:
    """Where the divergence starts: the first breach when it jumps, the drift onset otherwise."""
    return self.verdict.first_divergent

  @property
  def first_breach(self) -> str | None:
    """The first stage in execution order over its tolerance."""
    return self.verdict.first_breach

  @property
  def passed(self) -> bool:
    return self.verdict.passed

  @property
  def exit_code(self) -> int:
    return 0 if self.passed else 1

  @property
  def names(self) -> list[str]:
    return [r.name for r in self.rows]

  def row(self, name: str) -> StageRow:
    for r in self.rows:
      if r.name == name:
        return r
    raise KeyError(name)

  @property
  def breached(self) -> list[StageRow]:
    return [r for r in self.rows if not r.passed]

  def verdict_line(self) -> str:
    return self.verdict.message(self.profile.jump_factor)

  # -- JSON

  def to_dict(self) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "passed": self.passed,
        "verdict": self.verdict.to_dict(),
        "verdict_line": self.verdict_line(),
        "golden": self.golden.to_dict(),
        "candidate": self.candidate.to_dict(),
        "order_source": self.order_source,
        "stage_filter": self.stage_filter,
        "top_k": self.top_k,
        "profile": self.profile.to_dict(),
        "only_golden": list(self.only_golden),
        "only_candidate": list(self.only_candidate),
        "stages": [r.to_dict() for r in self.rows],
    }

  def to_json(self, indent: int | None = 1) -> str:
    """Strict JSON (no NaN/Infinity literals: those are the strings "nan"/"inf")."""
    return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

  def save_json(self, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(self.to_json())
      f.write("\n")
    os.replace(tmp, path)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "BundleReport":
    schema = d.get("schema") if isinstance(d, Mapping) else None
    if not isinstance(schema, str) or not schema.startswith("parity_jax.bundle_report/"):
      raise UsageError(f"not a bundle report (schema {schema!r}, expected {REPORT_SCHEMA!r})")
    if schema != REPORT_SCHEMA:
      raise UsageError(f"unsupported bundle report schema {schema!r}; this version reads {REPORT_SCHEMA!r}")
    try:
      return cls(
          rows=[StageRow.from_dict(r) for r in d["stages"]],
          verdict=Verdict.from_dict(d["verdict"]),
          profile=profile_from_dict(d["profile"], source="report profile"),
          golden=SourceInfo(**d["golden"]),
          candidate=SourceInfo(**d["candidate"]),
          order_source=d["order_source"],
          only_golden=list(d.get("only_golden", [])),
          only_candidate=list(d.get("only_candidate", [])),
          stage_filter=d.get("stage_filter"),
          top_k=int(d.get("top_k", 0)),
      )
    except (KeyError, TypeError, ValueError) as e:
      raise UsageError(f"malformed bundle report: {type(e).__name__}: {e}") from None

  @classmethod
  def from_json(cls, text: str) -> "BundleReport":
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise UsageError(f"bundle report is not valid JSON: {e}") from None
    return cls.from_dict(d)

  # -- rendering (parity_jax.bundle_render)

  def to_text(self, failing_only: bool = False, show_top: bool = True) -> str:
    from parity_jax import bundle_render
    return bundle_render.render_text(self, failing_only=failing_only, show_top=show_top)

  def __str__(self) -> str:
    return self.to_text()

  def __repr__(self) -> str:
    return f"BundleReport({len(self.rows)} stages, profile={self.profile.name!r}, {self.verdict.status}, first_divergent={self.first_divergent!r})"

  def _repr_html_(self) -> str:
    from parity_jax import bundle_render
    return bundle_render.render_html(self)

  def plot(self, path: str | os.PathLike | None = None, dpi: int = 110):
    """A heatmap layer x stage of log10 rel-L2 (first divergent stage marked) and the error along the
    stage order. Writes a PNG when ``path`` is given; returns the matplotlib Figure."""
    from parity_jax import bundle_plot
    return bundle_plot.plot_report(self, path=path, dpi=dpi)


def load_report(path: str | os.PathLike) -> BundleReport:
  """Reads a report written by :meth:`BundleReport.save_json` / ``--format=json``."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UsageError(f"no such report: {path}")
  with open(path, encoding="utf-8") as f:
    return BundleReport.from_json(f.read())


# ----------------------------------------------------------------------------------------------
# The comparison


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
      dict or a profile JSON path (see :mod:`parity_jax.tolerance`).
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


def _compare(gs: _Source, cs: _Source, prof: Profile, top_k: int, stage_filter: str | None, allow_missing: bool,
             order: Sequence[str] | None, progress: bool) -> BundleReport:
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
    raise UsageError(f"stages present on one side only ({'; '.join(parts)}); allow_missing / --allow_missing compares the {len(common)} common stages")

  # Execution order.
  if order is not None:
    order = list(order)
    missing = [n for n in common if n not in set(order)]
    if missing:
      raise UsageError(f"explicit order does not list {_few(missing)}")
    ordered, order_source = [n for n in order if n in set(common)], "explicit"
  elif gs.ordered:
    ordered, order_source = list(common), "golden_metadata"
  elif cs.ordered:
    pos = {n: i for i, n in enumerate(cnames)}
    ordered, order_source = sorted(common, key=lambda n: pos[n]), "candidate_metadata"
  else:
    ordered, order_source = _infer_order(common)

  # Fail fast: shapes, dtypes and rules of every stage before any statistic.
  plan = []
  for name in ordered:
    gshape, cshape = gs.shape(name), cs.shape(name)
    if gshape != cshape:
      raise UsageError(f"stage {name!r}: shape mismatch: golden {gshape} vs candidate {cshape}")
    gd, cd = gs.dtype(name), cs.dtype(name)
    cmp_dtype = _common_dtype(name, gd, cd, prof)
    if cmp_dtype.kind in "cOUSV" and not is_float_dtype(cmp_dtype):
      raise UsageError(f"stage {name!r}: unsupported dtype {cmp_dtype} for element-wise statistics")
    rule = prof.rule_for(name)
    want_logits = (rule.wants_logits_stats or _is_logits(name)) and is_float_dtype(cmp_dtype)
    if want_logits and (len(gshape) < 1 or gshape[-1] == 0):
      if rule.wants_logits_stats:
        raise UsageError(f"stage {name!r}: logits thresholds need a vocabulary axis, shape is {gshape}")
      want_logits = False
    plan.append((name, gd, cd, cmp_dtype, rule, want_logits))

  total = sum(int(np.prod(gs.shape(n), dtype=np.int64)) * (gd.itemsize + cd.itemsize) for n, gd, cd, *_ in plan)
  bar = byte_progress(total, "compare stages", enabled=progress)
  results = []
  try:
    for i, (name, gd, cd, cmp_dtype, rule, want_logits) in enumerate(plan):
      a, b = gs.get(name), cs.get(name)
      if a.dtype != cmp_dtype:
        a = a.astype(cmp_dtype)
      if b.dtype != cmp_dtype:
        b = b.astype(cmp_dtype)
      st = stage_stats(a, b, top_k, name)
      lg = logits_stats(a, b, topk=rule.topk) if want_logits else None
      results.append((name, str(gd), str(cd), st, rule, lg, check_rule(rule, st, lg)))
      bar.update(int(np.prod(a.shape, dtype=np.int64)) * (gd.itemsize + cd.itemsize))
      bar.set_postfix_str(f"{i + 1}/{len(plan)} stages")
      del a, b
  finally:
    bar.close()

  errors = {name: StageError(rel_l2=st.rel_l2, bit_equal=st.bit_equal, breached=bool(br))
            for name, _, _, st, _, _, br in results}
  growth, verdict = analyse([r[0] for r in results], errors, prof.jump_factor, prof.noise_floor)
  rows = []
  for i, (name, gd, cd, st, rule, lg, br) in enumerate(results):
    layer, stage = parse_stage(name)
    g = growth[name]
    rows.append(StageRow(index=i, name=name, layer=layer, stage=stage, golden_dtype=gd, candidate_dtype=cd, stats=st,
                         rule=rule, breaches=br, growth=g.growth, ref_stage=g.ref_stage, jump=g.jump, logits=lg))
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


def _producer(prov: Mapping[str, Any]) -> str | None:
  p = prov.get("producer") if isinstance(prov, Mapping) else None
  return None if p is None else str(p)


def _few(names: Sequence[str], n: int = 4) -> str:
  if not names:
    return "nothing"
  head = ", ".join(names[:n])
  return f"{head} (+{len(names) - n} more)" if len(names) > n else head
