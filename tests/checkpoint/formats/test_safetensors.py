"""The safetensors side: detection, every dtype, byte-range box reads, damaged and lying files, verify/migrate with HF.

Expected values are the arrays the test wrote (hand-written files, see
``tests.helpers.safetensors_files``), or the sha256 of every tensor that the
tunix fixtures' ``expected.json`` recorded from files written by transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors

from parity_jax.checkpoint import LeafReadError, RemapSpec, migrate, open_checkpoint, restore_leaves, verify_migration
from parity_jax.checkpoint.formats import safetensors as st
from parity_jax.errors import UsageError
from parity_jax.stores.local import LocalStore
from tests.helpers import safetensors_files as W

TUNIX = os.path.join(os.path.dirname(__file__), "..", "..", "data", "conversions", "tunix")
RENAME = RemapSpec.from_rules(
    [
        {"match": r"model\.layers\.(\d+)\.(.*)", "to": r"layers/\1/\2"},
        {"match": r"(?!model\.layers\.)(?:model\.)?(.*)", "to": r"\1"},
    ]
)
IDENTITY = RemapSpec.from_rules([{"match": "(.*)", "to": r"\1"}])


def _every_dtype() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(7)
  f = rng.standard_normal((3, 5, 4)).astype(np.float32)
  f[0, 0, :4] = [np.nan, -0.0, np.inf, -np.inf]
  out = {
      "f64": f.astype(np.float64),
      "f32": f,
      "f16": f.astype(np.float16),
      "bf16": f.astype(ml_dtypes.bfloat16),
      "f8_e4m3": np.clip(f, -400, 400).astype(ml_dtypes.float8_e4m3fn),
      "f8_e5m2": f.astype(ml_dtypes.float8_e5m2),
      "bool": rng.integers(0, 2, (3, 5, 4)).astype(np.bool_),
      "scalar": np.array(3.5, np.float32),
      "empty": np.zeros((0, 4), np.float32),
  }
  for t in (np.int64, np.int32, np.int16, np.int8, np.uint64, np.uint32, np.uint16, np.uint8):
    info = np.iinfo(t)
    out[np.dtype(t).name] = rng.integers(info.min, info.max, (3, 5, 4), dtype=t, endpoint=True)
  return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A single-file directory of every dtype, and a sharded one split across three files."""
  root = tmp_path_factory.mktemp("st")
  tensors = _every_dtype()
  single = root / "single"
  single.mkdir()
  W.write_file(single / "model.safetensors", tensors)
  names = list(tensors)
  shards = {f"model-0000{i + 1}-of-00003.safetensors": {n: tensors[n] for n in names[i::3]} for i in range(3)}
  sharded = W.write_sharded(root / "sharded", shards)
  return {"root": root, "tensors": tensors, "single": str(single), "sharded": sharded}


def _bits(a: np.ndarray) -> tuple:
  return a.dtype, a.shape, a.tobytes()


def test_helper_writes_what_the_safetensors_library_reads(tmp_path, dirs):
  from safetensors.numpy import load_file

  names = ("f64", "f32", "f16", "int8", "uint64", "bool", "scalar", "empty")  # numpy's own dtypes
  W.write_file(tmp_path / "np.safetensors", {n: dirs["tensors"][n] for n in names})
  loaded = load_file(tmp_path / "np.safetensors")
  for name in names:
    assert _bits(loaded[name]) == _bits(dirs["tensors"][name]), name


class _ByteRanges(LocalStore):
  """A local file read the way a bucket object is: byte-range requests (no local path to pread)."""

  @property
  def local_path(self):
    return None


@pytest.mark.parametrize("which", ["single", "sharded"])
@pytest.mark.parametrize("via", ["pread", "byte ranges"])
def test_every_dtype_reads_bit_exact(dirs, which, via):
  ck = open_checkpoint(dirs[which], "source")
  if via == "byte ranges":
    ck.where = {n: (_ByteRanges(s.url), b) for n, (s, b) in ck.where.items()}
  assert (ck.format, ck.layout) == ("safetensors", which)
  assert set(ck.leaves) == set(dirs["tensors"]) and not ck.unreadable()
  for name, a in dirs["tensors"].items():
    m = ck.leaves[name]
    assert (m.dtype, m.shape, m.box_reads) == (a.dtype, a.shape, True), name
    assert _bits(ck.read_whole(m)) == _bits(a), name


