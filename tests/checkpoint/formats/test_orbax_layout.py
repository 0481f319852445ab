"""parity_jax.checkpoint.formats.orbax_layout (and the _METADATA reading of formats.orbax): the rules by which a
directory is recognised and its storage decided, each checked on a _METADATA or a directory written here.

The rules are orbax's own (see the module docstring and tests/data/orbax_legacy/FINDINGS.md); the expected answers
below are those rules applied by hand to the dicts and directories of each test.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.helpers import ckpt as H
from parity_jax.checkpoint import open_checkpoint
from parity_jax.checkpoint.formats.orbax_layout import Tree, decide_layout, resolve_item_dir
from parity_jax.stores import open_store
from parity_jax.errors import UsageError


@pytest.fixture(scope="module")
def item(tmp_path_factory):
  """A v0 PyTree item directory written by the current orbax."""
  root = tmp_path_factory.mktemp("layout")
  return H.save_v0(root / "item", {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int32(7)})


def test_an_absent_use_zarr3_means_zarr_v2(item):
  use_ocdbt, use_zarr3, _, facts = decide_layout({"use_ocdbt": True}, item, item, "v0")
  assert use_ocdbt is True and use_zarr3 is False
  assert facts["zarr_format"] == 2 and "no use_zarr3" in facts["zarr_decided_by"]
  _, use_zarr3, _, facts = decide_layout({"use_ocdbt": True, "use_zarr3": True}, item, item, "v0")
  assert use_zarr3 is True and facts["zarr_format"] == 3


def test_recorded_use_ocdbt_without_the_fill_value_flag_means_every_chunk_was_stored(item):
  """orbax >= 0.11.31 records use_ocdbt and stores every chunk; before 0.10 neither was recorded."""
  _, _, strict, facts = decide_layout({"use_ocdbt": True, "use_zarr3": True}, item, item, "v0")
  assert strict is True and "use_ocdbt is recorded" in facts["missing_chunks_decided_by"]
  _, _, strict, _ = decide_layout({"use_zarr3": True}, item, item, "v0")
  assert strict is False  # orbax < 0.10 left out chunks equal to the fill value
  _, _, strict, _ = decide_layout({"use_zarr3": True, "store_array_data_equal_to_fill_value": False}, item, item, "v0")
  assert strict is False  # the flag, where recorded, decides


def test_the_orbax_version_hint_follows_which_flags_metadata_records(item):
  """use_ocdbt recorded: >= 0.11.31; only the fill flag: 0.10 up to 0.11.31; neither: before 0.10."""
  flag = "store_array_data_equal_to_fill_value"
  for raw, hint in (
      ({"use_ocdbt": True, flag: True}, "orbax >= 0.11.31"),
      ({flag: True}, "orbax >= 0.10.0, < 0.11.31"),
      ({flag: False}, "orbax >= 0.10.0, < 0.11.31"),
      ({}, "orbax < 0.10.0"),
  ):
    facts = decide_layout(raw, item, item, "v0")[3]
    assert facts["orbax_version"] is None and facts["orbax_version_hint"] == hint, raw


def test_a_step_named_directory_holding_files_besides_its_item_is_not_an_orbax_0_5_step(item, tmp_path):
  step = tmp_path / "100"
  step.mkdir()
  os.symlink(item, step / "default")
  assert resolve_item_dir(step) == (str(step / "default"), "step")  # items only: orbax 0.5's unmarked step
  (step / "notes.txt").write_text("a file beside the item")
  with pytest.raises(UsageError, match="holds one or more"):
    resolve_item_dir(step)


def test_an_empty_key_in_metadata_is_one_line(item, tmp_path):
  import shutil

  bad = tmp_path / "bad"
  shutil.copytree(item, bad)
  meta = json.loads((bad / "_METADATA").read_text())
  entry = next(iter(meta["tree_metadata"].values()))
  entry["key_metadata"][0]["key"] = ""
  (bad / "_METADATA").write_text(json.dumps(meta))
  with pytest.raises(UsageError, match=r"key '' in .* is empty or contains '/'") as e:
    open_checkpoint(bad)
  assert "\n" not in str(e.value)


def test_a_flax_msgpack_file_is_named_as_such(tmp_path):
  """A msgpack map (0x8N) in a file named checkpoint*: flax's own format, refused by name in one line."""
  f = tmp_path / "checkpoint_100"
  f.write_bytes(bytes([0x81, 0xA1, 0x61, 0x01]))  # {"a": 1}
  with pytest.raises(UsageError, match="not an Orbax checkpoint but a flax msgpack checkpoint file"):
    resolve_item_dir(f)


