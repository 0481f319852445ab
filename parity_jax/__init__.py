"""parity_jax: prove that a port, a migration or a weight reconstruction is exactly right.

Subpackages are imported lazily so that ``import parity_jax`` stays cheap
(``docs/architecture.md`` draws the whole map):

* :mod:`parity_jax.checkpoint` -- Orbax remap specs, the migrator and the value-exact verifier
* :mod:`parity_jax.qwen2`      -- Qwen2 / Qwen3 forward with stage capture, and forward parity against HF
* :mod:`parity_jax.svf`        -- SVF (singular-value fine-tuning) reconstruction and its parity gate
* :mod:`parity_jax.bundles`    -- stage bundles and their comparison: tolerance, verdict, report, plot
* :mod:`parity_jax.oracle`     -- the independent oracle (HF transformers + torch): goldens
* :mod:`parity_jax.cli`        -- the command-line tools (console scripts ``parity-*``)
* foundations: :mod:`~parity_jax.arraydiff` (bit-exact equality, diff statistics),
  :mod:`~parity_jax.dtypes`, :mod:`~parity_jax.files`, :mod:`~parity_jax.jsonio`,
  :mod:`~parity_jax.report`, :mod:`~parity_jax.progress`, :mod:`~parity_jax.provenance`,
  :mod:`~parity_jax.errors`
"""

import importlib
import importlib.util

__version__ = "0.1.0"


def __getattr__(name):
  # Any submodule, found on disk rather than from a hand-kept list that could drift.
  if not name.startswith("_") and importlib.util.find_spec(f"parity_jax.{name}") is not None:
    return importlib.import_module(f"parity_jax.{name}")
  raise AttributeError(f"module 'parity_jax' has no attribute {name!r}")
