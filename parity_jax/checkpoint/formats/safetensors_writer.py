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

Into a bucket (``directory`` a bucket :class:`~parity_jax.stores.Store`) a file
is one object, and an object is written with one upload (tensorstore's kvstore
writes whole values: no multipart upload, no compose): each shard is assembled
in memory and uploaded, so memory is about three times a shard's bytes (the
buffer, and the two copies ``ts.KvStore.write`` makes while it is called). The
shards are written in order and the index last (:func:`write_safetensors_dir`):
the object that makes the directory loadable is the last one written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from parity_jax.checkpoint.formats.safetensors import INDEX, SINGLE
from parity_jax.dtypes import SAFETENSORS_DTYPES
from parity_jax.errors import UsageError
from parity_jax.stores import Store

__all__ = ["Tensor", "plan_shards", "write_safetensors_dir"]

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


def _fill(t: Tensor, write: Callable[[memoryview], Any], progress: Callable[[int], None]) -> None:
  """Writes the C-order bytes of ``t`` piece by piece through ``write``; checks that they are all there."""
  wrote = 0
  for piece in t.values():
    piece = np.ascontiguousarray(piece, dtype=t.dtype)
    write(memoryview(piece.reshape(-1).view(np.uint8)))
    wrote += piece.nbytes
    progress(piece.nbytes)
  if wrote != t.nbytes:
    raise UsageError(f"tensor {t.name!r}: {wrote} bytes produced, {t.nbytes} expected")


def _write_shard(directory: str | Store, name: str, shard: Sequence[Tensor], progress: Callable[[int], None]) -> None:
  head = _header(shard)

  def emit(write: Callable[[Any], Any]) -> None:  # the file's bytes in order: header length, header, tensors
    write(struct.pack("<Q", len(head)))
    write(head)
    for t in shard:
      _fill(t, write, progress)

  if isinstance(directory, Store):  # a bucket: one object, one upload of the whole shard
    size = 8 + len(head) + sum(t.nbytes for t in shard)
    buf = bytearray(size)
    at = 0

    def put(b) -> None:
      nonlocal at
      buf[at : at + len(b)] = b
      at += len(b)

    emit(put)
    if at != size:  # a slice assignment past the end grows the buffer: check the file's size was planned right
      raise AssertionError(f"{name}: wrote {at} bytes, planned {size}")
    directory.child(name).write_bytes(buf)
    return
  with open(os.path.join(directory, name), "wb") as f:
    emit(f.write)


def write_safetensors_dir(
    directory: str | Store,
    tensors: Sequence[Tensor],
    max_shard_bytes: int,
    progress: Callable[[int], None] = lambda n: None,
) -> list[str]:
  """Writes ``tensors`` as an HF safetensors directory into ``directory`` (an existing local directory, or a
  bucket :class:`~parity_jax.stores.Store`), the shards in order and the index last; the files written."""
  for t in tensors:
    if t.dtype not in _NAMES:
      raise UsageError(f"tensor {t.name!r}: dtype {t.dtype} has no safetensors name ({', '.join(SAFETENSORS_DTYPES)})")
  shards = plan_shards(tensors, max_shard_bytes)
  n = len(shards)
  names = [SINGLE] if n <= 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for name, shard in zip(names, shards or [[]]):
    _write_shard(directory, name, shard, progress)
  if n > 1:
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
    }
    data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    if isinstance(directory, Store):
      directory.child(INDEX).write_bytes(data)
    else:
      with open(os.path.join(directory, INDEX), "wb") as f:
        f.write(data)
    names.append(INDEX)
  return names