@pytest.mark.parametrize("piece", [None, 40])
def test_boxes_read_only_their_own_bytes(dirs, piece, monkeypatch):
  """Every box equals numpy's slice; a box is read by ranges that stay inside the tensor and cost about its bytes.

  ``piece=40``: requests of at most 40 bytes, so every span is cut into many pieces.
  """
  if piece:
    monkeypatch.setattr(st, "READ_PIECE_BYTES", piece)
  rng = np.random.default_rng(3)
  big = rng.standard_normal((6, 7, 9, 5)).astype(ml_dtypes.bfloat16)
  d = dirs["root"] / f"boxes{piece}"
  d.mkdir()
  W.write_file(d / "model.safetensors", {"pad": np.zeros(17, np.uint8), "big": big})
  ck = open_checkpoint(d)
  m = ck.leaves["big"]
  _, begin = ck.where["big"]
  ranges = []
  pread = st._pread

  def recording(fd, offset, dest):
    ranges.append((offset, offset + dest.size))
    return pread(fd, offset, dest)

  monkeypatch.setattr(st, "_pread", recording)
  boxes = [
      (slice(2, 3), slice(0, 7), slice(0, 9), slice(0, 5)),  # one contiguous range
      (slice(1, 5), slice(2, 6), slice(3, 8), slice(1, 4)),  # a general box
      (slice(0, 6), slice(0, 7), slice(4, 5), slice(0, 5)),  # a strided column of rows
      (slice(5, 6), slice(6, 7), slice(8, 9), slice(4, 5)),  # the last element
      (slice(1, 5), slice(3, 3), slice(0, 9), slice(0, 5)),  # an empty box: nothing read
      (),  # the whole leaf
  ]
  with ck.reader(m) as r:
    for box in boxes:
      ranges.clear()
      want = big[box] if box else big
      out = np.empty(want.shape, want.dtype)
      r.wait(r.read_into_async(box, out))
      assert _bits(out) == _bits(want), box
      got = r.read(box)
      assert _bits(got) == _bits(want), box
      assert all(begin <= a < b <= begin + big.nbytes for a, b in ranges), (box, ranges)
      # read twice (read_into_async, read): each read costs at most 4x the box's own bytes (runs at least a
      # quarter dense are read as one span; sparser runs one by one)
      assert sum(b - a for a, b in ranges) <= 2 * 4 * want.nbytes, (box, ranges)
      if box == boxes[2]:  # runs of 10 bytes, 90 apart: too sparse for one span, so exactly the box's bytes
        assert sorted(ranges) == sorted(
            2 * [(begin + i * 630 + j * 90 + 40, begin + i * 630 + j * 90 + 50) for i in range(6) for j in range(7)]
        )
      assert all(b - a <= st.READ_PIECE_BYTES for a, b in ranges)
  assert len(ranges) == (2 if piece is None else 2 * -(-big.nbytes // piece))  # the whole leaf: one range per read


def test_a_strided_box_is_refused_not_read_as_a_dense_one(dirs):
  ck = open_checkpoint(dirs["single"])
  with ck.reader(ck.leaves["f32"]) as r:
    for box in ((slice(0, 3, 2),), (slice(None), slice(None), slice(None, None, -1))):
      with pytest.raises(ValueError, match="strided boxes are not supported"):
        r.read(box)
    assert _bits(r.read((slice(0, 3, 1),))) == _bits(dirs["tensors"]["f32"])  # step 1 is a plain box
    too_many = (slice(None),) * (len(ck.leaves["f32"].shape) + 1)  # never cut down to the leaf's axes
    with pytest.raises(ValueError, match=f"box of {len(too_many)} axes for shape"):
      r.read(too_many)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors in /proc")
def test_a_reader_closes_its_file_on_leaving_and_there_are_no_string_leaves(dirs):
  ck = open_checkpoint(dirs["single"])
  m = ck.leaves["f32"]
  before = sorted(os.listdir("/proc/self/fd"))
  with ck.reader(m) as r:
    assert _bits(r.read(())) == _bits(dirs["tensors"]["f32"])
    assert len(os.listdir("/proc/self/fd")) == len(before) + 1  # its one descriptor, read with pread
  assert sorted(os.listdir("/proc/self/fd")) == before
  with pytest.raises(LeafReadError, match="safetensors checkpoints hold no string leaves"):
    ck.read_string(m)


def test_a_directory_that_cannot_be_listed_is_one_line_naming_the_role(tmp_path):
  with pytest.raises(UsageError, match=f"^source: {tmp_path / 'nope'}: No such file or directory$"):
    st.open_safetensors(tmp_path / "nope", role="source")
  with pytest.raises(UsageError, match="^source: s3://ab: not a valid S3 bucket name$"):
    st.open_safetensors("s3://ab", role="source")


def test_damaged_and_lying_files(dirs):
  """Whole-file damage is one line; a lying or truncated tensor is UNREADABLE by name, the others still read."""
  root = dirs["root"] / "bad"
  good = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2, 2), np.float16)}

  def case(name, **kw):
    d = root / name
    d.mkdir(parents=True)
    W.write_file(d / "model.safetensors", good, **kw)
    return str(d)

  def lie_shape(h):
    h["a"]["shape"] = [4, 4]

  def lie_dtype(h):
    h["b"]["dtype"] = "F99"

  def overlap(h):
    h["b"]["data_offsets"] = [40, 48]

  ck = open_checkpoint(case("shape", edit=lie_shape))
  assert "header lies" in ck.leaves["a"].error and ck.leaves["b"].error is None
  ck = open_checkpoint(case("dtype", edit=lie_dtype))
  assert "'F99' is not one of" in ck.leaves["b"].error and ck.leaves["a"].error is None
  ck = open_checkpoint(case("overlap", edit=overlap))
  assert "overlap" in ck.leaves["a"].error and "overlap" in ck.leaves["b"].error

  def b_listed_first(h):  # the header need not list tensors in the order of their bytes
    items = list(h.items())
    h.clear()
    h.update(reversed(items))

  ck = open_checkpoint(case("reordered", edit=b_listed_first))
  assert ck.leaves["a"].error is None and ck.leaves["b"].error is None
  assert _bits(ck.read_whole(ck.leaves["b"])) == _bits(good["b"])
  ck = open_checkpoint(case("truncated", truncate=3))
  assert "past the end of the file" in ck.leaves["b"].error and ck.leaves["a"].error is None
  assert _bits(ck.read_whole(ck.leaves["a"])) == _bits(good["a"])
  ck = open_checkpoint(case("cut_after_opening"))  # the file loses its last bytes after its header was read
  f = os.path.join(ck.path, "model.safetensors")
  os.truncate(f, os.path.getsize(f) - 3)
  with pytest.raises(LeafReadError, match="^cannot read leaf 'b': ") as e:  # the reader's own error, not wrapped again
    ck.read_whole(ck.leaves["b"])
  assert e.value.leaf == "b" and "\n" not in str(e.value) and "cannot read leaf" not in str(e.value)[17:]
  assert _bits(ck.read_whole(ck.leaves["a"])) == _bits(good["a"])

  d = root / "header_garbage"
  d.mkdir()
  (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
  with pytest.raises(UsageError, match="header is not valid JSON"):
    open_checkpoint(d)
  d = root / "header_too_long"
  d.mkdir()
  (d / "model.safetensors").write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{}")
  with pytest.raises(UsageError, match="runs past the end of the file"):
    open_checkpoint(d)

  # one byte over the safetensors library's header limit: it refuses the file, and so do we (a sparse file: the
  # header is never read)
  d = root / "header_over_the_limit"
  d.mkdir()
  with open(d / "model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", 100_000_001))
    f.truncate(8 + 100_000_001 + 8)
  with pytest.raises(Exception, match="header too large"):
    safetensors.safe_open(str(d / "model.safetensors"), "np")
  with pytest.raises(UsageError, match="the header length 100000001 exceeds safetensors' limit of 100000000 bytes"):
    open_checkpoint(d)

  d = root / "unknown_layout"
  d.mkdir()
  W.write_file(d / "adapter.safetensors", good)
  with pytest.raises(UsageError, match="neither model.safetensors nor model.safetensors.index.json; supported"):
    open_checkpoint(d)
  d = root / "empty"
  d.mkdir()
  with pytest.raises(UsageError, match="HF safetensors dirs"):
    open_checkpoint(d)
  # what a migration into a bucket leaves when cut short before its last object (the index, or model.safetensors)
  d = root / "unfinished"
  d.mkdir()
  (d / "config.json").write_text("{}")
  with pytest.raises(UsageError, match=r"source is unfinished: only config.json but neither model.safetensors.index"):
    open_checkpoint(d, "source")
  W.write_file(d / "model-00002-of-00003.safetensors", good)
  W.write_file(d / "model-00003-of-00003.safetensors", good)
  with pytest.raises(
      UsageError, match=r"is unfinished: 2 shards \(model-00002-of-00003.safetensors, ...\) but neither"
  ):
    open_checkpoint(d)


