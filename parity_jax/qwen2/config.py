"""Qwen2 / Qwen3 (dense and mixture-of-experts) model configuration parsed from a Hugging Face ``config.json``.

Two on-disk styles exist and both load:

* transformers 4.x (what the published Qwen2.5 / Qwen3 checkpoints ship):
  top-level ``rope_theta``, ``rope_scaling`` (``null``, or e.g.
  ``{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}``),
  ``sliding_window`` with ``use_sliding_window`` and ``max_window_layers``,
  ``torch_dtype``;
* transformers 5.x (what ``save_pretrained`` writes today):
  ``rope_parameters: {rope_theta, rope_type, ...}``, ``layer_types``, ``dtype``.

Both are read the way transformers 5.23 (the pinned oracle) reads them.

The parser is an allowlist, as penzai's is: every attribute of the config is
either *handled* (parsed into :class:`QwenConfig`), *knowingly ignored* (listed
in :data:`IGNORED` with the reason it cannot change the forward pass), or
*conditional* (listed in :data:`CONDITIONAL`: accepted only at the value that
keeps the math we implement). Anything else, and any value this
implementation does not reproduce (a RoPE type other than default / linear /
dynamic / yarn, a non-SiLU activation, non-causal attention, quantised
weights, ...), is refused with a one-line :class:`~parity_jax.errors.UsageError`
naming the attribute. It never guesses.

Long-context variants (all as transformers 5.23 applies them):

* ``rope_type`` ``linear``, ``dynamic`` (NTK, recomputed from the sequence
  length at run time) and ``yarn``, recorded as a hashable :class:`RopeScaling`;
* the Qwen2/Qwen3 sliding window: ``sliding_window`` only counts when
  ``use_sliding_window`` is true; the layers it applies to are ``layer_types``'
  ``"sliding_attention"`` entries, or, without ``layer_types``, every layer
  ``i >= max_window_layers`` (``Qwen2Config.__post_init__``).

Mixtures of experts (``qwen2_moe``: Qwen1.5-MoE, Qwen2-57B-A14B; ``qwen3_moe``:
Qwen3-30B-A3B, Qwen3-235B-A22B), as transformers 5.23 builds them:

* a layer ``i`` has the sparse block when ``num_experts > 0``, ``i`` is not in
  ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``; the others
  keep the dense MLP of ``intermediate_size``;
* the block routes each token to ``num_experts_per_tok`` of ``num_experts``
  experts (SwiGLU MLPs of ``moe_intermediate_size``), weighted by the top-k of
  the router's softmax, renormalised when ``norm_topk_prob``; Qwen2-MoE adds a
  shared expert (``shared_expert_intermediate_size``) behind a sigmoid gate;
* Qwen2-MoE's q/k/v biases follow ``qkv_bias`` (default true), its default
  sliding layers are the even ``i < max_window_layers``
  (``Qwen2MoeConfig.__post_init__``), and it writes ``sliding_window: 0`` when
  the window is off; Qwen3-MoE has q/k norms, ``attention_bias``, its expert
  count under ``num_experts`` (4.x) or ``num_local_experts`` (5.x), ``head_dim``
  defaulting to ``hidden_size / num_attention_heads``, and a window (when on)
  on every layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from parity_jax.errors import UsageError

__all__ = [
    "QwenConfig",
    "RopeScaling",
    "load_config",
    "parse_config",
    "SUPPORTED_MODEL_TYPES",
    "MOE_MODEL_TYPES",
    "HANDLED",
    "IGNORED",
    "CONDITIONAL",
    "ROPE_TYPES",
]

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
_LAYER_TYPES = ("full_attention", "sliding_attention")
# transformers' configuration_utils._LEGACY_LAYER_TYPE_REMAP, restricted to what maps onto _LAYER_TYPES.
_LEGACY_LAYER_TYPES = {"attention": "full_attention"}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")

# Class defaults of transformers 5.23's Qwen2Config / Qwen3Config, used where config.json omits the key.
_HF_DEFAULT_MAX_POSITION_EMBEDDINGS = 32768
_HF_DEFAULT_SLIDING_WINDOW = 4096
_HF_DEFAULT_MAX_WINDOW_LAYERS = 28
# Class defaults of Qwen2MoeConfig / Qwen3MoeConfig for the MoE keys.
_HF_MOE_DEFAULTS = {
    "qwen2_moe": dict(
        num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632
    ),
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
}

# --- The allowlist ---------------------------------------------------------------------------------------------
# Attributes parsed into QwenConfig (or read to decide it). Per model type: Qwen2 has no attention_bias
# (transformers hard-wires its q/k/v biases), so the key is unknown there.
_HANDLED_COMMON = frozenset(
    {
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "rms_norm_eps",
        "tie_word_embeddings",
        "max_position_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "partial_rotary_factor",
        "original_max_position_embeddings",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "layer_types",
        "dtype",
        "torch_dtype",
    }
)
_HANDLED_MOE = frozenset(
    {
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
    }
)
HANDLED: Mapping[str, frozenset] = {
    "qwen2": _HANDLED_COMMON,
    "qwen3": _HANDLED_COMMON | {"attention_bias"},
    "qwen2_moe": _HANDLED_COMMON | _HANDLED_MOE | {"qkv_bias", "shared_expert_intermediate_size"},
    # Qwen3-MoE has no layer_types (its window, when on, covers every layer); max_window_layers is read and unused,
    # as transformers leaves it; 5.x writes the expert count as num_local_experts.
    "qwen3_moe": (_HANDLED_COMMON - {"layer_types"}) | _HANDLED_MOE | {"attention_bias", "num_local_experts"},
}

_GENERATION = "a generation setting (transformers pops it from the model config on load); not part of the forward pass"
_OUTPUTS = "selects which outputs HF returns, not their values"
# Attributes known not to change the forward pass, with the reason.
IGNORED: Mapping[str, str] = {
    "architectures": "names the HF class to instantiate; model_type selects the math",
    "transformers_version": "the writer's version (provenance)",
    "_name_or_path": "provenance",
    "name_or_path": "provenance",
    "_commit_hash": "provenance",
    "bos_token_id": "tokenizer / generation id",
    "eos_token_id": "tokenizer / generation id",
    "sep_token_id": "tokenizer / generation id",
    "decoder_start_token_id": "tokenizer / generation id",
    "pad_token_id": "HF's nn.Embedding padding_idx only zeroes that row's gradient and init; "
    "the stored embedding row is used as is",
    "tokenizer_class": "tokenizer metadata",
    "prefix": "pipeline metadata",
    "task_specific_params": "pipeline metadata",
    "finetuning_task": "classification-head metadata",
    "id2label": "classification-head metadata",
    "label2id": "classification-head metadata",
    "num_labels": "classification-head metadata",
    "problem_type": "classification-head metadata",
    "use_cache": "KV cache for generation; a full-sequence forward computes the same values",
    "initializer_range": "weight initialisation only; weights come from the checkpoint",
    "attention_dropout": "dropout is inactive at inference (HF passes dropout=0.0 unless training)",
    "output_attentions": _OUTPUTS,
    "output_hidden_states": _OUTPUTS,
    "return_dict": _OUTPUTS,
    "use_return_dict": _OUTPUTS,
    "torchscript": "export plumbing (tied weights are cloned, with equal values)",
    "chunk_size_feed_forward": "not used by the Qwen2/Qwen3 modeling code (and chunking would not change values)",
    "use_bfloat16": "legacy TensorFlow flag; the loader's dtype decides",
    "tf_legacy_loss": "training loss only",
    "is_decoder": "not read by the Qwen2/Qwen3 modeling code (a causal LM is a decoder)",
    "cross_attention_hidden_size": "not read: Qwen2/Qwen3 have no cross-attention",
    "attn_implementation": "selects HF's attention kernel; the math is eager attention's",
    "_attn_implementation_autoset": "HF bookkeeping for the attention kernel",
    "_attn_implementation_internal": "HF bookkeeping (transformers skips it on load)",
    "experts_implementation": "selects HF's MoE kernel (eager loop, grouped_mm, ...); each computes the same experts",
    "output_router_logits": "returns the router logits (for the auxiliary loss); not their values",
    "router_aux_loss_coef": "weight of the load-balancing loss in training; not part of the forward pass",
    "_experts_implementation_internal": "HF bookkeeping (transformers skips it on load)",
    # transformers.GenerationConfig._get_default_generation_params() in 5.23 (use_cache is above)
    **{
        k: _GENERATION
        for k in (
            "assistant_confidence_threshold",
            "assistant_lookbehind",
            "bad_words_ids",
            "begin_suppress_tokens",
            "diversity_penalty",
            "do_sample",
            "early_stopping",
            "encoder_no_repeat_ngram_size",
            "encoder_repetition_penalty",
            "epsilon_cutoff",
            "eta_cutoff",
            "exponential_decay_length_penalty",
            "forced_bos_token_id",
            "forced_eos_token_id",
            "length_penalty",
            "max_length",
            "min_length",
            "no_repeat_ngram_size",
            "num_assistant_tokens",
            "num_assistant_tokens_schedule",
            "num_beam_groups",
            "num_beams",
            "num_return_sequences",
            "output_scores",
            "remove_invalid_values",
            "repetition_penalty",
            "return_dict_in_generate",
            "suppress_tokens",
            "target_lookbehind",
            "temperature",
            "top_k",
            "top_p",
            "typical_p",
        )
    },
}

# Attributes accepted only at these values (anything else would change the math, or names a model we do not run).
CONDITIONAL: Mapping[str, tuple[tuple[Any, ...], str]] = {
    "is_causal": ((True,), "bidirectional attention is not implemented"),
    "pretraining_tp": ((1,), "tensor-parallel-split linear layers are not implemented"),
    "quantization_config": ((None,), "quantized checkpoints are not supported"),
    "is_encoder_decoder": ((False,), "Qwen2/Qwen3 are decoder-only"),
    "add_cross_attention": ((False,), "Qwen2/Qwen3 have no cross-attention"),
    "tie_encoder_decoder": ((False,), "Qwen2/Qwen3 are decoder-only"),
    "pruned_heads": (({},), "pruned attention heads are not implemented"),
    "use_mrope": ((False,), "multimodal RoPE (Qwen2-VL) is not implemented"),  # Qwen2.5 base configs carry false
}

# Keys a RoPE parameter dict may hold, per rope_type (transformers' _validate_<type>_rope_parameters).
_ROPE_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_ROPE_KEYS = {
    "default": _ROPE_COMMON,
    "linear": _ROPE_COMMON | {"factor"},
    "dynamic": _ROPE_COMMON | {"factor"},
    "yarn": _ROPE_COMMON
    | {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A scaled RoPE variant, resolved the way transformers 5.23 resolves it (hashable static data).

  * ``linear``: ``inv_freq / factor``.
  * ``dynamic``: at run time, when ``max(positions) + 1 > max_position_embeddings``
    the base becomes ``theta * (factor * L / max_pos - (factor - 1)) ** (hd / (hd - 2))``
    with ``L = max(positions) + 1``; otherwise the unscaled frequencies.
  * ``yarn``: per-frequency blend of ``inv_freq`` and ``inv_freq / factor``
    with a linear ramp between the correction dims of ``beta_fast`` /
    ``beta_slow`` at ``original_max_position_embeddings`` (floored / ceiled
    when ``truncate``); cos and sin are multiplied by ``attention_factor``.
  """

  rope_type: str  # "linear" | "dynamic" | "yarn"
  factor: float
  max_position_embeddings: int | None = None  # dynamic: HF's config.max_position_embeddings (the scaling threshold)
  original_max_position_embeddings: int | None = None  # yarn
  attention_factor: float = 1.0  # yarn: explicit, or derived from factor / mscale / mscale_all_dim as HF does
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Everything the forward pass needs; hashable, so it can be static under ``jax.jit``."""

  model_type: str  # "qwen2" | "qwen3"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  rope_theta: float
  tie_word_embeddings: bool
  qkv_bias: bool  # Qwen2: always (hard-wired in HF); Qwen3: attention_bias
  o_bias: bool  # Qwen3 with attention_bias only
  qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
  max_position_embeddings: int | None = None
  rope_scaling: RopeScaling | None = None  # None: HF's "default" RoPE
  # Sliding window as HF applies it: the window (None when use_sliding_window is false) and the layers using it.
  sliding_window: int | None = None
  sliding_layers: tuple[int, ...] = ()
  stored_dtype: str | None = None  # torch_dtype / dtype as written in config.json (informational)
  source: str = "<dict>"
  # Mixture of experts (qwen2_moe / qwen3_moe): the layers with a sparse block, and its shape.
  moe_layers: tuple[int, ...] = ()
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False
  shared_expert_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert; 0: none

  @property
  def is_moe(self) -> bool:
    """True when some layer has a sparse MoE block."""
    return bool(self.moe_layers)

  @property
  def shared_expert(self) -> bool:
    return self.shared_expert_intermediate_size > 0

  @property
  def num_groups(self) -> int:
    """Query heads per kv head (GQA)."""
    return self.num_heads // self.num_kv_heads

  @property
  def q_dim(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.num_kv_heads * self.head_dim


def _fail(source: str, msg: str) -> "NoReturn":  # noqa: F821
  raise UsageError(f"{source}: {msg}")


def _int(cfg: Mapping[str, Any], key: str, source: str, default: Any = None, minimum: int = 1) -> int:
  v = cfg.get(key, default)
  if v is None:
    _fail(source, f"config has no {key!r}")
  if isinstance(v, bool) or not isinstance(v, int):
    _fail(source, f"{key} must be an integer, got {v!r}")
  if v < minimum:
    _fail(source, f"{key} must be >= {minimum}, got {v}")
  return v


def _float(v: Any, key: str, source: str) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
    _fail(source, f"{key} must be a positive finite number, got {v!r}")
  return float(v)


def _bool(cfg: Mapping[str, Any], key: str, source: str, default: bool) -> bool:
  v = cfg.get(key, default)
  if not isinstance(v, bool):
    _fail(source, f"{key} must be true or false, got {v!r}")
  return v


def _check_allowlist(cfg: Mapping[str, Any], model_type: str, source: str) -> None:
  """Every key is handled, knowingly ignored, or conditional at an accepted value; else one line naming it."""
  handled = HANDLED[model_type]
  unknown = sorted(k for k in cfg if k not in handled and k not in IGNORED and k not in CONDITIONAL)
  if len(unknown) == 1:
    _fail(source, f"unknown attribute {unknown[0]!r} (not handled, not known to be harmless); refusing to guess")
  if unknown:
    _fail(
        source,
        f"unknown attributes {', '.join(map(repr, unknown))} (not handled, not known to be harmless); "
        "refusing to guess",
    )
  for key, (allowed, why) in CONDITIONAL.items():
    if key in cfg:
      v = cfg[key]
      if not any(type(v) is type(a) and v == a for a in allowed):
        _fail(
            source,
            f"{key}={json.dumps(v, sort_keys=True)} is not implemented ({why}; only " f"{json.dumps(allowed[0])})",
        )


def _rope(cfg: Mapping[str, Any], head_dim: int, source: str) -> tuple[float, RopeScaling | None]:
  """``rope_theta`` and the RoPE variant from either style, as transformers 5.23 standardises them.

  ``convert_rope_params_to_dict``: a truthy ``rope_scaling`` replaces
  ``rope_parameters``; the top-level ``rope_theta`` fills in a missing
  ``rope_theta``; ``type`` is the legacy spelling of ``rope_type``. For yarn,
  ``original_max_position_embeddings`` defaults to ``max_position_embeddings``
  and a top-level ``original_max_position_embeddings`` takes priority
  (``standardize_rope_params``). Where transformers would silently prefer one
  of two contradicting values, this refuses instead.
  """
  where, rope, rope_type = _rope_section(cfg, source)
  theta = _rope_theta(cfg, rope, where, source)
  if rope_type == "default":
    return theta, None
  mpe = cfg.get("max_position_embeddings", _HF_DEFAULT_MAX_POSITION_EMBEDDINGS)
  if "factor" not in rope:
    _fail(source, f"{where} has no factor (transformers requires it for rope_type {rope_type!r})")
  factor = rope["factor"]
  if rope_type == "linear":
    return theta, RopeScaling("linear", _float(factor, f"{where}.factor", source))
  if rope_type == "dynamic":
    if head_dim <= 2:
      _fail(source, f"dynamic RoPE needs head_dim > 2 (its exponent is hd / (hd - 2)), got {head_dim}")
    return theta, RopeScaling("dynamic", _float(factor, f"{where}.factor", source), max_position_embeddings=mpe)
  return theta, _yarn(cfg, rope, where, mpe, factor, source)


def _rope_section(cfg: Mapping[str, Any], source: str) -> tuple[str, Mapping[str, Any], str]:
  """``(where, rope dict, rope_type)``: the one RoPE section in force, its keys checked against its type."""
  scaling = cfg.get("rope_scaling")
  params = cfg.get("rope_parameters")
  if scaling and params:
    _fail(
        source,
        "both rope_scaling and rope_parameters are set (transformers would use rope_scaling and drop "
        "rope_parameters); refusing to guess",
    )
  where = "rope_scaling" if scaling else "rope_parameters"
  rope = scaling or params or {}
  if not isinstance(rope, Mapping):
    _fail(source, f"{where} must be an object, got {rope!r}")
  if "rope_type" in rope and "type" in rope and rope["rope_type"] != rope["type"]:
    _fail(source, f"{where}.rope_type={rope['rope_type']!r} contradicts {where}.type={rope['type']!r}")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    _fail(source, f"{where}.rope_type={rope_type!r} is not implemented (only {', '.join(ROPE_TYPES)})")
  extra = sorted(set(rope) - _ROPE_KEYS[rope_type])
  if extra:
    _fail(
        source,
        f"{where} has {extra}, which rope_type {rope_type!r} does not use (transformers would ignore it); "
        "refusing to guess",
    )
  for prf, key in (
      (rope.get("partial_rotary_factor"), f"{where}.partial_rotary_factor"),
      (cfg.get("partial_rotary_factor"), "partial_rotary_factor"),
  ):
    if prf is not None and (isinstance(prf, bool) or prf != 1.0):
      _fail(source, f"{key}={prf!r} is not implemented (only full rotary)")
  return where, rope, rope_type


def _rope_theta(cfg: Mapping[str, Any], rope: Mapping[str, Any], where: str, source: str) -> float:
  """The RoPE base: the section's ``rope_theta``, else the top-level one; never both different, never neither."""
  top = cfg.get("rope_theta")
  if "rope_theta" in rope and rope["rope_theta"] is not None:
    theta = _float(rope["rope_theta"], f"{where}.rope_theta", source)
    if top is not None and _float(top, "rope_theta", source) != theta:
      _fail(source, f"rope_theta={top!r} contradicts {where}.rope_theta={rope['rope_theta']!r}")
    return theta
  if top is not None:
    return _float(top, "rope_theta", source)
  _fail(source, "config has neither rope_theta nor rope_parameters.rope_theta (refusing to guess the RoPE base)")


