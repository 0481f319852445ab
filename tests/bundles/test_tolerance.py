"""Tolerance profiles: built-ins, first-match rules and strict validation of profile JSON."""

import json

import pytest

from parity_jax.bundles import tolerance
from parity_jax.errors import UsageError


def test_builtins_cover_every_stage_and_are_consistent():
  for name, p in tolerance.BUILTIN_PROFILES.items():
    assert p.rule_for("layers.7.v_proj").stages == ".*"
    assert tolerance.profile_from_dict(p.to_dict()) == p  # JSON form round-trips
    if name != "exact":
      # a breach over inputs at the noise floor is always a jump (see parity_jax.bisect)
      assert all(r.max_rel_l2 >= p.jump_factor * p.noise_floor for r in p.rules)
  assert tolerance.BUILTIN_PROFILES["f32"].rule_for("logits").min_argmax_agreement == 1.0
  assert tolerance.BUILTIN_PROFILES["f32"].rule_for("layers.0.q_proj").max_rel_l2 == 1e-5
  assert tolerance.BUILTIN_PROFILES["exact"].rule_for("logits").bit_exact
  assert tolerance.BUILTIN_PROFILES["bf16"].widen_dtypes and not tolerance.BUILTIN_PROFILES["f32"].widen_dtypes


def test_json_profile_first_match_and_extends(tmp_path):
  path = tmp_path / "p.json"
  path.write_text(
      json.dumps(
          {
              "schema": "parity_jax.tolerance_profile/1",
              "name": "loose-attention",
              "extends": "f32",
              "jump_factor": 5,
              "rules": [{"stages": r"layers\.\d+\.attention", "max_rel_l2": 1e-4, "min_cosine": 0.9999}],
          }
      )
  )
  p = tolerance.load_profile_json(path)
  assert p.name == "loose-attention" and p.jump_factor == 5.0
  assert p.noise_floor == tolerance.BUILTIN_PROFILES["f32"].noise_floor
  assert p.rule_for("layers.3.attention").max_rel_l2 == 1e-4
  assert p.rule_for("layers.3.attention_extra").max_rel_l2 == 1e-5  # fullmatch, not search
  assert p.rule_for("logits").max_kl == 1e-6  # from f32
  assert tolerance.resolve_profile(str(path)) == p


def test_no_matching_rule_is_an_error():
  p = tolerance.profile_from_dict(
      {"schema": "parity_jax.tolerance_profile/1", "rules": [{"stages": "logits", "max_kl": 1}]}
  )
  with pytest.raises(UsageError, match="no rule for stage 'embedding'"):
    p.rule_for("embedding")


_S = "parity_jax.tolerance_profile/1"


@pytest.mark.parametrize(
    "doc,message",
    [
        ([], "must be a JSON object"),
        ({"rules": [{"stages": ".*", "max_rel_l2": 1}]}, '"schema" must be'),
        ({"schema": "parity_jax.tolerance_profile/2", "rules": []}, '"schema" must be'),
        ({"schema": _S}, "at least one rule"),
        ({"schema": _S, "rules": {"stages": ".*"}}, '"rules" must be a list'),
        ({"schema": _S, "rules": [{"stages": ".*", "max_rel_l2": -1}]}, r"rules\[0\]\.max_rel_l2 must lie in"),
        ({"schema": _S, "rules": [{"stages": ".*", "max_rel_l2": "1e-5"}]}, "must be a finite number"),
        ({"schema": _S, "rules": [{"stages": ".*", "min_cosine": 1.5}]}, "min_cosine must lie in"),
        ({"schema": _S, "rules": [{"stages": ".*", "max_ulp": 2.5}]}, "max_ulp must be an integer"),
        ({"schema": _S, "rules": [{"stages": "(", "max_rel_l2": 1}]}, "not a valid regular expression"),
        ({"schema": _S, "rules": [{"stages": ".*"}]}, "sets no threshold"),
        ({"schema": _S, "rules": [{"stages": ".*", "bit_exact": False}]}, "sets no threshold"),
        ({"schema": _S, "rules": [{"stages": ".*", "max_rel_l2": 1, "max_rell2": 1}]}, "unknown key 'max_rell2'"),
        ({"schema": _S, "rules": [{"stages": ".*", "max_rel_l2": 1, "topk": 3}]}, "topk only makes sense"),
        ({"schema": _S, "rules": [{"max_rel_l2": 1}]}, "stages must be a non-empty"),
        ({"schema": _S, "extends": "f16", "rules": []}, '"extends" must name a built-in'),
        ({"schema": _S, "extends": "f32", "jump_factor": 1}, "jump_factor must be greater than 1"),
        ({"schema": _S, "extends": "f32", "noise_floor": -1}, "noise_floor must lie in"),
        ({"schema": _S, "extends": "f32", "widen_dtypes": "yes"}, "widen_dtypes must be true or false"),
        ({"schema": _S, "extends": "f32", "tolerance": 1}, "unknown key 'tolerance'"),
    ],
)
def test_bad_profiles_are_one_line_usage_errors(doc, message):
  with pytest.raises(UsageError, match=message) as e:
    tolerance.profile_from_dict(doc, source="p.json")
  assert "\n" not in str(e.value)


