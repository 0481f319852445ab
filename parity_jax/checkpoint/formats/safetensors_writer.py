"""Writing a Hugging Face safetensors directory, tensor by tensor and slab by slab (never a tensor whole).

The layout ``transformers`` ``save_pretrained`` writes: one ``model.safetensors``
when everything fits in one shard, else ``model-00001-of-0000N.safetensors``
... and ``model.safetensors.index.json`` (``metadata.total_size`` and the
``weight_map``). Tensors are placed in name order, a new shard started when
the next tensor would pass ``max_shard_bytes`` (a bigger tensor gets a shard
of its own). Each file is the safetensors format: an 8-byte little-endian
header length, the JSON header (``dtype``, ``shape``, ``data_offsets`` per
tensor, ``__metadata__`` ``{"format": "pt"}``, padded with spaces to a
multiple of 8), then the tensors' C-order bytes back to back. The values of a
tensor come from a callable that yields its C-order elements in pieces, so
memory stays near one piece.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Iterable, Sequence

import numpy as np

from parity_jax.dtypes import SAFETENSORS_DTYPES
from parity_jax.errors import UsageError

__all__ = ["Tensor", "plan_shards", "write_safetensors_dir"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor to write: its name, shape, dtype and its C-order values in pieces (1-D arrays of ``dtype``)."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  values: Callable[[], Iterable[np.ndarray]]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize if self.shape else self.dtype.itemsize


def plan_shards(tensors: Sequence[Tensor], max_shard_bytes: int) -> list[list[Tensor]]:
  """The tensors in name order, cut into shards of at most ``max_shard_bytes`` (a bigger tensor alone)."""
  shards: list[list[Tensor]] = []
  size = 0
  for t in sorted(tensors, key=lambda t: t.name):
    if not shards or (size + t.nbytes > max_shard_bytes and shards[-1]):
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards


def _header(shard: Sequence[Tensor]) -> bytes:
  head: dict = {"__metadata__": {"format": "pt"}}
  at = 0
  for t in shard:
    head[t.name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + t.nbytes]}
    at += t.nbytes
  raw = json.dumps(head, separators=(",", ":")).encode()
  return raw + b" " * (-len(raw) % 8)


def write_safetensors_dir(
    directory: str, tensors: Sequence[Tensor], max_shard_bytes: int, progress: Callable[[int], None] = lambda n: None
) -> list[str]:
  """Writes ``tensors`` as an HF safetensors directory into the existing ``directory``; the files written."""
  for t in tensors:
    if t.dtype not in _NAMES:
      raise UsageError(f"tensor {t.name!r}: dtype {t.dtype} has no safetensors name ({', '.join(SAFETENSORS_DTYPES)})")
  shards = plan_shards(tensors, max_shard_bytes)
  n = len(shards)
  names = [SINGLE] if n <= 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for name, shard in zip(names, shards or [[]]):
    head = _header(shard)
    with open(os.path.join(directory, name), "wb") as f:
      f.write(struct.pack("<Q", len(head)))
      f.write(head)
      for t in shard:
        wrote = 0
        for piece in t.values():
          piece = np.ascontiguousarray(piece, dtype=t.dtype)
          f.write(memoryview(piece.reshape(-1).view(np.uint8)))
          wrote += piece.nbytes
          progress(piece.nbytes)
        if wrote != t.nbytes:
          raise UsageError(f"tensor {t.name!r}: {wrote} bytes produced, {t.nbytes} expected")
  if n > 1:
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
    }
    with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as f:
      json.dump(index, f, indent=2, sort_keys=True)
      f.write("\n")
    names.append(INDEX)
  return names
