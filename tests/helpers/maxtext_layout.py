"""MaxText's checkpoint layout of a Hugging Face Qwen state dict, and back, in plain numpy.

Independent ground truth for parity_jax's ``hf-to-maxtext`` / ``hf-to-maxtext-scanned`` presets and their reverses
(issue 17). MaxText needs Python >= 3.12 and cannot run here, so this module is a transcription of its public
conversion code, not a run of it; nothing here uses parity_jax.

Transcribed from AI-Hypercomputer/maxtext at commit e591f30cbbf217ed67ef71263ec0538239f9c3b8 (2026-08-22):

* ``src/maxtext/checkpoint_conversion/utils/param_mapping.py``: ``QWEN_MAXTEXT_TO_HF_PARAM_MAPPING`` (names) and
  ``QWEN_MAXTEXT_TO_HF_PARAM_HOOK_FN`` (``pad_embedding_layer``, ``reshape_kernel``, ``reshape_expert_kernel``,
  ``reshape_bias``), used for qwen2.5-*, qwen3-* dense and qwen3-*-a*b MoE alike.
* ``src/maxtext/checkpoint_conversion/to_maxtext.py``: ``_build_single_axis_stacked_tensor`` (scanned layers stack
  on ``param_scan_axis``, 1 by default; unscanned MoE experts on axis 0), ``_build_multi_axis_stacked_tensor``
  (scanned MoE: ``np.stack`` of layers, then of experts: ``[experts, layers, ...]``), ``_eager_getter`` (the cast
  to ``--save_dtype``), and ``utils.save_weights_to_checkpoint`` (what is saved, and where).
* ``src/maxtext/checkpoint_conversion/to_huggingface.py`` and ``utils/utils.py``: ``process_maxtext_param``
  (slice the stacked axes, apply the hooks with ``saving_to_hf=True``) and ``convert_jax_weight_to_numpy`` (the
  cast to ``weight_dtype``, float32 by default).
* Parameter shapes: ``experimental/agent/ckpt_conversion_agent/context/qwen3/maxtext_params.json`` (MaxText's
  own dump for qwen3-4b, unscanned), ``layers/moe.py`` (experts ``[num_experts, emb, moe_mlp]``, gate kernel
  ``[emb, num_experts]``) and ``layers/decoders.py`` (``nn.scan(variable_axes={"params": param_scan_axis})``:
  the layer axis is inserted at ``param_scan_axis`` of every parameter; ``configs/base.yml``:
  ``param_scan_axis: 1``, ``scan_layers: true``).

Layout of the checkpoint MaxText writes (``save_weights_to_checkpoint``): a CheckpointManager step ``0`` with one
item ``items`` (``PyTreeCheckpointHandler``, ``checkpoint_storage_use_ocdbt``/``_zarr3`` both true by default)
holding ``TrainState(step=0, params={"params": weights}, opt_state={})``. Every weight therefore sits under
``params/params/...``: ``params/params/token_embedder/embedding``, ``params/params/decoder/decoder_norm/scale``,
``params/params/decoder/logits_dense/kernel`` (untied only), ``params/params/decoder/layers_<i>/...``
(unscanned) or ``params/params/decoder/layers/...`` (scanned). MaxText's flat names join those keys with ``-``
(``params-decoder-layers_0-self_attention-query-kernel``, the leading ``params`` being the collection); the
outer ``params`` is the TrainState field.

Value rules (every hook moves elements without changing them; only the optional casts change bits):

* kernels: ``reshape_kernel`` = ``x.T.reshape(target)`` (to MaxText), ``x.reshape(flip(target)).T`` (to HF);
* MoE experts: ``reshape_expert_kernel`` = 2-D transpose of each expert; MoE router: ``reshape_kernel``;
* q/k/v biases (Qwen2): ``reshape_bias`` = ``reshape([heads, head_dim])``; norms: identity;
* embedding: ``pad_embedding_layer``: rows appended, ``np.zeros`` (+0.0), when MaxText's ``vocab_size`` is larger
  than HF's; truncated back to HF's vocabulary on the way back. ``logits_dense`` gets no padding hook, so for an
  untied model with a padded vocabulary ``reshape_kernel`` fails (numpy's "cannot reshape", here as in MaxText);
* casts: to MaxText, ``--save_dtype`` (default ``bfloat16``) is applied per tensor only in eager mode
  (``--lazy_load_tensors=false``): ``astype(ml_dtypes.bfloat16)`` / float32, i.e. round to nearest even. The
  default lazy mode hands orbax the tensor as read, in the file's dtype. To HF, every tensor is cast to
  ``weight_dtype`` (base.yml: float32): widening from bf16 is exact.
* Qwen attention has no ``scale_query_layer``-style hook: the 1/sqrt(head_dim) scale is applied at run time
  (``query_pre_attn_scalar`` in ``models/qwen3.py``), so the Qwen conversion is value-preserving.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

MAXTEXT_COMMIT = "e591f30cbbf217ed67ef71263ec0538239f9c3b8"
PARAM_SCAN_AXIS = 1  # configs/base.yml: param_scan_axis: 1


@dataclasses.dataclass(frozen=True)
class QwenDims:
  """What the MaxText mapping reads from the HF config.json (and what decides which MaxText leaves exist)."""

  model_type: str
  num_layers: int
  hidden: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate: int
  vocab_size: int
  num_experts: int  # 0 or 1: dense MLP (MaxText tests `num_experts > 1`)
  moe_intermediate: int
  tied: bool  # MaxText's logits_via_embedding: no logits_dense leaf, HF has no lm_head.weight
  attention_bias: bool  # Qwen2 (q/k/v biases); MaxText's attention_bias
  qk_norm: bool  # Qwen3 (q_norm/k_norm); MaxText's use_qk_norm

  @classmethod
  def from_hf_config(cls, cfg: dict) -> "QwenDims":
    model_type = cfg["model_type"]
    if model_type not in ("qwen2", "qwen3", "qwen3_moe"):
      # MaxText has no qwen2_moe mapping (no shared expert, no shared_expert_gate in QWEN_..._PARAM_MAPPING).
      raise ValueError(f"MaxText's Qwen mapping covers qwen2, qwen3, qwen3_moe; not {model_type!r}")
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0  # param_mapping.py reads both
    heads = cfg["num_attention_heads"]
    return cls(
        model_type=model_type,
        num_layers=cfg["num_hidden_layers"],
        hidden=cfg["hidden_size"],
        num_heads=heads,
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,  # hf_shape.py: the same fallback
        intermediate=cfg.get("intermediate_size", 0),
        vocab_size=cfg["vocab_size"],
        num_experts=num_experts,
        moe_intermediate=cfg.get("moe_intermediate_size") or cfg.get("intermediate_size", 0),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
    )

  @property
  def moe(self) -> bool:
    return self.num_experts > 1


# --------------------------------------------------------------------------- names


def param_mapping(dims: QwenDims, scan_layers: bool) -> dict:
  """MaxText flat name -> HF name(s): ``QWEN_MAXTEXT_TO_HF_PARAM_MAPPING``, restricted to the leaves that exist.

  A value is a str (one HF tensor), a list (scanned layers, or the experts of an unscanned MoE layer) or a list
  of lists (scanned MoE: ``[[e0_l0, e0_l1, ...], [e1_l0, ...], ...]``, experts outer). MaxText's table also
  lists biases for Qwen3 and norms for Qwen2; ``validate_and_filter_param_map_keys`` skips names the model does
  not have, which is what the restriction here does.
  """
  n, e = dims.num_layers, dims.num_experts
  m = {
      "params-token_embedder-embedding": "model.embed_tokens.weight",
      "params-decoder-decoder_norm-scale": "model.norm.weight",
  }
  if not dims.tied:
    m["params-decoder-logits_dense-kernel"] = "lm_head.weight"
  attn = {
      "pre_self_attention_layer_norm-scale": "input_layernorm.weight",
      "self_attention-query-kernel": "self_attn.q_proj.weight",
      "self_attention-key-kernel": "self_attn.k_proj.weight",
      "self_attention-value-kernel": "self_attn.v_proj.weight",
      "self_attention-out-kernel": "self_attn.o_proj.weight",
      "post_self_attention_layer_norm-scale": "post_attention_layernorm.weight",
  }
  if dims.attention_bias:
    attn["self_attention-query-bias"] = "self_attn.q_proj.bias"
    attn["self_attention-key-bias"] = "self_attn.k_proj.bias"
    attn["self_attention-value-bias"] = "self_attn.v_proj.bias"
  if dims.qk_norm:
    attn["self_attention-query_norm-scale"] = "self_attn.q_norm.weight"
    attn["self_attention-key_norm-scale"] = "self_attn.k_norm.weight"
  if dims.moe:
    per_layer = dict(attn)
    per_layer["moe_block-gate-kernel"] = "mlp.gate.weight"
    experts = {"moe_block-wi_0": "gate_proj", "moe_block-wi_1": "up_proj", "moe_block-wo": "down_proj"}
  else:
    per_layer = dict(attn)
    per_layer.update({"mlp-wi_0-kernel": "mlp.gate_proj.weight", "mlp-wi_1-kernel": "mlp.up_proj.weight"})
    per_layer["mlp-wo-kernel"] = "mlp.down_proj.weight"
    experts = {}
  if scan_layers:
    for mt, hf in per_layer.items():
      m[f"params-decoder-layers-{mt}"] = [f"model.layers.{i}.{hf}" for i in range(n)]
    for mt, proj in experts.items():
      m[f"params-decoder-layers-{mt}"] = [
          [f"model.layers.{l}.mlp.experts.{j}.{proj}.weight" for l in range(n)] for j in range(e)
      ]
  else:
    for i in range(n):
      for mt, hf in per_layer.items():
        m[f"params-decoder-layers_{i}-{mt}"] = f"model.layers.{i}.{hf}"
      for mt, proj in experts.items():
        m[f"params-decoder-layers_{i}-{mt}"] = [f"model.layers.{i}.mlp.experts.{j}.{proj}.weight" for j in range(e)]
  return m


def hf_shapes(dims: QwenDims) -> dict[str, tuple]:
  """HF name -> shape (``hf_shape.py``'s ``QWEN_HF_WEIGHTS_TO_SHAPE``, restricted like param_mapping)."""
  d, h, kv, hd = dims.hidden, dims.num_heads, dims.num_kv_heads, dims.head_dim
  s = {"model.embed_tokens.weight": (dims.vocab_size, d), "model.norm.weight": (d,)}
  if not dims.tied:
    s["lm_head.weight"] = (dims.vocab_size, d)
  for i in range(dims.num_layers):
    p = f"model.layers.{i}"
    s.update(
        {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (h * hd, d),
            f"{p}.self_attn.k_proj.weight": (kv * hd, d),
            f"{p}.self_attn.v_proj.weight": (kv * hd, d),
            f"{p}.self_attn.o_proj.weight": (d, h * hd),
        }
    )
    if dims.qk_norm:
      s[f"{p}.self_attn.q_norm.weight"] = (hd,)
      s[f"{p}.self_attn.k_norm.weight"] = (hd,)
    if dims.attention_bias:
      s[f"{p}.self_attn.q_proj.bias"] = (h * hd,)
      s[f"{p}.self_attn.k_proj.bias"] = (kv * hd,)
      s[f"{p}.self_attn.v_proj.bias"] = (kv * hd,)
    if dims.moe:
      f = dims.moe_intermediate
      s[f"{p}.mlp.gate.weight"] = (dims.num_experts, d)
      for j in range(dims.num_experts):
        s[f"{p}.mlp.experts.{j}.gate_proj.weight"] = (f, d)
        s[f"{p}.mlp.experts.{j}.up_proj.weight"] = (f, d)
        s[f"{p}.mlp.experts.{j}.down_proj.weight"] = (d, f)
    else:
      f = dims.intermediate
      s[f"{p}.mlp.gate_proj.weight"] = (f, d)
      s[f"{p}.mlp.up_proj.weight"] = (f, d)
      s[f"{p}.mlp.down_proj.weight"] = (d, f)
  return s


def _unscanned_layer_shape(dims: QwenDims, name: str) -> tuple:
  """Shape of one layer's parameter in the MaxText model (the per-layer part of a scanned one)."""
  d, h, kv, hd = dims.hidden, dims.num_heads, dims.num_kv_heads, dims.head_dim
  table = {
      "pre_self_attention_layer_norm-scale": (d,),
      "post_self_attention_layer_norm-scale": (d,),
      "self_attention-query-kernel": (d, h, hd),
      "self_attention-key-kernel": (d, kv, hd),
      "self_attention-value-kernel": (d, kv, hd),
      "self_attention-out-kernel": (h, hd, d),
      "self_attention-query-bias": (h, hd),
      "self_attention-key-bias": (kv, hd),
      "self_attention-value-bias": (kv, hd),
      "self_attention-query_norm-scale": (hd,),
      "self_attention-key_norm-scale": (hd,),
      "mlp-wi_0-kernel": (d, dims.intermediate),
      "mlp-wi_1-kernel": (d, dims.intermediate),
      "mlp-wo-kernel": (dims.intermediate, d),
      "moe_block-gate-kernel": (d, dims.num_experts),
      "moe_block-wi_0": (dims.num_experts, d, dims.moe_intermediate),
      "moe_block-wi_1": (dims.num_experts, d, dims.moe_intermediate),
      "moe_block-wo": (dims.num_experts, dims.moe_intermediate, d),
  }
  return table[name]


def maxtext_shapes(dims: QwenDims, scan_layers: bool, vocab_size: int | None = None) -> dict[str, tuple]:
  """MaxText flat name -> the shape of that parameter in MaxText's model (what to_maxtext's target shapes are)."""
  v = vocab_size or dims.vocab_size
  out = {}
  for mt in param_mapping(dims, scan_layers):
    if mt == "params-token_embedder-embedding":
      out[mt] = (v, dims.hidden)
    elif mt == "params-decoder-decoder_norm-scale":
      out[mt] = (dims.hidden,)
    elif mt == "params-decoder-logits_dense-kernel":
      out[mt] = (dims.hidden, v)
    elif scan_layers:
      one = _unscanned_layer_shape(dims, mt.split("params-decoder-layers-", 1)[1])
      # nn.scan inserts the layer axis at param_scan_axis of every parameter (experts too: [E, L, ...]).
      out[mt] = one[:PARAM_SCAN_AXIS] + (dims.num_layers,) + one[PARAM_SCAN_AXIS:]
    else:
      out[mt] = _unscanned_layer_shape(dims, mt.split("-", 3)[3])
  return out


# --------------------------------------------------------------------------- hooks (param_mapping.py)


def _pad_embedding_layer(x: np.ndarray, target_shape: tuple, saving_to_hf: bool) -> np.ndarray:
  if x.shape[0] == target_shape[0]:
    return x
  if saving_to_hf:  # MaxText to HF, truncate
    return x[: target_shape[0], :]
  if target_shape[0] < x.shape[0]:
    raise ValueError(f"MaxText vocab_size {target_shape[0]} is smaller than HF's {x.shape[0]}")
  padded = np.zeros(target_shape, dtype=x.dtype)  # HF to MaxText, pad with zeros
  padded[: x.shape[0], :] = x
  return padded


def _reshape_kernel(x: np.ndarray, target_shape: tuple, saving_to_hf: bool) -> np.ndarray:
  if saving_to_hf:
    return x.reshape(tuple(np.flip(np.array(target_shape)))).T
  return x.T.reshape(target_shape)


def _reshape_expert_kernel(x: np.ndarray, target_shape: tuple, saving_to_hf: bool) -> np.ndarray:
  del target_shape, saving_to_hf  # the same 2-D transpose both ways
  return x.transpose(0, 2, 1) if x.ndim == 3 else x.transpose(1, 0)


def _reshape_bias(x: np.ndarray, target_shape: tuple, saving_to_hf: bool) -> np.ndarray:
  del saving_to_hf
  return x.reshape(target_shape)


def _hook(mt_name: str):
  """The hook ``QWEN_MAXTEXT_TO_HF_PARAM_HOOK_FN`` registers for a MaxText name (None: identity)."""
  if mt_name == "params-token_embedder-embedding":
    return _pad_embedding_layer
  if mt_name == "params-decoder-logits_dense-kernel":
    return _reshape_kernel
  if mt_name == "params-decoder-decoder_norm-scale":
    return None
  leaf = mt_name.split("-", 3)[3]  # after params-decoder-layers[_i]-
  if leaf.endswith("-kernel") and (leaf.startswith("self_attention-") or leaf.startswith("mlp-")):
    return _reshape_kernel
  if leaf.endswith("-bias"):
    return _reshape_bias
  if leaf == "moe_block-gate-kernel":
    return _reshape_kernel
  if leaf in ("moe_block-wi_0", "moe_block-wi_1", "moe_block-wo"):
    return _reshape_expert_kernel
  return None


def _apply(hook, x, target_shape, saving_to_hf):
  return x if hook is None else hook(x, tuple(target_shape), saving_to_hf)


# --------------------------------------------------------------------------- casts


def _cast(x: np.ndarray, dtype) -> np.ndarray:
  """numpy/ml_dtypes astype (round to nearest even when narrowing), as MaxText's getters and jax's astype do."""
  if dtype is None:
    return x
  dtype = np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)
  return x if x.dtype == dtype else x.astype(dtype)


