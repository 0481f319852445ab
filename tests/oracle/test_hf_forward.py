"""parity_jax.oracle.hf_forward: the HF oracle's stages and greedy generation, called directly on a tiny model.

Expectations: the committed golden of the same model and inputs (compared under
the f32 profile, never bit for bit: BLAS paths differ between machines), and
invariants of greedy decoding (each new token is the argmax of its step's
logits; the captured step's logits are that step's logits).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity_jax.bundles import BundleReader, compare_bundles  # noqa: E402
from parity_jax.errors import UsageError  # noqa: E402
from parity_jax.oracle.hf_forward import hf_generate, hf_stages, load_hf_model  # noqa: E402
from parity_jax.qwen2.parity import golden_inputs  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "goldens" / "models" / "qwen2_tied"
GOLDEN = ROOT / "goldens" / "forward" / "qwen2_tied.padded.safetensors"


@pytest.fixture(scope="module")
def model():
  return load_hf_model(MODEL)


def test_loaded_in_eval_mode_with_eager_attention_in_the_dtype_asked(model):
  assert not model.training and model.config._attn_implementation == "eager"
  assert next(model.parameters()).dtype == torch.float32
  with pytest.raises(UsageError, match="dtype must be float32 or bfloat16, got 'float16'"):
    load_hf_model(MODEL, "float16")
  with pytest.raises(UsageError, match="no such model directory"):
    load_hf_model(MODEL / "nope")


def test_stages_match_the_committed_golden_in_its_order(model):
  tokens, mask, _ = golden_inputs(GOLDEN)
  stages = hf_stages(model, tokens, mask)
  with BundleReader(GOLDEN) as r:
    names = list(r.names)
  assert list(stages) == names
  assert all(a.dtype == np.float32 for a in stages.values())
  rep = compare_bundles(str(GOLDEN), dict(stages), "f32")
  assert rep.passed, rep.text(failing_only=True)
  # position_ids = arange(T) without a mask are transformers' own default positions
  plain = hf_stages(model, tokens[2:])
  pos = hf_stages(model, tokens[2:], position_ids=np.arange(tokens.shape[1]))
  assert compare_bundles(dict(plain), dict(pos), "f32").passed


def test_bad_inputs_are_one_line(model):
  with pytest.raises(UsageError, match=r"tokens must be an int array \[batch, seq\]"):
    hf_stages(model, np.arange(4))
  with pytest.raises(UsageError, match=r"attention_mask shape \[1, 3\] != tokens shape \[1, 4\]"):
    hf_stages(model, np.ones((1, 4), int), np.ones((1, 3), int))
  with pytest.raises(UsageError, match="tokens must be an int array"):
    hf_generate(model, np.ones((2, 3), np.float32), 1)
  with pytest.raises(UsageError, match=r"tokens must be an int array \[batch, seq\], got float64 \[2\]"):
    hf_generate(model, [1.0, 2.0], 1)  # a list is taken as the array it spells


def test_greedy_generation_and_the_captured_step(model):
  tokens, mask, _ = golden_inputs(GOLDEN)
  b, t = tokens.shape
  seq, logits, stages = hf_generate(model, tokens, 3, mask, capture_step=1)
  assert seq.shape == (b, t + 3) and logits.shape == (3, b, 320)
  np.testing.assert_array_equal(seq[:, :t], tokens)
  for k in range(3):  # greedy: each new token is its step's argmax
    np.testing.assert_array_equal(seq[:, t + k], logits[k].argmax(-1))
  with BundleReader(GOLDEN) as r:
    assert list(stages) == list(r.names)
  assert stages["logits"].shape == (b, 1, 320)  # the step after the prefill computes one position
  np.testing.assert_allclose(stages["logits"][:, 0], logits[1], rtol=1e-6, atol=1e-6)
  seq2, logits2 = hf_generate(model, tokens, 2, mask)  # without a capture: two values, the same tokens
  np.testing.assert_array_equal(seq2, seq[:, : t + 2])
  assert logits2.shape == (2, b, 320)


def test_restarting_positions_without_a_mask_keep_the_plain_causal_mask(model):
  """position_ids only feed RoPE: positions that restart (0 1 2 0 1 2) must not make transformers mask the row as
  packed sequences, so the stages equal those of the same call with an explicit all-ones mask."""
  tokens = np.arange(1, 7).reshape(1, 6)
  pos = np.array([[0, 1, 2, 0, 1, 2]])
  pinned = hf_stages(model, tokens, position_ids=pos)
  explicit = hf_stages(model, tokens, np.ones((1, 6), int), position_ids=pos)
  packed = hf_stages(model, tokens[:, 3:], position_ids=pos[:, 3:])  # what a packed second sequence would see
  for name in pinned:
    np.testing.assert_allclose(pinned[name], explicit[name], rtol=1e-6, atol=1e-6, err_msg=name)
  assert not np.allclose(pinned["logits"][:, 3:], packed["logits"], rtol=1e-3, atol=1e-3)


def test_capture_refuses_other_attention_implementations_model_types_and_bf16_for_hf_stages(model):
  from types import SimpleNamespace

  from parity_jax.oracle.hf_forward import capture_hf_stages

  tokens = np.ones((1, 2), int)
  for config, words in [
      (SimpleNamespace(_attn_implementation="sdpa", model_type="qwen2"), "needs attn_implementation='eager'"),
      (SimpleNamespace(_attn_implementation="eager", model_type="llama"), "got model_type='llama'"),
  ]:
    with pytest.raises(UsageError, match=words):
      capture_hf_stages(SimpleNamespace(config=config), tokens)
  with pytest.raises(UsageError, match="hf_stages runs the oracle in float32; the model is torch.bfloat16"):
    hf_stages(load_hf_model(MODEL, "bfloat16"), tokens)
