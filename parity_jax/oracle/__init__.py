"""The independent oracle: HF transformers + torch on CPU.

Goldens are produced here and only here -- never by the code they check.
Everything in this package needs the ``[oracle]`` extra (torch, transformers);
the modules import torch lazily so that ``import parity_jax`` never needs it.

* :mod:`parity_jax.oracle.forward_goldens` -- small seeded HF Qwen2/Qwen3 models
  and their float32 stage tensors.
* :mod:`parity_jax.oracle.svf_goldens` -- seeded matrices, ``torch.svd``
  components and the Python SVF reconstruction stages.
* :mod:`parity_jax.oracle.hf_forward` -- every named stage of an HF forward, by hooks.
* :mod:`parity_jax.oracle.svd_weights` -- a PyTorch ``svd_weights.pt`` as an SVF components file.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from parity_jax.errors import UsageError

__all__ = ["quiet_transformers", "require_oracle", "to_numpy"]


def require_oracle() -> None:
  """Raises a one-line :class:`UsageError` unless torch and transformers import."""
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    raise UsageError(f"this needs the [oracle] extra (pip install 'parity_jax[oracle]'): {e}") from None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
  """transformers' own progress bars (loading weights, writing shards) off within the block, as they were after."""
  from transformers.utils import logging

  was_on = logging.is_progress_bar_enabled()
  logging.disable_progress_bar()
  try:
    yield
  finally:
    if was_on:
      logging.enable_progress_bar()


def to_numpy(t: Any) -> np.ndarray:
  """A torch tensor as a C-order numpy array with the same bytes (bfloat16 through ml_dtypes, no rounding)."""
  import ml_dtypes
  import torch

  t = t.detach().to("cpu").contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
  return t.numpy().copy()
