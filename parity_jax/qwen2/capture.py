"""Stage capture: load a checkpoint, run the forward with ``capture=True``, keep the stages as a bundle.

What ``parity-capture-stages`` / ``python -m tools.capture_stages`` runs; in the
library so that tests, notebooks and :mod:`parity_jax.qwen2.parity` call the same code.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from parity_jax.bundles import StageBundle
from parity_jax.dtypes import compute_dtype
from parity_jax.files import check_output_path
from parity_jax.provenance import default_provenance
from parity_jax.qwen2.config import load_config
from parity_jax.qwen2.model import Model, check_inputs, forward
from parity_jax.qwen2.params import load_params
from parity_jax.qwen2.sharding import batch_sharding, to_host

__all__ = ["capture_stages", "capture_to_bundle"]


def capture_stages(
    model_dir: str | os.PathLike,
    tokens: Any,
    dtype: str = "float32",
    attention_mask: Any = None,
    strict: bool = True,
    mesh: Any = None,
    rules: Any = None,
) -> StageBundle:
  """Loads ``model_dir``, runs ``forward(capture=True)`` and returns the stages as a bundle with provenance.

  The config and the inputs are checked before any weight is read. With a
  ``mesh`` the weights are loaded sharded onto it (:mod:`parity_jax.qwen2.sharding`)
  and the stages gathered from the mesh; under ``jax.distributed`` every
  process gets the whole stages.
  """
  dt = compute_dtype(dtype)
  cfg = load_config(model_dir)  # missing dir / unsupported config
  tokens, attention_mask, _ = check_inputs(cfg, np.asarray(tokens), attention_mask)
  if mesh is not None:  # a batch that cannot split over dp fails here, before any weight is read
    batch_sharding(mesh, 2, int(tokens.shape[0]), "tokens")
  params, report = load_params(model_dir, cfg, dtype=dt, strict=strict, mesh=mesh, rules=rules)
  model = Model(cfg, params)
  _, stages = forward(model, tokens, attention_mask=attention_mask, capture=True)
  stages = {name: to_host(v) for name, v in stages.items()}
  prov = default_provenance(
      "parity_jax.qwen2.capture",
      model=os.path.basename(os.path.normpath(model_dir)),
      model_dir=os.path.abspath(model_dir),
      model_type=cfg.model_type,
      dtype=dt.name,
      inputs={"tokens": tokens.tolist(), "attention_mask": None if attention_mask is None else attention_mask.tolist()},
      positions="default arange(T)",
      weight_files=[os.path.basename(f) for f in report.files],
      stored_dtypes=list(report.stored_dtypes),
      backend=jax.default_backend(),
  )
  if mesh is not None:
    prov["mesh"] = {name: int(size) for name, size in mesh.shape.items()}
    prov["processes"] = jax.process_count()
  return StageBundle(stages, prov)


def capture_to_bundle(
    model_dir: str | os.PathLike,
    tokens: Any,
    out: str | os.PathLike,
    dtype: str = "float32",
    attention_mask: Any = None,
    strict: bool = True,
    overwrite: bool = False,
    mesh: Any = None,
    rules: Any = None,
) -> dict[str, Any]:
  """:func:`capture_stages` written to the stage bundle ``out``; returns the provenance written.

  The output path is checked before anything runs (``.safetensors``, not on or
  inside the model directory, not an existing file unless ``overwrite``), so
  bad input fails fast and nothing is written. Under ``jax.distributed`` only
  process 0 writes.
  """
  out = check_output_path(out, (model_dir,), "out", suffix=".safetensors", overwrite=overwrite)
  bundle = capture_stages(
      model_dir, tokens, dtype=dtype, attention_mask=attention_mask, strict=strict, mesh=mesh, rules=rules
  )
  if jax.process_index() == 0:
    bundle.save(out)
  return bundle.provenance