def _yarn(
    cfg: Mapping[str, Any], rope: Mapping[str, Any], where: str, mpe: int, factor: Any, source: str
) -> RopeScaling:
  """YaRN as transformers' ``_compute_yarn_parameters`` resolves it, in Python floats as it computes them."""
  orig = rope.get("original_max_position_embeddings")
  top_orig = cfg.get("original_max_position_embeddings")
  if top_orig is not None:
    if orig is not None and orig != top_orig:
      _fail(
          source,
          f"original_max_position_embeddings={top_orig!r} contradicts "
          f"{where}.original_max_position_embeddings={orig!r}",
      )
    orig = top_orig
  if orig is None:
    orig = mpe
  if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
    _fail(source, f"{where}.original_max_position_embeddings must be a positive integer, got {orig!r}")
  factor = mpe / orig if factor is None else _float(factor, f"{where}.factor", source)
  numbers = {}
  for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
    v = rope.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
      _fail(source, f"{where}.{key} must be a number, got {v!r}")
    numbers[key] = v
  truncate = rope.get("truncate", True)
  if not isinstance(truncate, bool):
    _fail(source, f"{where}.truncate must be true or false, got {truncate!r}")

  def get_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

  attention_factor = numbers["attention_factor"]
  if attention_factor is None:
    if numbers["mscale"] and numbers["mscale_all_dim"]:
      attention_factor = float(get_mscale(factor, numbers["mscale"]) / get_mscale(factor, numbers["mscale_all_dim"]))
    else:
      attention_factor = get_mscale(factor)
  elif attention_factor <= 0:
    _fail(source, f"{where}.attention_factor must be positive, got {attention_factor!r}")
  return RopeScaling(
      "yarn",
      factor,
      original_max_position_embeddings=orig,
      attention_factor=float(attention_factor),
      beta_fast=float(numbers["beta_fast"] or 32),
      beta_slow=float(numbers["beta_slow"] or 1),
      truncate=truncate,
  )


