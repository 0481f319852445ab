"""The verifier's streaming machinery: slab alignment, the memory-model planner, and fault detection through
every read plan and hashing mode (pipelined, background, inline, spill, read-ahead) on leaves of many pieces.

Expected hashes are ``hashlib.sha256(array.tobytes())`` of numpy arrays built here, and expected statistics are
``arraydiff.diff_stats`` on whole arrays, never values produced by the code under test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools

import numpy as np
import pytest

from parity_jax import arraydiff
from parity_jax.checkpoint import RemapSpec, geometry, migrate, stream, verify_migration
from parity_jax.checkpoint import LeafMeta
from parity_jax.checkpoint.stream import plan
from parity_jax.errors import UsageError

MIB = 2**20


# ---- geometry ----------------------------------------------------------------------------------


def test_boundaries_include_multiples_of_matches_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(300):
    r = tuple(int(x) for x in rng.integers(1, 7, size=rng.integers(1, 4)))
    n = int(np.prod(r))
    plan = geometry.SlabPlan.for_target(r, int(rng.integers(1, n + 1)))
    bounds = {geometry.flat_offset(lo, r) for lo, _ in plan} | {n}
    for e in range(1, n + 1):
      want = all(m in bounds for m in range(e, n, e))
      assert plan.boundaries_include_multiples_of(e) == want, (r, plan, e)


# ---- the planner (pure: hand-built metadata, no data) --------------------------------------------


def _meta(shape, chunk, raw, dtype=np.float32, path="w"):
  return LeafMeta(
      path, (path,), "array", tuple(shape), np.dtype(dtype), tuple(chunk), path, "np.ndarray", raw_chunks=raw
  )


def _plan(src, mig, piece_mb=8, **kw):
  r = geometry.refinement(src.shape, mig.shape)
  return stream.plan_pair(src, mig, r, int(piece_mb * MIB), memmap=kw.pop("memmap", True), **kw)


BIG = (1, 65536, 4096)  # 1 GiB of float32, as in bench/checkpoint_migration.py


def test_plan_chunked_source_raw_migrated_meets_the_chunked_memory_target():
  src = _meta(BIG, (1, 4096, 4096), raw=False)  # 64 MiB zstd chunk rows
  mig = _meta(BIG[1:], (4096, 4096), raw=True)
  p = _plan(src, mig)
  assert not p.spill and p.slabs.slab_elems * 4 == 8 * MIB
  assert (p.src.mode, p.src.row_elems * 4, p.src.rows_cached, p.src.reopen) == ("rows", 64 * MIB, 1, True)
  assert p.mig.mode == "raw" and p.hash_mode == "pipelined"
  assert p.estimate_bytes <= 2 * 64 * MIB + 64 * MIB - 16 * MIB  # the target, with room for overhead
  # read-ahead costs about one more row plus its transient
  ra = _plan(src, mig, readahead=1)
  assert ra.src.readahead == 1 and 64 * MIB <= ra.estimate_bytes - p.estimate_bytes <= 2 * 64 * MIB + 8 * MIB
  ra2 = _plan(src, mig, readahead=2)  # each further row: its compressed bytes, the decoded row, a warm-up piece
  assert ra2.estimate_bytes - ra.estimate_bytes == 2 * 64 * MIB + 8 * MIB


def test_plan_single_chunk_pairs():
  src = _meta(BIG, BIG, raw=False)
  leaf = 2**30
  # raw migrated: stream, the migrated leaf is hashed while the source decodes
  p = _plan(src, _meta(BIG[1:], BIG[1:], raw=True))
  assert (p.src.mode, p.src.rows_cached, p.spill, p.hash_mode) == ("rows", 1, False, "migrated")
  assert p.estimate_bytes <= 2.2 * leaf
  # both compressed single chunks: holding both costs ~4 leaves, spilling ~2
  p = _plan(src, _meta(BIG[1:], BIG[1:], raw=False))
  assert p.spill and p.estimate_bytes <= 2.2 * leaf
  # without memory-mapped reads a raw chunk is a unit that must be read whole, like a compressed one
  p = _plan(src, _meta(BIG[1:], BIG[1:], raw=True), memmap=False)
  assert p.mig.mode == "rows" and p.spill


def test_plan_in_a_bucket_streams_and_reads_rows_ahead():
  """A 1 GiB leaf as a training job stores it (8 zstd chunks of 128 MiB) against the migrator's 64 MiB raw rows.

  From a bucket nothing is memory-mapped and each stored chunk is one request: on local disk the pair would
  spill (one side at a time, the leaf on local disk); in a bucket it streams, and ``readahead=None`` keeps
  rows in flight on both sides, as many as fit in half of REMOTE_READAHEAD_BYTES each (2 rows' worth a row).
  """
  src = _meta((8, 32768, 1024), (1, 32768, 1024), raw=False)
  mig = _meta((8, 32768, 1024), (1, 16384, 1024), raw=True)
  local = _plan(src, mig, memmap=False, readahead=None)
  assert local.spill and (local.src.readahead, local.mig.readahead) == (0, 0)
  auto = _plan(src, mig, memmap=False, readahead=None, remote=True)
  assert not auto.spill and (auto.src.mode, auto.mig.mode) == ("rows", "rows")
  # a chunk row is 128 MiB on both sides (the migrated chunks pair up along the first split axis):
  # 512 MiB // (2 x 128 MiB) = 2
  assert (auto.src.readahead, auto.mig.readahead) == (2, 2)
  assert auto.estimate_bytes <= plan.REMOTE_SPILL_ABOVE_BYTES
  # an explicit readahead is kept as it is; 0 streams without reading ahead
  none = _plan(src, mig, memmap=False, readahead=0, remote=True)
  assert not none.spill and (none.src.readahead, none.mig.readahead) == (0, 0)
  # rows of 16 MiB: 16 fit, 4 is the cap; 256 MiB: one; 512 MiB: none
  other = _meta((64, 4096, 1024), (64, 4096, 1024), raw=True)
  for rows, ahead in ((1, 4), (8, 2), (16, 1), (32, 0)):
    rows_of = _meta((64, 4096, 1024), (rows, 4096, 1024), raw=False)
    assert _plan(rows_of, other, memmap=False, readahead=None, remote=True).src.readahead == ahead, rows
  # sides read by range requests per stored chunk have their requests in flight within a row: one row ahead
  ranged = _plan(
      dataclasses.replace(src, ranged=True),
      dataclasses.replace(mig, ranged=True),
      memmap=False,
      readahead=None,
      remote=True,
  )
  assert (ranged.src.readahead, ranged.mig.readahead) == (1, 1) and ranged.estimate_bytes < auto.estimate_bytes
  # a pair that would hold more than REMOTE_SPILL_ABOVE_BYTES streaming still spills in a bucket
  whole = _meta((8, 32768, 1024), (8, 32768, 1024), raw=False)
  assert _plan(whole, _meta((8, 32768, 1024), (8, 32768, 1024), raw=False), memmap=False, remote=True).spill


def test_plan_spills_only_above_2_gib_in_a_bucket_and_256_mib_on_local_disk():
  """Two single-chunk zstd leaves of k x 128 MiB: streaming holds both decoded leaves and a compressed one (about
  4 k x 128 MiB = k/2 GiB); in a bucket that streams up to 2 GiB (k = 3: 1.5 GiB) and spills above (k = 5)."""
  for k, spills in ((3, False), (5, True)):
    shape = (k, 32768, 1024)
    p = _plan(_meta(shape, shape, raw=False), _meta(shape, shape, raw=False), memmap=False, readahead=0, remote=True)
    assert p.spill == spills, k
    held = k * 2**29  # streaming: 4 leaf-sized buffers; spilling: one side at a time (2), plus the 8 MiB pieces
    assert held < (2 if spills else 1) * p.estimate_bytes < held + 2**28, k
  # on local disk the threshold is 256 MiB: leaves of k x 32 MiB stream at k = 1 (about 128 MiB), spill at k = 3
  for k, spills in ((1, False), (3, True)):
    shape = (k, 8192, 1024)
    p = _plan(_meta(shape, shape, raw=False), _meta(shape, shape, raw=False), memmap=False, readahead=0)
    assert p.spill == spills, k


def test_plan_small_rows_are_read_whole_per_piece():
  src = _meta((1, 4096, 256), (1, 64, 256), raw=False)  # 64 KiB rows
  p = _plan(src, _meta((4096, 256), (4096, 256), raw=True))
  assert p.src.mode == "direct" and p.slabs.slab_elems % p.src.row_elems == 0


def test_plan_rows_that_pieces_cannot_tile_cache_two_rows():
  # (1, 12, 7) in 14-element chunk rows, reshaped to (4, 21): refinement (4, 3, 7). Pieces of at most 14
  # elements are lines of the middle axis (7 or 14 within each block of 21), so the row boundary at 28
  # falls inside a piece: a piece may need two rows.
  src = _meta((1, 12, 7), (1, 2, 7), raw=False)
  p = _plan(src, _meta((4, 21), (4, 21), raw=True), piece_mb=14 * 4 / MIB)
  assert p.src.mode == "rows" and p.src.rows_cached == 2 and not p.src.reopen
  assert not p.slabs.boundaries_include_multiples_of(14)
  piece = plan.pieces_of(src, _meta((4, 21), (4, 21), raw=True), (4, 3, 7), p.slabs)[0]
  for frozen in (p, p.src, p.slabs, piece):  # a plan is shared by the reading threads
    with pytest.raises(dataclasses.FrozenInstanceError):
      frozen.mode = "raw"


# ---- fault detection through every plan, on leaves of many pieces -----------------------------

SHAPE = (1, 96, 64)  # 24 KiB float32; pieces of 4 KiB -> 6 pieces
PIECE_MB = 4 / 1024

# name: (source save options, migrated options, verify options)
MODES = {
    "pipelined, cached source rows": (dict(chunk_kb=8, row_major=True), dict(chunk_kb=8), {}),
    "pipelined, whole rows per piece": (dict(chunk_kb=2, row_major=True), dict(chunk_kb=8), {}),
    "pipelined, both raw": (dict(chunk_kb=4, compressed=False), dict(chunk_kb=8), {}),
    "pipelined, both compressed": (dict(chunk_kb=8, row_major=True), dict(chunk_kb=8, compression="zstd"), {}),
    "read-ahead": (dict(chunk_kb=8, row_major=True), dict(chunk_kb=8), {"readahead": 1}),
    "read-ahead 2 rows": (dict(chunk_kb=6, row_major=True), dict(chunk_kb=8), {"readahead": 2}),
    "background hash of migrated": (dict(chunk_kb=None), dict(chunk_kb=4), {}),
    "background hash of source": (dict(chunk_kb=4, compressed=False), dict(chunk_kb=None, compression="zstd"), {}),
    "spill": (dict(chunk_kb=None), dict(chunk_kb=None, compression="zstd"), {"spill": True}),
}
EXPECTED_MODE = {
    "pipelined, cached source rows": "source chunk rows of 8.0 KiB cached",
    "pipelined, whole rows per piece": "source whole chunk rows of 2.0 KiB per piece",
    "pipelined, both raw": "source raw",
    "pipelined, both compressed": "migrated chunk rows of 8.0 KiB cached",
    "read-ahead": "source chunk rows of 8.0 KiB cached (1 at a time, 1 row(s) read ahead)",
    "read-ahead 2 rows": "source chunk rows of 6.0 KiB cached (1 at a time, 2 row(s) read ahead)",
    "background hash of migrated": "sha256 of the migrated leaf read by a background thread",
    "background hash of source": "sha256 of the source leaf read by a background thread",
    "spill": "spill: ",
}


FAULTS = {
    "first bit of the first element": lambda w: _flip(w, (0, 0), 1),
    "mantissa bit in a middle piece": lambda w: _flip(w, (50, 17), 1 << 9),
    "last element": lambda w: _flip(w, (95, 63), 1 << 22),
    "-0.0 for +0.0 in the last piece": lambda w: w.__setitem__((90, 3), -0.0),
    "NaN payload in the second piece": lambda w: w.__setitem__(
        (20, 5), np.array(0x7FC00002, np.uint32).view(np.float32)
    ),
}


def _flip(w, idx, mask):
  w.view(np.uint32)[idx] ^= np.uint32(mask)


def _source_tree():
  rng = np.random.default_rng(11)
  w = rng.standard_normal(SHAPE).astype(np.float32)
  w[0, 90, 3] = 0.0  # only a bitwise comparison sees it become -0.0
  w[0, 20, 5] = np.array(0x7FC00001, np.uint32).view(np.float32)  # a NaN with payload 1
  return {"w": w, "s": np.array(5, np.int64)}


SPEC = RemapSpec.from_rules([{"match": "^w$", "to": "w", "squeeze": [0]}, {"match": "^s$", "to": "s"}])


def _save_source(path, tree, chunk_kb=None, row_major=False, compressed=True):
  from orbax.checkpoint import v1 as ocp_v1

  from parity_jax.checkpoint.formats.tstore import quiet_orbax
  from parity_jax.checkpoint.formats.orbax_writer import row_major_chunks

  ctx = ocp_v1.Context()
  if chunk_kb:
    ctx.array.saving.storage_options.chunk_byte_size = int(chunk_kb * 1024)
  ctx.array.saving.use_compression = compressed
  with ctx, quiet_orbax(), row_major_chunks() if row_major else contextlib.nullcontext():
    ocp_v1.save(str(path), tree)
  return path


def _migrated(tmp, name, tree, chunk_kb=None, compression="none"):
  """A migrated checkpoint holding exactly ``tree`` (already in migrated shapes), written like the migrator does."""
  src = _save_source(tmp / f"{name}_src", {"w": tree["w"][None], "s": tree["s"]}, compressed=False)
  dest = tmp / name
  migrate(src, dest, SPEC, chunk_mb=(chunk_kb / 1024) if chunk_kb else 1024, compression=compression)
  return dest


@pytest.fixture(scope="module", params=list(MODES))
def mode_pair(request, tmp_path_factory):
  name = request.param
  src_kw, mig_kw, ver_kw = MODES[name]
  tmp = tmp_path_factory.mktemp("mode")
  tree = _source_tree()
  src = _save_source(tmp / "src", tree, **src_kw)
  good = {"w": tree["w"][0], "s": tree["s"]}
  return name, tmp, tree, src, good, mig_kw, dict(ver_kw)


def _verify(src, mig, ver_kw, tmp, monkeypatch):
  ver_kw = dict(ver_kw)
  if ver_kw.pop("spill", False):
    monkeypatch.setattr(stream.plan, "SPILL_ABOVE_BYTES", 0)
  return verify_migration(src, mig, SPEC, slab_mb=PIECE_MB, spill_dir=tmp, **ver_kw)


def test_mode_passes_with_exact_hashes(mode_pair, monkeypatch):
  name, tmp, tree, src, good, mig_kw, ver_kw = mode_pair
  mig = _migrated(tmp, "good", good, **mig_kw)
  rep = _verify(src, mig, ver_kw, tmp, monkeypatch)
  assert rep.passed, rep.text()
  w = rep.leaf("w")
  assert EXPECTED_MODE[name] in w.read_mode, w.read_mode
  assert w.read_mode.startswith("spill: " if name == "spill" else "stream: ")
  assert w.sha256 == w.source_sha256 == hashlib.sha256(good["w"].tobytes()).hexdigest()
  assert rep.leaf("s").sha256 == hashlib.sha256(good["s"].tobytes()).hexdigest()
  assert not list(tmp.glob("parity_jax_verify_spill_*"))


@pytest.mark.parametrize("fault", list(FAULTS))
def test_mode_detects_fault_with_exact_hashes_and_stats(mode_pair, fault, monkeypatch):
  name, tmp, tree, src, good, mig_kw, ver_kw = mode_pair
  bad = {"w": good["w"].copy(), "s": good["s"]}
  FAULTS[fault](bad["w"])
  assert not arraydiff.bit_equal(bad["w"], good["w"])
  mig = _migrated(tmp, f"bad_{abs(hash(fault))}", bad, **mig_kw)
  rep = _verify(src, mig, ver_kw, tmp, monkeypatch)
  assert not rep.passed and [r.migrated_path for r in rep.failures] == ["w"]
  w = rep.leaf("w")
  assert w.status == "VALUE_MISMATCH", w.reason
  assert EXPECTED_MODE[name] in w.read_mode, w.read_mode
  assert w.source_sha256 == hashlib.sha256(good["w"].tobytes()).hexdigest()
  assert w.sha256 == hashlib.sha256(bad["w"].tobytes()).hexdigest()
  want = arraydiff.diff_stats(good["w"], bad["w"], top_k=10).to_dict()
  got = w.diff.to_dict()
  for k in ("cosine", "rel_l2", "rms_diff"):  # float64 sums over pieces: the order may change the last bits
    assert got.pop(k) == pytest.approx(want.pop(k), rel=1e-12, abs=1e-15), k
  assert got == want
  assert rep.leaf("s").passed
  assert not list(tmp.glob("parity_jax_verify_spill_*"))


def test_pair_streamer_without_a_second_pass_returns_at_the_first_difference(tmp_path):
  """``run(second_pass=False)`` (a job's range of a leaf): a differing pair is "not equal", no hashes, no statistics,
  and stops reading at the piece that differs; with the second pass, both hashes and the statistics."""
  from parity_jax.checkpoint import open_checkpoint

  tree = _source_tree()
  good = tree["w"][0]
  bad = good.copy()
  _flip(bad, (20, 0), 1)  # in the second of six 4 KiB pieces
  src = open_checkpoint(_save_source(tmp_path / "src", tree, chunk_kb=None, compressed=False))
  mig = open_checkpoint(_migrated(tmp_path, "mig", {"w": bad, "s": tree["s"]}))
  s_meta, m_meta = src.leaves["w"], mig.leaves["w"]
  r = geometry.refinement(s_meta.shape, m_meta.shape)
  pl = stream.plan_pair(s_meta, m_meta, r, int(PIECE_MB * MIB))
  assert pl.slabs.n_slabs == 6 and not pl.spill

  def streamer(read):
    return stream.PairStreamer(
        src,
        mig,
        s_meta,
        m_meta,
        r,
        pl,
        stream.Buffers(int(PIECE_MB * MIB)),
        spill_dir=str(tmp_path),
        on_bytes=read.append,
    )

  read = []
  out = streamer(read).run(second_pass=False)
  assert (out.equal, out.source_sha256, out.sha256, out.diff, out.diff_error) == (
      False,
      "",
      "",
      None,
      "second pass not run",
  )
  assert sum(read) == 2 * 4096  # both sides through the second piece, nothing after it
  read = []
  out = streamer(read).run(top_k=3)
  assert not out.equal and out.diff_error is None and sum(read) == 2 * good.nbytes
  assert (out.source_sha256, out.sha256) == (
      hashlib.sha256(good.tobytes()).hexdigest(),
      hashlib.sha256(bad.tobytes()).hexdigest(),
  )
  want, got = arraydiff.diff_stats(good, bad, top_k=3).to_dict(), out.diff.to_dict()
  for k in ("cosine", "rel_l2", "rms_diff"):  # float64 sums over pieces: the order may change the last bits
    assert got.pop(k) == pytest.approx(want.pop(k), rel=1e-12, abs=1e-15), k
  assert got == want


# ---- the hash pipeline on its own ------------------------------------------------------------


def test_bytes_equal_is_raw_byte_equality_for_every_size():
  """Pieces of 1..40 bytes (whole 8-byte words or not), against ``tobytes()``: one flipped bit anywhere, -0.0 for
  0.0 and NaN payloads differ; a different size or dtype is never equal; shapes may differ."""
  rng = np.random.default_rng(3)
  for n in range(0, 41):
    a = rng.integers(0, 256, n, dtype=np.uint8)
    assert stream.bytes_equal(a, a.copy()) and stream.bytes_equal(a.reshape(1, n), a.copy())
    for i in range(n):
      b = a.copy()
      b[i] ^= 1 << (i % 8)
      assert not stream.bytes_equal(a, b), (n, i)
  z = np.zeros(3, np.float32)
  nan = np.full(3, np.nan, np.float32)
  assert not stream.bytes_equal(z, -z) and stream.bytes_equal(nan, nan.copy())
  assert not stream.bytes_equal(nan, (nan.view(np.uint32) ^ np.uint32(1)).view(np.float32))
  assert not stream.bytes_equal(z, np.zeros(4, np.float32)) and not stream.bytes_equal(z, z.view(np.int32))


def test_hash_pipeline_hashes_pieces_in_submission_order():
  rng = np.random.default_rng(5)
  bufs = stream.Buffers(4096)
  hp = stream.HashPipeline(bufs, "t")
  want = hashlib.sha256()
  for n in itertools.islice(itertools.cycle([4096, 1, 4000, 17, 0]), 60):
    i = hp.acquire()  # blocks while all PIPELINE_DEPTH buffers wait to be hashed
    data = rng.integers(0, 256, n, dtype=np.uint8)
    bufs.pool(i)[:n] = data
    if n == 17:  # a piece given back unhashed (its comparison failed) is not part of the hash
      hp.release(i)
      continue
    want.update(data.tobytes())
    hp.submit(i, n)
  assert hp.finish() == want.hexdigest()


def test_spill_file_failure_is_a_one_line_usage_error(tmp_path, monkeypatch):
  tree = _source_tree()
  src = _save_source(tmp_path / "src", tree)
  mig = _migrated(tmp_path, "mig", {"w": tree["w"][0], "s": tree["s"]}, compression="zstd")
  monkeypatch.setattr(stream.plan, "SPILL_ABOVE_BYTES", 0)

  class Full:

    def __init__(self, f):
      self.f = f

    def write(self, data):
      raise OSError(28, "No space left on device")

    def __getattr__(self, name):
      return getattr(self.f, name)

  real = stream.pair.tempfile.TemporaryFile
  monkeypatch.setattr(stream.pair.tempfile, "TemporaryFile", lambda **kw: Full(real(**kw)))
  with pytest.raises(UsageError, match=r"cannot write the spill file in .*No space left on device") as e:
    verify_migration(src, mig, SPEC, slab_mb=PIECE_MB, spill_dir=tmp_path)
  assert "\n" not in str(e.value)


def test_in_a_bucket_rows_are_read_ahead_and_pairs_streamed(gcs_bucket, tmp_path, monkeypatch):
  """``readahead`` unset: rows read ahead and no spill when a side is in a bucket; neither on local disk."""
  tree = _source_tree()
  src = _save_source(tmp_path / "src", tree, chunk_kb=8, row_major=True)  # compressed rows of 8 KiB
  mig = _migrated(tmp_path, "mig", {"w": tree["w"][0], "s": tree["s"]}, chunk_kb=8, compression="zstd")
  monkeypatch.setattr(stream.plan, "SPILL_ABOVE_BYTES", 0)  # on local disk this pair would now spill
  src_url, mig_url = gcs_bucket.upload_tree(src, "src"), gcs_bucket.upload_tree(mig, "mig")
  modes = {}
  for where, (s, m) in {"local": (src, mig), "bucket": (src_url, mig_url)}.items():
    rep = verify_migration(s, m, SPEC, slab_mb=PIECE_MB, spill_dir=tmp_path)
    assert rep.passed, rep.text()
    modes[where] = next(leaf.read_mode for leaf in rep.leaves if leaf.source_path == "w")
  assert modes["local"].startswith("spill: ")
  assert modes["bucket"].startswith("stream: "), modes
  for side in ("source", "migrated"):
    assert f"{side} chunk rows of 8.0 KiB cached (1 at a time, 4 row(s) read ahead)" in modes["bucket"], modes


def test_a_leaf_without_elements_has_no_pieces():
  for src_shape, mig_shape in (((0, 3), (0, 3)), ((2, 0, 4), (2, 0, 4)), ((1, 0), (0,))):
    r = geometry.refinement(src_shape, mig_shape)
    src, mig = _meta(src_shape, src_shape, raw=True), _meta(mig_shape, mig_shape, raw=True)
    assert stream.pieces_of(src, mig, r, geometry.SlabPlan.for_target(r, 4)) == [], (src_shape, mig_shape)
  r = (2, 3)  # and one with elements: its slabs, in C order
  src = _meta(r, r, raw=True)
  assert [(p.flat_lo, p.flat_hi) for p in stream.pieces_of(src, src, r, geometry.SlabPlan.for_target(r, 3))] == [
      (0, 3),
      (3, 6),
  ]