def test_foreign_files_are_named_by_their_magic_bytes_and_names(tmp_path):
  import pickle

  cases = {  # file name, content -> what the one-line refusal calls it (None: nothing named)
      ("weights.pkl", pickle.dumps({"w": 1}, protocol=4)): "a Python pickle file",
      ("weights.pkl2", pickle.dumps([1], protocol=2)): "a Python pickle file",
      ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "): "a safetensors file",
      ("model.pt", b"PK\x03\x04rest"): "a PyTorch checkpoint file",
      ("model.pt.txt", b"PK\x03\x04rest"): None,  # a zip by another name
      ("arrays.npz", b"PK\x03\x04rest"): "a NumPy .npz archive",
      ("array.npy", b"\x93NUMPY\x01\x00"): "a NumPy .npy file",
      ("weights.h5", b"\x89HDF\r\n\x1a\n"): "an HDF5 file (Keras / h5py)",
      ("model.ckpt.index", b"\x00\x01"): "a TensorFlow checkpoint file",
      ("blob", b"\x80\x10not a pickle protocol"): None,  # 0x80, then no protocol number 2..5
      ("blob2", b"\x00\x04starts like nothing"): None,  # a protocol number without the 0x80 opcode before it
  }
  for (name, data), what in cases.items():
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(UsageError) as e:
      resolve_item_dir(f)
    msg = str(e.value)
    assert "\n" not in msg
    if what is None:
      assert " but a" not in msg and "pickle" not in msg, (name, msg)
    else:
      assert f"not an Orbax checkpoint but {what}" in msg, (name, msg)


def test_foreign_directories_are_named_by_what_they_hold(tmp_path):
  cases = {  # the files of a directory -> what the one-line refusal calls it
      ("checkpoint", "model.ckpt-1.index"): "a TensorFlow checkpoint directory",
      ("config.json", "model-00001-of-00002.safetensors"): "a safetensors / Hugging Face model directory",
      ("vocab.index", "model.safetensors"): "a safetensors / Hugging Face model directory",  # no 'checkpoint' file
      ("config.json", "pytorch_model.bin"): "a PyTorch / Hugging Face model directory",
      ("pytorch_model.bin.index.json",): "a PyTorch / Hugging Face model directory",
      ("zarr.json",): "a bare zarr array (no Orbax PyTree metadata)",
      (".zarray", "0.0"): "a bare zarr array (no Orbax PyTree metadata)",
  }
  for i, (names, what) in enumerate(cases.items()):
    d = tmp_path / f"d{i}"
    d.mkdir()
    for n in names:
      (d / n).write_bytes(b"\x00")
    with pytest.raises(UsageError) as e:
      resolve_item_dir(d)
    assert f"not an Orbax checkpoint but {what}" in str(e.value), (names, str(e.value))


def test_a_missing_directory_lists_as_empty(item):
  tree = Tree(open_store(str(item)))
  assert tree.subdirs("no_such_dir") == [] and tree.files("no_such_dir") == []
  assert "_METADATA" in tree.files() and tree.subdirs() == sorted(e.name for e in os.scandir(item) if e.is_dir())


def test_an_item_directory_outside_its_checkpoint_is_refused(item, tmp_path):
  with pytest.raises(UsageError, match=f"item directory {tmp_path} is not inside {item}"):
    decide_layout({"use_ocdbt": True}, tmp_path, item, "v0")


def test_directories_that_are_not_checkpoints_yet_say_what_they_are(tmp_path):
  """One line each: an OCDBT database with no PyTree metadata; a directory holding only an interrupted save."""
  db = tmp_path / "db"
  db.mkdir()
  (db / "manifest.ocdbt").write_bytes(b"\x00")
  with pytest.raises(UsageError, match=r"not an Orbax checkpoint but an OCDBT database without Orbax PyTree metadata"):
    resolve_item_dir(db)
  run = tmp_path / "run"
  (run / "state.orbax-checkpoint-tmp-1234").mkdir(parents=True)
  (run / "notes").mkdir()  # a plain directory beside it is not "unfinished"
  with pytest.raises(UsageError, match=r"holds only an unfinished checkpoint \(state.orbax-checkpoint-tmp-1234\)"):
    resolve_item_dir(run)
  only_notes = tmp_path / "only_notes"
  (only_notes / "notes").mkdir(parents=True)
  with pytest.raises(UsageError) as e:
    resolve_item_dir(only_notes)
  assert "unfinished" not in str(e.value)


