"""Hashes the Python process records, and the one name-sanitising rule.

* :func:`bf16_sha256` -- sha256 of the little-endian, C-order bfloat16 bytes.
  ``nan_policy="torch"`` canonicalises every NaN to ``0xFFFF`` first (``"torch_scalar"``:
  ``0x7FC0``, torch's scalar kernels; see :mod:`parity_jax.dtypes`), because
  torch's float32 -> bfloat16 conversion writes ``0xFFFF`` for every NaN while
  JAX/ml_dtypes keep the sign and quiet the payload (``0x7FC0``/``0xFFC0``).
  With the torch policy a JAX array hashes like the torch tensor it should equal.
* :class:`ArrayHasher` -- the same digest fed row chunk by row chunk (any dtype,
  raw bytes), for tensors rebuilt in chunks.
* :func:`combined_sha256` -- one hash over sorted ``(name, sha256)`` pairs.
* :func:`safe_source_name` -- ``model.layers.0.mlp.up_proj.weight`` ->
  ``model_layers_0_mlp_up_proj_weight``, the all-selected bundle's key part.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable

import numpy as np

from parity_jax.dtypes import NAN_POLICIES, bf16_bits, c_contiguous
from parity_jax.errors import UsageError

__all__ = ["ArrayHasher", "bf16_sha256", "combined_sha256", "safe_source_name", "sha256_array"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def safe_source_name(name: str) -> str:
  """``name`` with every character outside ``[A-Za-z0-9_]`` replaced by ``_``."""
  return _UNSAFE.sub("_", name)


def _le_bytes(a: np.ndarray) -> np.ndarray:
  """C-order little-endian view of ``a``'s bytes (a copy only when needed)."""
  a = c_contiguous(a)
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  return a


class ArrayHasher:
  """Incremental sha256 over the C-order bytes of row chunks of one array.

  ``bf16=True`` hashes bfloat16 bytes under ``nan_policy`` (float inputs are
  rounded to bfloat16 first); otherwise the raw little-endian bytes of
  whatever dtype arrives. Feeding the rows of an array in order gives the
  digest of the whole array.
  """

  def __init__(self, bf16: bool = False, nan_policy: str = "keep"):
    if nan_policy not in NAN_POLICIES:
      raise UsageError(f"unknown nan_policy {nan_policy!r}; expected one of {', '.join(NAN_POLICIES)}")
    self.bf16 = bf16
    self.nan_policy = nan_policy
    self._h = hashlib.sha256()

  def update(self, rows: Any) -> "ArrayHasher":
    if self.bf16:
      # no mutate: copy=False only spares a copy of rows already uint16; the bytes hashed are the same either way
      data = bf16_bits(rows, self.nan_policy).astype("<u2", copy=False)  # no mutate
    else:
      data = _le_bytes(np.asarray(rows))
    self._h.update(memoryview(data.reshape(-1).view(np.uint8)))
    return self

  def hexdigest(self) -> str:
    return self._h.hexdigest()


def bf16_sha256(array: Any, nan_policy: str = "keep") -> str:
  """sha256 hex digest of ``array``'s little-endian C-order bfloat16 bytes.

  ``nan_policy="keep"`` hashes the bytes as they are; ``"torch"`` first maps
  every NaN to ``0xFFFF``, torch's bfloat16 NaN, so that hashes of JAX and torch
  results agree when NaNs are present. Non-bf16 float inputs are rounded to
  bfloat16 (nearest even) first.
  """
  return ArrayHasher(bf16=True, nan_policy=nan_policy).update(array).hexdigest()


def sha256_array(array: Any) -> str:
  """sha256 of an array's raw little-endian C-order bytes (any dtype)."""
  return ArrayHasher().update(array).hexdigest()


def combined_sha256(pairs: Iterable[tuple[str, str]]) -> str:
  """One sha256 over ``(name, sha256)`` pairs sorted by name.

  The hashed text is ``"<name>\\t<sha256>\\n"`` per pair in sorted order, so
  the result does not depend on the order tensors were processed in. Duplicate
  names are an error.
  """
  items = sorted(pairs)
  names = [n for n, _ in items]
  if len(set(names)) != len(names):
    raise UsageError("combined_sha256: duplicate tensor names")
  h = hashlib.sha256()
  for name, digest in items:
    h.update(f"{name}\t{digest}\n".encode())
  return h.hexdigest()
