"""SVF (singular-value fine-tuning) reconstruction in JAX and its parity gate.

* :func:`reconstruct` -- the Python formula, jitted, stage by stage (:data:`STAGES`).
* :func:`bf16_sha256`, :func:`safe_source_name`, :func:`combined_sha256` -- the
  hashes and names the Python process records.
* :func:`replay` -- replays a Python run (sample or all-selected, optionally
  filtered, chunked under a memory budget) and judges it: stage tolerances,
  byte equality and explained mismatches (:mod:`parity_jax.svf.bounds`).
* :mod:`parity_jax.svf.io` -- components, offsets, bundle keys, reports.
"""

from __future__ import annotations

from parity_jax.svf.bounds import FormulaConstants, MismatchAccounting
from parity_jax.svf.core import (
    DEFAULT_ROW_BLOCK,
    LAYOUTS,
    ORIENTATIONS,
    ROW_STAGES,
    STAGES,
    reconstruct,
    resolve_orientation,
    torch_cpu_sum,
)
from parity_jax.svf.gate import DEFAULT_CHUNK_MB, MODES, STAGE_TOLERANCES, ReplayResult, chunk_rows, replay
from parity_jax.svf.hashing import ArrayHasher, bf16_sha256, combined_sha256, safe_source_name, sha256_array
from parity_jax.svf.io import ComponentStore, load_golden, sample_key, tensor_key, write_components

__all__ = [
    "ArrayHasher",
    "ComponentStore",
    "DEFAULT_CHUNK_MB",
    "DEFAULT_ROW_BLOCK",
    "FormulaConstants",
    "LAYOUTS",
    "MODES",
    "MismatchAccounting",
    "ORIENTATIONS",
    "ROW_STAGES",
    "ReplayResult",
    "STAGES",
    "STAGE_TOLERANCES",
    "bf16_sha256",
    "chunk_rows",
    "combined_sha256",
    "load_golden",
    "reconstruct",
    "replay",
    "resolve_orientation",
    "safe_source_name",
    "sample_key",
    "sha256_array",
    "tensor_key",
    "torch_cpu_sum",
    "write_components",
]
