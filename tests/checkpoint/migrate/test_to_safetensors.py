"""migrate(dest_format="safetensors") to local disk: the files the safetensors library reads back, the config, what
the result says, what is replaced and what is refused.

Sources are written here (safetensors by tests/helpers/safetensors_files.py, an Orbax tree by orbax itself); the
migrated tensors are read with ``safe_open`` and compared bit-exact with the arrays written.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from parity_jax.checkpoint import RemapSpec, migrate
from parity_jax.checkpoint.migrate.to_safetensors import BUCKET_SHARD_FLOOR, bucket_shard_bytes
from parity_jax.checkpoint.formats.safetensors_writer import Tensor
from parity_jax.errors import UsageError
from tests.helpers import safetensors_files as W

A = np.arange(240, dtype=np.float32).reshape(12, 20) * 0.25 - 3  # 960 bytes
B = np.array([7, -1, 2**31 - 1], dtype=np.int32)
SPEC = RemapSpec.from_dict({"rules": [{"match": "^a$", "to": "model.a"}, {"match": "^b$", "to": "model.b"}]})
_MIB = 1 << 20


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  d = tmp_path_factory.mktemp("st") / "src"
  d.mkdir()
  W.write_file(d / "model.safetensors", {"a": A, "b": B})
  return d


def _tensors(d) -> dict[str, np.ndarray]:
  out = {}
  for f in sorted(os.listdir(d)):
    if f.endswith(".safetensors"):
      with safe_open(str(d / f), framework="numpy") as s:
        out.update({k: s.get_tensor(k) for k in s.keys()})
  return out


def _same(a, b) -> bool:
  return (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes())


def test_sharded_with_a_config_read_back_bit_exact(src, tmp_path):
  dest = tmp_path / "hf"
  cfg = {"model_type": "toy", "hidden_size": 20}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  res = migrate(
      src,
      dest,
      SPEC,
      dest_format="safetensors",
      max_shard_mb=500 / _MIB,
      batch_mb=100 / _MIB,
      hf_config=tmp_path / "config.json",
  )
  # model.a (960 bytes) alone over the 500-byte limit; model.b (12 bytes) in a second shard; read in 100-byte slabs
  assert sorted(os.listdir(dest)) == [
      "config.json",
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
      "model.safetensors.index.json",
  ]
  got = _tensors(dest)
  assert set(got) == {"model.a", "model.b"} and _same(got["model.a"], A) and _same(got["model.b"], B)
  assert json.loads((dest / "config.json").read_text()) == cfg
  assert (dest / "config.json").read_text() == json.dumps(cfg, indent=2, sort_keys=True) + "\n"
  assert (res.source, res.dest) == (str(src), str(dest))
  assert (res.n_leaves, res.nbytes, res.n_batches, res.chunk_bytes) == (2, 972, 2, 500)
  assert (res.compression, res.row_major_chunks) == ("none", False)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "hf"]  # no temporary left beside it


def test_one_file_without_a_config_and_a_directory_replaced_only_with_overwrite(src, tmp_path):
  dest = tmp_path / "hf"
  res = migrate(src, dest, SPEC, dest_format="safetensors")
  assert sorted(os.listdir(dest)) == ["model.safetensors"] and res.n_batches == 1
  with pytest.raises(UsageError, match="exists"):
    migrate(src, dest, SPEC, dest_format="safetensors")
  assert sorted(os.listdir(dest)) == ["model.safetensors"]
  one = RemapSpec.from_dict({"rules": [{"match": "^a$", "to": "only.a"}, {"match": "^b$", "to": "only.b"}]})
  migrate(src, dest, one, dest_format="safetensors", overwrite=True)  # an HF directory may be replaced
  assert set(_tensors(dest)) == {"only.a", "only.b"}
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  with pytest.raises(UsageError):
    migrate(src, other, SPEC, dest_format="safetensors", overwrite=True)  # neither Orbax nor HF: never replaced
  assert os.listdir(other) == ["notes.txt"]


def test_a_string_leaf_is_refused_before_anything_is_written(tmp_path):
  import orbax.checkpoint as ocp

  ocp.PyTreeCheckpointer().save(tmp_path / "ob", {"a": A, "s": "a string"})
  spec = RemapSpec.from_dict({"rules": [{"match": "^a$", "to": "a"}, {"match": "^s$", "to": "s"}]})
  with pytest.raises(UsageError, match=r"safetensors holds no strings: leaf 's' \(drop it in the spec\)"):
    migrate(tmp_path / "ob", tmp_path / "hf", spec, dest_format="safetensors")
  assert not (tmp_path / "hf").exists()


def test_bucket_shards_are_capped_at_the_floor_or_the_largest_tensor():
  def t(n):
    return Tensor("t", (n,), np.dtype(np.uint8), lambda: iter(()))

  assert BUCKET_SHARD_FLOOR == 256 * _MIB
  assert bucket_shard_bytes([t(10)], 5 << 30) == BUCKET_SHARD_FLOOR  # the floor: far below the 5 GiB asked
  assert bucket_shard_bytes([t(10)], 100) == 100  # what was asked, when it is smaller
  assert bucket_shard_bytes([t(10), t(300 * _MIB)], 1 << 30) == 300 * _MIB  # the largest tensor needs its shard
  assert bucket_shard_bytes([], 1 << 30) == BUCKET_SHARD_FLOOR


def test_into_a_bucket_written_in_place_with_its_config(src, gcs_bucket, tmp_path):
  cfg = {"model_type": "toy"}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  url = gcs_bucket.url + "/hf"
  res = migrate(src, url, SPEC, dest_format="safetensors", hf_config=tmp_path / "config.json")
  assert (res.dest, res.n_leaves, res.nbytes) == (url, 2, 972)
  assert gcs_bucket.keys("hf/") == ["hf/config.json", "hf/model.safetensors"]
  assert json.loads(gcs_bucket.get("hf/config.json")) == cfg
  gcs_bucket.download_tree("hf", tmp_path / "down")
  got = _tensors(tmp_path / "down")
  assert set(got) == {"model.a", "model.b"} and _same(got["model.a"], A) and _same(got["model.b"], B)
  gcs_bucket.put("taken/notes.txt", b"someone's")  # a prefix holding what is not a checkpoint: refused, untouched
  with pytest.raises(UsageError, match=r"holds objects that are not a checkpoint \(notes.txt\)"):
    migrate(src, gcs_bucket.url + "/taken", SPEC, dest_format="safetensors", overwrite=True)
  assert gcs_bucket.keys("taken/") == ["taken/notes.txt"]


@pytest.mark.parametrize("where", ["local", "bucket"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError, OSError])
def test_a_run_stopped_after_writing_its_shards_leaves_nothing(src, gcs_bucket, tmp_path, monkeypatch, where, error):
  """The shards written, then stopped (an interrupt, an error, a failed write): nothing at the destination, no
  temporary beside it; an interrupt and a failed local write say so in one line."""
  from parity_jax.checkpoint.migrate import to_safetensors

  real = to_safetensors.write_safetensors_dir

  def write_then_stop(*args):
    real(*args)
    raise error("stopped here")

  monkeypatch.setattr(to_safetensors, "write_safetensors_dir", write_then_stop)
  (tmp_path / "out").mkdir()
  dest = str(tmp_path / "out" / "hf") if where == "local" else gcs_bucket.url + "/stopped"
  with pytest.raises(BaseException) as e:
    migrate(src, dest, SPEC, dest_format="safetensors")
  if error is KeyboardInterrupt:
    assert str(e.value) == f"interrupted (SIGINT): removed the unfinished migration; nothing written at {dest}"
  elif error is OSError and where == "local":
    assert isinstance(e.value, UsageError)
    assert str(e.value) == f"cannot write the safetensors directory next to {dest}: stopped here"
  else:
    assert type(e.value) is error and str(e.value) == "stopped here"
  assert os.listdir(tmp_path / "out") == [] and gcs_bucket.keys() == []
