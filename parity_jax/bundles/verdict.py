"""Where does a forward pass first diverge? Growth factors and the jump/drift verdict.

Aggregate statistics blame the stage where the error is *largest*, and a
per-stage threshold alone blames the stage where accumulated drift happens to
cross the line. Neither answers "where first". This module answers it from
the per-stage rel-L2 errors and breaches, with one documented rule:

1. **Input of a stage.** For Qwen2/Qwen3 stage names the data-flow inputs are
   known (``layers.i.v_proj`` reads ``layers.i.attn_norm``, ``layers.i.output``
   reads ``ffn_out`` and ``post_attn_residual``, ...; see
   :func:`parity_jax.bundles.qwen_graph.qwen_stage_inputs`). For other names the input is the previous
   compared stage in execution order. The *reference* of a stage is its
   compared input with the largest rel-L2.
2. **Growth** across a stage = ``rel_l2(stage) / max(rel_l2(reference),
   noise_floor)``. The floor (a profile setting: the dtype's machine epsilon)
   keeps rounding-level errors out: a stage reading bit-identical inputs and
   adding one rounding shows growth of about 1, not infinity.
3. **Jump.** A stage *jumps* when its growth is at least the profile's
   ``jump_factor`` (inclusive: growth exactly equal to the factor is a jump), or when it differs although every compared input is
   bit-identical (or it has none): the error entered there.
4. **Verdict.** No stage over its tolerance: ``pass``. Otherwise let B be the
   first stage in execution order over its tolerance (the *first breach*).

   * If B jumps, the verdict is ``jump`` and B is the first divergent stage.
   * Otherwise the error only accumulated into B: the verdict is ``drift``.
     Its origin is found by walking back from B along references while the
     stages do not jump; the walk stops at the first stage that jumps (a
     sub-tolerance jump, the likely culprit) or that has no compared input.
     That stage is the first divergent stage (the *onset*); the late stage B
     is never blamed for accumulated drift.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from parity_jax import jsonio
from parity_jax.bundles.qwen_graph import qwen_stage_inputs

__all__ = ["StageError", "StageGrowth", "Verdict", "analyse", "fmt_growth"]


@dataclasses.dataclass(frozen=True)
class StageError:
  """What the verdict needs to know about one compared stage."""

  rel_l2: float  # inf when a NaN/inf appears on one side only
  bit_equal: bool
  breached: bool


@dataclasses.dataclass(frozen=True)
class StageGrowth:
  ref_stage: str | None  # the compared input with the largest rel-L2
  growth: float | None  # rel_l2 / max(ref rel_l2, noise_floor); None when 0/0
  jump: bool


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The answer to "where first?"."""

  status: str  # "pass" | "jump" | "drift"
  first_divergent: str | None  # jump: the first breach; drift: the onset of the drift
  first_breach: str | None  # first stage in execution order over its tolerance
  growth: float | None  # growth across first_breach
  ref_stage: str | None  # the reference of first_breach
  path: tuple[str, ...] = ()  # drift: first_breach back to the onset, following references
  max_growth_stage: str | None = None  # drift: the stage with the largest growth on the path
  max_growth: float | None = None
  n_breached: int = 0

  @property
  def passed(self) -> bool:
    return self.status == "pass"

  def to_dict(self) -> dict[str, Any]:
    return {
        "status": self.status,
        "first_divergent": self.first_divergent,
        "first_breach": self.first_breach,
        "growth": jsonio.num(self.growth),
        "ref_stage": self.ref_stage,
        "path": list(self.path),
        "max_growth_stage": self.max_growth_stage,
        "max_growth": jsonio.num(self.max_growth),
        "n_breached": self.n_breached,
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Verdict":
    return cls(
        status=d["status"],
        first_divergent=d["first_divergent"],
        first_breach=d["first_breach"],
        growth=_opt_float(d.get("growth")),
        ref_stage=d.get("ref_stage"),
        path=tuple(d.get("path", ())),
        max_growth_stage=d.get("max_growth_stage"),
        max_growth=_opt_float(d.get("max_growth")),
        n_breached=int(d.get("n_breached", 0)),
    )

  def message(self, jump_factor: float) -> str:
    """The one verdict line."""
    if self.status == "pass":
      return "PASS: every compared stage is within tolerance"
    g = f"x{fmt_growth(self.growth)}" + (f" over {self.ref_stage}" if self.ref_stage else " (no compared input)")
    if self.status == "jump":
      return (
          f"FAIL: first divergent stage {self.first_divergent} -- jump: rel-L2 grows {g}"
          f" (jump factor {jump_factor:g}); {self.n_breached} stage(s) over tolerance"
      )
    biggest = (
        f"; largest growth on the way x{fmt_growth(self.max_growth)} at {self.max_growth_stage}"
        if self.max_growth_stage
        else ""
    )
    return (
        f"FAIL: drift -- error accumulates gradually from {self.first_divergent} (first divergent) and first exceeds"
        f" tolerance at {self.first_breach} ({g}, below jump factor {jump_factor:g}){biggest};"
        f" {self.n_breached} stage(s) over tolerance"
    )


def fmt_growth(g: float | None) -> str:
  if g is None:
    return "-"
  if math.isinf(g):
    return "inf"
  return f"{g:.3g}" if g < 1e4 else f"{g:.1e}"


def _opt_float(x: Any) -> float | None:
  return None if x is None else float(jsonio.from_jsonable(x))


def analyse(
    order: Sequence[str],
    errors: Mapping[str, StageError],
    jump_factor: float,
    noise_floor: float,
    inputs: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, StageGrowth], Verdict]:
  """Growth per stage and the verdict, for stages compared in execution ``order``.

  ``inputs`` overrides the data flow (stage -> its input stages); by default
  Qwen names use :func:`qwen_stage_inputs` and other names the previous stage.
  """
  compared = [n for n in order if n in errors]
  compared_set = set(compared)
  growth: dict[str, StageGrowth] = {}
  for i, name in enumerate(compared):
    if inputs is not None and name in inputs:
      refs = tuple(r for r in inputs[name] if r in compared_set)
    else:
      refs = qwen_stage_inputs(name, compared_set)
      if refs is None or (not refs and name != "embedding"):
        refs = (compared[i - 1],) if i > 0 else ()
    e = errors[name]
    rel = math.inf if math.isnan(e.rel_l2) else e.rel_l2
    ref = max(refs, key=lambda r: _rel(errors[r])) if refs else None
    ref_rel = _rel(errors[ref]) if ref else 0.0
    denom = max(ref_rel, noise_floor)
    if denom > 0:
      g = rel / denom
    else:
      g = math.inf if rel > 0 else None
    inputs_clean = all(errors[r].bit_equal for r in refs)
    jump = (not e.bit_equal) and (inputs_clean or (g is not None and g >= jump_factor))
    growth[name] = StageGrowth(ref_stage=ref, growth=g, jump=jump)

  breached = [n for n in compared if errors[n].breached]
  if not breached:
    return growth, Verdict(status="pass", first_divergent=None, first_breach=None, growth=None, ref_stage=None)
  b = breached[0]
  gb = growth[b]
  if gb.jump:
    return growth, Verdict(
        status="jump",
        first_divergent=b,
        first_breach=b,
        growth=gb.growth,
        ref_stage=gb.ref_stage,
        path=(b,),
        n_breached=len(breached),
    )
  path = [b]
  x = b
  while not growth[x].jump and growth[x].ref_stage is not None and growth[x].ref_stage not in path:
    x = growth[x].ref_stage
    path.append(x)
  with_growth = [(growth[p].growth, p) for p in path if growth[p].growth is not None]
  mg, ms = max(with_growth, key=lambda t: t[0]) if with_growth else (None, None)
  return growth, Verdict(
      status="drift",
      first_divergent=x,
      first_breach=b,
      growth=gb.growth,
      ref_stage=gb.ref_stage,
      path=tuple(path),
      max_growth_stage=ms,
      max_growth=mg,
      n_breached=len(breached),
  )


def _rel(e: StageError) -> float:
  return math.inf if math.isnan(e.rel_l2) else e.rel_l2
