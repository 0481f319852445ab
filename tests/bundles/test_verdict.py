"""First divergent stage: planted errors are named exactly; gradual drift is not blamed on a late stage."""

import math

import ml_dtypes
import numpy as np
import pytest

from parity_jax.bundles import verdict as bisect
from parity_jax.bundles import compare_bundles
from parity_jax.errors import UsageError
from tests.helpers import stages as synth

NOISE = 1e-7  # honest float32 noise, relative


def _planted(golden, stage, rel=1e-3, propagate=True):
  """f32-noise everywhere; an error of size ``rel`` at ``stage``, growing 5% per stage after it when it propagates."""
  names = list(golden)
  k0 = names.index(stage)

  def rel_of(i, name):
    if i < k0:
      return NOISE
    if i == k0:
      return rel
    return rel * 1.05 ** (i - k0) if propagate else NOISE

  return synth.candidate(golden, rel_of)


@pytest.mark.parametrize(
    "stage,qk_norm",
    [
        ("embedding", False),
        ("layers.0.attn_norm", False),
        ("layers.1.v_proj", False),
        ("layers.2.ffn_swiglu", False),
        ("layers.1.q_norm", True),
        ("layers.2.attention", True),
        ("final_norm", False),
        ("logits", False),
    ],
)
def test_planted_error_is_named_exactly(stage, qk_norm):
  golden = synth.golden_stages(num_layers=3, qk_norm=qk_norm)
  cand = _planted(golden, stage)
  report = compare_bundles(golden, cand, profile="f32")
  assert report.first_divergent == stage
  assert report.first_breach == stage
  assert report.verdict.status == "jump"
  assert report.exit_code == 1
  # the error is largest late, so "the largest error" would be a wrong answer here
  worst = max(report.rows, key=lambda r: r.stats.rel_l2).name
  assert worst != stage or stage == "logits"
  assert f"first divergent stage {stage} " in report.verdict_line()


def test_local_error_without_propagation_and_just_over_tolerance():
  golden = synth.golden_stages(num_layers=3)
  cand = _planted(golden, "layers.1.ffn_up", rel=3e-5, propagate=False)  # 3x the f32 bound, nothing downstream
  report = compare_bundles(golden, cand, profile="f32")
  assert report.first_divergent == "layers.1.ffn_up" and report.verdict.status == "jump"
  assert [r.name for r in report.breached] == ["layers.1.ffn_up"]
  row = report.row("layers.1.ffn_up")
  assert row.ref_stage == "layers.1.ffn_norm"  # its data-flow input, not the stage listed before it (ffn_gate)
  expected = synth.rel_l2(golden["layers.1.ffn_up"], cand["layers.1.ffn_up"]) / max(
      synth.rel_l2(golden["layers.1.ffn_norm"], cand["layers.1.ffn_norm"]), 2.0**-23
  )
  assert row.growth == pytest.approx(expected, rel=1e-9)


def test_honest_noise_passes():
  golden = synth.golden_stages(num_layers=3)
  report = compare_bundles(golden, synth.candidate(golden, lambda i, n: NOISE), profile="f32")
  assert report.passed and report.first_divergent is None and report.exit_code == 0
  assert report.verdict.message(10.0) == "PASS: every compared stage is within tolerance"


def _drift(golden, rate, start=1e-8):
  return synth.candidate(golden, lambda i, n: start * rate**i)


def test_gradual_drift_is_not_blamed_on_the_late_stage():
  golden = synth.golden_stages(num_layers=6)
  cand = _drift(golden, rate=1.15)
  # independent: the first stage whose relative L2 error exceeds the f32 bound
  rels = {n: synth.rel_l2(golden[n], cand[n]) for n in golden}
  first_over = next(n for n in golden if rels[n] > 1e-5)
  assert first_over.startswith(("layers.3.", "layers.4."))  # the fixture really breaches late
  report = compare_bundles(golden, cand, profile="f32")
  assert report.verdict.status == "drift"
  assert report.first_breach == first_over
  assert report.first_divergent == "embedding"  # where the accumulating error starts
  assert report.first_divergent != first_over
  assert report.verdict.growth < report.profile.jump_factor
  line = report.verdict_line()
  assert "drift" in line and f"first divergent stage {first_over}" not in line
  # the path walks back from the breach to the onset through data-flow inputs
  path = report.verdict.path
  assert path[0] == first_over and path[-1] == "embedding"
  assert all(report.row(a).ref_stage == b for a, b in zip(path, path[1:]))


