"""parity_jax: prove that a port, a migration or a weight reconstruction is exactly right.

Subpackages are imported lazily so that ``import parity_jax`` stays cheap:

* :mod:`parity_jax.compare`    -- bit-exact equality and diff statistics
* :mod:`parity_jax.stages`     -- stage bundles (ordered safetensors + provenance)
* :mod:`parity_jax.checkpoint` -- Orbax remap specs, migrator and value-exact verifier
* :mod:`parity_jax.qwen2`      -- Qwen2 / Qwen3 forward pass with stage capture
* :mod:`parity_jax.svf`        -- SVF (singular-value fine-tuning) reconstruction
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("compare", "stages", "errors", "progress", "checkpoint", "qwen2", "svf")


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"parity_jax.{name}")
  raise AttributeError(f"module 'parity_jax' has no attribute {name!r}")
