"""A small HF transformers stage capture for testing and calibrating the bundle comparison.

Forward hooks on a HF Qwen2/Qwen3 model record the stages that are module
inputs or outputs, under the canonical names of parity_jax.stage_names
(``q_rope``/``k_rope`` are computed inside the attention function and are not
captured here). This is a test/bench helper, not the oracle's golden capture
(parity_jax.oracle.forward_goldens). Needs torch + transformers.
"""

from __future__ import annotations

import numpy as np


def tiny_qwen(kind: str = "qwen2", num_layers: int = 4, init: float = 0.02, seed: int = 0, hidden: int = 64,
              vocab: int = 256):
  """A seeded random HF model in float32 with non-zero q/k/v biases (Qwen2) so that dropping one shows."""
  import torch
  import transformers

  torch.manual_seed(seed)
  common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=init,
                tie_word_embeddings=False)
  if kind == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
  elif kind == "qwen3":
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=hidden // 4, **common))
  else:
    raise ValueError(kind)
  with torch.no_grad():
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        if proj.bias is not None:
          proj.bias.normal_(0.0, 4 * init)
  return model.eval()


def capture(model, tokens) -> dict[str, np.ndarray]:
  """Runs ``model`` on ``tokens`` and returns name -> numpy array (model dtype) in execution order."""
  import torch

  out: dict[str, np.ndarray] = {}
  hooks = []

  def hook(name, use_input=False):
    def f(mod, args, result):
      x = args[0] if use_input else (result[0] if isinstance(result, tuple) else result)
      x = x.detach()
      out[name] = x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy().copy()
      if x.dtype == torch.bfloat16:  # keep bf16 as bf16 (exactly), not widened
        import ml_dtypes
        out[name] = out[name].astype(ml_dtypes.bfloat16)
    return f

  m = model.model
  hooks.append(m.embed_tokens.register_forward_hook(hook("embedding")))
  for i, layer in enumerate(m.layers):
    p = f"layers.{i}."
    att, mlp = layer.self_attn, layer.mlp
    pairs = [(layer.input_layernorm, "attn_norm", False), (att.q_proj, "q_proj", False), (att.k_proj, "k_proj", False),
             (att.v_proj, "v_proj", False)]
    if hasattr(att, "q_norm"):
      pairs += [(att.q_norm, "q_norm", False), (att.k_norm, "k_norm", False)]
    pairs += [(att.o_proj, "attention", True), (att.o_proj, "attn_out", False),
              (layer.post_attention_layernorm, "post_attn_residual", True), (layer.post_attention_layernorm, "ffn_norm", False),
              (mlp.gate_proj, "ffn_gate", False), (mlp.up_proj, "ffn_up", False), (mlp.act_fn, "ffn_silu", False),
              (mlp.down_proj, "ffn_swiglu", True), (mlp.down_proj, "ffn_out", False), (layer, "output", False)]
    hooks += [mod.register_forward_hook(hook(p + name, use_input)) for mod, name, use_input in pairs]
  hooks.append(m.norm.register_forward_hook(hook("final_norm")))
  try:
    with torch.no_grad():
      logits = model(torch.as_tensor(tokens)).logits.detach()
  finally:
    for h in hooks:
      h.remove()
  out["logits"] = logits.float().numpy() if logits.dtype == torch.bfloat16 else logits.numpy().copy()
  if logits.dtype == torch.bfloat16:
    import ml_dtypes
    out["logits"] = out["logits"].astype(ml_dtypes.bfloat16)
  from parity_jax.stage_names import qwen_stage_sort_key
  return dict(sorted(out.items(), key=lambda kv: qwen_stage_sort_key(kv[0])))