def test_lying_index(dirs):
  root = dirs["root"] / "index"
  t = {"x": np.arange(4, dtype=np.int32), "y": np.arange(6, dtype=np.int64), "z": np.zeros(3, np.uint8)}
  d = W.write_sharded(root / "moved", {"s1.safetensors": {"x": t["x"], "y": t["y"]}, "s2.safetensors": {"z": t["z"]}})
  index = json.loads((root / "moved" / st.INDEX).read_text())
  index["weight_map"]["y"] = "s2.safetensors"  # y is in s1
  index["weight_map"]["w"] = "s2.safetensors"  # w is nowhere
  (root / "moved" / st.INDEX).write_text(json.dumps(index))
  ck = open_checkpoint(d)
  assert "puts it in s2.safetensors, but it is stored in s1.safetensors" in ck.leaves["y"].error
  assert "does not hold it" in ck.leaves["w"].error
  assert ck.leaves["x"].error is None and ck.leaves["z"].error is None
  W.write_file(root / "moved" / "s2.safetensors", {"z": t["z"], "x": t["x"]})  # x now in both files
  ck = open_checkpoint(d)
  assert "stored in 2 files (s1.safetensors, s2.safetensors)" in ck.leaves["x"].error
  assert ck.leaves["z"].error is None
  index["weight_map"] = {"x": "../s1.safetensors"}
  (root / "moved" / st.INDEX).write_text(json.dumps(index))
  with pytest.raises(UsageError, match="not a file in this directory"):
    open_checkpoint(d)
  index["weight_map"] = {"x": "s3.safetensors"}
  (root / "moved" / st.INDEX).write_text(json.dumps(index))
  with pytest.raises(UsageError, match="lists shard 's3.safetensors'"):
    open_checkpoint(d)