def _sliding(
    cfg: Mapping[str, Any], num_layers: int, source: str, model_type: str = "qwen2"
) -> tuple[int | None, tuple[int, ...]]:
  """The sliding window and the layers it applies to, as transformers 5.23's config classes decide.

  ``__post_init__``: ``sliding_window`` (class default 4096 when absent) is
  dropped unless ``use_sliding_window``; without ``layer_types``, layer ``i``
  is ``"sliding_attention"`` when the window is set and
  ``i >= max_window_layers`` (default 28; Qwen2-MoE: ``i`` even and
  ``i < max_window_layers``). Qwen3-MoE has no layer types: the window covers
  every layer. Legacy layer type ``"attention"`` means ``"full_attention"``. A
  sliding layer without a window makes transformers fail
  (``create_sliding_window_causal_mask``), so it is refused. Qwen2-MoE writes
  ``sliding_window: 0`` when the window is off, which is accepted then.
  """
  use = _bool(cfg, "use_sliding_window", source, False)
  window = cfg.get("sliding_window", _HF_DEFAULT_SLIDING_WINDOW)
  off_zero = model_type == "qwen2_moe" and not use and window == 0 and not isinstance(window, bool)
  if not off_zero and window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
    _fail(source, f"sliding_window must be a positive integer or null, got {window!r}")
  if not use:
    window = None
  max_window_layers = _int(cfg, "max_window_layers", source, default=_HF_DEFAULT_MAX_WINDOW_LAYERS, minimum=0)
  if model_type == "qwen3_moe":
    return window, tuple(range(num_layers)) if window is not None else ()
  layer_types = cfg.get("layer_types")
  if layer_types is None:
    if model_type == "qwen2_moe":
      sliding = lambda i: window is not None and (i + 1) % 2 == 1 and i < max_window_layers  # noqa: E731
    else:
      sliding = lambda i: window is not None and i >= max_window_layers  # noqa: E731
    layer_types = ["sliding_attention" if sliding(i) else "full_attention" for i in range(num_layers)]
  else:
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
      _fail(source, f"layer_types must list {num_layers} entries, got {layer_types!r}")
    layer_types = [_LEGACY_LAYER_TYPES.get(t, t) if isinstance(t, str) else t for t in layer_types]
    bad = sorted({repr(t) for t in layer_types if t not in _LAYER_TYPES})
    if bad:
      _fail(source, f"layer_types {bad} are not implemented (only {list(_LAYER_TYPES)})")
  layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
  if layers and window is None:
    _fail(
        source,
        f"layer_types marks layers {list(layers)[:8]} sliding_attention but there is no window "
        "(use_sliding_window is false or sliding_window is null; transformers fails there)",
    )
  return window, layers


