"""Big leaves of a bucket's OCDBT database read by many range requests (parity_jax.checkpoint.formats.ocdbt_ranges).

Expected values: the legacy fixtures' ``expected.json`` (sha256 written by the old orbax release's generator),
numpy arrays written here with orbax and compared bit for bit, and chunk keys written out by hand from the zarr
specifications. The bucket is the GCS emulator on 127.0.0.1 (tests/helpers/objectstores.py); the slice size is
made tiny so that the fixtures' small chunks are each fetched as several ranges.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest

from parity_jax import stores
from parity_jax.checkpoint import migrate, open_checkpoint, verify_migration
from parity_jax.checkpoint.formats import LeafReadError, ocdbt_ranges
from parity_jax.checkpoint.formats.ocdbt_ranges import (
    SPARE_BUFFERS,
    RangedLeafReader,
    RawLayout,
    ValueRef,
    chunk_boxes,
    crc32c,
    raw_layout,
)
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
  assert ValueRef.parse({"key": b"a", "indirect_value": "value:run:3/:d/ab12:5:7"}) == ValueRef(  # ':' in a name
      file="run:3/d/ab12", offset=5, length=7
  )
  with pytest.raises(ValueError):
    ValueRef.parse({"key": b"a", "indirect_value": "btreenode::d/ab12:0:7"})
  with pytest.raises(dataclasses.FrozenInstanceError):  # shared by every reader of the cached index: none may move one
    ValueRef(file="d/ab12", length=7).length = 8


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
      "dir": root,
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


def test_a_cache_of_exactly_one_chunk_keeps_that_chunk(saved, ranged):
  ckpt = open_checkpoint(saved["a"])
  meta = ckpt.leaves["w"]
  ckpt.ocdbt_index().under(b"w/")
  one_chunk = math.prod(meta.chunk_shape) * 4  # chunk c/0/0 is a whole chunk of float32
  io0 = stores.io_stats()
  with ckpt.reader(meta, one_chunk) as r:
    assert r.read((slice(0, 1), slice(0, 1))).tobytes() == saved["w"][:1, :1].tobytes()
    assert r.read((slice(1, 2), slice(1, 2))).tobytes() == saved["w"][1:2, 1:2].tobytes()  # the same chunk, kept
  stored = ckpt.ocdbt_index().under(b"w/c/0/0")[b"w/c/0/0"].nbytes
  assert stores.io_stats(since=io0)["gs"]["bytes_read"] == stored


def test_a_reader_holds_no_stored_chunk_once_it_is_decoded(saved, raw_saved, ranged):
  for url in (saved["a"], raw_saved["url"]):  # decoded by tensorstore from the memory kvstore / viewed
    ckpt = open_checkpoint(url)
    with ckpt.reader(ckpt.leaves["w"], 1 << 20) as r:
      assert r.held_keys() == ["w/zarr.json"]  # the metadata it opened the array with
      assert r.read().tobytes() == saved["w"].tobytes()
      assert r.held_keys() == ["w/zarr.json"], url  # every chunk decoded and held decoded, none stored
    assert r.held_keys() == []


def test_spare_buffers_are_kept_while_a_reader_is_open_and_freed_with_the_last(saved, raw_saved, ranged):
  a, raw = open_checkpoint(saved["a"]), open_checkpoint(raw_saved["url"])
  with raw.reader(raw.leaves["w"], 0) as other:  # open (its metadata read), reads nothing
    assert other.open() is other  # opened once: a second open is the same reader
    with a.reader(a.leaves["w"], 0) as r:  # no cache: each chunk is dropped once read, its buffers kept as spares
      assert r.read((slice(0, 1), slice(0, 1))).tobytes() == saved["w"][:1, :1].tobytes()
      assert SPARE_BUFFERS.held() == 2  # the joined stored bytes, the decoded values
    assert SPARE_BUFFERS.held() == 2  # another reader is open: kept for its chunks
    assert other.read((slice(0, 1), slice(0, 1))).tobytes() == saved["w"][:1, :1].tobytes()  # a raw chunk, viewed
    assert SPARE_BUFFERS.held() == 3  # its stored bytes, the values' own buffer, kept once it is dropped
  assert SPARE_BUFFERS.held() == 0  # the last reader closed: nothing kept


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


# ---- raw chunks: stored bytes that are the values' bytes are viewed, not decoded


def test_crc32c_is_the_castagnoli_checksum():
  # the check values of CRC-32C (RFC 3720, B.4; the "123456789" check value of the CRC catalogue)
  assert crc32c(b"123456789") == 0xE3069283
  assert crc32c(bytes(32)) == 0x8A9136AA
  assert crc32c(b"") == 0


def _bytes(endian="little"):
  return {"name": "bytes", "configuration": {"endian": endian}}


def _sharded(grid, inner, index=None, where=None):
  conf = {"chunk_shape": grid, "codecs": inner, "index_codecs": index or [_bytes(), {"name": "crc32c"}]}
  if where:
    conf["index_location"] = where
  return {**_z3(grid), "codecs": [{"name": "sharding_indexed", "configuration": conf}]}


def test_raw_layouts_are_only_codecs_that_lay_out_the_values_bytes():
  f4 = np.dtype("<f4")
  assert raw_layout({**_z3([4, 8]), "codecs": [_bytes()]}, f4) == RawLayout((4, 8), f4)
  assert raw_layout(_sharded([4, 8], [_bytes()]), f4) == RawLayout((4, 8), f4, "end")
  assert raw_layout(_sharded([4, 8], [_bytes()], where="start"), f4) == RawLayout((4, 8), f4, "start")
  zarr2 = {"zarr_format": 2, "chunks": [4, 8], "dtype": "<f4", "compressor": None, "filters": None, "order": "C"}
  assert raw_layout(zarr2, f4) == RawLayout((4, 8), f4)
  refused = [
      ({**_z3([4, 8]), "codecs": [_bytes(), {"name": "zstd"}]}, f4),  # compressed
      ({**_z3([4, 8]), "codecs": [_bytes("big")]}, f4),  # swapped bytes
      ({**_z3([4, 8]), "codecs": [{"name": "transpose", "configuration": {"order": [1, 0]}}, _bytes()]}, f4),
      (_sharded([4, 8], [_bytes()], where="middle"), f4),
      (_sharded([4, 8], [_bytes(), {"name": "zstd"}]), f4),  # a compressed inner chunk
      (_sharded([4, 8], [_bytes()], index=[_bytes()]), f4),  # an index without its checksum
      ({**_sharded([4, 8], [_bytes()]), "chunk_grid": {"configuration": {"chunk_shape": [8, 8]}}}, f4),  # 2 inner
      ({**zarr2, "compressor": {"id": "zstd"}}, f4),
      ({**zarr2, "order": "F"}, f4),
      ({**zarr2, "dtype": ">f4"}, f4),
      ({**_z3([4, 8]), "codecs": [_bytes()]}, np.dtype(bool)),  # a byte that is neither 0 nor 1: tensorstore decides
  ]
  for metadata, dtype in refused:
    assert raw_layout(metadata, dtype) is None, metadata


def _shard(values: np.ndarray, where: str = "end", crc_delta: int = 0, offset=None, nbytes=None) -> bytes:
  """A zarr3 shard of one inner chunk, written out by hand from the sharding codec's specification."""
  data = values.astype("<" + values.dtype.str[1:]).tobytes()
  off = (0 if where == "end" else 20) if offset is None else offset
  index = off.to_bytes(8, "little") + (len(data) if nbytes is None else nbytes).to_bytes(8, "little")
  index += ((crc32c(index) + crc_delta) % 2**32).to_bytes(4, "little")
  return data + index if where == "end" else index + data


