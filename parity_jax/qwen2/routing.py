"""MoE routing flips, explained: a tie the reference could not decide, or a clear winner replaced (a bug).

In bf16, or in a port with another summation order, a token's top-k experts
can differ from the golden's. Whether that is legitimate is a question about
the *reference*: did the golden's router see the swapped experts as a tie?

For one token of one MoE layer with golden choice ``G`` and candidate choice
``C`` (both ordered, largest weight first), the candidate's choice asserts a
ranking: ``C[i]`` above ``C[j]`` for ``i < j``, and every expert of ``C``
above every expert outside it. Each of those pairs that the golden's router
logits order the other way is an *inversion*; the flip's ``gap`` is the
largest golden-logit difference over its inversions. The flip is a **tie**
when ``gap <= tolerance``, with the tolerance taken from the stage's rule in
the comparison profile: ``max_rel_l2`` of ``layers.L.router_logits`` times
the RMS of the token's golden logits (the per-element size of an error at
the rule's bound), plus the rule's ``max_abs_diff`` when it has one. A flip
whose gap exceeds that is a **bug**: a clear winner was replaced.

A flip changes everything downstream of that token (and, through attention,
of later tokens), so :func:`parity_jax.qwen2.parity.forward_parity` replays
the candidate with the golden's choice forced at every flipped token
(:func:`parity_jax.qwen2.forward` ``forced_experts``), layer by layer, and
judges the later stages on the replay; :class:`RoutingReport` carries the
flips, their counts per layer and kind, and the natural run's report.
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any, Mapping, Sequence

import numpy as np

from parity_jax.report import Report

__all__ = ["Flip", "RoutingReport", "classify_flips", "flipped_tokens", "tie_tolerance"]


@dataclasses.dataclass(frozen=True)
class Flip:
  """One token of one layer whose selected experts differ from the golden's."""

  layer: int
  batch: int
  position: int
  golden: tuple[int, ...]
  candidate: tuple[int, ...]
  gap: float  # largest golden-logit difference over the pairs the candidate ranks the other way
  tolerance: float

  @property
  def tie(self) -> bool:
    return self.gap <= self.tolerance

  @property
  def kind(self) -> str:
    return "tie" if self.tie else "bug"

  def describe(self) -> str:
    return (
        f"layers.{self.layer} [{self.batch},{self.position}]: golden experts {list(self.golden)} vs candidate "
        f"{list(self.candidate)}; golden logit gap {self.gap:.3g} vs tolerance {self.tolerance:.3g} -> {self.kind}"
    )

  def to_dict(self) -> dict[str, Any]:
    return {
        "layer": self.layer,
        "batch": self.batch,
        "position": self.position,
        "golden": list(self.golden),
        "candidate": list(self.candidate),
        "gap": self.gap,
        "tolerance": self.tolerance,
        "kind": self.kind,
    }


def tie_tolerance(profile: Any, layer: int) -> tuple[float, float]:
  """``(relative, absolute)`` tie tolerance of layer ``layer``'s router logits under ``profile`` (see the module)."""
  from parity_jax.bundles import resolve_profile

  rule = resolve_profile(profile).rule_for(f"layers.{layer}.router_logits")
  if rule.bit_exact:
    return 0.0, 0.0
  return float(rule.max_rel_l2 or 0.0), float(rule.max_abs_diff or 0.0)


def flipped_tokens(golden: np.ndarray, candidate: np.ndarray) -> np.ndarray:
  """``[B, T]`` bool: the tokens whose ordered expert choice differs (``[B, T, k]`` each)."""
  return np.any(np.asarray(golden) != np.asarray(candidate), axis=-1)


def _gap(logits: np.ndarray, chosen: Sequence[int]) -> float:
  """Largest golden-logit excess of an expert the candidate ranked below another (0 when its ranking agrees)."""
  chosen = list(chosen)
  others = np.setdiff1d(np.arange(logits.shape[0]), chosen)
  gap = 0.0
  for i, c in enumerate(chosen):
    below = chosen[i + 1 :] + list(others)  # the candidate ranks c above all of these
    if below:
      gap = max(gap, float(np.max(logits[below]) - logits[c]))
  return gap


