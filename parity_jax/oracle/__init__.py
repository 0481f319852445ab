"""The independent oracle: HF transformers + torch on CPU.

Goldens are produced here and only here -- never by the code they check.
Everything in this package needs the ``[oracle]`` extra (torch, transformers);
the modules import torch lazily so that ``import parity_jax`` never needs it.

* :mod:`parity_jax.oracle.forward_goldens` -- small seeded HF Qwen2/Qwen3 models
  and their float32 stage tensors.
* :mod:`parity_jax.oracle.svf_goldens` -- seeded matrices, ``torch.svd``
  components and the Python SVF reconstruction stages.
"""

from __future__ import annotations

from parity_jax.errors import UsageError


def require_oracle() -> None:
  """Raises a one-line :class:`UsageError` unless torch and transformers import."""
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    raise UsageError(f"this needs the [oracle] extra (pip install -e '.[oracle]'): {e}") from None