def test_a_well_formed_raw_shard_is_viewed_and_anything_else_is_left_to_tensorstore():
  v = np.arange(32, dtype=np.float32).reshape(4, 8) - 7.5
  v.view(np.uint32)[1, 2] = 0x7FC01234  # a NaN payload and -0.0 survive: the values are the stored bytes
  v[3, 3] = -0.0
  for where in ("end", "start"):
    layout = RawLayout((4, 8), np.dtype(np.float32), where)
    got = layout.values(bytearray(_shard(v, where)))
    assert got.dtype == np.float32 and got.shape == (4, 8) and got.tobytes() == v.tobytes(), where
  layout = RawLayout((4, 8), np.dtype(np.float32), "end")
  missing = 2**64 - 1  # the sharding codec's "empty inner chunk": the fill value, tensorstore's business
  for bad in (
      _shard(v, crc_delta=1),  # the index checksum does not match
      _shard(v, offset=missing, nbytes=missing),
      _shard(v, nbytes=127),  # not the chunk's size
      _shard(v, offset=4),  # past the data
      _shard(v)[:-21] + _shard(v)[-20:],  # a byte short
      b"short",
  ):
    assert layout.values(bad) is None
  plain = RawLayout((4, 8), np.dtype(np.float32))
  assert plain.values(v.tobytes()).tobytes() == v.tobytes()
  assert plain.values(v.tobytes() + b"x") is None