def test_fast_but_gradual_drift_is_still_drift():
  golden = synth.golden_stages(num_layers=2)
  cand = _drift(golden, rate=2.0, start=1e-12)  # x2 per stage: fast, but no single stage jumps 10x
  report = compare_bundles(golden, cand, profile="f32")
  assert report.verdict.status == "drift"
  assert report.first_divergent != report.first_breach


def test_sub_tolerance_jump_inside_drift_is_the_onset():
  golden = synth.golden_stages(num_layers=6)
  names = list(golden)
  k = names.index("layers.1.attn_out")  # every later stage reads it, directly or not

  def rel_of(i, name):
    r = 1e-8 * 1.1**i
    return r * 60 if i >= k else r  # a x60 jump, still under 1e-5 there, then drift

  cand = synth.candidate(golden, rel_of)
  assert synth.rel_l2(golden["layers.1.attn_out"], cand["layers.1.attn_out"]) < 1e-5
  report = compare_bundles(golden, cand, profile="f32")
  assert report.verdict.status == "drift"
  assert report.first_divergent == "layers.1.attn_out"
  assert report.row("layers.1.attn_out").jump and report.row("layers.1.attn_out").passed


def test_exact_profile_names_the_first_changed_bit():
  golden = synth.golden_stages(num_layers=2)
  cand = {k: v.copy() for k, v in golden.items()}
  a = cand["layers.1.ffn_out"]
  a.reshape(-1)[5] = np.nextafter(a.reshape(-1)[5], np.float32(np.inf))  # one ulp
  assert compare_bundles(golden, cand, profile="f32").passed
  report = compare_bundles(golden, cand, profile="exact")
  assert report.first_divergent == "layers.1.ffn_out" and report.verdict.status == "jump"
  assert report.row("layers.1.ffn_out").stats.max_ulp == 1


def test_bf16_profile_accepts_bf16_rounding_and_names_a_real_bug():
  golden = synth.golden_stages(num_layers=3)
  cand = {k: v.astype(ml_dtypes.bfloat16) for k, v in golden.items()}  # honest bf16 rounding of every stage
  with pytest.raises(UsageError, match=r"stage 'embedding': dtype mismatch: golden float32 vs candidate bfloat16"):
    compare_bundles(golden, cand, profile="f32")
  report = compare_bundles(golden, cand, profile="bf16")
  assert report.passed, report.text(failing_only=True)
  assert report.row("embedding").candidate_dtype == "bfloat16"
  rng = np.random.default_rng(3)
  cand["layers.1.v_proj"] = synth.with_error(golden["layers.1.v_proj"], 0.3, rng).astype(ml_dtypes.bfloat16)
  report = compare_bundles(golden, cand, profile="bf16")
  assert report.first_divergent == "layers.1.v_proj" and report.verdict.status == "jump"


def _errs(table):
  return {n: bisect.StageError(rel_l2=r, bit_equal=(r == 0), breached=b) for n, (r, b) in table.items()}


def test_analyse_rule_on_a_plain_table():
  order = ["a", "b", "c", "d", "e"]  # unknown names: the reference is the previous stage
  growth, v = bisect.analyse(
      order,
      _errs({"a": (0, False), "b": (1e-7, False), "c": (2e-6, False), "d": (3e-6, True), "e": (1e-3, True)}),
      jump_factor=10,
      noise_floor=1e-7,
  )
  assert growth["b"].jump  # differs although its input is bit-identical: the error entered here
  assert growth["c"].growth == pytest.approx(20) and growth["c"].jump
  assert growth["d"].growth == pytest.approx(1.5) and not growth["d"].jump
  assert v.status == "drift" and v.first_breach == "d" and v.first_divergent == "c" and v.path == ("d", "c")
  _, v = bisect.analyse(
      order,
      _errs({"a": (0, False), "b": (0, False), "c": (0, False), "d": (5e-5, True), "e": (1e-3, True)}),
      jump_factor=10,
      noise_floor=1e-7,
  )
  assert v.status == "jump" and v.first_divergent == "d"
  _, v = bisect.analyse(order, _errs({n: (1e-7, False) for n in order}), 10, 1e-7)
  assert v.status == "pass" and v.first_divergent is None


def test_qwen_data_flow_inputs():
  names = set(synth.golden_stages(num_layers=2, qk_norm=True))
  assert bisect.qwen_stage_inputs("layers.1.attn_norm", names) == ("layers.0.output",)
  assert bisect.qwen_stage_inputs("layers.0.post_attn_residual", names) == ("layers.0.attn_out", "embedding")
  assert bisect.qwen_stage_inputs("layers.0.q_rope", names) == ("layers.0.q_norm",)
  assert bisect.qwen_stage_inputs("layers.0.q_rope", names - {"layers.0.q_norm"}) == ("layers.0.q_proj",)
  assert bisect.qwen_stage_inputs("final_norm", names) == ("layers.1.output",)
  assert bisect.qwen_stage_inputs("logits", names) == ("final_norm",)
  assert bisect.qwen_stage_inputs("custom_thing", names) is None
  assert math.isinf(bisect.analyse(["x", "y"], _errs({"x": (0, False), "y": (1.0, True)}), 10, 0.0)[0]["y"].growth)


