"""parity_jax.qwen2.parity called directly: inputs from a golden's provenance, argument checks, the reports' verdicts.

The goldens under goldens/forward were made by HF transformers
(parity_jax.oracle.forward_goldens); their recorded inputs are read back here
from the safetensors header with json, not through the code under test. The
reports' verdict logic is checked on hand-built rows and routing flips.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from parity_jax.bundles import resolve_profile, save_bundle
from parity_jax.errors import UsageError
from parity_jax.qwen2.parity import (
    DecodeParity,
    ForwardParity,
    StepRow,
    check_real_rows,
    decode_parity,
    default_tokens,
    forward_parity,
    golden_inputs,
)
from parity_jax.qwen2.routing import Flip, RoutingReport

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "goldens" / "models" / "qwen2_tied"
PADDED = ROOT / "goldens" / "forward" / "qwen2_tied.padded.safetensors"


def _recorded_inputs(path: pathlib.Path) -> dict:
  """The provenance's ``inputs``, parsed from the safetensors header by hand."""
  raw = path.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  meta = json.loads(raw[8 : 8 + n])["__metadata__"]
  return json.loads(meta["provenance"])["inputs"]


@pytest.fixture(scope="module")
def padded():
  """Our float32 forward of qwen2_tied against the oracle's padded golden (inputs from its provenance)."""
  return forward_parity(MODEL, PADDED)


def test_golden_inputs_are_the_recorded_tokens_and_mask():
  tokens, mask, prov = golden_inputs(PADDED)
  want = _recorded_inputs(PADDED)
  assert tokens.dtype == np.int64 and mask.dtype == np.int64
  np.testing.assert_array_equal(tokens, np.array(want["tokens"]))
  np.testing.assert_array_equal(mask, np.array(want["attention_mask"]))
  assert prov["inputs"] == want


@pytest.mark.parametrize(
    "inputs, words",
    [
        (None, "records no inputs.tokens"),
        ({"attention_mask": [[1, 1]]}, "records no inputs.tokens"),
        ({"tokens": [[1, 2], [3]]}, "not rectangular integer arrays"),
        ({"tokens": [[1, 2]], "attention_mask": [[1], [1, 0]]}, "not rectangular integer arrays"),
    ],
)
def test_golden_inputs_refuses_a_golden_without_usable_inputs(tmp_path, inputs, words):
  path = tmp_path / "g.safetensors"
  save_bundle(path, {"logits": np.zeros((1, 2, 3), np.float32)}, {} if inputs is None else {"inputs": inputs})
  with pytest.raises(UsageError, match=words):
    golden_inputs(path)


def test_golden_inputs_without_a_mask_gives_none(tmp_path):
  path = tmp_path / "g.safetensors"
  save_bundle(path, {"logits": np.zeros((1, 2, 3), np.float32)}, {"inputs": {"tokens": [[4, 5]]}})
  tokens, mask, _ = golden_inputs(path)
  assert mask is None and tokens.tolist() == [[4, 5]]


def test_default_tokens_are_seeded_ids_below_the_vocabulary():
  t = default_tokens(7, batch=3, seq=50)
  assert t.shape == (3, 50) and t.dtype == np.int64
  assert t.min() >= 0 and t.max() <= 6 and len(np.unique(t)) == 7  # 150 draws of 7 ids: every id appears
  assert default_tokens(320).shape == (2, 16)
  np.testing.assert_array_equal(default_tokens(1000, seed=3), default_tokens(1000, seed=3))
  assert not np.array_equal(default_tokens(1000, seed=3), default_tokens(1000, seed=4))


def test_check_real_rows_refuses_an_all_padding_row_only():
  check_real_rows(None)
  check_real_rows(np.array([[0, 1], [1, 0]]))
  check_real_rows(np.zeros(3))  # not a (batch, seq) mask: nothing to check per row
  with pytest.raises(UsageError, match="row 1 is all padding"):
    check_real_rows(np.array([[0, 1], [0, 0], [1, 1]]))


