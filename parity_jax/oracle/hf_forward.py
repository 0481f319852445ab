"""The oracle forward pass: HF transformers (PyTorch, CPU) with every stage captured.

``hf_stages(model_dir, tokens, attention_mask=None)`` runs the Hugging Face
Qwen2/Qwen3 (dense or MoE) model in float32 with ``attn_implementation="eager"``
(and, for MoE, ``experts_implementation="eager"``: the plain loop over the
hit experts) and returns the stages named by :mod:`parity_jax.bundles.qwen_graph`,
in the same layouts the JAX model emits. ``hf_generate`` runs HF's greedy
``generate`` and can capture every stage of one of its steps. Nothing here
uses parity_jax's own model: the tensors come from transformers' modules,
read with hooks:

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
  records them (transposed from ``[B, heads, T, hd]`` to ``[B, T, heads, hd]``;
  with a KV cache the key holds the cached keys too, and ``k_rope`` is its
  last ``T``: the step's new keys);
* a sparse MoE block (``mlp`` with ``gate`` and ``experts``): the router's
  output tuple (``router_logits``, ``routing_weights``, ``selected_experts``
  as int32), the experts module's output (``routed_out``), the shared
  expert's output (``shared_out``) and its gate linear's (``shared_gate``),
  the block's output (``ffn_out``); HF flattens tokens to ``[B*T, ...]``
  there, reshaped back to ``[B, T, ...]``.

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

__all__ = ["hf_stages", "capture_hf_stages", "hf_generate", "load_hf_model"]

MODEL_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


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
  config = transformers.AutoConfig.from_pretrained(model_dir)
  if getattr(config, "model_type", None) in MOE_MODEL_TYPES:
    kwargs["experts_implementation"] = "eager"
  major = int(transformers.__version__.split(".")[0])
  kwargs["dtype" if major >= 5 else "torch_dtype"] = _torch_dtype(dtype)
  with quiet_transformers():  # keep tool and test output to the point
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
  return model.eval()


def _stage_numpy(t) -> np.ndarray:
  """A captured stage as numpy: float32, float64 and bfloat16 bit-exact; integer stages (expert ids) as int32."""
  a = to_numpy(t)
  if np.issubdtype(a.dtype, np.integer):
    return a.astype(np.int32)
  if a.dtype not in (np.float32, np.float64, ml_dtypes.bfloat16):
    raise UsageError(f"unexpected stage dtype {t.dtype}")
  return a


class _Recorder:
  """Collects stage tensors by canonical name; a name recorded twice is an error.

  ``active`` switches recording on and off (``hf_generate`` records one step
  of many); ``shape`` is the current call's ``(B, T)``, for the MoE stages
  HF computes on flattened tokens.
  """

  def __init__(self) -> None:
    self.stages: dict[str, np.ndarray] = {}
    self.active = True
    self.shape: tuple[int, int] | None = None

  def put(self, name: str, tensor, flat: bool = False) -> None:
    if not self.active:
      return
    if name in self.stages:
      raise RuntimeError(f"oracle capture: stage {name} recorded twice")
    if flat:
      tensor = tensor.reshape(*self.shape, *tensor.shape[1:])
    self.stages[name] = _stage_numpy(tensor)


def _is_sparse(mlp) -> bool:
  return hasattr(mlp, "experts") and hasattr(mlp, "gate")


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

  def flat_hook(name):
    def hook(module, args, output):
      rec.put(name, _first(output), flat=True)

    return hook

  def router_hook(prefix):
    def hook(module, args, output):
      logits, weights, experts = output
      rec.put(prefix + "router_logits", logits, flat=True)
      rec.put(prefix + "routing_weights", weights, flat=True)
      rec.put(prefix + "selected_experts", experts, flat=True)

    return hook

  def shape_hook(module, args, kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    rec.shape = tuple(ids.shape)

  base = model.model
  handles.append(base.register_forward_pre_hook(shape_hook, with_kwargs=True))
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
        layer.register_forward_hook(out_hook(p + "output")),
    ]
    if _is_sparse(mlp):
      handles += [
          mlp.gate.register_forward_hook(router_hook(p)),
          mlp.experts.register_forward_hook(flat_hook(p + "routed_out")),
          mlp.register_forward_hook(out_hook(p + "ffn_out")),
      ]
      if getattr(mlp, "shared_expert", None) is not None:
        handles += [
            mlp.shared_expert.register_forward_hook(flat_hook(p + "shared_out")),
            mlp.shared_expert_gate.register_forward_hook(flat_hook(p + "shared_gate")),
        ]
    else:
      handles += [
          mlp.gate_proj.register_forward_hook(out_hook(p + "ffn_gate")),
          mlp.up_proj.register_forward_hook(out_hook(p + "ffn_up")),
          mlp.act_fn.register_forward_hook(out_hook(p + "ffn_silu")),
          mlp.down_proj.register_forward_pre_hook(in_hook(p + "ffn_swiglu")),
          mlp.down_proj.register_forward_hook(out_hook(p + "ffn_out")),
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
    rec.put(p + "k_rope", key[:, :, -query.shape[2] :].transpose(1, 2))  # the step's new keys (after the cache)
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
  if model_type not in MODEL_TYPES:
    raise UsageError(f"oracle capture supports {', '.join(MODEL_TYPES)}, got model_type={model_type!r}")
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
  qk_norm = model_type in ("qwen3", "qwen3_moe")
  rec = _Recorder()
  with torch.inference_mode(), _hooks(model, rec, qk_norm):
    out = model(input_ids=ids, use_cache=False, **kwargs)
  rec.put("logits", out.logits)
  return _ordered(model, rec)


def _stage_names_of(model) -> list[str]:
  """The stage names of an HF model, from its own modules (which layers are sparse, whether a shared expert)."""
  layers = model.model.layers
  moe = [i for i, layer in enumerate(layers) if _is_sparse(layer.mlp)]
  shared = any(getattr(layers[i].mlp, "shared_expert", None) is not None for i in moe)
  qk_norm = hasattr(layers[0].self_attn, "q_norm")
  return qwen_stage_names(len(layers), qk_norm, moe, shared)


def _ordered(model, rec: _Recorder) -> collections.OrderedDict:
  names = _stage_names_of(model)
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


def hf_generate(
    model_dir: Any, tokens: Any, max_new_tokens: int, attention_mask: Any = None, capture_step: int | None = None
):
  """HF's greedy ``generate`` (float32, eager, CPU): ``(sequences [B, T + N], logits [N, B, V])``.

  ``generate(do_sample=False, output_logits=True, return_dict_in_generate=True)``
  with no end-of-sequence stop (the model's ``eos_token_id`` is set aside for
  the call), so every row gets ``max_new_tokens`` tokens. ``logits`` are the
  raw logits of each step. With ``capture_step=k`` it also returns the
  stages of the k-th forward call of the generation (0: the prefill), as
  :func:`capture_hf_stages` names them (the logits of the last position only,
  as ``generate`` computes them).
  """
  require_oracle()
  import torch
  import transformers

  model = load_hf_model(model_dir, "float32") if isinstance(model_dir, (str, os.PathLike)) else model_dir
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise UsageError(f"tokens must be an int array [batch, seq], got {tokens.dtype} {list(tokens.shape)}")
  ids = torch.from_numpy(tokens.astype(np.int64))
  kwargs = {}
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask).astype(np.int64))
  gc = transformers.GenerationConfig(
      do_sample=False,
      max_new_tokens=int(max_new_tokens),
      min_new_tokens=0,
      output_logits=True,
      return_dict_in_generate=True,
      pad_token_id=0,
      eos_token_id=None,
  )
  saved = model.generation_config
  model.generation_config = transformers.GenerationConfig(pad_token_id=0)  # no eos stop from the model's own config
  rec = _Recorder()
  rec.active = False
  calls = [0]

  def count(module, args, kwargs_):
    rec.active = capture_step is not None and calls[0] == capture_step
    calls[0] += 1

  handle = model.register_forward_pre_hook(count, with_kwargs=True)
  try:
    qk_norm = hasattr(model.model.layers[0].self_attn, "q_norm")
    with torch.inference_mode(), _hooks(model, rec, qk_norm):
      if capture_step is None:
        out = model.generate(ids, generation_config=gc, **kwargs)
      else:
        logits_hook = model.register_forward_hook(lambda m, a, o: rec.put("logits", o.logits))
        try:
          out = model.generate(ids, generation_config=gc, **kwargs)
        finally:
          logits_hook.remove()
  finally:
    handle.remove()
    model.generation_config = saved
  sequences = out.sequences.numpy()
  if sequences.shape[1] != tokens.shape[1] + max_new_tokens:
    raise RuntimeError(f"HF generate returned {sequences.shape[1] - tokens.shape[1]} new tokens, not {max_new_tokens}")
  logits = np.stack([to_numpy(step) for step in out.logits])
  if capture_step is None:
    return sequences, logits
  return sequences, logits, _ordered(model, rec)
