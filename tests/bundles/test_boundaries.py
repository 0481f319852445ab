"""Thresholds exactly at their boundary: every tolerance is inclusive, a growth equal to the jump factor is a jump."""

from __future__ import annotations

import math

import numpy as np

from parity_jax.bundles import BUILTIN_PROFILES, StageError, ToleranceRule, analyse
from parity_jax.bundles.diff import check_rule
from parity_jax.arraydiff import DiffStats
from parity_jax.svf.bounds import check_bound


def _stats(rel_l2: float, cosine: float = 1.0, max_ulp: int = 0, max_abs: float = 0.0, frac: float = 0.0) -> DiffStats:
  return DiffStats(
      shape=(4,),
      dtype="float32",
      size=4,
      n_diff=1,
      frac_diff=frac,
      max_abs_diff=max_abs,
      max_abs_index=(0,),
      rms_diff=0.0,
      cosine=cosine,
      rel_l2=rel_l2,
      max_ulp=max_ulp,
      n_nan_mismatch=0,
      top_k=(),
  )


def test_every_tolerance_passes_at_its_limit_and_fails_just_past_it():
  rule = ToleranceRule(stages=".*", max_rel_l2=1e-5, min_cosine=0.999, max_abs_diff=0.25, max_ulp=4, max_frac_diff=0.5)
  assert check_rule(rule, _stats(1e-5, 0.999, 4, 0.25, 0.5), None) == ()
  up = lambda x: math.nextafter(x, math.inf)  # noqa: E731
  down = lambda x: math.nextafter(x, -math.inf)  # noqa: E731
  for st, metric in (
      (_stats(up(1e-5)), "rel_l2"),
      (_stats(0.0, cosine=down(0.999)), "cosine"),
      (_stats(0.0, max_abs=up(0.25)), "max_abs_diff"),
      (_stats(0.0, max_ulp=5), "max_ulp"),
      (_stats(0.0, frac=up(0.5)), "frac_diff"),
  ):
    assert [b.metric for b in check_rule(rule, st, None)] == [metric]
  # the built-in f32 profile: rel-L2 of exactly 1e-5 passes
  assert check_rule(BUILTIN_PROFILES["f32"].rule_for("layers.0.q_proj"), _stats(1e-5), None) == ()


def test_growth_equal_to_the_jump_factor_is_a_jump():
  ref = 2.0**-10  # powers of two: the growth is exactly 8, with no rounding in the division
  order = ["embedding", "layers.0.attn_norm"]
  for rel, status in ((ref * 8, "jump"), (math.nextafter(ref * 8, 0.0), "drift")):
    errors = {
        "embedding": StageError(rel_l2=ref, bit_equal=False, breached=False),
        "layers.0.attn_norm": StageError(rel_l2=rel, bit_equal=False, breached=True),
    }
    growth, verdict = analyse(order, errors, jump_factor=8.0, noise_floor=0.0)
    assert growth["layers.0.attn_norm"].growth == rel / ref
    assert verdict.status == status, (rel, verdict)


def test_an_svf_bound_stage_passes_at_exactly_its_bound():
  golden = np.array([1.0, 2.0, -3.0, np.nan], np.float32)
  step = np.float32(2.0**-20)
  ours = golden + np.array([step, -step, 0.0, 0.0], np.float32)
  tol = np.array([float(step), float(step), 0.0, 1.0])  # exactly the differences (float64 differences are exact)
  assert check_bound(golden, ours, tol) == (0, 1.0)
  tighter = np.nextafter(tol, -np.inf)
  n_out, worst = check_bound(golden, ours, tighter)
  assert n_out == 2 and worst > 1.0
  assert check_bound(golden, np.array([1.0, 2.0, -3.0, 0.0], np.float32), tol)[0] == 1  # NaN on one side fails
