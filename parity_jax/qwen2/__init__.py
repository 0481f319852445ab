"""Qwen2 / Qwen3 (dense and mixture-of-experts) forward pass and decoding in JAX with named stage capture.

  model = parity_jax.qwen2.load(path, dtype=jnp.float32)
  logits = parity_jax.qwen2.forward(model, tokens)
  logits, stages = parity_jax.qwen2.forward(model, tokens, capture=True)
  tokens, step_logits = parity_jax.qwen2.generate(model, tokens, max_new_tokens=8)   # greedy, KV cache

``path`` is a Hugging Face checkpoint directory (``config.json`` plus
``model.safetensors`` or sharded ``model-*.safetensors`` with
``model.safetensors.index.json``). ``load(path, mesh=make_mesh("dp:2,tp:4"))``
places the weights sharded on any device mesh (:mod:`.sharding`). ``stages`` is an ordered dict stage name ->
array with the names of :mod:`parity_jax.bundles.qwen_graph`; ``qwen2_moe`` / ``qwen3_moe`` layers add the
router, routing and experts' stages (:mod:`.moe`).

:mod:`.capture` writes those stages to a bundle; :mod:`.parity` runs the whole
workflow against the HF oracle (a golden file, transformers on the spot, or
transformers on an original checkpoint against a converted one) and names
the first divergent stage, explaining MoE routing flips (:mod:`.routing`);
:mod:`.decode` is greedy decoding with a KV cache; :mod:`.sources` turns a
model directory into a :class:`Model` (the seam for converted checkpoints).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from parity_jax.qwen2.capture import capture_stages, capture_to_bundle
from parity_jax.qwen2.config import QwenConfig, load_config, parse_config
from parity_jax.qwen2.decode import generate
from parity_jax.qwen2.model import Model, check_inputs, forward, stage_names
from parity_jax.qwen2.params import (
    KEY_TABLE,
    Attention,
    Layer,
    LoadReport,
    Mlp,
    Moe,
    Params,
    init_params,
    load_params,
    random_params,
    to_hf_tensors,
)
from parity_jax.qwen2.parity import DecodeParity, ForwardParity, decode_parity, forward_parity
from parity_jax.qwen2.sharding import DEFAULT_AXIS_RULES, make_mesh, parse_axis_rules, shard_params

__all__ = [
    "Attention",
    "DEFAULT_AXIS_RULES",
    "DecodeParity",
    "ForwardParity",
    "KEY_TABLE",
    "Layer",
    "LoadReport",
    "Mlp",
    "Model",
    "Moe",
    "Params",
    "QwenConfig",
    "capture_stages",
    "capture_to_bundle",
    "check_inputs",
    "decode_parity",
    "forward",
    "forward_parity",
    "generate",
    "init_params",
    "load",
    "load_config",
    "load_params",
    "make_mesh",
    "parse_axis_rules",
    "parse_config",
    "random_params",
    "shard_params",
    "stage_names",
    "to_hf_tensors",
]


def load(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    strict: bool = True,
    put: Callable[[Any], Any] | None = jax.device_put,
    mesh: Any = None,
    rules: Any = None,
    axis_rules: Any = None,
) -> Model:
  """Loads an HF Qwen2/Qwen3 (dense or MoE) checkpoint directory as a :class:`Model`.

  ``dtype`` (float32 or bfloat16) is both the weight and the activation
  dtype. float32 from bf16-stored weights is an exact upcast. Unsupported
  configs, missing tensors, wrong shapes and (with ``strict``) unknown tensors
  raise a one-line :class:`~parity_jax.errors.UsageError`.

  ``mesh`` places every weight directly onto a device mesh (any mesh:
  ``jax.make_mesh`` with Explicit or Auto axes, a hand-built ``Mesh``,
  :func:`parity_jax.qwen2.sharding.make_mesh`), each device's shard read
  from the file by slice. ``axis_rules`` (``(logical axis, mesh axes)`` rows)
  come before :data:`DEFAULT_AXIS_RULES`; ``rules`` (``(regex,
  PartitionSpec)`` rows) pin single weights (:mod:`parity_jax.qwen2.sharding`).
  """
  from parity_jax.qwen2.sharding import normalize_axis_rules

  cfg = load_config(path)
  axis_rules = normalize_axis_rules(axis_rules)
  params, _ = load_params(path, cfg, dtype=dtype, strict=strict, put=put, mesh=mesh, rules=rules, axis_rules=axis_rules)
  return Model(cfg, params, axis_rules)
