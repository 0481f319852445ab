"""Tiny seeded HF Qwen models for testing and calibrating the bundle comparison (needs torch + transformers).

Stages are captured with the oracle's own capture,
:func:`parity_jax.oracle.hf_forward.capture_hf_stages`.
"""

from __future__ import annotations

import numpy as np


def tiny_qwen(
    kind: str = "qwen2", num_layers: int = 4, init: float = 0.02, seed: int = 0, hidden: int = 64, vocab: int = 256
):
  """A seeded random HF model in float32, eager attention, with non-zero q/k/v biases (Qwen2) so that dropping one shows."""
  import torch
  import transformers

  torch.manual_seed(seed)
  common = dict(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=2 * hidden,
      num_hidden_layers=num_layers,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=128,
      initializer_range=init,
      tie_word_embeddings=False,
  )
  if kind == "qwen2":
    config = transformers.Qwen2Config(**common)
    model_cls = transformers.Qwen2ForCausalLM
  elif kind == "qwen3":
    config = transformers.Qwen3Config(head_dim=hidden // 4, **common)
    model_cls = transformers.Qwen3ForCausalLM
  else:
    raise ValueError(kind)
  config._attn_implementation = "eager"
  model = model_cls(config)
  with torch.no_grad():
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        if proj.bias is not None:
          proj.bias.normal_(0.0, 4 * init)
  return model.eval()


def capture(model, tokens) -> dict[str, np.ndarray]:
  """The oracle's stages of ``model`` on ``tokens``, in the model's dtype, in execution order."""
  from parity_jax.oracle.hf_forward import capture_hf_stages

  return dict(capture_hf_stages(model, np.asarray(tokens)))
