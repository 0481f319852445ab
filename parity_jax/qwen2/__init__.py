"""Qwen2 / Qwen3 forward pass in JAX with named stage capture.

  model = parity_jax.qwen2.load(path, dtype=jnp.float32)
  logits = parity_jax.qwen2.forward(model, tokens)
  logits, stages = parity_jax.qwen2.forward(model, tokens, capture=True)

``path`` is a Hugging Face checkpoint directory (``config.json`` plus
``model.safetensors`` or sharded ``model-*.safetensors`` with
``model.safetensors.index.json``). ``stages`` is an ordered dict stage name ->
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
from parity_jax.qwen2.params import (KEY_TABLE, Attention, Layer, LoadReport, Mlp, Params, init_params, load_params,
                                     to_hf_tensors)

__all__ = [
    "Attention", "ForwardParity", "KEY_TABLE", "Layer", "LoadReport", "Mlp", "Model", "Params", "QwenConfig",
    "capture_stages", "capture_to_bundle", "check_inputs", "forward", "forward_parity", "init_params", "load",
    "load_config", "load_params", "parse_config", "to_hf_tensors",
]


def load(path: str | os.PathLike, dtype: Any = jnp.float32, *, strict: bool = True,
         put: Callable[[Any], Any] | None = jax.device_put) -> Model:
  """Loads an HF Qwen2/Qwen3 checkpoint directory as a :class:`Model`.

  ``dtype`` (float32 or bfloat16) is both the weight and the activation
  dtype. float32 from bf16-stored weights is an exact upcast. Unsupported
  configs, missing tensors, wrong shapes and (with ``strict``) unknown tensors
  raise a one-line :class:`~parity_jax.errors.UsageError`.
  """
  cfg = load_config(path)
  params, _ = load_params(path, cfg, dtype=dtype, strict=strict, put=put)
  return Model(cfg, params)
