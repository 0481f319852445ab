"""Qwen2 / Qwen3 forward pass: pure jitted functions over the dataclass pytrees.

The math follows transformers' ``modeling_qwen2`` / ``modeling_qwen3`` (eager
attention) operation by operation, because the point of this model is to be
compared element by element against it:

* RMSNorm in float32, cast back to the activation dtype, *then* multiplied by
  the weight (``weight * normed.to(input_dtype)``);
* rotate-half RoPE with HF's ``inv_freq = 1 / base ** (arange(0, hd, 2) / hd)``
  built in float32, or its ``linear`` / ``dynamic`` / ``yarn`` variant
  (:func:`rope_inv_freq_scaled`, :func:`dynamic_inv_freq`); ``cos``/``sin``
  computed in float32, multiplied by yarn's attention factor, and cast to the
  activation dtype before they touch q and k;
* scores ``(q @ k^T) * hd**-0.5`` (the scale applied in float32, as torch's
  opmath does for a Python-float factor) plus an additive mask holding 0 where a key
  is visible and ``finfo(dtype).min`` where it is not (causal, padding and, on
  the config's sliding layers, the window), softmax in float32, probabilities
  cast back to the activation dtype;
* GQA by grouping query heads ``h = kv * G + g`` onto kv head ``kv`` (HF's
  ``repeat_kv`` order), without materialising repeated keys;
* every contraction is an ``einsum`` over named axes with
  ``precision=HIGHEST``, so float32 means float32 on every backend.

Where float32 results can still differ from HF in the last bits: matmul
accumulation order, the libm behind ``pow``/``cos``/``sin``/``exp``, and XLA's
CPU backend contracting ``a*b + c`` into fused multiply-adds inside fusions
(torch rounds the product first), and, for dynamic RoPE beyond
``max_position_embeddings``, the float32 evaluation of a power torch takes in
float64 (:func:`dynamic_inv_freq`). On the goldens that is ~1e-6 relative L2 at
worst, against the tests' 1e-5.

Fully masked query rows (the padded positions of a left-padded batch) behave
as in HF: every score there is ``score + finfo.min``, which rounds to exactly
``finfo.min``, so softmax spreads the row uniformly over all keys.

Axis letters: b batch, t query position, s key position, d hidden, v vocab,
n query heads, k kv heads, g query heads per kv head, h head_dim, i intermediate.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parity_jax.errors import UsageError
from parity_jax.qwen2 import moe
from parity_jax.qwen2.config import QwenConfig, RopeScaling
from parity_jax.qwen2.params import Attention, Layer, Mlp, Params
from parity_jax.qwen2.sharding import compute_mesh, mesh_of, place_batch, place_inputs, rewrap
from parity_jax.bundles.qwen_graph import qwen_stage_names

__all__ = [
    "ATTENTION_IMPLS",
    "Model",
    "cached_step",
    "check_forced_experts",
    "check_inputs",
    "forward",
    "key_mask_bias",
    "on_mesh",
    "stage_names",
    "rms_norm",
    "rope_inv_freq",
    "rope_inv_freq_scaled",
    "dynamic_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "attention_mask_bias",
]

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Model:
  """A config (static pytree metadata) plus its :class:`Params` (the leaves).

  ``axis_rules``: the logical-axis rules the weights were placed on a mesh
  with (None: the defaults); the forward places the inputs' batch by them.
  """

  config: QwenConfig
  params: Params
  axis_rules: tuple | None = None

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.params.embed.dtype)


jax.tree_util.register_dataclass(Model, data_fields=["params"], meta_fields=["config", "axis_rules"])


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *operands, precision=HIGHEST)


def _heads_proj(x: jax.Array, w: jax.Array) -> jax.Array:
  """``einsum("btd,nhd->btnh")`` computed as ``btd,fd->btf`` over the merged axis ``f = (n, h)``.

  Same math, same HF ``[out, in]`` weight layout; a rank-2 weight lets XLA's CPU
  dot read it in place, where the rank-3 form made it copy (transpose) every
  attention weight on every call. The merge keeps ``n`` major, so a weight
  sharded over heads stays sharded over the merged axis.
  """
  n, h, d = w.shape
  return _einsum("btd,fd->btf", x, w.reshape(n * h, d)).reshape(*x.shape[:-1], n, h)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """HF ``Qwen2RMSNorm``: normalise in float32, cast to ``x.dtype``, then scale by the weight."""
  xf = x.astype(jnp.float32)
  variance = jnp.mean(xf * xf, axis=-1, keepdims=True)
  normed = xf * jax.lax.rsqrt(variance + jnp.float32(eps))
  return weight * normed.astype(x.dtype)


def _pos_freqs(head_dim: int, theta: float) -> np.ndarray:
  """HF's ``base ** (arange(0, dim, 2, float32) / dim)`` in float32.

  The exponent is HF's float32 division; the power is evaluated in float64 and
  rounded to float32 (a correctly rounded float32 power). torch evaluates the
  float32 power with SLEEF's vectorised ``powf`` (1-ulp accurate, not always
  correctly rounded), so an element can differ from torch's by an ulp.
  """
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return np.power(np.float64(np.float32(theta)), exponent.astype(np.float64)).astype(np.float32)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """HF's default-RoPE ``inv_freq``: ``1.0 / (base ** (arange(0, dim, 2, float32) / dim))`` in float32.

  The power as in :func:`_pos_freqs`, then the float32 reciprocal, as HF takes
  it. Over 70 (head_dim, theta) pairs 99.4% of elements are bit-identical to
  torch's, the rest 1-2 ulp apart (checked by the live-oracle test). A host
  constant baked into the jitted function.
  """
  return (np.float32(1.0) / _pos_freqs(head_dim, theta)).astype(np.float32)


def rope_inv_freq_scaled(head_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[np.ndarray, float]:
  """Host-side ``(inv_freq, attention_factor)`` of a RoPE variant, as transformers 5.23's init functions compute them.

  * ``None`` (default): :func:`rope_inv_freq`, factor 1.
  * ``linear`` (``_compute_linear_scaling_rope_parameters``): the default
    ``inv_freq`` divided by ``float32(factor)`` (torch's in-place division by a
    Python scalar), factor 1.
  * ``dynamic`` (``_compute_dynamic_ntk_parameters`` at init, ``seq_len=None``):
    the frequencies used while ``max(positions) + 1 <= max_position_embeddings``;
    the base ``theta * ((factor * mpe / mpe) - (factor - 1)) ** (hd / (hd - 2))``
    in Python float64, as HF computes it there; factor 1. Longer sequences use
    :func:`dynamic_inv_freq`.
  * ``yarn`` (``_compute_yarn_parameters``): ``pos_freqs`` as :func:`_pos_freqs`;
    extrapolation ``1 / pos_freqs`` and interpolation ``1 / (float32(factor) * pos_freqs)``
    in float32; the correction range in Python float64 (``math.log``,
    floor/ceil when ``truncate``, clipped to ``[0, dim - 1]``, ``+0.001`` when
    empty); the ramp ``clamp((arange(dim // 2) - low) / (high - low), 0, 1)``
    and the blend ``interp * (1 - e) + extrap * e`` with ``e = 1 - ramp``, all
    in float32 with a rounding after each operation, as torch does them;
    ``attention_factor`` as resolved by the config. Given torch's
    ``pos_freqs`` this is bit-identical to HF's (so any difference is the
    :func:`_pos_freqs` ulp).
  """
  if scaling is None:
    return rope_inv_freq(head_dim, theta), 1.0
  if scaling.rope_type == "linear":
    return (rope_inv_freq(head_dim, theta) / np.float32(scaling.factor)).astype(np.float32), 1.0
  if scaling.rope_type == "dynamic":
    f, mpe = scaling.factor, scaling.max_position_embeddings
    base = theta * ((f * mpe / mpe) - (f - 1)) ** (head_dim / (head_dim - 2))
    return rope_inv_freq(head_dim, base), 1.0
  if scaling.rope_type != "yarn":
    raise UsageError(f"rope_type {scaling.rope_type!r} is not implemented")
  dim, f32 = head_dim, np.float32
  pos_freqs = _pos_freqs(dim, theta)

  def correction_dim(num_rotations: float) -> float:
    return (dim * math.log(scaling.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
        2 * math.log(theta)
    )

  low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0), f32(1)).astype(f32)
  extrapolation_factor = (f32(1) - ramp).astype(f32)
  extrapolation = (f32(1) / pos_freqs).astype(f32)
  interpolation = (f32(1) / (f32(scaling.factor) * pos_freqs)).astype(f32)
  inv_freq = interpolation * (f32(1) - extrapolation_factor) + extrapolation * extrapolation_factor
  return inv_freq.astype(f32), scaling.attention_factor


def dynamic_inv_freq(
    seq_len: jax.Array, head_dim: int, theta: float, factor: float, max_position_embeddings: int
) -> jax.Array:
  """Dynamic-NTK ``inv_freq`` for a traced ``seq_len > max_position_embeddings``, in float32 inside jit.

  transformers (``dynamic_rope_update`` -> ``_compute_dynamic_ntk_parameters``
  with ``seq_len = max(position_ids) + 1`` as a tensor) computes
  ``base = theta * ((factor * L / mpe) - (factor - 1)) ** (hd / (hd - 2))`` in
  float32 torch ops, except that torch's float32 ``pow`` with a Python-float
  exponent is evaluated in float64 and rounded. Here that power is the float32
  power of the float32-rounded exponent times ``1 + e_lo * log(x)`` (``e_lo``
  the exponent's rounding error): within 1 ulp of torch's, identical about 3
  times in 4. Then ``1 / base ** (arange(0, hd, 2) / hd)`` in float32; the
  optimization barrier keeps XLA from rewriting ``1 / pow(b, e)`` into
  ``pow(b, -e)``, which rounds differently. Against HF the result is within a
  few ulp, ~85% bit-identical (live-oracle test).
  """
  exponent = head_dim / (head_dim - 2)
  e_hi = np.float32(exponent)
  e_lo = np.float32(exponent - float(e_hi))
  inner = (jnp.float32(factor) * seq_len.astype(jnp.float32)) / jnp.float32(max_position_embeddings) - jnp.float32(
      factor - 1
  )
  power = jnp.power(inner, e_hi)
  power = power + power * (e_lo * jnp.log(inner))
  base = jnp.float32(theta) * power
  exps = jnp.asarray(np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
  return jnp.float32(1.0) / jax.lax.optimization_barrier(jnp.power(base, exps))


def rope_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, dtype: Any, scaling: RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
  """``cos``/``sin`` tables ``[B, T, hd]`` for integer positions ``[B, T]``, as HF's rotary embedding.

  HF: ``freqs = positions.float() * inv_freq``; ``cos = cat(freqs, freqs).cos() * attention_scaling``
  (a float32 product) and the same for ``sin``, then cast to the activation
  dtype. With ``dynamic`` scaling the frequencies depend on the data:
  ``L = max(positions) + 1`` over the whole batch, and
  ``where(L > max_position_embeddings, dynamic_inv_freq(L), unscaled)``. That
  is a fresh HF model's behaviour; HF's rotary module also *keeps* grown
  frequencies across calls (until a call shorter than
  ``max_position_embeddings`` resets them), which a pure function does not.
  """
  inv_freq, attention_factor = rope_inv_freq_scaled(head_dim, theta, scaling)
  inv_freq = jnp.asarray(inv_freq)
  if scaling is not None and scaling.rope_type == "dynamic":
    seq_len = jnp.max(positions) + 1
    grown = dynamic_inv_freq(seq_len, head_dim, theta, scaling.factor, scaling.max_position_embeddings)
    inv_freq = jnp.where(seq_len > scaling.max_position_embeddings, grown, inv_freq)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if attention_factor != 1.0:
    cos, sin = cos * jnp.float32(attention_factor), sin * jnp.float32(attention_factor)
  return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE on ``x[B, T, heads, hd]`` with ``cos``/``sin`` ``[B, T, hd]``."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return x * cos + _rotate_half(x) * sin


def attention_mask_bias(
    attention_mask: jax.Array | None, batch: int, seq: int, dtype: Any, sliding_window: int | None = None
) -> jax.Array:
  """Additive mask ``[B, T, S]``: 0 where query t may see key s, else finfo.min.

  Visible: ``s <= t`` and s not padding and, with a ``sliding_window`` ``w``,
  ``s > t - w`` (transformers' ``sliding_window_overlay``: the query and the
  ``w - 1`` keys before it). Indices are sequence indices, not positions, as in
  transformers' mask functions.
  """
  return key_mask_bias(jnp.arange(seq), attention_mask, batch, seq, dtype, sliding_window)


def key_mask_bias(
    query_index: jax.Array,
    key_mask: jax.Array | None,
    batch: int,
    keys: int,
    dtype: Any,
    sliding_window: int | None = None,
) -> jax.Array:
  """:func:`attention_mask_bias` for queries at sequence indices ``query_index [T]`` over ``keys`` key slots.

  Key ``s`` is visible to query ``t`` when ``s <= t``, ``key_mask[b, s]`` is
  set (None: no padding) and, with a window ``w``, ``s > t - w``. A decode
  step's queries sit at the end of a preallocated cache whose unwritten slots
  lie beyond every query, so causality masks them.
  """
  t_idx, s_idx = query_index[:, None], jnp.arange(keys)[None, :]
  allowed = s_idx <= t_idx  # [t, s]
  if sliding_window is not None:
    allowed = allowed & (s_idx > t_idx - sliding_window)
  allowed = allowed[None]
  if key_mask is not None:
    allowed = allowed & (key_mask[:, None, :] != 0)
  allowed = jnp.broadcast_to(allowed, (batch, query_index.shape[0], keys))
  return jnp.where(allowed, jnp.zeros((), dtype), jnp.finfo(dtype).min)


class _Stages:
  """The stage boundaries of one forward pass, in execution order.

  Every stage value passes through :meth:`__call__`; with ``capture`` it is
  kept (in its canonical layout) as an extra output of the jitted program,
  otherwise it is just passed on. Because capturing adds outputs, XLA compiles
  a different program and may fuse elementwise work differently around them;
  on CPU it contracts ``a*b + c`` into FMAs inside fusions, so the logits of
  ``capture=True`` can differ from ``capture=False`` in the last bits (about
  3e-7 relative L2 on the goldens). Each mode is deterministic on its own, and
  the stages and logits of one capture run come from one program.
  """

  def __init__(self, capture: bool):
    self.capture = capture
    self.names: list[str] = []
    self.values: list[jax.Array] = []

  def __call__(self, name: str, x: jax.Array, layout: tuple[int, ...] | None = None) -> jax.Array:
    if self.capture:
      self.names.append(name)
      self.values.append(x if layout is None else x.reshape(layout))
    return x


def _attention(
    p: Attention,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    bias: jax.Array,
    cfg: QwenConfig,
    tap: _Stages,
    prefix: str,
    attention: str,
    causal_only: bool,
    cache: tuple[jax.Array, jax.Array] | None = None,
    index: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
  """Self-attention of one layer: ``x[B, T, D]`` (already normed) -> (o_proj output ``[B, T, D]``, cache).

  With a ``cache = (k [B, S, K, hd], v [B, S, K, hd])`` the new keys and values
  are written at sequence index ``index`` and the queries attend over all
  ``S`` slots (``bias`` is ``[B, T, S]``); the updated cache is returned.
  """
  b, t, _ = x.shape
  q = _heads_proj(x, p.wq)  # btd,nhd->btnh
  k = _heads_proj(x, p.wk)  # btd,khd->btkh
  v = _heads_proj(x, p.wv)  # btd,khd->btkh
  if p.bq is not None:
    q, k, v = q + p.bq, k + p.bk, v + p.bv
  q = tap(prefix + "q_proj", q, (b, t, -1))
  k = tap(prefix + "k_proj", k, (b, t, -1))
  v = tap(prefix + "v_proj", v, (b, t, -1))
  if p.q_norm is not None:
    q = tap(prefix + "q_norm", rms_norm(q, p.q_norm, cfg.rms_norm_eps))
    k = tap(prefix + "k_norm", rms_norm(k, p.k_norm, cfg.rms_norm_eps))
  q = tap(prefix + "q_rope", apply_rope(q, cos, sin))
  k = tap(prefix + "k_rope", apply_rope(k, cos, sin))
  if cache is not None:
    zero = jnp.zeros((), jnp.int32)
    k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (zero, index, zero, zero))
    v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (zero, index, zero, zero))
    cache = (k, v)
  if attention != "eager":
    ctx = _fused_attention(q, k, v, bias, cfg, attention, causal_only)
    ctx = tap(prefix + "attention", ctx, (b, t, -1))
    out = _einsum("btf,df->btd", ctx.reshape(b, t, -1), p.wo.reshape(p.wo.shape[0], -1))
    if p.bo is not None:
      out = out + p.bo
    return tap(prefix + "attn_out", out), cache
  qg = q.reshape(b, t, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim)
  scores = _einsum("btkgh,bskh->bkgts", qg, k)
  # HF multiplies by the Python float hd**-0.5; torch does that in float32 ("opmath") and rounds
  # once to the activation dtype, so the scale itself is never rounded to bfloat16.
  scores = (scores.astype(jnp.float32) * jnp.float32(cfg.head_dim**-0.5)).astype(x.dtype)
  scores = scores + bias[:, None, None, :, :]
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
  ctx = _einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, cfg.num_heads, cfg.head_dim)
  ctx = tap(prefix + "attention", ctx, (b, t, -1))
  # btnh,dnh->btd with the (n, h) pair merged into one axis f, for the same reason as _heads_proj.
  out = _einsum("btf,df->btd", ctx.reshape(b, t, -1), p.wo.reshape(p.wo.shape[0], -1))
  if p.bo is not None:
    out = out + p.bo
  return tap(prefix + "attn_out", out), cache


#: ``forward(attention=...)``: ``eager`` is HF's eager attention operation by operation (the parity path);
#: ``xla`` / ``cudnn`` / ``auto`` run :func:`jax.nn.dot_product_attention` with that implementation (``auto``:
#: JAX picks), a fused kernel for speed whose rounding differs from HF's eager attention.
ATTENTION_IMPLS = ("eager", "xla", "cudnn", "auto")


def _fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, cfg: QwenConfig, attention: str, causal_only: bool
) -> jax.Array:
  """``jax.nn.dot_product_attention`` on ``q[B, T, N, hd]``, ``k/v[B, S, K, hd]`` (GQA in the kernel)."""
  impl = None if attention == "auto" else attention
  kw: dict[str, Any] = {"is_causal": True} if causal_only else {"mask": (bias == 0)[:, None, :, :]}
  return jax.nn.dot_product_attention(q, k, v, scale=cfg.head_dim**-0.5, implementation=impl, **kw)


def _mlp(p: Mlp, x: jax.Array, tap: _Stages, prefix: str) -> jax.Array:
  """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""
  gate = tap(prefix + "ffn_gate", _einsum("btd,id->bti", x, p.w_gate))
  up = tap(prefix + "ffn_up", _einsum("btd,id->bti", x, p.w_up))
  act = tap(prefix + "ffn_silu", jax.nn.silu(gate))
  swiglu = tap(prefix + "ffn_swiglu", act * up)
  return tap(prefix + "ffn_out", _einsum("bti,di->btd", swiglu, p.w_down))


def _layer(
    p: Layer,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    bias: jax.Array,
    cfg: QwenConfig,
    tap: _Stages,
    prefix: str,
    attention: str,
    causal_only: bool,
    cache: tuple[jax.Array, jax.Array] | None = None,
    index: jax.Array | None = None,
    forced: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
  """One pre-norm decoder layer (dense MLP or sparse MoE block); returns the output and the layer's cache."""
  h = tap(prefix + "attn_norm", rms_norm(x, p.attn_norm, cfg.rms_norm_eps))
  attn, cache = _attention(p.attn, h, cos, sin, bias, cfg, tap, prefix, attention, causal_only, cache, index)
  x = tap(prefix + "post_attn_residual", x + attn)
  h = tap(prefix + "ffn_norm", rms_norm(x, p.ffn_norm, cfg.rms_norm_eps))
  if p.moe is not None:
    ffn = moe.moe_block(p.moe, h, cfg.num_experts_per_tok, cfg.norm_topk_prob, tap, prefix, forced)
  else:
    ffn = _mlp(p.mlp, h, tap, prefix)
  return tap(prefix + "output", x + ffn), cache


def stage_names(cfg: QwenConfig) -> list[str]:
  """Every stage name of this config's forward, in execution order (:func:`parity_jax.bundles.qwen_graph.qwen_stage_names`)."""
  return qwen_stage_names(cfg.num_layers, cfg.qk_norm, cfg.moe_layers, cfg.shared_expert)


def _decoder(
    model: Model,
    tokens: jax.Array,
    positions: jax.Array,
    biases: tuple[jax.Array, jax.Array | None],
    tap: _Stages,
    attention: str = "eager",
    causal_only: bool = False,
    cache: Any = None,
    index: jax.Array | None = None,
    forced: Any = None,
    last_only: bool = False,
) -> tuple[jax.Array, Any]:
  """Embedding, every layer, final norm and logits (of the last position only when ``last_only``)."""
  cfg, p = model.config, model.params
  dtype = p.embed.dtype
  b, t = tokens.shape
  # Out-of-range ids give NaN rows (never a silently clamped row); forward() rejects them on the host first.
  x = tap("embedding", jnp.take(p.embed, tokens, axis=0, mode="fill", fill_value=jnp.nan))
  cos, sin = rope_cos_sin(jnp.broadcast_to(positions, (b, t)), cfg.head_dim, cfg.rope_theta, dtype, cfg.rope_scaling)
  full_bias, sliding_bias = biases
  new_cache = []
  for i, layer in enumerate(p.layers):
    sliding = i in cfg.sliding_layers
    layer_forced = None
    if forced is not None and i in cfg.moe_layers:
      layer_forced = forced[cfg.moe_layers.index(i)]
    x, kv = _layer(
        layer,
        x,
        cos,
        sin,
        sliding_bias if sliding else full_bias,
        cfg,
        tap,
        f"layers.{i}.",
        attention,
        causal_only and not sliding,
        None if cache is None else cache[i],
        index,
        layer_forced,
    )
    new_cache.append(kv)
  x = tap("final_norm", rms_norm(x, p.final_norm, cfg.rms_norm_eps))
  head = p.embed if p.lm_head is None else p.lm_head
  logits = tap("logits", _einsum("btd,vd->btv", x[:, -1:] if last_only else x, head))
  if tap.capture and tap.names != stage_names(cfg):
    raise AssertionError(f"stage order drifted from parity_jax.bundles.qwen_graph: {tap.names[:6]}...")
  return logits, (tuple(new_cache) if cache is not None else None)


@jax.jit(static_argnames=("capture", "attention"))
def _forward(
    model: Model,
    tokens: jax.Array,
    attention_mask: jax.Array | None,
    positions: jax.Array,
    capture: bool,
    attention: str = "eager",
    forced: Any = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """The jitted forward: logits ``[B, T, V]`` and, when ``capture``, every stage in execution order."""
  cfg = model.config
  dtype = model.params.embed.dtype
  b, t = tokens.shape
  tap = _Stages(capture)
  bias = attention_mask_bias(attention_mask, b, t, dtype)
  sliding_bias = None
  if cfg.sliding_layers:
    sliding_bias = attention_mask_bias(attention_mask, b, t, dtype, cfg.sliding_window)
  causal_only = attention_mask is None
  logits, _ = _decoder(model, tokens, positions, (bias, sliding_bias), tap, attention, causal_only, forced=forced)
  return logits, tuple(tap.values)


@jax.jit(static_argnames=("capture",), donate_argnames=("cache",))
def cached_step(
    model: Model,
    tokens: jax.Array,
    positions: jax.Array,
    key_mask: jax.Array,
    cache: Any,
    index: jax.Array,
    capture: bool = False,
) -> tuple[jax.Array, Any, tuple[jax.Array, ...]]:
  """One prefill or decode step over a preallocated KV cache (jitted once per shape; ``index`` is traced).

  ``tokens``/``positions`` ``[B, T]`` are written at sequence indices
  ``index .. index + T - 1`` of ``cache`` (per layer ``(k, v)`` of
  ``[B, S, K, hd]``, donated); ``key_mask [B, S]`` marks the real keys (0 for
  left padding). Returns the last position's logits ``[B, 1, V]``, the
  updated cache and, with ``capture``, every stage (logits: the last position,
  as transformers' ``generate`` computes them with ``logits_to_keep=1``).
  """
  cfg = model.config
  dtype = model.params.embed.dtype
  b, t = tokens.shape
  keys = key_mask.shape[1]
  query = index + jnp.arange(t, dtype=jnp.int32)
  bias = key_mask_bias(query, key_mask, b, keys, dtype)
  sliding_bias = key_mask_bias(query, key_mask, b, keys, dtype, cfg.sliding_window) if cfg.sliding_layers else None
  tap = _Stages(capture)
  logits, cache = _decoder(
      model, tokens, positions, (bias, sliding_bias), tap, cache=cache, index=index, last_only=True
  )
  return logits, cache, tuple(tap.values)


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_inputs(
    cfg: QwenConfig, tokens: Any, attention_mask: Any = None, positions: Any = None
) -> tuple[Any, Any, Any]:
  """Shapes, dtypes and (for concrete inputs) values of a forward's inputs against ``cfg``.

  Returns ``(tokens, attention_mask, positions)`` with numpy arrays for
  non-JAX inputs and the default positions filled in; bad input is a one-line
  UsageError. Needs only the config, so callers check before loading weights.
  """
  if not isinstance(tokens, jax.Array):
    tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
    raise UsageError(f"tokens must be a non-empty int array [batch, seq], got shape {list(tokens.shape)}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise UsageError(f"tokens must be integers, got dtype {tokens.dtype}")
  b, t = tokens.shape
  if _is_concrete(tokens):
    lo, hi = int(np.min(np.asarray(tokens))), int(np.max(np.asarray(tokens)))
    if lo < 0 or hi >= cfg.vocab_size:
      raise UsageError(f"token ids must lie in [0, {cfg.vocab_size}), got min {lo} max {hi}")
  if attention_mask is not None:
    if not isinstance(attention_mask, jax.Array):
      attention_mask = np.asarray(attention_mask)
    if tuple(attention_mask.shape) != (b, t):
      raise UsageError(f"attention_mask must have the tokens' shape {[b, t]}, got {list(attention_mask.shape)}")
    if not (jnp.issubdtype(attention_mask.dtype, jnp.integer) or attention_mask.dtype == jnp.bool_):
      raise UsageError(f"attention_mask must be bool or integer 0/1, got dtype {attention_mask.dtype}")
    if _is_concrete(attention_mask):
      m = np.asarray(attention_mask)
      if not np.isin(m, (0, 1)).all():
        raise UsageError("attention_mask must hold only 0 and 1")
  if positions is None:
    positions = np.arange(t, dtype=np.int32)[None, :]
  else:
    if not isinstance(positions, jax.Array):
      positions = np.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
      raise UsageError(f"positions must be integers, got dtype {positions.dtype}")
    if positions.ndim == 1:
      positions = positions[None, :]
    if positions.ndim != 2 or positions.shape[1] != t or positions.shape[0] not in (1, b):
      raise UsageError(f"positions must have shape [{t}], [1, {t}] or [{b}, {t}], got {list(positions.shape)}")
  return tokens, attention_mask, positions


def check_forced_experts(cfg: QwenConfig, forced: Any, batch: int, seq: int) -> tuple | None:
  """``{layer: (experts [B, T, k], where [B, T])}`` -> one entry per MoE layer (None where not forced), checked."""
  if forced is None:
    return None
  if not isinstance(forced, dict):
    raise UsageError("forced_experts must be a dict {layer: (experts [B, T, k], where [B, T])}")
  bad = sorted(set(forced) - set(cfg.moe_layers))
  if bad:
    raise UsageError(
        f"forced_experts names layers {bad} that have no sparse MoE block (those are {list(cfg.moe_layers)})"
    )
  out = []
  for layer in cfg.moe_layers:
    if layer not in forced:
      out.append(None)
      continue
    experts, where = (np.asarray(a) for a in forced[layer])
    k = cfg.num_experts_per_tok
    if experts.shape != (batch, seq, k) or where.shape != (batch, seq):
      raise UsageError(
          f"forced_experts[{layer}]: expected experts {[batch, seq, k]} and where {[batch, seq]}, "
          f"got {list(experts.shape)} and {list(where.shape)}"
      )
    if experts.size and (experts.min() < 0 or experts.max() >= cfg.num_experts):
      raise UsageError(f"forced_experts[{layer}]: expert ids must lie in [0, {cfg.num_experts})")
    out.append((experts.astype(np.int32), where.astype(bool)))
  return tuple(out)


def forward(
    model: Model,
    tokens: Any,
    *,
    attention_mask: Any = None,
    positions: Any = None,
    capture: bool = False,
    attention: str = "eager",
    forced_experts: Any = None,
):
  """Runs the model on ``tokens[B, T]``.

  Returns ``logits[B, T, V]`` in the model's dtype, or ``(logits, stages)``
  with ``capture=True``, where ``stages`` is an ordered dict stage name ->
  array in the names and layouts of :func:`stage_names` (the dense or MoE
  layers' stages of :mod:`parity_jax.bundles.qwen_graph`).

  ``attention_mask[B, T]`` (1 = real token, 0 = padding) masks padded keys,
  like HF's 2-D mask. ``positions`` (``[T]``, ``[1, T]`` or ``[B, T]``) only
  feed RoPE (with dynamic RoPE also its length ``max(positions) + 1``); the
  default is ``arange(T)`` for every row, which is what HF uses when called
  without ``position_ids``, padded or not. The sliding window, on the config's
  sliding layers, counts sequence indices, as HF's mask does. Capture happens inside
  the jitted computation (``capture`` is static): no host callbacks.

  ``forced_experts`` (MoE models) ``{layer: (experts [B, T, k], where [B, T])}``
  replays a run with those expert choices at the tokens ``where`` marks
  (:func:`parity_jax.qwen2.moe.moe_block`).

  A model loaded onto a mesh (``load(path, mesh=mesh)``, any mesh: Explicit or
  Auto axes) runs unchanged: the inputs are placed with their batch over the
  ``batch`` rule's mesh axes (:func:`parity_jax.qwen2.sharding.place_inputs`)
  and XLA partitions the computation from the weights' shardings, with every
  mesh axis treated as Auto (:func:`parity_jax.qwen2.sharding.compute_mesh`).
  The logits and stages are then global arrays on the model's mesh.

  ``attention`` (:data:`ATTENTION_IMPLS`): ``eager`` (default) is HF's eager
  attention, the parity path; ``xla``, ``cudnn`` or ``auto`` use
  :func:`jax.nn.dot_product_attention` (causal without a padding mask or
  window, else a boolean mask), for speed, not for bit-level parity.
  """
  if not isinstance(model, Model):
    raise UsageError(f"forward() needs a parity_jax.qwen2 Model, got {type(model).__name__}")
  if attention not in ATTENTION_IMPLS:
    raise UsageError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {attention!r}")
  tokens, attention_mask, positions = check_inputs(model.config, tokens, attention_mask, positions)
  forced = check_forced_experts(model.config, forced_experts, *tokens.shape)
  with on_mesh(model) as (run_model, place, back):
    tokens, attention_mask, positions = place(tokens, attention_mask, positions)
    if forced is not None:
      forced = jax.tree_util.tree_map(lambda a: place(a)[0], forced)
    logits, stages = _forward(run_model, tokens, attention_mask, positions, bool(capture), attention, forced)
    logits, stages = back(logits), tuple(back(s) for s in stages)
  if not capture:
    return logits
  return logits, collections.OrderedDict(zip(stage_names(model.config), stages, strict=True))


@contextlib.contextmanager
def on_mesh(model: Model):
  """Where a model runs: ``(model to compute with, place(*inputs), back(output))``.

  Unsharded: the model itself, inputs as given, outputs as computed. On a
  mesh: the weights viewed on the mesh's all-Auto twin (no copy), the inputs
  placed there with their batch over the ``batch`` rule, the computation
  inside ``jax.set_mesh`` of that twin (so a caller's Explicit mesh context
  does not apply), and outputs viewed back on the model's own mesh.
  """
  mesh = mesh_of(model.params)
  if mesh is None:
    yield model, (lambda *xs: xs), (lambda x: x)
    return
  cmesh = compute_mesh(mesh)
  run_model = model if cmesh is mesh else jax.tree_util.tree_map(lambda x: rewrap(x, cmesh), model)

  def place(*xs):
    if len(xs) == 3:
      return place_inputs(cmesh, *xs, axis_rules=model.axis_rules)
    return tuple(place_batch(cmesh, x, axis_rules=model.axis_rules) for x in xs)

  with jax.set_mesh(cmesh):
    yield run_model, place, (lambda x: rewrap(x, mesh))
