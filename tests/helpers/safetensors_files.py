"""Hand-written safetensors files for tests: the format written out from its specification, not by parity_jax.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets
relative to the end of the header) and the tensors' raw little-endian bytes.
:func:`write_file` writes one (tensors in the given order, back to back), with
optional edits of the header (``edit``) to make lying or damaged files;
:func:`write_sharded` writes shards plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

# The safetensors dtype names, written out here independently of parity_jax.dtypes.
NAMES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


def write_file(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    *,
    edit: Callable[[dict], None] | None = None,
    truncate: int = 0,
) -> str:
  """Writes ``tensors`` as one safetensors file; ``edit(header)`` may change the header, ``truncate`` drops bytes."""
  header: dict = {"__metadata__": {"format": "np"}}
  blobs, offset = [], 0
  for name, a in tensors.items():
    a = np.asarray(a)
    raw = a.tobytes()  # C order (ascontiguousarray would make a 0-d array 1-d)
    header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  if edit is not None:
    edit(header)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
  data = struct.pack("<Q", len(text)) + text + b"".join(blobs)
  if truncate:
    data = data[:-truncate]
  with open(path, "wb") as f:
    f.write(data)
  return os.fspath(path)


def write_sharded(directory: str | os.PathLike, shards: Mapping[str, Mapping[str, np.ndarray]]) -> str:
  """Writes each ``{file name: tensors}`` shard plus ``model.safetensors.index.json``; returns the directory."""
  os.makedirs(directory, exist_ok=True)
  weight_map = {}
  for fname, tensors in shards.items():
    write_file(os.path.join(directory, fname), tensors)
    weight_map.update({name: fname for name in tensors})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  return os.fspath(directory)
