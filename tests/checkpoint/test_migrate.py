"""migrate()'s arguments: every bad one refused in one line before anything is read or written; the layout chosen
for the source; a spec given as a file.

The sources are written here (safetensors with tests/helpers/safetensors_files.py, Orbax with orbax itself through
tests/helpers/ckpt.py); the migrated leaves are read back and compared with the arrays written.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from parity_jax import stores
from parity_jax.checkpoint import RemapSpec, migrate, open_checkpoint
from parity_jax.errors import UsageError
from tests.helpers import safetensors_files as W

A = np.arange(24, dtype=np.float32).reshape(4, 6) - 7.25
RULES = {"rules": [{"match": "^a$", "to": "x/a"}]}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  d = tmp_path_factory.mktemp("st")
  W.write_file(d / "model.safetensors", {"a": A})
  (d.parent / "spec.json").write_text(json.dumps(RULES))
  return d


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(dest_format="npz"), "dest_format must be one of orbax, safetensors, got 'npz'"),
        (dict(dest_format="safetensors", distributed=True), "a safetensors destination is written by one process"),
        (dict(max_shard_mb=0), "max_shard_mb must be a positive number, got 0"),
        (dict(layout="v2"), "layout must be one of auto, standard, v1, got 'v2'"),
        (dict(compression="lz4"), "compression must be 'none' or 'zstd', got 'lz4'"),
        (dict(chunk_mb=float("nan")), "chunk_mb must be a positive number, got nan"),
        (dict(chunk_mb=True), "chunk_mb must be a positive number, got True"),
        (dict(batch_mb=-1), "batch_mb must be a positive number, got -1"),
        (dict(batch_mb=float("inf")), "batch_mb must be a positive number, got inf"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(src, tmp_path, kw, message):
  with pytest.raises(UsageError, match="^" + message.replace("(", r"\(")):
    migrate(src, tmp_path / "out", RemapSpec.from_dict(RULES), **kw)
  assert os.listdir(tmp_path) == []


def test_a_safetensors_source_gets_the_standard_layout_and_the_spec_may_be_a_file(src, tmp_path, capfd):
  capfd.readouterr()
  res = migrate(src, tmp_path / "auto", src.parent / "spec.json", batch_mb=0.5, progress=True)  # spec by path
  # stderr is no terminal: one plain progress line at the end, named after the one process's migration
  last = capfd.readouterr().err.splitlines()[-1]
  assert last.startswith(f"migrate: 100% {A.nbytes} B/{A.nbytes} B ") and last.endswith(" 1/1 leaves"), last
  assert res.passed
  assert not (tmp_path / "auto" / "state").exists() and (tmp_path / "auto" / "_METADATA").is_file()
  ck = open_checkpoint(tmp_path / "auto")
  assert list(ck.leaves) == ["x/a"]
  got = ck.read_whole(ck.leaves["x/a"])
  assert (got.dtype, got.shape, got.tobytes()) == (A.dtype, A.shape, A.tobytes())
  migrate(src, tmp_path / "v1", RemapSpec.from_dict(RULES), layout="v1")
  assert (tmp_path / "v1" / "state" / "_METADATA").is_file()  # the item in state/, as ocp.v1.save writes it


def test_an_unreadable_source_leaf_is_refused_naming_it(tmp_path):
  d = tmp_path / "bad"
  d.mkdir()

  def lie(h):
    h["a"]["shape"] = [5, 6]  # more bytes than the file holds for it

  W.write_file(d / "model.safetensors", {"a": A}, edit=lie)
  with pytest.raises(UsageError, match=f"^source checkpoint {d}: cannot read leaf 'a': "):
    migrate(d, tmp_path / "out", RemapSpec.from_dict(RULES))
  assert not (tmp_path / "out").exists()


def test_a_leaf_is_written_in_groups_of_whole_chunks_up_to_batch_mb(src, tmp_path):
  """(4, 6) float32 in chunks of 32 bytes: one row (24 bytes) each, four chunks; batch_mb of 48 bytes takes two rows
  at a time (two groups), 1 byte takes each chunk alone (four)."""
  mib = 1 << 20
  res = migrate(src, tmp_path / "two", RemapSpec.from_dict(RULES), chunk_mb=32 / mib, batch_mb=48 / mib)
  assert (res.n_leaves, res.nbytes, res.n_batches) == (1, 96, 2)
  ck = open_checkpoint(tmp_path / "two")
  assert ck.leaves["x/a"].chunk_shape == (1, 6)
  got = ck.read_whole(ck.leaves["x/a"])
  assert (got.dtype, got.shape, got.tobytes()) == (A.dtype, A.shape, A.tobytes())
  assert migrate(src, tmp_path / "four", RemapSpec.from_dict(RULES), chunk_mb=32 / mib, batch_mb=1 / mib).n_batches == 4


@pytest.mark.parametrize(
    "point, error",
    [("migrate.commit", RuntimeError), ("migrate.merge", KeyboardInterrupt), ("migrate.install", RuntimeError)],
)
def test_a_migration_stopped_while_writing_leaves_nothing_behind(src, tmp_path, monkeypatch, point, error):
  """Stopped after its shares are written (before the merge, before the index and metadata, or before the rename):
  neither the destination nor its hidden temporary is left, and an interrupt says so in one line."""
  from parity_jax.checkpoint.migrate import schedule

  def stop(p, process=0):
    if (p, process) == (point, 0):  # the points a fault test names for process 0
      raise error("stopped here")

  monkeypatch.setattr(schedule, "stall_point", stop)
  out = tmp_path / "out" / "m"
  out.parent.mkdir()
  with pytest.raises(BaseException) as e:
    migrate(src, out, RemapSpec.from_dict(RULES))
  if error is KeyboardInterrupt:
    assert str(e.value) == f"interrupted (SIGINT): removed the unfinished migration; nothing written at {out}"
  else:
    assert type(e.value) is RuntimeError and str(e.value) == "stopped here"
  assert os.listdir(out.parent) == []


def test_a_bucket_migration_is_written_in_place_and_a_stopped_one_deletes_what_it_wrote(
    src, gcs_bucket, monkeypatch, tmp_path
):
  """gs://: no temporary, the commit marker last; stopped before its metadata (an error, or an interrupt before the
  merge), every object it wrote is deleted again."""
  from parity_jax.checkpoint.migrate import schedule

  url = gcs_bucket.url + "/m"
  res = migrate(src, url, RemapSpec.from_dict(RULES))
  assert res.dest == url and "m/commit_success.txt" in gcs_bucket.keys("m/")
  ck = open_checkpoint(url)
  got = ck.read_whole(ck.leaves["x/a"])
  assert (got.dtype, got.shape, got.tobytes()) == (A.dtype, A.shape, A.tobytes())
  # small leaves are committed together, many per OCDBT commit: eight cost the object writes of one
  many = tmp_path / "many"
  many.mkdir()
  W.write_file(many / "model.safetensors", {f"l{i}": np.full((4,), i, np.float32) for i in range(8)})
  identity = RemapSpec.from_rules([{"match": "(.*)", "to": r"\1"}])
  writes = []
  for source in (src, many):
    before = stores.io_stats()
    migrate(source, f"{gcs_bucket.url}/w{len(writes)}", identity if source == many else RemapSpec.from_dict(RULES))
    writes.append(stores.io_stats(since=before)["gs"]["writes"])
  assert writes[0] == writes[1], writes
  for point, error in (("migrate.install", RuntimeError), ("migrate.commit", KeyboardInterrupt)):

    def stop(p, process=0, point=point, error=error):
      if (p, process) == (point, 0):  # the points a fault test names for process 0
        raise error("stopped here")

    monkeypatch.setattr(schedule, "stall_point", stop)
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
      migrate(src, gcs_bucket.url + "/stopped", RemapSpec.from_dict(RULES))
    assert gcs_bucket.keys("stopped/") == [], point
