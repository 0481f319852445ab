"""Reading a checkpoint that orbax itself wrote: metadata, every read path, bit-exact, and the storage facts.

The checkpoint is written by ``ocp.PyTreeCheckpointer().save`` from a tree built here; the expected values are that
tree (compared as raw bytes with dtype and shape, so -0.0 and the NaN payload count).
"""

from __future__ import annotations

import pickle
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from parity_jax.checkpoint import open_checkpoint
from parity_jax.checkpoint.formats.orbax import STANDIN, on_bucket, restore_leaves
from parity_jax.errors import UsageError

_NAN = np.array([0x7FC1], dtype=np.uint16).view(ml_dtypes.bfloat16)[0]  # a NaN with a payload

TREE = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
    "b": np.array([1, -0.0, _NAN, 2, 3], dtype=ml_dtypes.bfloat16),
    "n": {"i": np.int8(-3), "pi": 7, "pf": 1.5},
    "s": "hello",
}
# leaf path -> (kind, dtype, shape) as orbax stores them: python ints and floats as 64-bit scalars
EXPECTED = {
    "w": ("array", np.dtype(np.float32), (3, 4)),
    "b": ("array", np.dtype(ml_dtypes.bfloat16), (5,)),
    "n/i": ("scalar", np.dtype(np.int8), ()),
    "n/pi": ("scalar", np.dtype(np.int64), ()),
    "n/pf": ("scalar", np.dtype(np.float64), ()),
    "s": ("string", None, ()),
}
VALUES = {
    "w": TREE["w"],
    "b": TREE["b"],
    "n/i": np.array(-3, dtype=np.int8),
    "n/pi": np.array(7, dtype=np.int64),
    "n/pf": np.array(1.5, dtype=np.float64),
}


def _same(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes())


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
  import orbax.checkpoint as ocp

  d = tmp_path_factory.mktemp("orbax") / "ckpt"
  ocp.PyTreeCheckpointer().save(d, TREE)
  return open_checkpoint(d)


def test_the_leaves_orbax_wrote_are_listed_with_their_kind_dtype_and_shape(ck):
  assert {p: (m.kind, m.dtype, m.shape) for p, m in ck.leaves.items()} == EXPECTED
  assert {p: m.storage_name for p, m in ck.leaves.items()} == {p: p.replace("/", ".") for p in EXPECTED}
  assert ck.describe().startswith("v0 checkpoint, 6 leaves")


def test_every_read_path_gives_the_saved_bytes(ck):
  for p, want in VALUES.items():
    m = ck.leaves[p]
    assert _same(ck.read_whole(m), want), p  # the shared handle
    assert ck.handle(m) is ck.handle(m)  # opened once, then reused
    with ck.reader(m) as r:
      assert _same(r.read(), want), p
  with ck.reader(ck.leaves["w"]) as r:
    assert _same(r.read((slice(1, 3), slice(1, 4))), VALUES["w"][1:3, 1:4])
    out = np.empty((2, 2), np.float32)
    r.wait(r.read_into_async((slice(0, 2), slice(2, 4)), out))
    assert _same(out, VALUES["w"][0:2, 2:4])
  assert ck.read_string(ck.leaves["s"]) == "hello"
  fresh = ck.reader(ck.leaves["w"])  # never opened: the first read opens it
  out = np.empty((1, 4), np.float32)
  fresh.wait(fresh.read_into_async((slice(2, 3), slice(0, 4)), out))
  assert _same(out, VALUES["w"][2:3])
  fresh.close()
  assert _same(fresh.result(fresh.read_async(())), VALUES["w"])  # closed, then read again: reopened
  fresh.close()


def test_the_repr_names_the_checkpoint_not_its_open_handles(ck):
  ck.read_whole(ck.leaves["w"])
  text = repr(ck)
  assert text.startswith("OrbaxCheckpoint(") and "TensorStore" not in text and "Context" not in text


def test_a_checkpoint_sent_to_another_process_opens_its_leaves_again_and_reads_the_same(ck):
  copy = pickle.loads(pickle.dumps(ck))  # what a job's processes receive: no handles, no context
  for p, want in VALUES.items():
    assert _same(copy.read_whole(copy.leaves[p]), want), p
    assert copy.handle(copy.leaves[p]) is copy.handle(copy.leaves[p])  # reopened once, then reused
  assert copy.read_string(copy.leaves["s"]) == "hello"


def test_restore_leaves_gives_the_stored_dtypes_and_only_the_leaves_asked_for(ck):
  got = restore_leaves(ck, list(ck.leaves))
  assert set(got) == set(EXPECTED)
  for p, want in VALUES.items():
    assert _same(got[p], want), p  # python scalars come back as their stored 64-bit dtype, an int8 stays int8
  assert got["s"] == "hello"
  assert set(restore_leaves(ck, ["n/i", "s"])) == {"n/i", "s"}
  with pytest.raises(UsageError, match="no such leaf.*'nope'"):
    restore_leaves(ck, ["w", "nope"])


def test_storage_facts_group_the_leaves_by_how_they_are_stored(ck):
  facts = ck.storage_facts()
  assert (facts["ocdbt"], facts["zarr_format"], facts["missing_chunks"]) == (True, 2, "error")
  groups = [(g["storage"], g["leaves"], g["examples"]) for g in facts["leaf_storage"]]
  assert groups == [
      ("zstd, 1 chunk, missing chunk = error", 5, ["b", "n/i", "n/pf"]),  # at most three examples
      ("string (in _strings.json)", 1, ["s"]),
  ]
  assert ck.storage_summary().startswith("OCDBT, zarr v2, zstd; missing chunks: error; ")