@pytest.mark.parametrize("fixture", sorted(f for f in os.listdir(TUNIX) if os.path.isdir(os.path.join(TUNIX, f))))
def test_transformers_written_files_match_recorded_hashes(fixture):
  """The tunix fixtures' HF files (transformers save_pretrained): every tensor's bytes hash as recorded there."""
  with open(os.path.join(TUNIX, fixture, "expected.json")) as f:
    expected = json.load(f)["hf_tensors"]
  ck = open_checkpoint(os.path.join(TUNIX, fixture, "hf"))
  assert sorted(ck.leaves) == sorted(expected)
  for name, e in expected.items():
    a = ck.read_whole(ck.leaves[name])
    assert (list(a.shape), W.NAMES[a.dtype]) == (e["shape"], e["dtype"]), name
    assert hashlib.sha256(a.tobytes()).hexdigest() == e["sha256"], name


def test_verify_and_migrate_with_hf_sides(tmp_path):
  """HF -> HF renamed (PASS; one bf16 value 1 ULP off FAILs by name; a truncated leaf is UNREADABLE), HF -> orbax."""
  hf = os.path.join(TUNIX, "qwen3_dense_bf16_tied_sharded", "hf")
  src = open_checkpoint(hf)
  tensors = {n: src.read_whole(m) for n, m in src.leaves.items()}
  renamed = {RENAME.map_path(n).replace("/", "."): a for n, a in tensors.items()}
  spec = RemapSpec.from_rules(
      [
          {"match": r"model\.layers\.(\d+)\.(.*)", "to": r"layers.\1.\2"},
          {"match": r"(?!model\.layers\.)(?:model\.)?(.*)", "to": r"\1"},
      ]
  )
  names = sorted(renamed)
  mig = W.write_sharded(
      tmp_path / "mig",
      {"a.safetensors": {n: renamed[n] for n in names[:10]}, "b.safetensors": {n: renamed[n] for n in names[10:]}},
  )
  rep = verify_migration(hf, mig, spec)
  assert rep.passed, rep.text()

  off = dict(renamed)
  victim = "layers.1.mlp.down_proj.weight"
  bad = off[victim].copy()
  bad.view(np.uint16)[3, 5] += 1  # one ULP
  off[victim] = bad
  d = tmp_path / "off"
  d.mkdir()
  W.write_file(d / "model.safetensors", off, truncate=2)  # the last tensor loses its last bytes
  rep = verify_migration(hf, d, spec)
  status = {r.migrated_path: r.status for r in rep.leaves}
  assert status[victim] == "VALUE_MISMATCH"
  assert status[list(off)[-1]] == "UNREADABLE"
  assert sum(s != "PASS" for s in status.values()) == 2 and not rep.passed

  out = tmp_path / "orbax"
  migrate(hf, out, RENAME)
  rep = verify_migration(hf, out, RENAME)
  assert rep.passed, rep.text()
  ock = open_checkpoint(out)
  got = restore_leaves(ock, sorted(ock.leaves))
  for n, a in tensors.items():
    assert _bits(np.asarray(got[RENAME.map_path(n)])) == _bits(a), n
  with pytest.raises(UsageError, match="cannot read leaf"):
    shutil.copytree(d, tmp_path / "src_bad")
    verify_migration(tmp_path / "src_bad", d, IDENTITY)


