"""``model.cached_step`` against the full forward: a prefill then one token at a time over a KV cache.

The full forward is checked against HF's eager forward elsewhere (test_model_long_context.py, sliding window
included); here the cached path must give the same last-position logits at every length, on a config whose
window (3) is shorter than the sequence, so the cached step's own sliding-window bias is what keeps a sliding
layer from seeing keys the window drops. A control proves the window changes the logits at those lengths.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from parity_jax import qwen2
from parity_jax.qwen2.model import Model, cached_step
from tests.helpers.qwen import config_dict

SEQ, PREFILL = 9, 4


@pytest.fixture(scope="module")
def sliding():
  cfg = qwen2.parse_config(
      config_dict(
          "qwen2", use_sliding_window=True, sliding_window=3, layer_types=["sliding_attention", "full_attention"]
      )
  )
  assert cfg.sliding_layers == (0,) and cfg.sliding_window == 3, cfg
  model = Model(cfg, qwen2.init_params(cfg, seed=3, scale=0.3))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, SEQ)).astype(np.int32)
  return model, tokens


def _cached_last_logits(model: Model, tokens: np.ndarray) -> list[np.ndarray]:
  """The last logits after the prefill of PREFILL tokens, then after each further token, through cached_step."""
  cfg = model.config
  b = tokens.shape[0]
  shape = (b, SEQ, cfg.num_kv_heads, cfg.head_dim)
  cache = tuple((jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)) for _ in range(cfg.num_layers))
  key_mask = jnp.ones((b, SEQ), jnp.int32)
  positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (b, SEQ))
  out = []
  start, stop = 0, PREFILL
  while stop <= SEQ:
    logits, cache, _ = cached_step(
        model,
        jnp.asarray(tokens[:, start:stop]),
        jnp.asarray(positions[:, start:stop]),
        key_mask,
        cache,
        jnp.int32(start),
    )
    out.append(np.asarray(logits)[:, -1])
    start, stop = stop, stop + 1
  return out


def test_cached_steps_with_a_sliding_window_match_the_full_forward(sliding):
  model, tokens = sliding
  cached = _cached_last_logits(model, tokens)
  assert len(cached) == SEQ - PREFILL + 1
  # causal: position n-1 of one full forward is the last position of the forward over the first n tokens
  want = np.asarray(qwen2.forward(model, tokens))
  unwindowed = np.asarray(
      qwen2.forward(Model(dataclasses.replace(model.config, sliding_layers=()), model.params), tokens)
  )
  for i, got in enumerate(cached):
    n = PREFILL + i
    np.testing.assert_allclose(got, want[:, n - 1], rtol=1e-5, atol=1e-5, err_msg=f"length {n}")
    # the window (3) drops keys at every one of these lengths: the control must differ
    assert np.abs(unwindowed[:, n - 1] - want[:, n - 1]).max() > 1e-3, n