def test_unreadable_profile_files(tmp_path):
  with pytest.raises(UsageError, match="no such profile file"):
    tolerance.load_profile_json(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(UsageError, match="not valid JSON"):
    tolerance.load_profile_json(bad)
  with pytest.raises(UsageError, match="unknown profile 'f64'"):
    tolerance.resolve_profile("f64")


def test_a_rule_is_bit_exact_only_when_it_says_so():
  # a rule with a threshold and no "bit_exact" key compares within that threshold: it is not bit-exact
  p = tolerance.profile_from_dict({"schema": _S, "rules": [{"stages": ".*", "max_rel_l2": 0.001}]})
  (rule,) = p.rules
  assert rule.bit_exact is False
  assert rule.describe() == "rel_l2<=0.001"
  assert rule.to_dict() == {"stages": ".*", "max_rel_l2": 0.001}
  assert tolerance.ToleranceRule(stages="logits", max_kl=0.5).describe() == "kl<=0.5"
  # asked for, it is
  p = tolerance.profile_from_dict({"schema": _S, "rules": [{"stages": ".*", "bit_exact": True}]})
  assert p.rules[0].bit_exact is True and p.rules[0].describe() == "bit-exact"


def test_resolve_profile_takes_every_form_and_refuses_the_rest(tmp_path):
  """A Profile as is, a built-in name, a dict, a JSON path; a rule read back from its dict; the remaining refusals."""
  f32 = tolerance.builtin_profile("f32")
  assert tolerance.resolve_profile(f32) is f32 and tolerance.resolve_profile("f32") is f32
  doc = {"schema": _S, "name": "mine", "rules": [{"stages": ".*", "max_rel_l2": 0.5, "max_ulp": 3}]}
  from_dict = tolerance.resolve_profile(doc)
  assert from_dict.name == "mine" and from_dict.rule_for("x").max_rel_l2 == 0.5 and from_dict.rule_for("x").max_ulp == 3
  (tmp_path / "p.json").write_text(json.dumps(doc))
  assert tolerance.resolve_profile(str(tmp_path / "p.json")) == from_dict
  rule = from_dict.rules[0]
  assert tolerance.ToleranceRule.from_dict({**rule.to_dict(), "not_a_field": 1}) == rule
  with pytest.raises(UsageError, match="profile must be a Profile, a built-in name or a JSON path, got int"):
    tolerance.resolve_profile(3)
  with pytest.raises(UsageError, match="cannot read profile"):
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{")
    tolerance.load_profile_json(tmp_path / "bin.json")
  for rules, words in [
      (["x"], 'rules\\[0\\] must be an object, got "x"'),
      ([{"stages": ".*", "max_ulp": -1}], r"rules\[0\]\.max_ulp must lie in \[0, 9223372036854775807\], got -1"),
      (
          [{"stages": ".*", "max_ulp": 1, "bit_exact": "yes"}],
          'rules\\[0\\]\\.bit_exact must be true or false, got "yes"',
      ),
  ]:
    with pytest.raises(UsageError, match=words):
      tolerance.profile_from_dict({"schema": _S, "rules": rules}, source="p.json")
  for key in ("name", "description"):
    with pytest.raises(UsageError, match=f"p.json: '{key}' must be a string"):
      tolerance.profile_from_dict({"schema": _S, "extends": "f32", key: 1}, source="p.json")


def test_a_rule_wants_logits_stats_when_it_sets_any_logits_threshold():
  """Any of max_kl, max_mean_kl, min_argmax_agreement, min_topk_overlap asks for the logits statistics."""
  from parity_jax.bundles import ToleranceRule

  assert not ToleranceRule(stages=".*", max_rel_l2=1e-5, min_cosine=0.9, max_abs_diff=1.0).wants_logits_stats
  for key, value in (("max_kl", 0.1), ("max_mean_kl", 0.1), ("min_argmax_agreement", 1.0), ("min_topk_overlap", 0.5)):
    assert ToleranceRule(stages=".*", **{key: value}).wants_logits_stats is True, key
