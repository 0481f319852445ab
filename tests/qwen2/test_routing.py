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
