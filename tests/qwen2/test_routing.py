"""Routing flips classified from hand-written golden router logits (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from parity_jax.qwen2 import routing


def test_classify_flips_on_hand_written_logits():
  """Gap = the largest golden-logit excess of an expert the candidate ranked lower; tie iff gap <= rel * RMS + abs."""
  logits = np.array([[[4.0, 3.0, 2.999, 0.0], [4.0, 3.0, 1.0, 0.0]]])  # [1, 2, 4]
  golden = np.array([[[0, 1], [0, 1]]])
  cand = np.array([[[0, 2], [0, 2]]])
  rms0 = np.sqrt(np.mean(logits[0, 0] ** 2))
  flips = routing.classify_flips(3, logits, golden, cand, rel_tol=1e-3)
  assert [(f.batch, f.position) for f in flips] == [(0, 0), (0, 1)]
  assert flips[0].gap == pytest.approx(0.001) and flips[0].tolerance == pytest.approx(1e-3 * rms0)
  assert flips[0].tie and not flips[1].tie and flips[1].gap == pytest.approx(2.0)
  # an order swap of the same two experts is a flip too, judged by the same gap
  swap = routing.classify_flips(0, logits, golden, np.array([[[1, 0], [0, 1]]]), rel_tol=0.0, abs_tol=0.5)
  assert len(swap) == 1 and swap[0].gap == pytest.approx(1.0) and not swap[0].tie
  report = routing.RoutingReport((3,), flips)
  assert report.counts() == {3: {"ties": 1, "bugs": 1}} and not report.passed
  assert report.first_divergent_stage == "layers.3.selected_experts"


class _Natural:
  """A stand-in for the natural run's comparison report: what RoutingReport reads of it."""

  def __init__(self, passed, first_divergent):
    self.passed = passed
    self.verdict = type("V", (), {"first_divergent": first_divergent})()

  def to_dict(self):
    return {"passed": self.passed}


def test_routing_report_json_text_and_html():
  tie = routing.Flip(1, 0, 2, (0, 1), (0, 2), 0.001, 0.01)
  bug = routing.Flip(0, 1, 0, (3, 1), (3, 2), 0.5, 0.01)
  r = routing.RoutingReport((0, 1), [tie, bug], runs=3, forced={0: 1, 1: 2}, natural=_Natural(False, "layers.0.x"))
  d = r.to_dict()
  assert d == {
      "passed": False,
      "moe_layers": [0, 1],
      "flips": 2,
      "ties": 1,
      "bugs": 1,
      "per_layer": {"0": {"ties": 0, "bugs": 1}, "1": {"ties": 1, "bugs": 0}},
      "first_divergent": "layers.0.selected_experts",
      "runs": 3,
      "forced_tokens": {"0": 1, "1": 2},
      "flip_list": [tie.to_dict(), bug.to_dict()],
      "natural_run": {"passed": False},
  }
  assert bug.to_dict()["kind"] == "bug" and tie.to_dict()["kind"] == "tie"
  lines = r.text().splitlines()
  assert lines[0] == (
      "routing: 2 flip(s): 1 tie(s) (legitimate), 1 bug(s) [layers.0: 0 tie(s), 1 bug(s), layers.1: 1 tie(s), 0 bug(s)];"
      " replayed with the golden's experts forced at 3 token(s) (3 runs)"
  )
  assert lines[1] == "  " + bug.describe() and lines[2] == "  " + tie.describe()  # bugs first
  assert lines[3] == "natural run (no forcing): FAIL, first divergent stage layers.0.x"
  assert lines[4] == "routing FAIL: first real divergence layers.0.selected_experts (a clear winner replaced)"
  assert r.text(limit=1).splitlines()[1:3] == ["  " + bug.describe(), "  ... 1 more"]
  escaped = r.text().replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;")
  assert r._repr_html_() == "<pre>" + escaped + "</pre>"
  calm = routing.RoutingReport((0,), [])
  assert calm.passed and calm.to_dict()["natural_run"] is None and calm.text() == "routing: no flips in 1 MoE layer(s)"


def test_tie_tolerance_is_the_router_logits_rule_of_the_profile():
  """(max_rel_l2, max_abs_diff) of the first rule matching ``layers.L.router_logits``; a bit-exact rule gives 0, 0."""
  from parity_jax.bundles import Profile, ToleranceRule

  profile = Profile(
      name="mine",
      rules=(
          ToleranceRule(stages=r"layers\.1\.router_logits", max_rel_l2=0.02, max_abs_diff=0.5),
          ToleranceRule(stages=r".*", max_rel_l2=1e-3),
      ),
  )
  assert routing.tie_tolerance(profile, 1) == (0.02, 0.5)
  assert routing.tie_tolerance(profile, 0) == (1e-3, 0.0)  # no max_abs_diff: 0
  assert routing.tie_tolerance("f32", 2) == (1e-5, 0.0)
  assert routing.tie_tolerance("exact", 0) == (0.0, 0.0)
