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
from parity_jax.qwen2.model import Model, check_inputs, forward
from parity_jax.qwen2.params import LoadReport
from parity_jax.qwen2.sharding import batch_sharding, to_host
from parity_jax.qwen2.sources import load_model, model_source

__all__ = ["capture_stages", "capture_to_bundle", "load_checked", "model_stages"]


def load_checked(
    model_dir: str | os.PathLike,
    tokens: Any,
    attention_mask: Any = None,
    dtype: str = "float32",
    strict: bool = True,
    mesh: Any = None,
    rules: Any = None,
    axis_rules: Any = None,
) -> tuple[Model, LoadReport, np.ndarray, Any]:
  """The model of ``model_dir`` (:mod:`parity_jax.qwen2.sources`), loaded after its config has checked the inputs.

  Returns ``(model, load report, tokens, attention_mask)``; a batch that
  cannot split over the mesh fails before any weight is read.
  """
  dt = compute_dtype(dtype)
  path = os.fspath(model_dir)
  cfg = model_source(path).config(path)  # missing dir / unsupported config
  tokens, attention_mask, _ = check_inputs(cfg, np.asarray(tokens), attention_mask)
  if mesh is not None:
    batch_sharding(mesh, 2, int(tokens.shape[0]), "tokens", axis_rules)
  model, report = load_model(path, dt, strict=strict, mesh=mesh, rules=rules, axis_rules=axis_rules, config=cfg)
  return model, report, tokens, attention_mask


def model_stages(model: Model, tokens: Any, attention_mask: Any = None, forced_experts: Any = None) -> dict[str, Any]:
  """Every stage of one forward as host numpy arrays (gathered from a mesh on every process)."""
  _, stages = forward(model, tokens, attention_mask=attention_mask, capture=True, forced_experts=forced_experts)
  return {name: to_host(v) for name, v in stages.items()}


def _provenance(model_dir: Any, model: Model, report: LoadReport, tokens: Any, attention_mask: Any, mesh: Any) -> dict:
  cfg = model.config
  prov = default_provenance(
      "parity_jax.qwen2.capture",
      model=os.path.basename(os.path.normpath(model_dir)),
      model_dir=os.path.abspath(model_dir),
      model_type=cfg.model_type,
      dtype=np.dtype(model.dtype).name,
      inputs={"tokens": tokens.tolist(), "attention_mask": None if attention_mask is None else attention_mask.tolist()},
      positions="default arange(T)",
      weight_files=[os.path.basename(f) for f in report.files],
      stored_dtypes=list(report.stored_dtypes),
      backend=jax.default_backend(),
  )
  if mesh is not None:
    prov["mesh"] = {name: int(size) for name, size in mesh.shape.items()}
    prov["processes"] = jax.process_count()
    prov["sharding_notes"] = list(report.sharding_notes)
  return prov


def capture_stages(
    model_dir: str | os.PathLike,
    tokens: Any,
    dtype: str = "float32",
    attention_mask: Any = None,
    strict: bool = True,
    mesh: Any = None,
    rules: Any = None,
    axis_rules: Any = None,
) -> StageBundle:
  """Loads ``model_dir``, runs ``forward(capture=True)`` and returns the stages as a bundle with provenance.

  The config and the inputs are checked before any weight is read. With a
  ``mesh`` the weights are loaded sharded onto it (:mod:`parity_jax.qwen2.sharding`;
  ``rules``/``axis_rules`` as :func:`parity_jax.qwen2.load`), the stages
  gathered from the mesh (under ``jax.distributed`` every process gets the
  whole stages), and the placement's fallbacks recorded in the provenance
  (``sharding_notes``).
  """
  model, report, tokens, attention_mask = load_checked(
      model_dir, tokens, attention_mask, dtype, strict, mesh, rules, axis_rules
  )
  stages = model_stages(model, tokens, attention_mask)
  return StageBundle(stages, _provenance(model_dir, model, report, tokens, attention_mask, mesh))


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
    axis_rules: Any = None,
) -> dict[str, Any]:
  """:func:`capture_stages` written to the stage bundle ``out``; returns the provenance written.

  The output path is checked before anything runs (``.safetensors``, not on or
  inside the model directory, not an existing file unless ``overwrite``), so
  bad input fails fast and nothing is written. Under ``jax.distributed`` only
  process 0 writes.
  """
  out = check_output_path(out, (model_dir,), "out", suffix=".safetensors", overwrite=overwrite)
  bundle = capture_stages(
      model_dir,
      tokens,
      dtype=dtype,
      attention_mask=attention_mask,
      strict=strict,
      mesh=mesh,
      rules=rules,
      axis_rules=axis_rules,
  )
  if jax.process_index() == 0:
    bundle.save(out)
  return bundle.provenance