# --------------------------------------------------------------------------- HF -> MaxText


def hf_to_maxtext(
    hf: dict, hf_config: dict, *, scan_layers: bool, vocab_size: int | None = None, save_dtype=None, strict: bool = True
) -> dict:
  """The MaxText params tree ``{"params": {"params": {...}}}`` that ``to_maxtext`` saves for this HF state dict.

  ``vocab_size``: MaxText's config vocab_size (pads the embedding with zero rows when larger than HF's).
  ``save_dtype``: None = the default lazy mode (dtype kept); ``"bfloat16"``/``"float32"`` = eager mode's cast.
  ``strict``: refuse HF tensors the mapping does not use (MaxText itself ignores them silently).
  """
  dims = QwenDims.from_hf_config(hf_config)
  mapping = param_mapping(dims, scan_layers)
  shapes = maxtext_shapes(dims, scan_layers, vocab_size)
  used = set()

  def get(name):
    if name not in hf:
      raise ValueError(f"HuggingFace key {name} not found in state_dict.")  # to_maxtext's own message
    used.add(name)
    return _cast(np.asarray(hf[name]), save_dtype)

  flat = {}
  for mt, src in mapping.items():
    target = shapes[mt]
    hook = _hook(mt)
    if isinstance(src, str):  # unscanned: one tensor
      value = _apply(hook, get(src), target, False)
    elif not isinstance(src[0], list):  # scanned layers (axis param_scan_axis) or unscanned experts (axis 0)
      axis = PARAM_SCAN_AXIS if scan_layers else 0
      one = target[:axis] + target[axis + 1 :]
      value = np.stack([_apply(hook, get(k), one, False) for k in src], axis=axis)
    else:  # scanned MoE: stack layers, then experts, on the two leading axes
      one = target[2:]
      value = np.stack([np.stack([_apply(hook, get(k), one, False) for k in inner], axis=0) for inner in src], axis=0)
    if value.shape != tuple(target):
      raise ValueError(f"Shape mismatch for {mt}: Expected {tuple(target)}, got {value.shape}")
    flat[mt] = value
  if strict and set(hf) - used:
    raise ValueError(f"HF tensors the MaxText mapping does not use: {sorted(set(hf) - used)}")
  return unflatten(flat)


