"""parity_jax: prove that a port, a migration or a weight reconstruction is exactly right.

Subpackages are imported lazily so that ``import parity_jax`` stays cheap:

* :mod:`parity_jax.compare`    -- bit-exact equality and diff statistics
* :mod:`parity_jax.stages`     -- stage bundles (ordered safetensors + provenance)
* :mod:`parity_jax.checkpoint` -- Orbax remap specs, migrator and value-exact verifier
* :mod:`parity_jax.qwen2`      -- Qwen2 / Qwen3 forward pass with stage capture
* :mod:`parity_jax.svf`        -- SVF (singular-value fine-tuning) reconstruction
* :mod:`parity_jax.forward_parity` -- our forward against the HF oracle, first divergent stage
"""

import importlib
import importlib.util

__version__ = "0.1.0"


def __getattr__(name):
  # Any submodule, found on disk rather than from a hand-kept list that could drift.
  if not name.startswith("_") and importlib.util.find_spec(f"parity_jax.{name}") is not None:
    return importlib.import_module(f"parity_jax.{name}")
  raise AttributeError(f"module 'parity_jax' has no attribute {name!r}")