def _moe(cfg: Mapping[str, Any], model_type: str, num_layers: int, source: str) -> dict[str, Any]:
  """The sparse blocks of a ``qwen2_moe`` / ``qwen3_moe`` config, as transformers 5.23's decoder layers decide them."""
  if model_type not in MOE_MODEL_TYPES:
    return {}
  defaults = _HF_MOE_DEFAULTS[model_type]
  experts = cfg.get("num_experts")
  if model_type == "qwen3_moe" and "num_local_experts" in cfg:
    if experts is not None and experts != cfg["num_local_experts"]:
      _fail(source, f"num_experts={experts!r} contradicts num_local_experts={cfg['num_local_experts']!r}")
    experts = cfg["num_local_experts"]
  key = "num_experts" if "num_experts" in cfg or "num_local_experts" not in cfg else "num_local_experts"
  # absent: the class default, as transformers takes it (a null is refused, as before)
  experts = _int({key: experts} if key in cfg else {}, key, source, default=defaults["num_experts"], minimum=0)
  step = _int(cfg, "decoder_sparse_step", source, default=1)
  only = cfg.get("mlp_only_layers")
  only = [] if only is None else only
  if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
    _fail(source, f"mlp_only_layers must be a list of layer indices, got {only!r}")
  outside = sorted(i for i in only if not 0 <= i < num_layers)
  if outside:
    _fail(source, f"mlp_only_layers {outside} lie outside the {num_layers} layers; refusing to guess")
  moe_layers = tuple(i for i in range(num_layers) if i not in only and experts > 0 and (i + 1) % step == 0)
  out: dict[str, Any] = {"moe_layers": moe_layers}
  if not moe_layers:
    return out
  top_k = _int(cfg, "num_experts_per_tok", source, default=defaults["num_experts_per_tok"])
  if top_k > experts:
    _fail(source, f"num_experts_per_tok={top_k} exceeds num_experts={experts}")
  out.update(
      num_experts=experts,
      num_experts_per_tok=top_k,
      moe_intermediate_size=_int(cfg, "moe_intermediate_size", source, default=defaults["moe_intermediate_size"]),
      norm_topk_prob=_bool(cfg, "norm_topk_prob", source, False),
  )
  if model_type == "qwen2_moe":
    out["shared_expert_intermediate_size"] = _int(
        cfg, "shared_expert_intermediate_size", source, default=defaults["shared_expert_intermediate_size"]
    )
  return out


