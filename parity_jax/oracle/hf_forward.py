"""The oracle forward pass: HF transformers (PyTorch, CPU) with every stage captured.

``hf_stages(model_dir, tokens, attention_mask=None)`` runs the Hugging Face
Qwen2/Qwen3 model in float32 with ``attn_implementation="eager"`` and returns
the stages named by :mod:`parity_jax.bundles.qwen_graph`, in the same layouts the JAX
model emits. Nothing here uses parity_jax's own model: the tensors come from
transformers' modules, read with hooks:

* forward hooks on modules: ``embed_tokens`` (embedding), ``input_layernorm``
  (attn_norm), ``q/k/v_proj``, ``q_norm``/``k_norm`` (Qwen3, already
  ``[B, T, heads, hd]`` there), ``o_proj`` (attn_out),
  ``post_attention_layernorm`` (ffn_norm), ``gate_proj``/``up_proj``,
  ``mlp.act_fn`` (ffn_silu), ``down_proj`` (ffn_out), the decoder layer
  (output), ``model.norm`` (final_norm), and the returned logits;
* forward pre-hooks for module *inputs*: ``o_proj`` (attention, the merged
  heads), ``post_attention_layernorm`` (post_attn_residual), ``down_proj``
  (ffn_swiglu);
* ``q_rope``/``k_rope`` are the query/key that transformers hands to its
  attention function after RoPE: the module-level ``eager_attention_forward``
  of the model's modeling module is wrapped for the duration of the call and
  records them (transposed from ``[B, heads, T, hd]`` to ``[B, T, heads, hd]``).

Every stage must be recorded exactly once, or the capture fails loudly.
torch and transformers are imported lazily.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from parity_jax.errors import UsageError
from parity_jax.oracle import quiet_transformers, require_oracle, to_numpy
from parity_jax.bundles.qwen_graph import qwen_stage_names

__all__ = ["hf_stages", "capture_hf_stages", "load_hf_model"]


def _torch_dtype(dtype: str):
  import torch

  table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
  if dtype not in table:
    raise UsageError(f"dtype must be float32 or bfloat16, got {dtype!r}")
  return table[dtype]


def load_hf_model(model_dir: str | os.PathLike, dtype: str = "float32"):
  """``AutoModelForCausalLM.from_pretrained`` on CPU, eager attention, eval mode, in ``dtype``."""
  require_oracle()
  import transformers

  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise UsageError(f"no such model directory: {model_dir}")
  kwargs = {"attn_implementation": "eager"}
  major = int(transformers.__version__.split(".")[0])
  kwargs["dtype" if major >= 5 else "torch_dtype"] = _torch_dtype(dtype)
  with quiet_transformers():  # keep tool and test output to the point
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
  return model.eval()


def _stage_numpy(t) -> np.ndarray:
  """A captured stage as numpy: float32, float64 and bfloat16 only, bit-exact."""
  a = to_numpy(t)
  if a.dtype not in (np.float32, np.float64, ml_dtypes.bfloat16):
    raise UsageError(f"unexpected stage dtype {t.dtype}")
  return a


class _Recorder:
  """Collects stage tensors by canonical name; a name recorded twice is an error."""

  def __init__(self) -> None:
    self.stages: dict[str, np.ndarray] = {}

  def put(self, name: str, tensor) -> None:
    if name in self.stages:
      raise RuntimeError(f"oracle capture: stage {name} recorded twice")
    self.stages[name] = _stage_numpy(tensor)


def _first(x):
  return x[0] if isinstance(x, (tuple, list)) else x


@contextlib.contextmanager
def _hooks(model, rec: _Recorder, qk_norm: bool) -> Iterator[None]:
  """Registers every hook and wraps the eager attention function; undoes all of it on exit."""
  handles = []

  def out_hook(name):
    def hook(module, args, output):
      rec.put(name, _first(output))

    return hook

  def in_hook(name):
    def hook(module, args):
      rec.put(name, args[0])

    return hook

  base = model.model
  handles.append(base.embed_tokens.register_forward_hook(out_hook("embedding")))
  handles.append(base.norm.register_forward_hook(out_hook("final_norm")))
  for i, layer in enumerate(base.layers):
    p = f"layers.{i}."
    attn, mlp = layer.self_attn, layer.mlp
    handles += [
        layer.input_layernorm.register_forward_hook(out_hook(p + "attn_norm")),
        attn.q_proj.register_forward_hook(out_hook(p + "q_proj")),
        attn.k_proj.register_forward_hook(out_hook(p + "k_proj")),
        attn.v_proj.register_forward_hook(out_hook(p + "v_proj")),
        attn.o_proj.register_forward_pre_hook(in_hook(p + "attention")),
        attn.o_proj.register_forward_hook(out_hook(p + "attn_out")),
        layer.post_attention_layernorm.register_forward_pre_hook(in_hook(p + "post_attn_residual")),
        layer.post_attention_layernorm.register_forward_hook(out_hook(p + "ffn_norm")),
        mlp.gate_proj.register_forward_hook(out_hook(p + "ffn_gate")),
        mlp.up_proj.register_forward_hook(out_hook(p + "ffn_up")),
        mlp.act_fn.register_forward_hook(out_hook(p + "ffn_silu")),
        mlp.down_proj.register_forward_pre_hook(in_hook(p + "ffn_swiglu")),
        mlp.down_proj.register_forward_hook(out_hook(p + "ffn_out")),
        layer.register_forward_hook(out_hook(p + "output")),
    ]
    if qk_norm:
      handles += [
          attn.q_norm.register_forward_hook(out_hook(p + "q_norm")),
          attn.k_norm.register_forward_hook(out_hook(p + "k_norm")),
      ]

  modeling = sys.modules[type(base.layers[0].self_attn).__module__]
  original = getattr(modeling, "eager_attention_forward", None)
  if original is None:
    raise UsageError(f"{modeling.__name__} has no eager_attention_forward to wrap; unsupported transformers version")

  def eager_with_capture(module, query, key, value, attention_mask, *args, **kwargs):
    p = f"layers.{module.layer_idx}."
    rec.put(p + "q_rope", query.transpose(1, 2))
    rec.put(p + "k_rope", key.transpose(1, 2))
    return original(module, query, key, value, attention_mask, *args, **kwargs)

  modeling.eager_attention_forward = eager_with_capture
  try:
    yield
  finally:
    modeling.eager_attention_forward = original
    for h in handles:
      h.remove()


def capture_hf_stages(
    model, tokens: Any, attention_mask: Any = None, position_ids: Any = None
) -> collections.OrderedDict:
  """Runs ``model`` (an HF Qwen2/Qwen3 ForCausalLM, eager attention) and returns its stages in the model's dtype."""
  require_oracle()
  import torch

  impl = getattr(model.config, "_attn_implementation", None)
  if impl != "eager":
    raise UsageError(f"the oracle needs attn_implementation='eager', the model uses {impl!r}")
  model_type = getattr(model.config, "model_type", None)
  if model_type not in ("qwen2", "qwen3"):
    raise UsageError(f"oracle capture supports qwen2/qwen3, got model_type={model_type!r}")
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise UsageError(f"tokens must be an int array [batch, seq], got {tokens.dtype} {list(tokens.shape)}")
  ids = torch.from_numpy(tokens.astype(np.int64))
  kwargs = {}
  if attention_mask is not None:
    mask = np.asarray(attention_mask)
    if mask.shape != tokens.shape:
      raise UsageError(f"attention_mask shape {list(mask.shape)} != tokens shape {list(tokens.shape)}")
    kwargs["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
  if position_ids is not None:
    pos = np.asarray(position_ids)
    kwargs["position_ids"] = torch.from_numpy(np.broadcast_to(pos, tokens.shape).astype(np.int64).copy())
    if attention_mask is None:
      # Without a 2-D mask, transformers treats restarting position_ids as packed sequences and
      # masks across them; parity_jax's positions only feed RoPE, so pin the plain causal mask.
      kwargs["attention_mask"] = torch.ones_like(ids)
  qk_norm = model_type == "qwen3"
  rec = _Recorder()
  with torch.inference_mode(), _hooks(model, rec, qk_norm):
    out = model(input_ids=ids, use_cache=False, **kwargs)
  rec.put("logits", out.logits)
  names = qwen_stage_names(model.config.num_hidden_layers, qk_norm)
  missing = [n for n in names if n not in rec.stages]
  extra = [n for n in rec.stages if n not in names]
  if missing or extra:
    raise RuntimeError(f"oracle capture incomplete: missing {missing[:5]}, unexpected {extra[:5]}")
  return collections.OrderedDict((n, rec.stages[n]) for n in names)


def hf_stages(
    model_dir: Any, tokens: Any, attention_mask: Any = None, *, position_ids: Any = None
) -> collections.OrderedDict:
  """The oracle's stages as float32 numpy arrays, in execution order.

  ``model_dir`` is an HF checkpoint directory (loaded in float32 on CPU with
  eager attention) or an already loaded float32 eager model. ``tokens`` is
  ``[B, T]``; ``attention_mask`` the optional HF 2-D padding mask. Without
  ``position_ids`` transformers uses ``arange(T)`` for every row, padded or
  not, which is also parity_jax's default.
  """
  require_oracle()
  import torch

  model = load_hf_model(model_dir, "float32") if isinstance(model_dir, (str, os.PathLike)) else model_dir
  dtype = next(model.parameters()).dtype
  if dtype != torch.float32:
    raise UsageError(f"hf_stages runs the oracle in float32; the model is {dtype} (use capture_hf_stages)")
  return capture_hf_stages(model, tokens, attention_mask, position_ids)
