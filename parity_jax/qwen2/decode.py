"""Greedy decoding with a preallocated KV cache, as transformers' ``generate(do_sample=False)`` runs it.

``generate(model, tokens, max_new_tokens=N)`` returns ``(tokens [B, T + N],
step_logits [N, B, V])``: the prompt followed by the N greedy tokens, and the
logits each token was chosen from (HF's ``output_logits``: step 0 is the
prefill's last position, step k the k-th single-token decode step).

How it follows HF (transformers 5.23, ``DynamicCache``):

* **positions**: without a mask ``arange(T)``; with a left-padded
  ``attention_mask`` ``cumsum(mask) - 1`` with padding at 0
  (``_prepare_position_ids_for_generation``), then ``last + k`` at step k;
* **masks**: the padding stays masked in every step; the generated tokens
  are real keys; the sliding window counts cache (sequence) indices, as HF's
  mask does; dynamic RoPE recomputes its base from each step's
  ``max(position) + 1``, as HF's rotary module does during generation;
* **cache**: one ``(k, v)`` pair ``[B, T + N - 1, K, hd]`` per layer,
  allocated once and donated to every step, written at the step's sequence
  index; keys are cached after RoPE (as HF caches them). A sliding layer keeps
  every slot and masks the ones outside its window, which is all the window
  needs;
* **logits**: only the last position's (HF's ``logits_to_keep=1``); the
  next token is the first index of the largest logit (``torch.argmax``).

One jitted program per (batch, prompt length, cache length) for the prefill
and one for every decode step (:func:`parity_jax.qwen2.model.cached_step`;
the step index is a traced scalar): nothing recompiles from step to step.
There is no end-of-sequence stop: every row gets N tokens.

``capture_step=k`` also returns every stage of step k (the prefill for
k = 0), in the layouts of :func:`parity_jax.qwen2.model.forward` with
``T`` the step's token count (``k_rope`` holds the step's new keys), for
comparison with :func:`parity_jax.oracle.hf_forward.hf_generate`.
``force_tokens [B, N]`` feeds given tokens instead of the greedy ones
(teacher forcing: how a decode comparison stays comparable after a
legitimate divergence).
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parity_jax.errors import UsageError
from parity_jax.qwen2.model import Model, cached_step, check_inputs, on_mesh, stage_names
from parity_jax.qwen2.sharding import batch_sharding, compute_mesh, mesh_of, to_host

__all__ = ["check_left_padding", "generate", "generation_positions"]


def check_left_padding(attention_mask: Any) -> None:
  """Every row has a real token and no padding after its first real token (one-line UsageError otherwise)."""
  m = np.asarray(attention_mask) != 0
  for b, row in enumerate(m):
    if not row.any():
      raise UsageError(f"attention_mask row {b} is all padding: nothing to generate from")
    first = int(np.argmax(row))
    if not row[first:].all():
      raise UsageError(f"attention_mask row {b} has padding after its first real token; generate needs left padding")


def generation_positions(attention_mask: Any, batch: int, seq: int) -> np.ndarray:
  """HF's prompt positions ``[B, T]``: ``arange(T)``, or ``cumsum(mask) - 1`` with padding at 0."""
  if attention_mask is None:
    return np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
  m = np.asarray(attention_mask).astype(np.int64)
  return np.where(m != 0, np.cumsum(m, axis=-1) - 1, 0).astype(np.int32)


@jax.jit
def _greedy(logits: jax.Array) -> jax.Array:
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)


def _empty_cache(model: Model, batch: int, keys: int, mesh: Any) -> tuple:
  cfg = model.config
  shape = (batch, keys, cfg.num_kv_heads, cfg.head_dim)
  dtype = model.params.embed.dtype
  sharding = None
  if mesh is not None:
    sharding = batch_sharding(compute_mesh(mesh), 4, batch, "tokens", model.axis_rules)
  zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
  return tuple((zeros(), zeros()) for _ in range(cfg.num_layers))


def generate(
    model: Model,
    tokens: Any,
    max_new_tokens: int,
    attention_mask: Any = None,
    capture_step: int | None = None,
    *,
    force_tokens: Any = None,
):
  """Greedy decoding of ``max_new_tokens`` tokens after ``tokens [B, T]`` (see the module docstring).

  Returns ``(tokens [B, T + N], step_logits [N, B, V])`` as numpy arrays, or
  ``(tokens, step_logits, stages)`` with ``capture_step``. A padded batch
  must be left-padded (``attention_mask`` 0 before each row's first real
  token), as for HF's ``generate``. Bad input is a one-line :class:`UsageError`.
  """
  if not isinstance(model, Model):
    raise UsageError(f"generate() needs a parity_jax.qwen2 Model, got {type(model).__name__}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise UsageError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  n = int(max_new_tokens)
  tokens, attention_mask, _ = check_inputs(model.config, np.asarray(tokens), attention_mask)
  tokens = np.asarray(tokens).astype(np.int32)
  b, t = tokens.shape
  if attention_mask is not None:
    check_left_padding(attention_mask)
  if capture_step is not None and (isinstance(capture_step, bool) or not 0 <= int(capture_step) < n):
    raise UsageError(f"capture_step must lie in [0, {n}), got {capture_step!r}")
  if force_tokens is not None:
    force_tokens = np.asarray(force_tokens)
    if force_tokens.shape != (b, n) or not np.issubdtype(force_tokens.dtype, np.integer):
      raise UsageError(f"force_tokens must be int [{b}, {n}], got {force_tokens.dtype} {list(force_tokens.shape)}")
    check_inputs(model.config, force_tokens)
  keys = t + n - 1
  key_mask = np.ones((b, keys), np.int32)
  if attention_mask is not None:
    key_mask[:, :t] = np.asarray(attention_mask) != 0
  positions = generation_positions(attention_mask, b, t)
  last = positions[:, -1:]
  cache = _empty_cache(model, b, keys, mesh_of(model.params))
  logits_per_step, chosen, stages = [], [], None
  with on_mesh(model) as (run_model, place, back):
    (mask_dev,) = place(key_mask)
    step_tokens, step_positions = place(tokens, positions)
    for k in range(n):
      capture = capture_step is not None and k == int(capture_step)
      index = np.int32(0 if k == 0 else t + k - 1)
      logits, cache, captured = cached_step(run_model, step_tokens, step_positions, mask_dev, cache, index, capture)
      if capture:
        stages = collections.OrderedDict(
            (name, to_host(back(v))) for name, v in zip(stage_names(model.config), captured)
        )
      logits_per_step.append(logits)
      nxt = _greedy(logits) if force_tokens is None else force_tokens[:, k].astype(np.int32)
      chosen.append(nxt)
      if k + 1 < n:
        step_tokens, step_positions = place(
            jnp.reshape(nxt, (b, 1)) if force_tokens is None else nxt.reshape(b, 1), (last + k + 1).astype(np.int32)
        )
  step_logits = np.stack([to_host(back(lg))[:, -1] for lg in logits_per_step])
  new = np.stack([np.asarray(to_host(back(c)) if isinstance(c, jax.Array) else c) for c in chosen], axis=1)
  out = np.concatenate([tokens, new.astype(tokens.dtype)], axis=1)
  if capture_step is not None:
    return out, step_logits, stages
  return out, step_logits
