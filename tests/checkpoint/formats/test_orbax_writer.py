"""The migrator's Orbax writer pieces: chunk shapes, the merged-index check, the metadata files, item paths.

Expected chunk shapes are worked by hand (row-major: trailing axes whole, the leading axis cut to fit the chunk
bytes); expected metadata is the JSON orbax's own readers need, written out here; the check of a merged index is
run against arrays written here with tensorstore.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import tensorstore as ts

from parity_jax.checkpoint.formats import orbax_writer as W
from parity_jax.errors import UsageError


def _chunk_and_codecs(spec) -> tuple[tuple[int, ...], list[str]]:
  inner = spec.json["metadata"]["codecs"][0]["configuration"]
  return tuple(spec.metadata.chunk_shape), [c["name"] for c in inner["codecs"]]


def test_row_major_chunks_cut_the_leading_axis_and_keep_the_rest_whole(tmp_path):
  from orbax.checkpoint._src.arrays import subchunking

  original = subchunking.choose_chunk_shape
  f32 = np.dtype(np.float32)
  with W.row_major_chunks() as hooked:
    assert hooked
    spec = W.write_spec("x", (8, 16), f32, str(tmp_path), None, chunk_bytes=128, compression="none")
    assert _chunk_and_codecs(spec) == ((2, 16), ["bytes"])  # a row is 64 bytes: two rows per 128-byte chunk
    spec = W.write_spec("x", (8, 16), f32, str(tmp_path), None, chunk_bytes=256, compression="zstd")
    assert _chunk_and_codecs(spec) == ((4, 16), ["bytes", "zstd"])
  assert subchunking.choose_chunk_shape is original  # orbax's own chooser is back
  theirs = W.write_spec("x", (8, 16), f32, str(tmp_path), None, chunk_bytes=128, compression="none")
  assert tuple(theirs.metadata.chunk_shape) != (2, 16)  # orbax's own choice is not row-major here


def test_a_given_chunk_shape_replaces_the_chosen_one_only_for_that_spec(tmp_path):
  from orbax.checkpoint._src.arrays import subchunking

  original = subchunking.choose_chunk_shape
  f32 = np.dtype(np.float32)
  with W.row_major_chunks():
    spec = W.write_spec(
        "y", (4, 4, 4), f32, str(tmp_path), None, chunk_bytes=128, compression="none", chunk_shape=(1, 2, 4)
    )
    assert tuple(spec.metadata.chunk_shape) == (1, 2, 4)  # one stack member per chunk, not 128 bytes of rows
    after = W.write_spec("y", (4, 4, 4), f32, str(tmp_path), None, chunk_bytes=128, compression="none")
    assert tuple(after.metadata.chunk_shape) == (2, 4, 4)  # chosen again: two 64-byte slices
  assert subchunking.choose_chunk_shape is original


def test_check_merged_counts_every_chunk_of_every_array(tmp_path):
  with W.row_major_chunks():
    spec = W.write_spec("x", (8, 16), np.dtype(np.float32), str(tmp_path), None, chunk_bytes=128, compression="none")
  t = ts.open(spec.json, create=True, open=True, context=W.write_context()).result()
  t.write(np.arange(128, dtype=np.float32).reshape(8, 16)).result()
  leaf = types.SimpleNamespace(name="x", n_chunks=4, dest="layers/x")
  W.check_merged(str(tmp_path), [leaf])  # 8 rows in chunks of 2: four chunks and a zarr.json
  with pytest.raises(UsageError, match=r"lacks part of leaf 'layers/x' \(4 of 5 chunks\); nothing installed"):
    W.check_merged(str(tmp_path), [types.SimpleNamespace(name="x", n_chunks=5, dest="layers/x")])
  with pytest.raises(UsageError, match=r"lacks part of leaf 'y' \(0 of 1 chunks, no zarr.json\)"):
    W.check_merged(str(tmp_path), [leaf, types.SimpleNamespace(name="y", n_chunks=1, dest="y")])


def test_a_merge_that_fails_names_the_item_directory(tmp_path):
  item = tmp_path / "item"
  (item / "ocdbt.process_0").mkdir(parents=True)
  (item / "ocdbt.process_0" / "manifest.ocdbt").write_bytes(b"garbage\n")  # a process's database, damaged
  with pytest.raises(UsageError, match=f"cannot merge the per-process databases under {item}"):
    W.merge(str(item))


def test_item_path_of_each_layout():
  assert W.item_path("/ck/7", "standard") == "/ck/7"
  assert W.item_path("/ck/7", "v1") == "/ck/7/state"


def test_metadata_files_in_order_with_the_tree_orbax_reads():
  files = W.metadata_files("/out/ck", [("a", "b"), ("c",)], {("s",): "hé"}, {"from": "x"}, 123, layout="v1")
  names = [n for n, _ in files]
  assert names == [
      "state/_strings.json",
      "state/_METADATA",
      "_CHECKPOINT_METADATA",
      "orbax.checkpoint",
      W.COMMIT_MARKER,
  ]
  body = dict(files)
  assert body["state/_strings.json"] == '{"s":"hé"}'.encode()
  meta = json.loads(body["state/_METADATA"])
  assert meta["tree_metadata"] == {
      "('a', 'b')": {
          "key_metadata": [{"key": "a", "key_type": 2}, {"key": "b", "key_type": 2}],
          "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
      },
      "('c',)": {
          "key_metadata": [{"key": "c", "key_type": 2}],
          "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
      },
      "('s',)": {
          "key_metadata": [{"key": "s", "key_type": 2}],
          "value_metadata": {"value_type": "string", "skip_deserialize": False},
      },
  }
  assert (meta["use_ocdbt"], meta["use_zarr3"], meta["store_array_data_equal_to_fill_value"]) == (True, True, True)
  ck = json.loads(body["_CHECKPOINT_METADATA"])
  assert (ck["init_timestamp_nsecs"], ck["custom_metadata"]) == (123, {"from": "x"})
  assert list(ck["item_handlers"]) == ["state"] and ck["commit_timestamp_nsecs"] >= 123
  assert body["orbax.checkpoint"] == b""
  assert body[W.COMMIT_MARKER] == b"Checkpoint commit was successful to /out/ck"

  standard = W.metadata_files("/out/ck", [("a",)], {}, {}, 0, layout="standard")
  assert [n for n, _ in standard] == ["_METADATA", "_CHECKPOINT_METADATA", W.COMMIT_MARKER]  # no strings, no marker
  handler = json.loads(dict(standard)["_CHECKPOINT_METADATA"])["item_handlers"]
  assert isinstance(handler, str) and handler.endswith("StandardCheckpointHandler")


def test_the_handler_names_are_orbax_own_and_the_same_when_it_lacks_the_classes(monkeypatch):
  """_CHECKPOINT_METADATA names orbax's handler classes; an orbax without them gets the same names."""
  from orbax.checkpoint._src.handlers import standard_checkpoint_handler as std
  from orbax.checkpoint.experimental.v1._src.handlers import stateful_checkpointable_handler as item

  want = {
      "v1": {"state": f"{item.__name__}.StatefulCheckpointableHandler"},
      "standard": f"{std.__name__}.StandardCheckpointHandler",
  }

  def handlers():
    return {
        layout: json.loads(dict(W.metadata_files("/o", [("a",)], {}, {}, 0, layout=layout))["_CHECKPOINT_METADATA"])[
            "item_handlers"
        ]
        for layout in want
    }

  assert handlers() == want
  monkeypatch.delattr(std, "StandardCheckpointHandler")  # an orbax whose modules lack the classes
  monkeypatch.delattr(item, "StatefulCheckpointableHandler")
  assert handlers() == want


def test_an_orbax_without_the_chunk_shape_hook_gets_a_warning_and_its_own_chunks(monkeypatch):
  from orbax.checkpoint._src.arrays import subchunking

  monkeypatch.delattr(subchunking, "choose_chunk_shape")
  with pytest.warns(RuntimeWarning, match="orbax has no chunk-shape hook"):
    with W.row_major_chunks() as hooked:
      assert hooked is False
  assert not hasattr(subchunking, "choose_chunk_shape")  # nothing installed in its place
