"""Writing a safetensors directory tensor by tensor: files the safetensors library reads back bit-exact, shards cut
the way ``save_pretrained`` cuts them, the index, and the refusals.

The oracle is the ``safetensors`` library itself (``safe_open``) and the format as its documentation states it (an
8-byte little-endian header length, the JSON header); the arrays are made here.
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from parity_jax.checkpoint.formats.safetensors_writer import Tensor, plan_shards, write_safetensors_dir
from parity_jax.errors import UsageError
from parity_jax.stores import open_store

ARRAYS = {
    "a": np.arange(12, dtype=np.float32).reshape(3, 4) - 0.5,  # 48 bytes
    "b": np.array([1, -0.0, np.nan, 2, 3], dtype=ml_dtypes.bfloat16),  # 10 bytes
    "c": np.array(-7, dtype=np.int64),  # a scalar: 8 bytes
    "d": np.zeros((0, 3), np.float16),  # empty: 0 bytes
}


def _tensor(name: str, a: np.ndarray, piece: int = 5) -> Tensor:
  flat = a.reshape(-1)
  return Tensor(name, a.shape, a.dtype, lambda: (flat[i : i + piece] for i in range(0, flat.size, piece)))


TENSORS = [_tensor(k, v) for k, v in reversed(ARRAYS.items())]  # given out of order: written in name order


def _read(path) -> dict[str, np.ndarray]:
  with safe_open(str(path), framework="numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _same(a, b) -> bool:
  return (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes())


def _header(path) -> tuple[int, bytes]:
  raw = open(path, "rb").read()
  (n,) = struct.unpack("<Q", raw[:8])
  return n, raw[8 : 8 + n]


def test_one_shard_reads_back_bit_exact_with_the_header_the_format_describes(tmp_path):
  seen = []
  names = write_safetensors_dir(str(tmp_path), TENSORS, 1 << 20, progress=seen.append)
  assert names == ["model.safetensors"]
  got = _read(tmp_path / "model.safetensors")
  assert set(got) == {"a", "b", "c", "d"}  # b (bf16) is checked in the raw bytes below
  assert _same(got["a"], ARRAYS["a"]) and _same(got["c"], ARRAYS["c"]) and _same(got["d"], ARRAYS["d"])
  n, head = _header(tmp_path / "model.safetensors")
  assert n % 8 == 0 and head == head.rstrip() + b" " * (n - len(head.rstrip()))  # padded with spaces to 8
  h = json.loads(head)
  assert h["__metadata__"] == {"format": "pt"}
  assert [(k, h[k]["dtype"], h[k]["shape"], h[k]["data_offsets"]) for k in "abcd"] == [
      ("a", "F32", [3, 4], [0, 48]),
      ("b", "BF16", [5], [48, 58]),
      ("c", "I64", [], [58, 66]),
      ("d", "F16", [0, 3], [66, 66]),
  ]
  raw = open(tmp_path / "model.safetensors", "rb").read()
  assert raw[8 + n :] == b"".join(ARRAYS[k].tobytes() for k in "abcd")
  assert sum(seen) == 66


def test_shards_are_cut_in_name_order_and_the_index_written_last(tmp_path):
  assert [[t.name for t in s] for s in plan_shards(TENSORS, 50)] == [["a"], ["b", "c", "d"]]  # 48 | 10 + 8 + 0
  assert [[t.name for t in s] for s in plan_shards(TENSORS, 5)] == [["a"], ["b"], ["c"], ["d"]]  # each alone
  assert [[t.name for t in s] for s in plan_shards(TENSORS, 58)] == [["a", "b"], ["c", "d"]]  # 58 fits exactly
  assert plan_shards([], 10) == []
  names = write_safetensors_dir(str(tmp_path), TENSORS, 50)
  assert names == [
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
      "model.safetensors.index.json",
  ]
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert index == {
      "metadata": {"total_size": 66},
      "weight_map": {
          "a": "model-00001-of-00002.safetensors",
          "b": "model-00002-of-00002.safetensors",
          "c": "model-00002-of-00002.safetensors",
          "d": "model-00002-of-00002.safetensors",
      },
  }
  assert set(_read(tmp_path / names[0])) == {"a"} and _same(_read(tmp_path / names[0])["a"], ARRAYS["a"])
  assert _same(_read(tmp_path / names[1])["c"], ARRAYS["c"])


def test_a_store_gets_the_same_bytes_one_object_per_file(tmp_path):
  (tmp_path / "plain").mkdir()
  (tmp_path / "store").mkdir()
  write_safetensors_dir(str(tmp_path / "plain"), TENSORS, 50)
  names = write_safetensors_dir(open_store(tmp_path / "store"), TENSORS, 50)
  for name in names:
    assert (tmp_path / "store" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


def test_nothing_to_write_is_one_file_with_only_the_metadata(tmp_path):
  assert write_safetensors_dir(str(tmp_path), [], 10) == ["model.safetensors"]
  n, head = _header(tmp_path / "model.safetensors")
  assert json.loads(head) == {"__metadata__": {"format": "pt"}} and _read(tmp_path / "model.safetensors") == {}


def test_too_few_bytes_or_a_dtype_without_a_name_are_refused(tmp_path):
  short = Tensor("a", (3, 4), np.dtype(np.float32), lambda: iter([np.zeros(11, np.float32)]))
  with pytest.raises(UsageError, match="tensor 'a': 44 bytes produced, 48 expected"):
    write_safetensors_dir(str(tmp_path), [short], 1 << 20)
  odd = Tensor("z", (2,), np.dtype(np.complex64), lambda: iter([np.zeros(2, np.complex64)]))
  with pytest.raises(UsageError, match="tensor 'z': dtype complex64 has no safetensors name"):
    write_safetensors_dir(str(tmp_path / "nowhere"), [odd], 1 << 20)
  assert Tensor("s", (), np.dtype(np.int16), lambda: iter(())).nbytes == 2
