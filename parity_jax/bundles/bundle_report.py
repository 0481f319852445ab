"""The result of a stage-bundle comparison: one row per stage, the verdict, and the JSON schema they round-trip through."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from parity_jax import jsonio
from parity_jax.bundles.diff import Breach
from parity_jax.bundles.logits import LogitsStats
from parity_jax.bundles.tolerance import Profile, ToleranceRule, profile_from_dict
from parity_jax.bundles.verdict import Verdict
from parity_jax.arraydiff import DiffStats
from parity_jax.errors import UsageError
from parity_jax.report import Report

__all__ = ["REPORT_SCHEMA", "BundleReport", "SourceInfo", "StageRow", "load_report"]

REPORT_SCHEMA = "parity_jax.bundle_report/1"


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """Where one side came from, for the report header."""

  source: str
  producer: str | None
  n_stages: int
  ordered: bool

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


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
  rule: ToleranceRule
  breaches: tuple[Breach, ...]
  growth: float | None  # rel-L2 growth over ref_stage (see parity_jax.bundles.verdict)
  ref_stage: str | None
  jump: bool
  logits: LogitsStats | None = None
  max_ulp: int | None = None  # in ulp_dtype: the narrower dtype of a widened comparison (see bundles.diff.ulp_dtype)
  ulp_dtype: str | None = None

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
        "growth": jsonio.num(self.growth),
        "ref_stage": self.ref_stage,
        "jump": self.jump,
        "stats": self.stats.to_dict(),
        "logits": None if self.logits is None else self.logits.to_dict(),
        "max_ulp": self.max_ulp,
        "ulp_dtype": self.ulp_dtype,
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
        stats=DiffStats.from_dict(d["stats"]),
        rule=ToleranceRule.from_dict(d["rule"]),
        breaches=tuple(Breach.from_dict(b) for b in d["breaches"]),
        growth=None if d.get("growth") is None else float(jsonio.from_jsonable(d["growth"])),
        ref_stage=d.get("ref_stage"),
        jump=bool(d.get("jump", False)),
        logits=None if d.get("logits") is None else LogitsStats.from_dict(d["logits"]),
        max_ulp=d.get("max_ulp", d["stats"].get("max_ulp")),
        ulp_dtype=d.get("ulp_dtype", d["stats"].get("dtype")),
    )


@dataclasses.dataclass
class BundleReport(Report):
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

  # -- rendering (parity_jax.bundles.render, .plot)

  def text(self, failing_only: bool = False, show_top: bool = True) -> str:
    from parity_jax.bundles import render

    return render.render_text(self, failing_only=failing_only, show_top=show_top)

  def __repr__(self) -> str:
    return f"BundleReport({len(self.rows)} stages, profile={self.profile.name!r}, {self.verdict.status}, first_divergent={self.first_divergent!r})"

  def _repr_html_(self) -> str:
    from parity_jax.bundles import render

    return render.render_html(self)

  def plot(self, path: str | os.PathLike | None = None, dpi: int = 110):
    """A heatmap layer x stage of log10 rel-L2 (first divergent stage marked) and the error along the
    stage order. Writes a PNG when ``path`` is given; returns the matplotlib Figure."""
    from parity_jax.bundles import plot

    return plot.plot_report(self, path=path, dpi=dpi)


def load_report(path: str | os.PathLike) -> BundleReport:
  """Reads a report written by :meth:`BundleReport.write_json` / ``--format=json``."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UsageError(f"no such report: {path}")
  with open(path, encoding="utf-8") as f:
    return BundleReport.from_json(f.read())