def test_forward_parity_argument_errors_come_before_the_model_runs(tmp_path):
  cases = [
      (dict(model_dir=tmp_path / "nope", golden=PADDED), "no such model directory"),
      (dict(model_dir=MODEL), "give a golden bundle"),
      (dict(model_dir=MODEL, golden=PADDED, oracle=True), "not golden and oracle"),
      (dict(model_dir=MODEL, oracle=True, reference_dir=MODEL), "not oracle and reference_dir"),
      (dict(model_dir=MODEL, reference_dir=tmp_path / "gone"), "no such reference directory"),
      (dict(model_dir=MODEL, golden=PADDED, attention_mask=np.zeros((3, 9), np.int64)), "row 0 is all padding"),
  ]
  for kwargs, words in cases:
    with pytest.raises(UsageError, match=words):
      forward_parity(**kwargs)


def test_the_padded_golden_passes_with_its_recorded_inputs(padded):
  want = _recorded_inputs(PADDED)
  assert padded.passed and padded.report.passed
  assert padded.first_divergent is None and padded.routing is None and padded.sharding_notes == ()
  np.testing.assert_array_equal(padded.tokens, np.array(want["tokens"]))
  np.testing.assert_array_equal(padded.attention_mask, np.array(want["attention_mask"]))
  assert isinstance(padded.attention_mask, np.ndarray)
  assert padded.golden == str(PADDED)  # compared straight from the file
  assert padded.report.profile.name == "f32"
  d = padded.to_dict()
  assert "routing" not in d and d == padded.report.to_dict()
  assert padded.text() == padded.report.text()
  assert padded._repr_html_() == padded.report._repr_html_()


def test_tokens_given_replace_the_golden_ones_and_diverge():
  tokens, _, _ = golden_inputs(PADDED)
  other = (tokens + 1) % 320
  r = forward_parity(MODEL, PADDED, tokens=other, dtype=np.float32)  # a dtype, not its name
  np.testing.assert_array_equal(r.tokens, other)
  assert r.attention_mask is None  # given tokens come without the golden's recorded mask
  assert not r.passed and r.first_divergent == "embedding" == r.report.first_divergent


def _flip(layer, gap, tolerance):
  return Flip(layer, 0, 1, (0, 1), (0, 2), gap, tolerance)


def test_routing_flips_decide_the_forward_verdict(padded):
  """A bug flip fails a passing report and is the first divergence; ties only keep it passing."""
  bug = RoutingReport((0, 1), [_flip(1, 0.5, 0.01), _flip(0, 0.001, 0.01)], runs=2, forced={0: 1, 1: 1})
  r = ForwardParity(padded.report, padded.golden, padded.candidate, padded.tokens, None, bug)
  assert not r.passed and r.first_divergent == "layers.1.selected_experts"
  d = r.to_dict()
  assert d["passed"] is False and d["first_real_divergence"] == "layers.1.selected_experts"
  assert d["routing"]["bugs"] == 1 and d["routing"]["ties"] == 1
  assert r.text().startswith(padded.report.text() + "\n\n" + bug.text())
  assert r.text().endswith("\nFAIL: first real divergence layers.1.selected_experts")
  assert r._repr_html_() == padded.report._repr_html_() + bug._repr_html_()

  ties = RoutingReport((0, 1), [_flip(0, 0.001, 0.01)], runs=2, forced={0: 1})
  r = ForwardParity(padded.report, padded.golden, padded.candidate, padded.tokens, None, ties)
  assert r.passed and r.first_divergent is None
  assert r.to_dict()["passed"] is True and r.to_dict()["first_real_divergence"] is None
  assert r.text().endswith("\nPASS (every routing flip is a tie of the reference; the replay is within tolerance)")


def _rows():
  return [
      StepRow(0, (5, 6), (5, 6), 1e-7, 0.0, 1.0, True, ()),
      StepRow(1, (7, 8), (7, 9), 0.25, 0.5, 0.5, False, ("rel_l2", "tokens")),
      StepRow(2, (1, 2), (1, 2), 3e-7, None, None, True, ()),
  ]