def test_the_first_bytes_of_a_file_that_cannot_be_read_are_none(item):
  tree = Tree(open_store(str(item)))
  assert tree.head("_METADATA", 1) == b"{" and tree.head("no_such_file") == b""


def test_a_bucket_tree_lists_like_a_directory(item, gcs_bucket, tmp_path):
  """The same files on disk and in a bucket (one listing, answered from memory): the same answers."""
  files = {"_METADATA": b"{}", "f": b"0123456789", "d/x": b"x", "d/e/y": b"yy"}
  for rel, data in files.items():
    gcs_bucket.put("ck/" + rel, data)
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(data)
  for tree in (Tree(open_store(gcs_bucket.url + "/ck")), Tree(open_store(str(tmp_path)))):
    assert (tree.files(), tree.subdirs(), tree.files("d"), tree.subdirs("d"), tree.subdirs("d/e")) == (
        ["_METADATA", "f"],
        ["d"],
        ["x"],
        ["e"],
        [],
    )
    assert (tree.files("nope"), tree.subdirs("nope")) == ([], [])
    assert [tree.is_dir(r) for r in ("", "d", "d/e", "f", "nope")] == [True, True, True, False, False]
    assert [tree.is_file(r) for r in ("", "d", "d/e/y", "f", "nope")] == [False, False, True, True, False]
    assert [tree.exists(r) for r in ("d", "d/x", "nope")] == [True, True, False]
    assert (tree.head("f", 4), tree.head("f", 100), tree.head("d/e/y"), tree.head("nope")) == (
        b"0123",
        files["f"],
        b"yy",
        b"",
    )
    assert tree.read_bytes("d/x") == b"x"


def test_a_bucket_prefix_of_data_objects_without_metadata_or_marker_is_an_unfinished_upload(gcs_bucket):
  """An upload cut short before its metadata: named as unfinished (no commit marker), not as 'not a checkpoint'."""
  gcs_bucket.put("cut/d/manifest.ocdbt", b"x")
  gcs_bucket.put("cut/d/ocdbt.process_0/d/abc", b"y")
  with pytest.raises(UsageError, match=r"^checkpoint is unfinished: no commit_success.txt .* in gs://"):
    resolve_item_dir(gcs_bucket.url + "/cut")
  gcs_bucket.put("cut/commit_success.txt", b"")  # committed, yet no item: what it lacks is named instead
  with pytest.raises(UsageError) as e:
    resolve_item_dir(gcs_bucket.url + "/cut")
  assert "unfinished" not in str(e.value)


def test_directories_that_are_not_one_checkpoint_say_what_to_pass_instead(tmp_path):
  def mkdir(rel: str, *files: str):
    d = tmp_path / rel
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
      (d / f).write_bytes(b"{}")
    return d

  msgpack = bytes([0x81, 0xA1, 0x61, 0x01])  # {"a": 1}
  mkdir("flax1")
  (tmp_path / "flax1" / "checkpoint").write_bytes(msgpack)
  mkdir("flax2")
  for n in (5, 7):
    (tmp_path / "flax2" / f"checkpoint_{n}").write_bytes(msgpack)
  mkdir("two/a", "_METADATA")
  mkdir("two/b", "_METADATA")
  mkdir("two", "_CHECKPOINT_METADATA")
  for s in ("2", "10", "1"):
    mkdir(f"manager/{s}/default")
  tmp = mkdir("run.orbax-checkpoint-tmp-99")
  cases = {
      tmp_path / "nope": f"checkpoint does not exist: {tmp_path / 'nope'}",
      tmp: f"checkpoint is an unfinished temporary checkpoint directory (interrupted save?): {tmp}",
      tmp_path / "flax1": "checkpoint is not an Orbax checkpoint but a pre-_METADATA Orbax/flax checkpoint (a msgpack",
      tmp_path / "flax2": "checkpoint is not an Orbax checkpoint but a directory of flax msgpack checkpoints (e.g."
      " checkpoint_7)",
      tmp_path / "two": f"checkpoint holds 2 PyTree items (a, b); pass one of them, e.g. {tmp_path / 'two' / 'a'}",
      tmp_path / "manager": "checkpoint looks like a CheckpointManager directory (steps 1, 2, 10); pass one step"
      f" directory, e.g. {tmp_path / 'manager' / '10'}",
  }
  for path, message in cases.items():
    with pytest.raises(UsageError) as e:
      resolve_item_dir(path)
    assert str(e.value).startswith(message), (str(e.value), message)