# --------------------------------------------------------------------------- MaxText -> HF


def maxtext_to_hf(tree: dict, hf_config: dict, *, scan_layers: bool, weight_dtype="float32") -> dict:
  """The HF state dict ``to_huggingface`` writes for a MaxText params tree (``{"params": {"params": ...}}``).

  ``weight_dtype``: MaxText's ``weight_dtype`` (base.yml: float32), the dtype every tensor is cast to; None keeps
  the checkpoint's dtype.
  """
  dims = QwenDims.from_hf_config(hf_config)
  mapping = param_mapping(dims, scan_layers)
  shapes = hf_shapes(dims)
  flat = flatten(tree)
  missing = sorted(set(mapping) - set(flat))
  extra = sorted(set(flat) - set(mapping))
  if missing or extra:
    raise ValueError(f"MaxText tree does not match the mapping: missing {missing}, extra {extra}")
  out = {}

  def put(hf_name, x, hook):
    target = shapes[hf_name]
    x = _cast(_apply(hook, x, target, True), weight_dtype)
    out[hf_name] = np.ascontiguousarray(x.reshape(target))

  for mt, dst in mapping.items():
    w, hook = np.asarray(flat[mt]), _hook(mt)
    if isinstance(dst, str):
      put(dst, w, hook)
    elif not isinstance(dst[0], list):
      axis = PARAM_SCAN_AXIS if scan_layers else 0
      for i, name in enumerate(dst):
        put(name, np.take(w, i, axis=axis), hook)
    else:  # scanned MoE: experts on axis 0, then layers on axis 0 of each expert's slice
      for j, inner in enumerate(dst):
        for i, name in enumerate(inner):
          put(name, w[j][i], hook)
  return out


# --------------------------------------------------------------------------- trees


def unflatten(flat: dict) -> dict:
  """MaxText flat names (``params-decoder-...``) -> the saved tree ``{"params": {"params": {"decoder": ...}}}``."""
  tree: dict = {}
  for name, value in flat.items():
    node = tree.setdefault("params", {})
    parts = name.split("-")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return tree


def flatten(tree: dict) -> dict:
  """Inverse of unflatten: the saved tree (under the TrainState's ``params``) -> MaxText flat names."""
  out = {}

  def walk(node, path):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, path + (k,))
      else:
        out["-".join(path + (k,))] = v

  walk(tree["params"], ())
  return out


def train_state_item(tree: dict) -> dict:
  """The whole item MaxText saves (``TrainState(step=0, params=..., opt_state={})``; ``apply_fn``/``tx`` static)."""
  return {"step": 0, "params": tree["params"], "opt_state": {}}
