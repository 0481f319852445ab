"""``model.forward``'s options and refusals on tiny random models (no checkpoint, no oracle).

The eager path is checked against HF elsewhere (test_model_oracle.py, test_model_goldens.py); here the fused
``attention=`` implementations must agree with it within float32 noise, with and without padding (the causal
kernel flag and the boolean-mask branch), and the argument checks (the model's type, the attention name, forced
experts' layers, shapes and ids) each give one UsageError.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from parity_jax import qwen2
from parity_jax.errors import UsageError
from parity_jax.qwen2.model import Model, check_forced_experts
from tests.helpers.qwen import config_dict


@pytest.fixture(scope="module")
def dense():
  cfg = qwen2.parse_config(config_dict("qwen3", num_hidden_layers=1, layer_types=["full_attention"]))
  return Model(cfg, qwen2.init_params(cfg, seed=2, scale=0.3))


def test_fused_attention_agrees_with_eager_with_and_without_padding(dense):
  tokens = np.random.default_rng(1).integers(0, dense.config.vocab_size, (2, 7)).astype(np.int32)
  ones = np.ones((2, 7), np.int32)  # for eager the same as no mask: one compiled eager forward serves both
  mask = ones.copy()
  mask[0, :3] = 0  # left padding: the fused kernel gets a boolean mask instead of is_causal
  for fused_mask, eager_mask in ((None, ones), (mask, mask)):
    want = np.asarray(qwen2.forward(dense, tokens, attention_mask=eager_mask))
    got = np.asarray(qwen2.forward(dense, tokens, attention_mask=fused_mask, attention="xla"))
    np.testing.assert_allclose(got[1], want[1], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[0, 3:], want[0, 3:], rtol=2e-5, atol=2e-5)  # a padded row's real positions
  assert dense.dtype == jnp.float32
  # captured: the fused path records every stage once, in order; row 1 (no padding either way) as eager's
  _, stages = qwen2.forward(dense, tokens, attention="xla", capture=True)
  assert list(stages) == qwen2.stage_names(dense.config)
  np.testing.assert_allclose(np.asarray(stages["logits"])[1], want[1], rtol=2e-5, atol=2e-5)


def test_forward_refuses_what_is_not_a_model_or_an_attention_name(dense):
  with pytest.raises(UsageError, match="forward\\(\\) needs a parity_jax.qwen2 Model, got Params"):
    qwen2.forward(dense.params, np.ones((1, 2), np.int32))
  with pytest.raises(UsageError, match="attention must be one of eager, xla, cudnn, auto, got 'flash'"):
    qwen2.forward(dense, np.ones((1, 2), np.int32), attention="flash")


def test_forced_experts_are_checked_against_the_moe_layers():
  d = config_dict("qwen3", num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
  d.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], mlp_only_layers=[0])
  d.pop("layer_types")
  cfg = qwen2.parse_config(d)
  assert cfg.moe_layers == (1,)
  assert check_forced_experts(cfg, None, 1, 3) is None
  assert check_forced_experts(cfg, {}, 1, 3) == (None,)
  experts, where = np.zeros((1, 3, 2), np.int64), np.array([[1, 0, 1]])
  ((e, w),) = check_forced_experts(cfg, {1: (experts, where)}, 1, 3)
  assert e.dtype == np.int32 and w.dtype == bool and w.tolist() == [[True, False, True]]
  for forced, words in [
      ([(experts, where)], "forced_experts must be a dict"),
      ({0: (experts, where)}, r"names layers \[0\] that have no sparse MoE block \(those are \[1\]\)"),
      ({1: (experts[:, :2], where)}, r"forced_experts\[1\]: expected experts \[1, 3, 2\] and where \[1, 3\]"),
      ({1: (experts, where[:, :2])}, r"forced_experts\[1\]: expected experts"),
      ({1: (experts + 4, where)}, r"forced_experts\[1\]: expert ids must lie in \[0, 4\)"),
      ({1: (experts - 1, where)}, r"expert ids must lie in"),
  ]:
    with pytest.raises(UsageError, match=words):
      check_forced_experts(cfg, forced, 1, 3)
