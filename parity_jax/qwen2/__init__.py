"""Qwen2 / Qwen3 forward pass in JAX with named stage capture.

  model = parity_jax.qwen2.load(path, dtype=jnp.float32)
  logits = parity_jax.qwen2.forward(model, tokens)
  logits, stages = parity_jax.qwen2.forward(model, tokens, capture=True)

``path`` is a Hugging Face checkpoint directory (``config.json`` plus
``model.safetensors`` or sharded ``model-*.safetensors`` with
``model.safetensors.index.json``). ``load(path, mesh=make_mesh("dp:2,tp:4"))``
places the weights sharded on a device mesh (:mod:`.sharding`). ``stages`` is an ordered dict stage name ->
array with the names of :mod:`parity_jax.bundles.qwen_graph`.

:mod:`.capture` writes those stages to a bundle; :mod:`.parity` runs the whole
workflow against the HF oracle (a golden file or transformers on the spot) and
names the first divergent stage.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from parity_jax.qwen2.capture import capture_stages, capture_to_bundle
from parity_jax.qwen2.config import QwenConfig, load_config, parse_config
from parity_jax.qwen2.model import Model, check_inputs, forward
from parity_jax.qwen2.parity import ForwardParity, forward_parity
from parity_jax.qwen2.params import (
    KEY_TABLE,
    Attention,
    Layer,
    LoadReport,
    Mlp,
    Params,
    init_params,
    load_params,
    random_params,
    to_hf_tensors,
)
from parity_jax.qwen2.sharding import DEFAULT_RULES, make_mesh, shard_params

__all__ = [
    "Attention",
    "DEFAULT_RULES",
    "ForwardParity",
    "KEY_TABLE",
    "Layer",
    "LoadReport",
    "Mlp",
    "Model",
    "Params",
    "QwenConfig",
    "capture_stages",
    "capture_to_bundle",
    "check_inputs",
    "forward",
    "forward_parity",
    "init_params",
    "load",
    "load_config",
    "load_params",
    "make_mesh",
    "parse_config",
    "random_params",
    "shard_params",
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
) -> Model:
  """Loads an HF Qwen2/Qwen3 checkpoint directory as a :class:`Model`.

  ``dtype`` (float32 or bfloat16) is both the weight and the activation
  dtype. float32 from bf16-stored weights is an exact upcast. Unsupported
  configs, missing tensors, wrong shapes and (with ``strict``) unknown tensors
  raise a one-line :class:`~parity_jax.errors.UsageError`.

  ``mesh`` places every weight directly onto a device mesh (axes ``dp``,
  ``tp``; :func:`parity_jax.qwen2.sharding.make_mesh`), each device's shard
  read from the file by slice; ``rules`` are ``(regex, PartitionSpec)`` rows
  consulted before :data:`parity_jax.qwen2.sharding.DEFAULT_RULES`.
  """
  cfg = load_config(path)
  params, _ = load_params(path, cfg, dtype=dtype, strict=strict, put=put, mesh=mesh, rules=rules)
  return Model(cfg, params)