def classify_flips(
    layer: int,
    golden_logits: np.ndarray,
    golden_experts: np.ndarray,
    candidate_experts: np.ndarray,
    rel_tol: float,
    abs_tol: float = 0.0,
    where: np.ndarray | None = None,
) -> list[Flip]:
  """Every flipped token (restricted to ``where``) of one layer, classified against the golden's router logits."""
  logits = np.asarray(golden_logits, dtype=np.float64)
  g, c = np.asarray(golden_experts), np.asarray(candidate_experts)
  mask = flipped_tokens(g, c)
  if where is not None:
    mask &= np.asarray(where, bool)
  flips = []
  for b, t in zip(*np.nonzero(mask)):
    row = logits[b, t]
    rms = math.sqrt(float(np.mean(row * row)))
    flips.append(
        Flip(
            layer=int(layer),
            batch=int(b),
            position=int(t),
            golden=tuple(int(e) for e in g[b, t]),
            candidate=tuple(int(e) for e in c[b, t]),
            gap=_gap(row, c[b, t]),
            tolerance=rel_tol * rms + abs_tol,
        )
    )
  return flips


@dataclasses.dataclass
class RoutingReport(Report):
  """The routing flips of one comparison, per layer and kind, and the runs it took to judge them.

  ``natural`` is the report of the candidate's own run when the flips made a
  replay necessary (None otherwise); ``runs`` counts the forward runs (the
  natural one plus the replays); ``forced`` the tokens forced per layer.
  """

  moe_layers: tuple[int, ...]
  flips: list[Flip]
  runs: int = 1
  forced: Mapping[int, int] = dataclasses.field(default_factory=dict)
  natural: Any = None

  @property
  def ties(self) -> list[Flip]:
    return [f for f in self.flips if f.tie]

  @property
  def bugs(self) -> list[Flip]:
    return [f for f in self.flips if not f.tie]

  @property
  def passed(self) -> bool:
    return not self.bugs

  @property
  def first_bug(self) -> Flip | None:
    """The bug flip of the earliest layer (then batch, position)."""
    bugs = sorted(self.bugs, key=lambda f: (f.layer, f.batch, f.position))
    return bugs[0] if bugs else None

  @property
  def first_divergent_stage(self) -> str | None:
    return None if self.first_bug is None else f"layers.{self.first_bug.layer}.selected_experts"

  def counts(self) -> dict[int, dict[str, int]]:
    out = {layer: {"ties": 0, "bugs": 0} for layer in self.moe_layers}
    for f in self.flips:
      out.setdefault(f.layer, {"ties": 0, "bugs": 0})["ties" if f.tie else "bugs"] += 1
    return out

  def to_dict(self) -> dict[str, Any]:
    return {
        "passed": self.passed,
        "moe_layers": list(self.moe_layers),
        "flips": len(self.flips),
        "ties": len(self.ties),
        "bugs": len(self.bugs),
        "per_layer": {str(k): v for k, v in self.counts().items()},
        "first_divergent": self.first_divergent_stage,
        "runs": self.runs,
        "forced_tokens": {str(k): v for k, v in self.forced.items()},
        "flip_list": [f.to_dict() for f in self.flips],
        "natural_run": None if self.natural is None else self.natural.to_dict(),
    }

  def summary(self) -> str:
    """One line: flips by kind and the replay."""
    if not self.flips:
      return f"routing: no flips in {len(self.moe_layers)} MoE layer(s)"
    per = ", ".join(
        f"layers.{k}: {v['ties']} tie(s), {v['bugs']} bug(s)" for k, v in self.counts().items() if v["ties"] + v["bugs"]
    )
    forced = sum(self.forced.values())
    return (
        f"routing: {len(self.flips)} flip(s): {len(self.ties)} tie(s) (legitimate), {len(self.bugs)} bug(s) [{per}]; "
        f"replayed with the golden's experts forced at {forced} token(s) ({self.runs} runs)"
    )

  def text(self, limit: int = 10) -> str:
    lines = [self.summary()]
    shown = self.bugs[:limit] + self.ties[: max(0, limit - len(self.bugs))]
    lines += ["  " + f.describe() for f in shown]
    if len(self.flips) > len(shown):
      lines.append(f"  ... {len(self.flips) - len(shown)} more")
    if self.natural is not None:
      v = self.natural.verdict
      lines.append(
          f"natural run (no forcing): {'PASS' if self.natural.passed else 'FAIL'}"
          + (f", first divergent stage {v.first_divergent}" if v.first_divergent else "")
      )
    if self.first_bug is not None:
      lines.append(f"routing FAIL: first real divergence {self.first_divergent_stage} (a clear winner replaced)")
    return "\n".join(lines)

  def _repr_html_(self) -> str:
    return f"<pre>{html.escape(self.text())}</pre>"