def _head_dim(cfg: Mapping[str, Any], model_type: str, hidden: int, num_heads: int, source: str) -> int:
  head_dim = cfg.get("head_dim")
  if head_dim is None:
    if model_type == "qwen3":
      head_dim = 128  # Qwen3Config's class default (Qwen3MoeConfig has none: hidden_size // heads, as below)
    else:
      if hidden % num_heads:
        _fail(
            source, f"hidden_size={hidden} is not divisible by num_attention_heads={num_heads} and no head_dim is given"
        )
      head_dim = hidden // num_heads
  else:
    head_dim = _int(cfg, "head_dim", source)
  if head_dim % 2:
    _fail(source, f"head_dim={head_dim} must be even for rotate-half RoPE")
  return head_dim


def parse_config(cfg: Mapping[str, Any], source: str = "config.json") -> QwenConfig:
  """Validates a config.json dict (4.x or 5.x style) against the allowlist and returns a :class:`QwenConfig`."""
  if not isinstance(cfg, Mapping):
    _fail(source, f"expected a JSON object, got {type(cfg).__name__}")
  model_type = cfg.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    _fail(source, f"model_type={model_type!r} is not supported (only {', '.join(SUPPORTED_MODEL_TYPES)})")
  _check_allowlist(cfg, model_type, source)
  act = cfg.get("hidden_act", "silu")
  if act != "silu":
    _fail(source, f"hidden_act={act!r} is not implemented (only 'silu')")

  hidden = _int(cfg, "hidden_size", source)
  num_layers = _int(cfg, "num_hidden_layers", source)
  num_heads = _int(cfg, "num_attention_heads", source)
  kv = cfg.get("num_key_value_heads")
  num_kv_heads = num_heads if kv is None else _int(cfg, "num_key_value_heads", source)
  if num_heads % num_kv_heads:
    _fail(source, f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
  head_dim = _head_dim(cfg, model_type, hidden, num_heads, source)
  if model_type in ("qwen3", "qwen3_moe"):
    bias = _bool(cfg, "attention_bias", source, False)
    qkv_bias, o_bias, qk_norm = bias, bias, True
  elif model_type == "qwen2_moe":
    qkv_bias, o_bias, qk_norm = _bool(cfg, "qkv_bias", source, True), False, False
  else:
    # transformers' Qwen2Attention hard-wires bias=True on q/k/v and none on o_proj.
    qkv_bias, o_bias, qk_norm = True, False, False

  tie = _bool(cfg, "tie_word_embeddings", source, False)
  mpe = cfg.get("max_position_embeddings")
  if mpe is not None:
    mpe = _int(cfg, "max_position_embeddings", source)
  theta, scaling = _rope(cfg, head_dim, source)
  window, sliding_layers = _sliding(cfg, num_layers, source, model_type)
  moe = _moe(cfg, model_type, num_layers, source)
  stored_dtype = cfg.get("dtype") or cfg.get("torch_dtype")
  if stored_dtype is not None and not isinstance(stored_dtype, str):
    _fail(source, f"dtype must be a string, got {stored_dtype!r}")
  return QwenConfig(
      model_type=model_type,
      vocab_size=_int(cfg, "vocab_size", source),
      hidden_size=hidden,
      intermediate_size=_int(cfg, "intermediate_size", source),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      rms_norm_eps=_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
      rope_theta=theta,
      tie_word_embeddings=tie,
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      qk_norm=qk_norm,
      max_position_embeddings=mpe,
      rope_scaling=scaling,
      sliding_window=window,
      sliding_layers=sliding_layers,
      stored_dtype=stored_dtype,
      source=source,
      **moe,
  )


def load_config(path: str | os.PathLike) -> QwenConfig:
  """Reads ``config.json`` from a checkpoint directory (or the file itself)."""
  path = os.fspath(path)
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(path):
    raise UsageError(f"no such checkpoint directory: {path}")
  if os.path.isfile(path) and os.path.basename(path) != "config.json":
    raise UsageError(f"{path} is a file; expected an HF checkpoint directory (config.json + *.safetensors)")
  if not os.path.isfile(file):
    raise UsageError(f"{path}: no config.json")
  try:
    with open(file, encoding="utf-8") as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UsageError(f"{file}: not valid JSON: {e}") from None
  return parse_config(cfg, source=file)