# ------------------------------------------------------------------------------------------------------------------
# A stage with several inputs (issue 16 section 3): the reference is the worst input, and a stage is only "clean
# input" when every input is bit-identical.
# ------------------------------------------------------------------------------------------------------------------


def test_a_stage_with_one_clean_and_one_drifting_input_is_drift_not_jump():
  # a is bit-identical; b took an error (its only input is clean: the error entered at b); c reads both and grows
  # b's error by 2, below the jump factor 10. Hand-computed: ref(c) = b, growth(c) = 2e-4 / 1e-4 = 2.
  order = ["a", "b", "c"]
  inputs = {"a": (), "b": ("a",), "c": ("a", "b")}
  errors = {
      "a": bisect.StageError(rel_l2=0.0, bit_equal=True, breached=False),
      "b": bisect.StageError(rel_l2=1e-4, bit_equal=False, breached=False),
      "c": bisect.StageError(rel_l2=2e-4, bit_equal=False, breached=True),
  }
  growth, v = bisect.analyse(order, errors, jump_factor=10.0, noise_floor=1e-7, inputs=inputs)
  assert growth["c"] == bisect.StageGrowth(ref_stage="b", growth=2e-4 / 1e-4, jump=False)
  assert growth["b"] == bisect.StageGrowth(ref_stage="a", growth=1e-4 / 1e-7, jump=True)
  assert growth["a"].jump is False
  assert (v.status, v.first_breach, v.first_divergent, v.path) == ("drift", "c", "b", ("c", "b"))
  assert (v.ref_stage, v.max_growth_stage) == ("b", "b")
  # the inputs in the other order: the worst input is still the reference
  growth, v = bisect.analyse(order, errors, 10.0, 1e-7, inputs={**inputs, "c": ("b", "a")})
  assert growth["c"].ref_stage == "b" and not growth["c"].jump and v.first_divergent == "b"
  # ...and when every input of c is clean, c's own error is a jump wherever its growth
  clean = {**errors, "b": bisect.StageError(rel_l2=0.0, bit_equal=True, breached=False)}
  growth, v = bisect.analyse(order, clean, 10.0, 1e-7, inputs=inputs)
  assert growth["c"].jump and (v.status, v.first_divergent) == ("jump", "c")


def test_qwen_residual_with_a_clean_and_a_drifting_input():
  # layers.0.output reads layers.0.ffn_out and layers.0.post_attn_residual (tests/bundles/test_qwen_graph.py)
  order = ["layers.0.post_attn_residual", "layers.0.ffn_out", "layers.0.output"]
  errors = {
      "layers.0.post_attn_residual": bisect.StageError(rel_l2=0.0, bit_equal=True, breached=False),
      "layers.0.ffn_out": bisect.StageError(rel_l2=3e-6, bit_equal=False, breached=False),
      "layers.0.output": bisect.StageError(rel_l2=6e-6, bit_equal=False, breached=True),
  }
  growth, v = bisect.analyse(order, errors, jump_factor=10.0, noise_floor=1e-7)
  g = growth["layers.0.output"]
  assert g.ref_stage == "layers.0.ffn_out" and g.growth == pytest.approx(2.0, rel=1e-12) and not g.jump
  assert v.status == "drift" and v.first_divergent == "layers.0.ffn_out"


def test_verdict_to_json_and_back():
  v = bisect.Verdict(
      "drift", "layers.0.q_proj", "layers.1.output", float("inf"), "layers.0.ffn_out", ("a", "b"), "b", 3.5, 2
  )
  d = v.to_dict()
  assert d == {
      "status": "drift",
      "first_divergent": "layers.0.q_proj",
      "first_breach": "layers.1.output",
      "growth": "inf",
      "ref_stage": "layers.0.ffn_out",
      "path": ["a", "b"],
      "max_growth_stage": "b",
      "max_growth": 3.5,
      "n_breached": 2,
  }
  assert bisect.Verdict.from_dict(d) == v and not v.passed
  p = bisect.Verdict("pass", None, None, None, None)
  assert p.passed and bisect.Verdict.from_dict(p.to_dict()) == p and p.to_dict()["growth"] is None