def test_each_malformed_header_entry_is_its_leafs_error_and_each_whole_file_fault_one_line(tmp_path):
  """A header entry that is no object, a shape that is no list of sizes, offsets that are no [begin, end]: that
  leaf is UNREADABLE by its reason, the other reads. A file under 8 bytes, a header that is no JSON object, an
  index that cannot be read or has no weight_map: the checkpoint is refused in one line."""
  good = {"a": np.arange(6, dtype=np.float32), "b": np.ones(2, np.int8)}
  edits = {
      "entry": (lambda h: h.update(b=[1, 2]), "its header entry is not an object"),
      "shape": (lambda h: h["b"].update(shape=[2, -1]), "its header shape [2, -1] is not a list of sizes"),
      "offsets": (
          lambda h: h["b"].update(data_offsets=[30, 24]),
          "its header data_offsets [30, 24] are not [begin, end]",
      ),
  }
  for name, (edit, reason) in edits.items():
    (tmp_path / name).mkdir()
    W.write_file(tmp_path / name / "model.safetensors", good, edit=edit)
    ck = open_checkpoint(tmp_path / name)
    assert ck.leaves["b"].error == f"model.safetensors: {reason}", name
    assert _bits(ck.read_whole(ck.leaves["a"])) == _bits(good["a"])
  whole = {
      "short": (b"\x01\x00", "is not a safetensors file: 2 bytes, shorter than the 8-byte header length"),
      "array": (struct.pack("<Q", 8) + b"[]      ", "the header is not a JSON object"),
  }
  for name, (data, words) in whole.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "model.safetensors").write_bytes(data)
    with pytest.raises(UsageError, match=re.escape(words)):
      open_checkpoint(tmp_path / name)
  for name, text, words in (
      ("index_garbage", "{nope", f"cannot read {st.INDEX}: "),
      ("index_without_map", '{"metadata": {}}', f"{st.INDEX} has no 'weight_map' of tensor name -> shard file"),
  ):
    d = tmp_path / name
    d.mkdir()
    W.write_file(d / "model-00001-of-00001.safetensors", good)
    (d / st.INDEX).write_text(text)
    with pytest.raises(UsageError, match=f"^checkpoint {re.escape(str(d))}: {re.escape(words)}"):
      open_checkpoint(d)