def test_decode_report_names_the_first_divergent_step():
  rows = _rows()
  assert rows[0].same_tokens and not rows[1].same_tokens
  assert rows[1].to_dict()["same_tokens"] is False and rows[1].to_dict()["breaches"] == ("rel_l2", "tokens")
  prompt = np.array([[3], [4]])
  g, c = np.array([[3, 5, 7, 1], [4, 6, 8, 2]]), np.array([[3, 5, 7, 1], [4, 6, 9, 2]])
  r = DecodeParity(rows, prompt, None, g, c, resolve_profile("f32"), True, 1, None)
  assert not r.passed and r.first_divergent is None
  d = r.to_dict()
  assert d["schema"] == "parity_jax.decode_parity/1" and d["passed"] is False and d["steps"] == 3
  assert d["first_divergent_step"] == 1 and d["teacher_forced"] is True and d["profile"] == "f32"
  assert d["golden_tokens"] == g.tolist() and d["candidate_tokens"] == c.tolist() and d["step_report"] is None
  assert [x["step"] for x in d["rows"]] == [0, 1, 2]
  lines = r.text().splitlines()
  assert lines[0] == (
      "decode: 3 greedy steps against HF generate, profile f32"
      " (our logits from a run fed HF's tokens: the free-running tokens part)"
  )
  assert lines[2].split() == ["0", "same", "1.00e-07", "0.00e+00", "1.000", "ok"]
  assert lines[3].split() == ["1", "differ", "2.50e-01", "5.00e-01", "0.500", "FAIL", "rel_l2,", "tokens", "<--"] + [
      "first",
      "divergent",
      "step",
  ]
  assert lines[4].split() == ["2", "same", "3.00e-07", "-", "-", "ok"]
  assert lines[-1] == "FAIL: first divergent step 1"
  failing = r.text(failing_only=True).splitlines()
  assert len(failing) == 4 and failing[2].split()[0] == "1"
  assert r._repr_html_().startswith("<pre>decode: 3 greedy steps") and "&lt;-- first divergent step" in r._repr_html_()


def test_decode_report_passes_without_a_divergent_step():
  rows = [_rows()[0], _rows()[2]]
  g = np.array([[3, 5, 1]])
  r = DecodeParity(rows, np.array([[3]]), np.array([[1]]), g, g, resolve_profile("bf16"), False, None, None)
  assert r.passed and r.first_divergent is None
  lines = r.text().splitlines()
  assert lines[0] == "decode: 2 greedy steps against HF generate, profile bf16"
  assert lines[-1] == "PASS: 2 steps, same tokens, every step's logits within bf16"
  assert r.to_dict()["teacher_forced"] is False and r.to_dict()["passed"] is True


def test_decode_parity_argument_errors(tmp_path):
  cases = [
      (dict(model_dir=tmp_path / "nope", steps=1), "no such model directory"),
      (dict(model_dir=MODEL, reference_dir=tmp_path / "gone", steps=1), "no such reference directory"),
      (dict(model_dir=MODEL, steps=0), "decode steps must be an integer >= 1, got 0"),
      (dict(model_dir=MODEL, steps=1, dtype="float16"), "dtype must be one of float32, bfloat16, got 'float16'"),
      (dict(model_dir=MODEL, steps=True), "got True"),
      (dict(model_dir=MODEL, steps=1.0), "got 1.0"),
      (
          dict(model_dir=MODEL, steps=1, attention_mask=np.array([[1, 1], [0, 0]])),
          "row 1 is all padding: .* nothing to compare",
      ),
      (dict(model_dir=MODEL, steps=1, attention_mask=np.array([[1, 0], [1, 1]])), "pad"),
  ]
  for kwargs, words in cases:
    with pytest.raises(UsageError, match=words):
      decode_parity(**kwargs)
