"""Dtype tables and bit-level helpers: the one home for dtype names, bfloat16 bits and C-order bytes.

* :data:`SAFETENSORS_DTYPES` -- safetensors dtype names <-> numpy dtypes (what
  numpy/ml_dtypes can hold); stage bundles and checkpoint readers use it.
* :data:`COMPUTE_DTYPES` -- the names the tools accept for a model's compute
  dtype (``float32``, ``bfloat16``) -> numpy dtypes (``jnp`` accepts them).
* :func:`bf16_bits` -- bfloat16 bit patterns with torch's or the IEEE NaN
  encoding. Rounding float32 to bfloat16, torch's vectorised CPU kernels (AVX2,
  AVX-512: what x86-64 machines run) write ``0xFFFF`` for every NaN, its scalar
  kernels (``ATEN_CPU_CAPABILITY=default``) write ``0x7FC0``, and JAX and
  ml_dtypes keep the sign and quiet the payload (``0x7FC0``/``0xFFC0``).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from parity_jax.errors import UsageError

__all__ = [
    "BF16",
    "COMPUTE_DTYPES",
    "NAN_POLICIES",
    "SAFETENSORS_DTYPES",
    "TORCH_BF16_NAN_BITS",
    "TORCH_SCALAR_BF16_NAN_BITS",
    "bf16_bits",
    "c_contiguous",
    "compute_dtype",
    "is_float_dtype",
    "safetensors_name",
]

BF16 = np.dtype(ml_dtypes.bfloat16)
TORCH_BF16_NAN_BITS = 0xFFFF  # torch's vectorised float32 -> bfloat16 kernels
TORCH_SCALAR_BF16_NAN_BITS = 0x7FC0  # torch's scalar kernels (c10::BFloat16 round_to_nearest_even)
NAN_POLICIES = ("keep", "torch", "torch_scalar")

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": BF16,
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

COMPUTE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "bfloat16": BF16}


def safetensors_name(dtype: Any) -> str | None:
  """The safetensors name of a numpy dtype (native byte order), or None when safetensors cannot store it."""
  return _NP_TO_SAFETENSORS.get(np.dtype(dtype))


def compute_dtype(name: Any) -> np.dtype:
  """A compute dtype from its name (``float32``/``bfloat16``) or a dtype; refuses anything else in one line."""
  try:
    dt = COMPUTE_DTYPES[name] if isinstance(name, str) else np.dtype(name)
  except (KeyError, TypeError):
    dt = None
  if dt not in COMPUTE_DTYPES.values():
    raise UsageError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
  return dt


def c_contiguous(a: np.ndarray) -> np.ndarray:
  """C-contiguous ``a`` keeping its rank (``np.ascontiguousarray`` turns 0-d into 1-d)."""
  return a if a.flags.c_contiguous else np.array(a, order="C")


def is_float_dtype(dtype: Any) -> bool:
  """True for IEEE-style floating dtypes, including ml_dtypes' bfloat16/float8."""
  dtype = np.dtype(dtype)
  if dtype.kind == "c":
    return False
  try:
    ml_dtypes.finfo(dtype)
  except (ValueError, TypeError):
    return False
  return True


def bf16_bits(a: Any, nan_policy: str = "keep") -> np.ndarray:
  """C-order uint16 bit patterns of ``a`` as bfloat16, NaNs canonicalised under ``nan_policy``.

  Float inputs of another dtype are rounded to bfloat16 first (nearest even,
  like torch's ``.to(bfloat16)``). ``nan_policy="torch"`` maps every NaN to
  ``0xFFFF`` (torch's vectorised kernels), ``"torch_scalar"`` to ``0x7FC0``
  (its scalar ones), so a JAX array's bits equal the torch tensor it should equal.
  """
  if nan_policy not in NAN_POLICIES:
    raise UsageError(f"unknown nan_policy {nan_policy!r}; expected one of {', '.join(NAN_POLICIES)}")
  a = np.asarray(a)
  if a.dtype != BF16:
    if not is_float_dtype(a.dtype):
      raise UsageError(f"expected a floating array for bfloat16 bits, got {a.dtype}")
    a = a.astype(BF16)
  bits = c_contiguous(a).view(np.uint16)
  if nan_policy != "keep":
    nan = (bits & 0x7FFF) > 0x7F80
    if nan.any():
      canonical = TORCH_BF16_NAN_BITS if nan_policy == "torch" else TORCH_SCALAR_BF16_NAN_BITS
      bits = np.where(nan, np.uint16(canonical), bits)
  return bits
