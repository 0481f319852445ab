"""Qwen2 / Qwen3 model configuration parsed from a Hugging Face ``config.json``.

Two on-disk styles exist and both load:

* transformers 4.x (what the published Qwen2.5 / Qwen3 checkpoints ship):
  top-level ``rope_theta``, ``rope_scaling: null``, ``sliding_window`` with
  ``use_sliding_window: false``, ``torch_dtype``;
* transformers 5.x (what ``save_pretrained`` writes today):
  ``rope_parameters: {rope_theta, rope_type}``, ``layer_types``, ``dtype``.

The parser is strict in the penzai sense: every attribute value that would
change the math and that this implementation does not reproduce (RoPE
scaling, a non-SiLU activation, non-causal attention, quantised weights, ...)
is refused with a one-line :class:`~parity_jax.errors.UsageError`. It never
guesses. A sliding window cannot be judged from the config alone (it is a
no-op while the sequence fits in the window), so the config records it and
:func:`QwenConfig.check_seq_len` refuses a forward pass it would change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from parity_jax.errors import UsageError

__all__ = ["QwenConfig", "load_config", "parse_config", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
_LAYER_TYPES = ("full_attention", "sliding_attention")
_ROPE_KEYS = {"rope_theta", "rope_type"}
# Values these keys may hold without changing the math we implement.
_MUST_BE = {
    "is_causal": (True,),
    "pretraining_tp": (1,),
}


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
  # Sliding window, when enabled: the window and the layers it may apply to.
  sliding_window: int | None = None
  sliding_layers: tuple[int, ...] = ()
  stored_dtype: str | None = None  # torch_dtype / dtype as written in config.json (informational)
  source: str = "<dict>"

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

  def check_seq_len(self, seq_len: int) -> None:
    """Refuses a sequence length at which the sliding window would mask something.

    HF masks key ``j`` from query ``i`` on a sliding layer when ``j <= i - window``;
    that never happens while ``seq_len <= window``.
    """
    if self.sliding_window is not None and self.sliding_layers and seq_len > self.sliding_window:
      raise UsageError(
          f"{self.source}: sliding_window={self.sliding_window} would apply to layers {list(self.sliding_layers)[:8]} "
          f"at sequence length {seq_len}; sliding-window attention is not implemented"
      )


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


def _rope_theta(cfg: Mapping[str, Any], source: str) -> float:
  """``rope_theta`` from either style; refuses any RoPE variant other than the default."""
  scaling = cfg.get("rope_scaling")
  if scaling is not None:
    _fail(source, f"rope_scaling={json.dumps(scaling, sort_keys=True)} is not implemented (only unscaled RoPE)")
  prf = cfg.get("partial_rotary_factor")
  if prf is not None and prf != 1.0:
    _fail(source, f"partial_rotary_factor={prf!r} is not implemented (only full rotary)")
  params = cfg.get("rope_parameters")
  top = cfg.get("rope_theta")
  if params is not None:
    if not isinstance(params, Mapping):
      _fail(source, f"rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
      _fail(source, f"rope_parameters.rope_type={rope_type!r} is not implemented (only 'default')")
    extra = sorted(set(params) - _ROPE_KEYS - {"type"})
    if extra:
      _fail(source, f"rope_parameters has {extra} which is not implemented (only rope_theta, rope_type)")
    if "rope_theta" not in params:
      _fail(source, "rope_parameters has no rope_theta")
    theta = _float(params["rope_theta"], "rope_parameters.rope_theta", source)
    if top is not None and _float(top, "rope_theta", source) != theta:
      _fail(source, f"rope_theta={top!r} contradicts rope_parameters.rope_theta={params['rope_theta']!r}")
    return theta
  if top is None:
    _fail(source, "config has neither rope_theta nor rope_parameters (refusing to guess the RoPE base)")
  return _float(top, "rope_theta", source)


def _sliding(cfg: Mapping[str, Any], num_layers: int, source: str) -> tuple[int | None, tuple[int, ...]]:
  """The effective sliding window and the layers it may apply to, as transformers decides them.

  transformers only honours ``sliding_window`` when ``use_sliding_window`` is
  true. The layers come from ``layer_types`` when the config has them; a 4.x
  config without ``layer_types`` gets every layer, conservatively (4.x releases
  disagreed about ``max_window_layers``, and the forward refuses any length the
  window would affect anyway).
  """
  layer_types = cfg.get("layer_types")
  if layer_types is not None:
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
      _fail(source, f"layer_types must list {num_layers} entries, got {layer_types!r}")
    bad = sorted({t for t in layer_types if t not in _LAYER_TYPES})
    if bad:
      _fail(source, f"layer_types {bad} are not implemented (only {list(_LAYER_TYPES)})")
  if not cfg.get("use_sliding_window", False):
    return None, ()
  window = cfg.get("sliding_window")
  if window is None:
    return None, ()
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    _fail(source, f"sliding_window must be a positive integer, got {window!r}")
  if layer_types is not None:
    layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
  else:
    layers = tuple(range(num_layers))
  return window, layers


def parse_config(cfg: Mapping[str, Any], source: str = "config.json") -> QwenConfig:
  """Validates a config.json dict (4.x or 5.x style) and returns a :class:`QwenConfig`."""
  if not isinstance(cfg, Mapping):
    _fail(source, f"expected a JSON object, got {type(cfg).__name__}")
  model_type = cfg.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    _fail(source, f"model_type={model_type!r} is not supported (only {', '.join(SUPPORTED_MODEL_TYPES)})")
  if cfg.get("quantization_config") is not None:
    _fail(source, "quantized checkpoints (quantization_config) are not supported")
  act = cfg.get("hidden_act", "silu")
  if act != "silu":
    _fail(source, f"hidden_act={act!r} is not implemented (only 'silu')")
  for key, allowed in _MUST_BE.items():
    if key in cfg and cfg[key] not in allowed:
      _fail(source, f"{key}={cfg[key]!r} is not implemented (only {allowed[0]!r})")

  hidden = _int(cfg, "hidden_size", source)
  num_layers = _int(cfg, "num_hidden_layers", source)
  num_heads = _int(cfg, "num_attention_heads", source)
  kv = cfg.get("num_key_value_heads")
  num_kv_heads = num_heads if kv is None else _int(cfg, "num_key_value_heads", source)
  if num_heads % num_kv_heads:
    _fail(source, f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
  head_dim = cfg.get("head_dim")
  if head_dim is None:
    if model_type == "qwen3":
      head_dim = 128  # Qwen3Config's class default, used by transformers when config.json omits it
    else:
      if hidden % num_heads:
        _fail(source, f"hidden_size={hidden} is not divisible by num_attention_heads={num_heads} and no head_dim is given")
      head_dim = hidden // num_heads
  else:
    head_dim = _int(cfg, "head_dim", source)
  if head_dim % 2:
    _fail(source, f"head_dim={head_dim} must be even for rotate-half RoPE")

  if model_type == "qwen3":
    bias = cfg.get("attention_bias", False)
    if not isinstance(bias, bool):
      _fail(source, f"attention_bias must be true or false, got {bias!r}")
    qkv_bias, o_bias, qk_norm = bias, bias, True
  else:
    # transformers' Qwen2Attention hard-wires bias=True on q/k/v and none on o_proj.
    qkv_bias, o_bias, qk_norm = True, False, False

  tie = cfg.get("tie_word_embeddings", False)
  if not isinstance(tie, bool):
    _fail(source, f"tie_word_embeddings must be true or false, got {tie!r}")
  window, sliding_layers = _sliding(cfg, num_layers, source)
  mpe = cfg.get("max_position_embeddings")
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
      rope_theta=_rope_theta(cfg, source),
      tie_word_embeddings=tie,
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      qk_norm=qk_norm,
      max_position_embeddings=mpe if isinstance(mpe, int) and not isinstance(mpe, bool) else None,
      sliding_window=window,
      sliding_layers=sliding_layers,
      stored_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
      source=source,
  )


def load_config(path: str | os.PathLike) -> QwenConfig:
  """Reads ``config.json`` from a checkpoint directory (or the file itself)."""
  path = os.fspath(path)
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(path):
    raise UsageError(f"no such checkpoint directory: {path}")
  if not os.path.isfile(file):
    raise UsageError(f"{path}: no config.json")
  try:
    with open(file, encoding="utf-8") as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UsageError(f"{file}: not valid JSON: {e}") from None
  return parse_config(cfg, source=file)
