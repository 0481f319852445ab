"""Tiny seeded HF Qwen2-MoE / Qwen3-MoE models (needs torch + transformers), saved as transformers writes them.

Weights are widened with :func:`parity_jax.oracle.forward_goldens.widen_weights`
(unit-variance projections, so routing has clear winners and attention is
not uniform); the experts run HF's eager loop.
"""

from __future__ import annotations

import pathlib
from typing import Any

# Shapes of the tests' models: 2-3 layers, hidden 32, 8 experts, top-2, vocab 128.
COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_intermediate_size=16,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def tiny_moe(kind: str, seed: int, **over: Any):
  """A float32 HF ``Qwen2MoeForCausalLM`` / ``Qwen3MoeForCausalLM``, eager attention and experts, widened weights."""
  import torch
  import transformers

  from parity_jax.oracle.forward_goldens import widen_weights

  torch.manual_seed(seed)
  config = dict(COMMON, **over)
  if kind == "qwen2_moe":
    config.setdefault("shared_expert_intermediate_size", 24)
    cfg = transformers.Qwen2MoeConfig(**config)
    cls = transformers.Qwen2MoeForCausalLM
  elif kind == "qwen3_moe":
    config.setdefault("head_dim", 8)
    cfg = transformers.Qwen3MoeConfig(**config)
    cls = transformers.Qwen3MoeForCausalLM
  else:
    raise ValueError(kind)
  cfg._attn_implementation = "eager"
  cfg._experts_implementation = "eager"
  model = cls(cfg).to(torch.float32).eval()
  widen_weights(model, seed)
  return model


def save(model, path: pathlib.Path) -> pathlib.Path:
  """``save_pretrained`` (per-expert tensors, as transformers writes MoE checkpoints) without progress bars."""
  import transformers

  logging = transformers.utils.logging
  bars = logging.is_progress_bar_enabled()
  logging.disable_progress_bar()
  try:
    model.save_pretrained(path)
  finally:
    if bars:
      logging.enable_progress_bar()
  return path
