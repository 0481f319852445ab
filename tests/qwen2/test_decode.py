"""Greedy decoding with a KV cache against HF ``generate``: dense with a sliding window, YaRN, MoE, left padding.

The oracle is transformers' own ``generate(do_sample=False, output_logits=True, return_dict_in_generate=True)``
called here on tiny seeded models; every step's logits within 1e-5 rel-L2 (f32) and identical tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from parity_jax import qwen2  # noqa: E402
from parity_jax.bundles import compare_bundles  # noqa: E402
from parity_jax.errors import UsageError  # noqa: E402
from parity_jax.oracle import forward_goldens  # noqa: E402
from parity_jax.qwen2.model import cached_step  # noqa: E402
from tests.helpers.moe import save, tiny_moe  # noqa: E402

pytestmark = pytest.mark.oracle

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
STEPS = 6
PROMPT = np.array([[0, 0, 0, 11, 42, 7, 90], [5, 17, 99, 3, 64, 12, 8]])
MASK = np.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7])  # left padding: row 0's positions start after it


def _build(name, root):
  if name == "sliding_qwen2":  # window 4 < prompt + steps: the cache must drop what the window does
    cfg = dict(
        SMALL,
        num_hidden_layers=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    model = forward_goldens.build_model("qwen2", cfg, 7101)
  elif name == "yarn_qwen3":  # positions run past original_max_position_embeddings
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 8}
    cfg = dict(SMALL, num_hidden_layers=2, head_dim=8, max_position_embeddings=32, rope_parameters=rope)
    model = forward_goldens.build_model("qwen3", cfg, 7102)
  else:
    model = tiny_moe("qwen2_moe", seed=7103, num_hidden_layers=2)
  return model.eval(), save(model, root / name)


def _hf_generate(model, tokens, mask, steps):
  """transformers' greedy generate, every row ``steps`` tokens (no EOS stop): (sequences, logits [N, B, V])."""
  with torch.no_grad():
    out = model.generate(
        torch.from_numpy(tokens.astype(np.int64)),
        attention_mask=None if mask is None else torch.from_numpy(mask.astype(np.int64)),
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
  return out.sequences.numpy(), np.stack([lg.float().numpy() for lg in out.logits])


def _rel_l2(ref, got):
  ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
  return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("decode")
  return {name: _build(name, root) for name in ("sliding_qwen2", "yarn_qwen3", "qwen2_moe")}


@pytest.mark.parametrize("name", ["sliding_qwen2", "yarn_qwen3", "qwen2_moe"])
def test_greedy_decode_matches_hf_generate(built, name):
  hf, path = built[name]
  model = qwen2.load(path)
  want_tokens, want_logits = _hf_generate(hf, PROMPT, MASK, STEPS)  # row 0 left-padded, row 1 not
  before = cached_step._cache_size()
  got_tokens, got_logits = qwen2.generate(model, PROMPT, max_new_tokens=STEPS, attention_mask=MASK)
  # one program for the prefill and one for every decode step: never one per step
  assert cached_step._cache_size() - before <= 2
  assert got_tokens.shape == (2, PROMPT.shape[1] + STEPS) and got_logits.shape == want_logits.shape == (STEPS, 2, 128)
  np.testing.assert_array_equal(got_tokens, want_tokens)
  for k in range(STEPS):
    assert _rel_l2(want_logits[k], got_logits[k]) <= 1e-5, (name, k)


def test_no_recompilation_for_new_prompts_of_the_same_shape(built):
  _, path = built["sliding_qwen2"]
  model = qwen2.load(path)
  qwen2.generate(model, PROMPT, max_new_tokens=STEPS, attention_mask=MASK)
  size = cached_step._cache_size()
  other = (PROMPT + 1) % 128
  qwen2.generate(model, other, max_new_tokens=STEPS, attention_mask=MASK)
  assert cached_step._cache_size() == size


def test_capture_step_returns_that_steps_stages_as_hf_computes_them(built):
  from parity_jax.oracle.hf_forward import hf_generate

  hf, path = built["qwen2_moe"]
  model = qwen2.load(path)
  g_tokens, _, g_stages = hf_generate(hf, PROMPT, 3, MASK, capture_step=2)
  c_tokens, _, c_stages = qwen2.generate(model, PROMPT, max_new_tokens=3, attention_mask=MASK, capture_step=2)
  np.testing.assert_array_equal(c_tokens, g_tokens)
  assert list(c_stages) == list(g_stages) and "layers.0.router_logits" in c_stages
  assert c_stages["layers.0.router_logits"].shape[:2] == (2, 1)  # one new token per row at a decode step
  rep = compare_bundles(dict(g_stages), dict(c_stages), profile="f32")
  assert rep.passed, rep.text(failing_only=True)


def test_generate_refuses_bad_input_in_one_line(built):
  _, path = built["sliding_qwen2"]
  model = qwen2.load(path)
  right_padded = np.array([[1, 1, 1, 0, 0, 0, 0], [1] * 7])
  for kw, msg in [
      (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
      (dict(max_new_tokens=2, capture_step=2), r"capture_step must lie in \[0, 2\)"),
      (dict(max_new_tokens=2, attention_mask=right_padded), "left"),
      (
          dict(max_new_tokens=2, attention_mask=np.array([[1] * 7, [0] * 7])),
          "row 1 is all padding: nothing to generate",
      ),
      (
          dict(max_new_tokens=2, force_tokens=np.zeros((2, 3), np.int64)),
          r"force_tokens must be int \[2, 2\], got int64 \[2, 3\]",
      ),
      (
          dict(max_new_tokens=2, force_tokens=np.zeros((2, 2), np.float32)),
          r"force_tokens must be int \[2, 2\], got float32",
      ),
  ]:
    with pytest.raises(UsageError, match=msg) as e:
      qwen2.generate(model, PROMPT, **kw)
    assert "\n" not in str(e.value)
  one, logits = qwen2.generate(model, PROMPT, 1)  # the least a decode may ask for; int64 ids come back as int32
  assert one.shape == (2, PROMPT.shape[1] + 1) and one.dtype == np.int32 and logits.shape[:2] == (1, 2)
  np.testing.assert_array_equal(one[:, :-1], PROMPT)
  with pytest.raises(UsageError, match="generate\\(\\) needs a parity_jax.qwen2 Model, got str$"):
    qwen2.generate(str(path), PROMPT, 1)
  assert (one[:, -1] != [7, 3]).any()  # so the tokens forced next are not the greedy ones
  forced, forced_logits = qwen2.generate(model, PROMPT, 1, force_tokens=np.array([[7], [3]]))
  np.testing.assert_array_equal(forced, np.concatenate([PROMPT, [[7], [3]]], axis=1))  # the tokens given, not argmax
  np.testing.assert_array_equal(forced_logits, logits)  # the first step does not depend on them