@pytest.fixture(scope="module")
def raw_saved(gs, saved):
  """The saved leaf migrated by our migrator (raw, uncompressed sharded chunks of 16 rows), uploaded."""
  root = saved["dir"]
  migrate(root / "a", root / "raw", saved["spec"], chunk_mb=16 * 64 * 4 / 2**20)
  return {"url": gs.upload_tree(root / "raw", "saved/raw"), "dir": root / "raw"}


def test_raw_chunks_of_a_migrated_leaf_read_by_ranges_equal_the_leaf(raw_saved, saved, ranged, monkeypatch):
  viewed = []
  values = RawLayout.values
  monkeypatch.setattr(RawLayout, "values", lambda self, stored: viewed.append(values(self, stored)) or viewed[-1])
  ckpt = open_checkpoint(raw_saved["url"])
  meta = ckpt.leaves["w"]
  assert meta.chunk_shape == (16, 64) and meta.n_chunks == 4
  zarr_json = json.loads(ckpt.ocdbt_index().under(b"w/zarr.json")[b"w/zarr.json"].inline)
  assert raw_layout(zarr_json, np.dtype(np.float32)) == RawLayout((16, 64), np.dtype(np.float32), "end")  # viewed
  with ckpt.reader(meta, 1 << 20) as r:
    assert r.read().tobytes() == saved["w"].tobytes()
    for box in [(slice(20, 50), slice(3, 60)), (slice(63, 64), slice(0, 64)), (slice(0, 1), slice(0, 1))]:
      assert r.read(box).tobytes() == np.ascontiguousarray(saved["w"][box]).tobytes(), box
  assert len(viewed) == 4 and all(v is not None for v in viewed)  # each chunk viewed once, none decoded
  rep = verify_migration(saved["a"], raw_saved["url"], saved["spec"])
  assert rep.passed, rep.text()


def test_a_raw_chunk_whose_index_checksum_is_wrong_is_unreadable_not_viewed(gs, raw_saved, saved, ranged):
  ckpt = open_checkpoint(raw_saved["url"])
  ref = ckpt.ocdbt_index().under(b"w/c/1/0")[b"w/c/1/0"]
  gs.upload_tree(raw_saved["dir"], "saved/raw_bad")
  key = open_checkpoint(f"{gs.url}/saved/raw_bad").store.child(ref.file).url[len(gs.url) + 1 :]
  data = bytearray(gs.get(key))
  data[ref.offset + ref.length - 1] ^= 0x01  # the last byte of the shard's index checksum
  gs.put(key, bytes(data))
  bad = open_checkpoint(f"{gs.url}/saved/raw_bad")
  with bad.reader(bad.leaves["w"], 1 << 20) as r:
    assert r.read((slice(0, 16), slice(0, 64))).tobytes() == saved["w"][:16].tobytes()  # chunk 0 is intact
    with pytest.raises(LeafReadError, match="^cannot read leaf 'w'"):
      r.read((slice(16, 17), slice(0, 64)))
