"""Big leaves of a bucket's OCDBT database read by many range requests (parity_jax.checkpoint.formats.ocdbt_ranges).

Expected values: the legacy fixtures' ``expected.json`` (sha256 written by the old orbax release's generator),
numpy arrays written here with orbax and compared bit for bit, and chunk keys written out by hand from the zarr
specifications. The bucket is the GCS emulator on 127.0.0.1 (tests/helpers/objectstores.py); the slice size is
made tiny so that the fixtures' small chunks are each fetched as several ranges.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from parity_jax import stores
from parity_jax.checkpoint import open_checkpoint, verify_migration
from parity_jax.checkpoint.formats import LeafReadError, ocdbt_ranges
from parity_jax.checkpoint.formats.ocdbt_ranges import RangedLeafReader, ValueRef, chunk_boxes
from tests.helpers import ckpt as H
from tests.helpers import legacy as L
from tests.helpers.objectstores import Bucket, running

OCDBT = [fx for fx in L.all_fixtures() if fx.name.startswith("pytree_ocdbt")]
IDENTITY = {"rules": [{"match": "(.*)", "to": r"\1"}]}
MARKER = "commit_success.txt"


# ---- chunk keys, from the zarr specifications


def _z3(grid, encoding=None):
  return {"zarr_format": 3, "chunk_grid": {"configuration": {"chunk_shape": grid}}, "chunk_key_encoding": encoding}


def test_chunk_keys_of_zarr3_default_encoding():
  meta = _z3([4, 3], {"name": "default"})
  got = chunk_boxes(meta, (slice(3, 5), slice(2, 7)), (10, 7))
  assert got == [
      ("c/0/0", (slice(0, 4), slice(0, 3))),
      ("c/0/1", (slice(0, 4), slice(3, 6))),
      ("c/0/2", (slice(0, 4), slice(6, 7))),  # the edge chunk clipped to the shape
      ("c/1/0", (slice(4, 8), slice(0, 3))),
      ("c/1/1", (slice(4, 8), slice(3, 6))),
      ("c/1/2", (slice(4, 8), slice(6, 7))),
  ]
  dotted = _z3([4, 3], {"name": "default", "configuration": {"separator": "."}})
  assert [k for k, _ in chunk_boxes(dotted, (slice(9, 10), slice(6, 7)), (10, 7))] == ["c.2.2"]
  assert chunk_boxes(_z3([], None), (), ()) == [("c", ())]  # a scalar: one chunk, key "c"


def test_chunk_keys_of_zarr3_v2_encoding_and_zarr2():
  v2 = _z3([4], {"name": "v2"})
  assert [k for k, _ in chunk_boxes(v2, (slice(0, 9),), (9,))] == ["0", "1", "2"]
  assert chunk_boxes(_z3([], {"name": "v2"}), (), ()) == [("0", ())]
  zarray = {"zarr_format": 2, "chunks": [2, 2]}
  assert [k for k, _ in chunk_boxes(zarray, (slice(1, 3), slice(0, 1)), (4, 4))] == ["0.0", "1.0"]
  slashed = {"zarr_format": 2, "chunks": [2, 2], "dimension_separator": "/"}
  assert [k for k, _ in chunk_boxes(slashed, (slice(3, 4), slice(3, 4)), (4, 4))] == ["1/1"]
  assert chunk_boxes(zarray, (slice(2, 2), slice(0, 4)), (4, 4)) == []  # an empty box touches nothing


def test_value_references_from_the_tree():
  assert ValueRef.parse({"key": b"a", "inline_value": b"xyz"}) == ValueRef(inline=b"xyz")
  assert ValueRef.parse({"key": b"a", "indirect_value": "value:ocdbt.process_3/:d/ab12:181798:60594"}) == ValueRef(
      file="ocdbt.process_3/d/ab12", offset=181798, length=60594
  )
  assert ValueRef.parse({"key": b"a", "indirect_value": "value::d/ab12:0:7"}) == ValueRef(file="d/ab12", length=7)
  with pytest.raises(ValueError):
    ValueRef.parse({"key": b"a", "indirect_value": "btreenode::d/ab12:0:7"})


class _Done:

  def __init__(self, value):
    self.value = value

  def result(self):
    return self.value


def test_the_index_reads_only_the_subtrees_that_can_hold_the_prefix():
  leaf = lambda *keys: {"height": 0, "entries": [{"key": k, "inline_value": k.upper()} for k in keys]}  # noqa: E731
  nodes = {
      None: {
          "versions": [
              {"generation_number": 1, "root": {"location": "old"}},
              {"generation_number": 2, "root": {"location": "root"}},
          ]
      },
      "root": {
          "height": 1,
          "entries": [
              {"key": b"", "location": "n0"},  # [b"", b"a/x")
              {"key": b"a/x", "location": "n1"},  # [b"a/x", b"b/"): cannot hold b"b/..."
              {"key": b"b/", "location": "n2"},  # [b"b/", b"b/z")
              {"key": b"b/z", "location": "n3"},  # [b"b/z", b"c/")
              {"key": b"c/", "location": "n4"},  # [b"c/", ...)
          ],
      },
      "n2": leaf(b"b/c/0", b"b/zarr.json"),
      "n3": leaf(b"b/zz", b"bz"),
  }
  asked = []

  def dump(location):
    asked.append(location)
    return _Done(nodes[location])  # a KeyError for any node the prefix does not need

  index = ocdbt_ranges.OcdbtIndex(dump)
  got = index.under(b"b/")
  assert got == {k: ValueRef(inline=k.upper()) for k in (b"b/c/0", b"b/zarr.json", b"b/zz")}
  assert asked == [None, "root", "n2", "n3"]
  index.under(b"b/")
  assert asked == [None, "root", "n2", "n3"]  # each node read once
  assert ocdbt_ranges.OcdbtIndex(lambda loc: _Done({"versions": []})).under(b"b/") == {}  # an empty database


# ---- on a bucket


@pytest.fixture(scope="module")
def gs(_emulators):
  with pytest.MonkeyPatch.context() as mp:
    emu = running("gs")
    emu.apply(mp)
    b = Bucket(emu, emu.create_bucket())
    for fx in OCDBT:
      b.upload_tree(fx.checkpoint, f"legacy/{fx.release}/{fx.name}")
      b.put(f"legacy/{fx.release}/{fx.name}/{MARKER}", b"Checkpoint commit was successful")
    yield b


@pytest.fixture
def ranged(monkeypatch):
  """Every array leaf read by range requests, each stored chunk cut into slices of at most 1000 bytes."""
  monkeypatch.setattr(ocdbt_ranges, "RANGED_ABOVE_BYTES", 0)
  monkeypatch.setattr(ocdbt_ranges, "SLICE_BYTES", 1000)


@pytest.mark.parametrize("fx", OCDBT, ids=lambda fx: fx.id)
def test_every_legacy_ocdbt_leaf_reads_back_what_orbax_saved(gs, ranged, fx):
  ckpt = open_checkpoint(f"{gs.url}/legacy/{fx.release}/{fx.name}")
  arrays = [leaf for leaf in fx.leaves if ckpt.leaves[leaf.path].kind in ("array", "scalar")]
  assert {ckpt.leaves[leaf.path].kind for leaf in arrays} == {"array", "scalar"}
  for leaf in arrays:
    meta = ckpt.leaves[leaf.path]
    with ckpt.reader(meta, 1 << 20) as r:
      assert isinstance(r, RangedLeafReader)
      got = r.read()
    assert (str(got.dtype), got.shape, L.sha256_of(got)) == (leaf.dtype, leaf.shape, leaf.sha256), leaf.path


@pytest.fixture(scope="module")
def saved(gs, tmp_path_factory):
  """A float32 (64, 64) leaf stored in chunks of at most 4 KiB (4+ chunks, each in a data file: values above 1 KiB
  are not inlined in the tree), uploaded twice, and a copy whose element [17, 5] differs in its last bit."""
  import orbax.checkpoint as ocp

  root = tmp_path_factory.mktemp("ranges")
  w = np.random.default_rng(7).standard_normal((64, 64)).astype(np.float32)
  flipped = w.copy()
  flipped.view(np.uint32)[17, 5] ^= 1
  ctx = ocp.v1.Context()
  ctx.array.saving.storage_options.chunk_byte_size = 4096
  with ctx:
    ocp.v1.save(root / "a", {"w": w})
    ocp.v1.save(root / "b", {"w": flipped})
  H.write_spec(root / "spec.json", IDENTITY)
  return {
      "w": w,
      "a": gs.upload_tree(root / "a", "saved/a"),
      "a2": gs.upload_tree(root / "a", "saved/a2"),
      "b": gs.upload_tree(root / "b", "saved/b"),
      "spec": str(root / "spec.json"),
  }


def test_boxes_read_by_ranges_equal_what_was_saved_and_each_byte_is_fetched_once(saved, ranged):
  w = saved["w"]
  ckpt = open_checkpoint(saved["a"])
  meta = ckpt.leaves["w"]
  refs = ckpt.ocdbt_index().under(b"w/c/")  # the tree's nodes: read once, before the count below
  assert len(refs) == meta.n_chunks > 1
  assert all(ref.inline is None and ref.nbytes > 3000 for ref in refs.values())  # 4+ slices each
  slices = sum(math.ceil(ref.nbytes / 1000) for ref in refs.values())
  io0 = stores.io_stats()
  with ckpt.reader(meta, 1 << 20) as r:
    boxes = [(slice(3, 21), slice(2, 53)), (slice(0, 64), slice(0, 64)), (slice(63, 64), slice(63, 64))]
    for box in boxes:
      out = np.empty(tuple(s.stop - s.start for s in box), np.float32)
      r.wait(r.read_into_async(box, out))
      assert out.tobytes() == np.ascontiguousarray(w[box]).tobytes(), box
  io = stores.io_stats(since=io0)["gs"]
  # every chunk fetched once as its slices, kept decoded for the later boxes (the cache holds them all)
  assert io["reads"] == slices
  assert io["bytes_read"] == sum(ref.nbytes for ref in refs.values())


def test_a_chunk_dropped_from_a_reader_without_cache_is_fetched_again(saved, ranged):
  ckpt = open_checkpoint(saved["a"])
  meta = ckpt.leaves["w"]
  ckpt.ocdbt_index().under(b"w/")
  io0 = stores.io_stats()
  with ckpt.reader(meta, 0) as r:
    first = r.read((slice(0, 1), slice(0, 1)))  # chunk c/0/0 only
    again = r.read((slice(0, 1), slice(0, 1)))
  assert first.tobytes() == again.tobytes() == saved["w"][:1, :1].tobytes()
  stored = ckpt.ocdbt_index().under(b"w/c/0/0")[b"w/c/0/0"].nbytes
  assert stores.io_stats(since=io0)["gs"]["bytes_read"] == 2 * stored


def test_a_failed_fetch_is_an_unreadable_leaf_every_time_it_is_read(gs, saved, ranged, monkeypatch):
  with gs.emulator.proxy() as proxy:
    gs.emulator.apply(monkeypatch, endpoint=proxy.url)
    ckpt = open_checkpoint(saved["a"])
    ckpt.ocdbt_index().under(b"w/")  # the tree is read before the data files start failing
    with ckpt.reader(ckpt.leaves["w"], 1 << 20) as r:
      proxy.fail(404, path_contains="%2Fd%2F", methods=("GET",))  # gs object names are escaped: saved/a/.../d/...
      with pytest.raises(LeafReadError, match="^cannot read leaf 'w': gs://.*/d/[0-9a-f]+: no such object$"):
        r.read((slice(0, 1), slice(0, 1)))
      proxy.clear()
      with pytest.raises(
          LeafReadError, match="^cannot read leaf 'w': .*no such object"
      ):  # its slices are spent: never a half-filled chunk
        r.read((slice(0, 1), slice(0, 1)))
      assert r.read((slice(63, 64), slice(63, 64))).tobytes() == saved["w"][63:, 63:].tobytes()  # other chunks read


def test_verify_over_ranged_reads_passes_a_copy_and_names_a_flipped_bit(saved, ranged):
  rep = verify_migration(saved["a"], saved["a2"], saved["spec"])
  assert rep.passed, rep.text()
  assert [(r.migrated_path, r.sha256) for r in rep.leaves] == [("w", hashlib.sha256(saved["w"].tobytes()).hexdigest())]
  bad = verify_migration(saved["a"], saved["b"], saved["spec"])
  assert not bad.passed
  assert {r.migrated_path: r.status for r in bad.failures} == {"w": "VALUE_MISMATCH"}


def test_only_big_chunks_of_a_bucket_ocdbt_database_are_read_by_ranges(saved, monkeypatch):
  ckpt = open_checkpoint(saved["a"])
  meta = ckpt.leaves["w"]  # chunks of 768 bytes
  assert not isinstance(ckpt.reader(meta), RangedLeafReader)  # below one slice: tensorstore's own reader
  assert not meta.ranged
  monkeypatch.setattr(ocdbt_ranges, "RANGED_ABOVE_BYTES", 767)
  assert isinstance(ckpt.reader(meta), RangedLeafReader)
  assert open_checkpoint(saved["a"]).leaves["w"].ranged  # what the stream's plan reads (one row ahead suffices)
  assert not ocdbt_ranges.ranged_reads(meta, remote=False, use_ocdbt=True)
  assert not ocdbt_ranges.ranged_reads(meta, remote=True, use_ocdbt=False)
