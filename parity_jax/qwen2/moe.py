"""The sparse mixture-of-experts block of Qwen2-MoE and Qwen3-MoE, operation by operation as transformers 5.23.

``Qwen2MoeSparseMoeBlock`` / ``Qwen3MoeSparseMoeBlock`` with the eager
experts loop, per token of ``x[B, T, D]`` (already normed):

1. ``router_logits = x @ router^T`` in the activation dtype (:func:`router_logits`);
2. :func:`route`: ``softmax(router_logits)`` in float32, ``top_k`` of the
   probabilities (largest first, the lower index first on a tie, as
   ``torch.topk`` and ``jax.lax.top_k`` order them), divided by their sum when
   ``norm_topk_prob``, cast to the activation dtype;
3. :func:`routed_experts`: every selected expert's SwiGLU MLP times its
   weight, summed in ascending expert index (HF's ``index_add_`` over the hit
   experts, starting from zeros: the same order of additions);
4. Qwen2-MoE only (:func:`shared_expert`): the shared expert's SwiGLU MLP and
   the logit of its gate ``x @ shared_gate^T`` ``[B, T, 1]``;
   :func:`combine` returns ``routed + sigmoid(gate) * shared``.

This reference computes every expert on every token and keeps the selected
ones (E / top_k times the FLOPs of a sparse dispatch): simple, jittable with
static shapes, shardable over an expert axis, and exact in what it keeps;
it is a parity reference, not a serving kernel.

``forced`` (:func:`moe_block`) replays a run with given expert choices at
some tokens: there the selected experts are the given ones and their weights
are the probabilities at those experts (renormalised when
``norm_topk_prob``), what the model computes had its top-k chosen them. That
keeps every later stage of a token comparable with a golden whose routing
differs by a tie (:mod:`parity_jax.qwen2.routing`).

The step functions are module-level on purpose: a test plants a bug in a
port by replacing one of them (``route``, ``combine``, ...), as a wrong port
would have it, and watches the comparison name it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["combine", "forced_weights", "moe_block", "route", "routed_experts", "router_logits", "shared_expert"]

HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *operands, precision=HIGHEST)


def router_logits(x: jax.Array, router: jax.Array) -> jax.Array:
  """``[B, T, D] x [E, D] -> [B, T, E]`` in the activation dtype (HF's ``F.linear(x, gate.weight)``)."""
  return _einsum("btd,ed->bte", x, router)


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """``(weights [B, T, k] in the logits' dtype, experts [B, T, k] int32)``: softmax in float32, top-k, renormalise."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top, idx = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    top = top / jnp.sum(top, axis=-1, keepdims=True)
  return top.astype(logits.dtype), idx.astype(jnp.int32)


def forced_weights(logits: jax.Array, experts: jax.Array, norm_topk_prob: bool) -> jax.Array:
  """The routing weights of given ``experts [B, T, k]``: their float32 probabilities, renormalised as :func:`route` does."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top = jnp.take_along_axis(probs, experts, axis=-1)
  if norm_topk_prob:
    top = top / jnp.sum(top, axis=-1, keepdims=True)
  return top.astype(logits.dtype)


def _swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """One SwiGLU MLP ``down(silu(gate(x)) * up(x))`` on ``[B, T, D]`` with HF ``[out, in]`` weights."""
  gate = _einsum("btd,id->bti", x, w_gate)
  up = _einsum("btd,id->bti", x, w_up)
  return _einsum("bti,di->btd", jax.nn.silu(gate) * up, w_down)


def routed_experts(x: jax.Array, p: Any, weights: jax.Array, experts: jax.Array) -> jax.Array:
  """Weighted sum of the selected experts' outputs ``[B, T, D]``, accumulated in ascending expert index.

  ``p`` holds ``w_gate/w_up [E, I, D]`` and ``w_down [E, D, I]``. Each expert
  runs on every token; a token takes expert ``e``'s output times its weight
  where ``e`` is among its ``experts`` and nothing (an exact zero) elsewhere.
  """
  gate = _einsum("btd,eid->btei", x, p.w_gate)
  up = _einsum("btd,eid->btei", x, p.w_up)
  out = _einsum("btei,edi->bted", jax.nn.silu(gate) * up, p.w_down)  # [B, T, E, D]
  acc = jnp.zeros(x.shape, x.dtype)
  for e in range(p.w_gate.shape[0]):
    hit = experts == e  # [B, T, k]; at most one slot
    w = jnp.sum(jnp.where(hit, weights, jnp.zeros((), weights.dtype)), axis=-1)  # the weight, or exactly 0
    acc = acc + jnp.where(jnp.any(hit, axis=-1)[..., None], out[:, :, e] * w[..., None], jnp.zeros((), x.dtype))
  return acc


def shared_expert(x: jax.Array, p: Any) -> tuple[jax.Array, jax.Array]:
  """Qwen2-MoE's shared expert: ``(its output [B, T, D], its gate's logit [B, T, 1])``."""
  out = _swiglu(x, p.shared.w_gate, p.shared.w_up, p.shared.w_down)
  return out, _einsum("btd,od->bto", x, p.shared_gate)


def combine(routed: jax.Array, shared_out: jax.Array | None, gate_logit: jax.Array | None) -> jax.Array:
  """The block's output: ``routed + sigmoid(gate) * shared`` (Qwen2-MoE) or ``routed`` (Qwen3-MoE)."""
  if shared_out is None:
    return routed
  return routed + jax.nn.sigmoid(gate_logit) * shared_out


def moe_block(
    p: Any,
    x: jax.Array,
    top_k: int,
    norm_topk_prob: bool,
    tap: Callable[[str, jax.Array], jax.Array],
    prefix: str,
    forced: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """One sparse block on ``x[B, T, D]`` -> ``[B, T, D]``, every stage passed through ``tap``.

  ``forced = (experts [B, T, k] int, where [B, T] bool)`` replaces the top-k
  choice at the tokens ``where`` marks (see the module docstring).
  """
  logits = tap(prefix + "router_logits", router_logits(x, p.router))
  weights, experts = route(logits, top_k, norm_topk_prob)
  if forced is not None:
    f_experts, where = forced
    f_experts = f_experts.astype(jnp.int32)
    experts = jnp.where(where[..., None], f_experts, experts)
    weights = jnp.where(where[..., None], forced_weights(logits, f_experts, norm_topk_prob), weights)
  weights = tap(prefix + "routing_weights", weights)
  experts = tap(prefix + "selected_experts", experts)
  routed = tap(prefix + "routed_out", routed_experts(x, p, weights, experts))
  shared_out = gate_logit = None
  if p.shared is not None:
    shared_out, gate_logit = shared_expert(x, p)
    shared_out = tap(prefix + "shared_out", shared_out)
    gate_logit = tap(prefix + "shared_gate", gate_logit)
  return tap(prefix + "ffn_out", combine(routed, shared_out, gate_logit))
