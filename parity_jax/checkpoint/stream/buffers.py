"""Piece buffers allocated once per run, views into them, and raw-byte equality."""

from __future__ import annotations

import numpy as np

from parity_jax.checkpoint.stream.plan import PIPELINE_DEPTH
from parity_jax.dtypes import c_contiguous

__all__ = ["Buffers", "as_bytes", "bytes_equal", "view"]

_MIB = 1 << 20
_COMPARE_PIECE = 8 * _MIB


class Buffers:
  """Reusable byte buffers of ``nbytes`` each, allocated on first use and kept for the whole run.

  ``pool[i]`` (PIPELINE_DEPTH of them) hold source pieces on their way from
  the comparison to the hashing thread; ``b`` holds the migrated piece; ``h``
  is the background hash thread's.
  """

  def __init__(self, nbytes: int):
    self.nbytes = int(nbytes)
    self._pool: list[np.ndarray | None] = [None] * PIPELINE_DEPTH
    self._b: np.ndarray | None = None
    self._h: np.ndarray | None = None

  def pool(self, i: int) -> np.ndarray:
    if self._pool[i] is None:
      self._pool[i] = np.empty(self.nbytes, np.uint8)
    return self._pool[i]

  @property
  def b(self) -> np.ndarray:
    if self._b is None:
      self._b = np.empty(self.nbytes, np.uint8)
    return self._b

  @property
  def h(self) -> np.ndarray:
    """The background hash thread's own piece buffer."""
    if self._h is None:
      self._h = np.empty(self.nbytes, np.uint8)
    return self._h


def view(buf: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  count = int(np.prod(shape)) if shape else 1
  return buf[: count * dtype.itemsize].view(dtype).reshape(shape)


def as_bytes(a: np.ndarray) -> memoryview:
  """The raw bytes of a C-contiguous piece (a view into a buffer), for hashing and spilling."""
  return memoryview(a.reshape(-1).view(np.uint8))


def bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
  """Raw-byte equality of two same-size pieces (shapes may differ by the transform), 8 MiB at a time."""
  if a.dtype != b.dtype or a.size != b.size:
    return False
  fa = c_contiguous(a).reshape(-1).view(np.uint8)
  fb = c_contiguous(b).reshape(-1).view(np.uint8)
  for i in range(0, fa.size, _COMPARE_PIECE):
    pa, pb = fa[i : i + _COMPARE_PIECE], fb[i : i + _COMPARE_PIECE]
    if pa.size % 8 == 0:
      pa, pb = pa.view(np.uint64), pb.view(np.uint64)
    if not np.array_equal(pa, pb):
      return False
  return True