def _unraisable(name: str, message: str):
  """An unraisable-exception record of ``RuntimeError(message)`` raised inside a function called ``name``."""
  code = compile(f"def {name}():\n  raise RuntimeError({message!r})\n", "<asyncio>", "exec")
  scope: dict = {}
  exec(code, scope)
  try:
    scope[name]()
  except RuntimeError as e:
    return types.SimpleNamespace(
        exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__, err_msg=None, object=None
    )


def test_after_a_restore_only_the_closed_event_loop_callback_is_silenced(ck, monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  restore_leaves(ck, ["w"])  # installs the filter in front of the hook in place
  closed = _unraisable("_check_closed", "Event loop is closed")
  sys.unraisablehook(closed)
  assert seen == []  # asyncio's closed loop, after a failed restore: already reported, silenced
  others = [_unraisable("_check_closed", "something else"), _unraisable("elsewhere", "Event loop is closed")]
  for u in others:
    sys.unraisablehook(u)
  assert seen == others  # everything else still reaches the previous hook
  restore_leaves(ck, ["w"])  # a second restore does not stack a second filter
  sys.unraisablehook(closed)
  sys.unraisablehook(others[0])
  assert seen == [*others, others[0]]


def test_on_bucket_moves_only_the_file_kvstores_under_the_stand_in_directory(tmp_path):
  from parity_jax.stores import open_store

  store = open_store(tmp_path / "bucket_item")  # any store: its kvstore_spec is what the spec gets
  spec = {
      "driver": "zarr3",
      "kvstore": {"driver": "ocdbt", "base": {"driver": "file", "path": STANDIN + "/"}, "path": "w"},
      "other": [{"driver": "file", "path": "/elsewhere/"}, {"driver": "memory", "path": STANDIN + "/x"}],
      "sub": {"driver": "file", "path": STANDIN + "/d/ocdbt.process_0"},
  }
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  # what orbax itself adds to an OCDBT kvstore on remote storage (its gs:// spec): read coalescing
  theirs = tsu.build_kvstore_tspec("gs://bkt/item", use_ocdbt=True)
  coalescing = {k: v for k, v in theirs.items() if k.startswith("experimental_read_coalescing")}
  assert coalescing
  moved = on_bucket(spec, store)
  assert moved == {
      "driver": "zarr3",
      "kvstore": {"driver": "ocdbt", "base": store.kvstore_spec(as_dir=True), "path": "w", **coalescing},
      "other": [{"driver": "file", "path": "/elsewhere/"}, {"driver": "memory", "path": STANDIN + "/x"}],
      "sub": store.child("d", "ocdbt.process_0").kvstore_spec(as_dir=False),
  }
  assert moved["kvstore"]["base"] == {"driver": "file", "path": str(tmp_path / "bucket_item") + "/"}


def test_the_same_checkpoint_in_a_bucket_reads_the_same_bytes_by_ranges(ck, gcs_bucket, monkeypatch):
  """Uploaded as is: every leaf is read through byte ranges of its OCDBT data files (here from the first byte on;
  by default only leaves whose chunks exceed a slice), and the facts name the store."""
  from parity_jax.checkpoint.formats import ocdbt_ranges

  monkeypatch.setattr(ocdbt_ranges, "RANGED_ABOVE_BYTES", 0)
  url = gcs_bucket.upload_tree(ck.path, "ck")
  remote = open_checkpoint(url)
  assert {p: (m.kind, m.dtype, m.shape) for p, m in remote.leaves.items()} == EXPECTED
  assert all(m.ranged for p, m in remote.leaves.items() if m.kind != "string")
  assert remote.facts["store"]["url"] == url
  for p, want in VALUES.items():
    with remote.reader(remote.leaves[p]) as r:
      assert isinstance(r, ocdbt_ranges.RangedLeafReader) and _same(r.read(), want), p
  with remote.reader(remote.leaves["w"]) as r:
    assert _same(r.read((slice(1, 3), slice(1, 4))), VALUES["w"][1:3, 1:4])
  assert remote.read_string(remote.leaves["s"]) == "hello"


@pytest.mark.parametrize(
    "metadata, words",
    [
        (b"{not json", "cannot read _METADATA: "),
        (b'{"tree_metadata": []}', "_METADATA has no tree_metadata (not a PyTree checkpoint?)"),
        (b'{"tree_metadata": {"x": {"key_metadata": [{"no_key": 1}]}}}', "malformed entry in _METADATA"),
    ],
)
def test_a_damaged_tree_metadata_is_one_line(ck, tmp_path, metadata, words):
  import shutil

  d = tmp_path / "ck"
  shutil.copytree(ck.path, d)
  (d / "_METADATA").write_bytes(metadata)
  with pytest.raises(UsageError) as e:
    open_checkpoint(d)
  assert str(e.value).startswith(f"checkpoint {d}: {words}") and "\n" not in str(e.value), str(e.value)


def test_an_empty_subtree_is_named_as_an_empty_node_not_a_leaf(tmp_path):
  import orbax.checkpoint as ocp

  d = tmp_path / "ck"
  ocp.PyTreeCheckpointer().save(d, {"w": np.arange(3, dtype=np.float32), "opt": {}})
  ck = open_checkpoint(d)
  assert list(ck.leaves) == ["w"] and ck.empty_nodes == ["opt"]
