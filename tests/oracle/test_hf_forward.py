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
