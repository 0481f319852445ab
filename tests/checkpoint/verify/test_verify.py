"""Migrate-then-verify, layouts, streaming paths and fault injection (library level).

Expected migrated trees are written out by hand in ``_ckpt_helpers`` and
saved with orbax directly, so every fault below is a checkpoint that the
verifier has never seen produced by our own migrator.
"""

from __future__ import annotations

import collections

import contextlib
import json
import re

import numpy as np
import pytest

from tests.helpers import ckpt as H
from parity_jax import arraydiff
from parity_jax.checkpoint import RemapSpec, migrate, open_checkpoint, restore_leaves, verify_migration
from parity_jax.checkpoint import stream
from parity_jax.checkpoint.example import leaf_sha256
from parity_jax.checkpoint.keypath import flatten, nest
from tests.helpers.files import hash_file_tree
from parity_jax.errors import UsageError

TINY_CHUNK_MB = 256 / 2**20  # 256-byte chunks: every multi-row leaf spans several chunks
SPEC = RemapSpec.from_dict(H.GENERATED_SPEC, name="generated")


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
  """Generated source in v0, v1 and CheckpointManager layouts, plus our migration of it."""
  root = tmp_path_factory.mktemp("gen")
  src = H.generated_source()
  d = {
      "tree": src,
      "expected": H.expected_migrated(src),
      "v0": H.save_v0(root / "src_v0", src),
      "v1": H.save_v1(root / "src_v1", src),
      "step": H.save_manager_step(root / "mngr", 12, src),
      "root": root,
  }
  d["migrated"] = str(root / "migrated")
  migrate(d["v0"], d["migrated"], SPEC, chunk_mb=TINY_CHUNK_MB, batch_mb=1e-3)
  return d


def _read_all(path):
  ck = open_checkpoint(path)
  return ck, restore_leaves(ck, list(ck.leaves))


def _assert_tree_bit_equal(got: dict, want: dict):
  want = flatten(want)
  assert sorted(got) == sorted(want)
  for p, w in want.items():
    if isinstance(w, str):
      assert got[p] == w, p
    else:
      assert arraydiff.bit_equal(got[p], np.asarray(w)), p


def _assert_same_stats(got: arraydiff.DiffStats, want: arraydiff.DiffStats):
  """Streamed statistics equal whole-array ones; the float64 cosine may differ in the last bits (sum order)."""
  g, w = got.to_dict(), want.to_dict()
  assert g.pop("cosine") == pytest.approx(w.pop("cosine"), rel=1e-12, abs=1e-15)
  assert g == w


# ---- PASS paths ------------------------------------------------------------------------------


def test_shipped_example_passes_and_hashes_match_the_manifest(capfd):
  rep = verify_migration(H.EXAMPLE / "source", H.EXAMPLE / "migrated", H.EXAMPLE / "spec.json")
  assert rep.passed, rep.text()
  assert capfd.readouterr().err == ""  # no progress lines unless asked for
  assert list(rep.groups) == [
      "ci_fn",
      "ci_fn_opt_state",
      "components",
      "components_opt_state",
      "sources",
      "sources_opt_state",
      "step",
  ]
  manifest = json.loads((H.EXAMPLE / "MANIFEST.json").read_text())["source_leaves"]
  assert len(rep.leaves) == len(manifest) == 94
  for r in rep.leaves:
    assert r.sha256 == r.source_sha256 == manifest[r.source_path]["sha256"], r.source_path
  # the shipped migrated copy is also what a hand-written migration of the source says
  src_ck, src_vals = _read_all(H.EXAMPLE / "source")
  _, mig_vals = _read_all(H.EXAMPLE / "migrated")
  src_tree = nest(src_vals)
  _assert_tree_bit_equal(mig_vals, H.example_expected_migrated(src_tree))


def test_migrator_output_equals_the_hand_written_migration(gen):
  ck, vals = _read_all(gen["migrated"])
  assert ck.layout == "v1"
  _assert_tree_bit_equal(vals, gen["expected"])
  # chunked as asked: the 960-byte kernel is stored in row-major 256-byte chunks
  assert ck.leaves["params/block_0/kernel"].chunk_shape == (1, 40)
  # and it restores as one tree through orbax's own v1 API
  from orbax.checkpoint import v1 as ocp_v1

  tree = ocp_v1.load(gen["migrated"])
  assert arraydiff.bit_equal(tree["params"]["embedding"], gen["expected"]["params"]["embedding"])


@pytest.mark.parametrize("layout", ["v0", "v1", "step"])
def test_migrate_then_verify_passes_for_every_source_layout(gen, layout, tmp_path):
  dest = tmp_path / "m"
  res = migrate(gen[layout], dest, SPEC, chunk_mb=TINY_CHUNK_MB)
  assert res.n_leaves == 14 and res.row_major_chunks
  rep = verify_migration(gen[layout], dest, SPEC, slab_mb=1e-4)
  assert rep.passed, rep.text()
  assert rep.source_layout == layout and rep.migrated_layout == "v1"
  want = flatten(gen["expected"])
  for r in rep.leaves:
    assert r.sha256 == r.source_sha256 == leaf_sha256(want[r.migrated_path]), r.migrated_path
  assert rep.ignored_empty_nodes == {"source": [], "migrated": []}


def test_hand_written_v0_migrated_checkpoint_passes(gen, tmp_path):
  mig = H.save_v0(tmp_path / "mig_v0", gen["expected"])
  rep = verify_migration(gen["v1"], mig, SPEC)
  assert rep.passed, rep.text()
  assert (rep.source_layout, rep.migrated_layout) == ("v1", "v0")


def test_leaf_reader_matches_orbax_restore_for_every_leaf(gen):
  for path in (gen["v0"], gen["v1"], gen["migrated"]):
    ck = open_checkpoint(path)
    restored = restore_leaves(ck, list(ck.leaves))
    for p, meta in ck.leaves.items():
      if meta.streamable:
        with ck.reader(meta) as r:
          assert arraydiff.bit_equal(r.read(), restored[p]), (path, p)


def _big_pair(
    tmp_path,
    src_chunk_mb,
    mig_chunk_mb,
    shape=(1, 96, 64),
    src_row_major=False,
    src_compressed=True,
    mig_compression="none",
):
  rng = np.random.default_rng(1)
  tree = {"w": rng.standard_normal(shape).astype(np.float32), "s": np.array(1, np.int32)}
  spec = RemapSpec.from_rules([{"match": "^w$", "to": "w", "squeeze": [0]}, {"match": "^s$", "to": "s"}])
  from orbax.checkpoint import v1 as ocp_v1

  ctx = ocp_v1.Context()
  if src_chunk_mb:
    ctx.array.saving.storage_options.chunk_byte_size = int(src_chunk_mb * 2**20)
  ctx.array.saving.use_compression = src_compressed
  from parity_jax.checkpoint.formats.orbax_writer import row_major_chunks

  with ctx, row_major_chunks() if src_row_major else contextlib.nullcontext():
    H.save_v1(tmp_path / "src", tree)
  migrate(tmp_path / "src", tmp_path / "mig", spec, chunk_mb=mig_chunk_mb or 1024, compression=mig_compression)
  return tree, spec


# Every read plan the verifier can choose, on a 24 KiB leaf read in 4 KiB pieces (6 pieces). The source is
# orbax's default (one zstd chunk) unless said otherwise; our migrator writes raw (uncompressed) chunks.
STREAM_MODES = {
    "cached source rows": (
        dict(src_chunk_mb=None, mig_chunk_mb=4 / 1024),
        {},
        r"stream: 6 slab\(s\) of <= 4.0 KiB; source chunk rows of 24.0 KiB cached \(1 at a time\); migrated raw"
        r".*; sha256 of the migrated leaf read by a background thread",
    ),
    "whole chunk rows per piece": (
        dict(src_chunk_mb=2 / 1024, src_row_major=True, mig_chunk_mb=8 / 1024),
        {},
        r"stream: 6 slab\(s\) of <= 4.0 KiB; source whole chunk rows of 2.0 KiB per piece; migrated raw"
        r".*; sha256 of compared source pieces in a pipelined thread",
    ),
    "rows reopened per row": (
        dict(src_chunk_mb=8 / 1024, src_row_major=True, mig_chunk_mb=8 / 1024),
        {},
        r"stream: 6 slab\(s\) of <= 4.0 KiB; source chunk rows of 8.0 KiB cached \(1 at a time\); migrated raw",
    ),
    "rows read ahead": (
        dict(src_chunk_mb=8 / 1024, src_row_major=True, mig_chunk_mb=8 / 1024),
        {"readahead": 1},
        r"stream: .*source chunk rows of 8.0 KiB cached \(1 at a time, 1 row\(s\) read ahead\); migrated raw",
    ),
    "orbax's own chunk shapes": (dict(src_chunk_mb=8 / 1024, mig_chunk_mb=8 / 1024), {}, ""),  # any plan, same answer
    "both raw": (
        dict(src_chunk_mb=4 / 1024, src_compressed=False, mig_chunk_mb=8 / 1024),
        {},
        r"stream: 6 slab.*; source raw.*; migrated raw.*; sha256 of compared source pieces in a pipelined thread",
    ),
    "compressed migrated, raw source": (
        dict(src_chunk_mb=None, src_compressed=False, mig_chunk_mb=4 / 1024, mig_compression="zstd"),
        {},
        r"stream: .*; source raw.*; migrated whole chunk rows of 4.0 KiB per piece",
    ),
    "single compressed migrated chunk, raw source": (
        dict(src_chunk_mb=4 / 1024, src_compressed=False, mig_chunk_mb=None, mig_compression="zstd"),
        {},
        r"stream: .*; source raw.*; migrated chunk rows of 24.0 KiB cached.*; sha256 of the source leaf read by a",
    ),
    "both compressed, chunked": (
        dict(src_chunk_mb=8 / 1024, src_row_major=True, mig_chunk_mb=8 / 1024, mig_compression="zstd"),
        {},
        r"stream: .*; source chunk rows of 8.0 KiB cached.*; migrated chunk rows of 8.0 KiB cached",
    ),
    "spill": (  # both single compressed chunks: the two leaves are never in memory together
        dict(src_chunk_mb=None, mig_chunk_mb=None, mig_compression="zstd"),
        {},
        r"spill: ",
    ),
}


@pytest.mark.parametrize("mode", list(STREAM_MODES))
def test_streaming_modes_agree_with_whole_array_reference(tmp_path, mode, monkeypatch):
  if mode == "spill":
    monkeypatch.setattr(stream.plan, "SPILL_ABOVE_BYTES", 0)  # spill as soon as it saves memory, even for tiny leaves
  pair_kw, verify_kw, want = STREAM_MODES[mode]
  tree, spec = _big_pair(tmp_path, **pair_kw)
  rep = verify_migration(tmp_path / "src", tmp_path / "mig", spec, slab_mb=2 / 1024, spill_dir=tmp_path, **verify_kw)
  assert rep.passed, rep.text()
  w = rep.leaf("w")
  assert re.match(want, w.read_mode), w.read_mode
  assert w.sha256 == w.source_sha256 == leaf_sha256(tree["w"][0])
  assert not list(tmp_path.glob("parity_jax_verify_spill_*"))  # the spill file is gone


def test_value_diff_stats_streamed_equal_whole_array_stats(tmp_path):
  """A difference found slab by slab reports the same statistics as diff_stats on whole arrays."""
  tree, spec = _big_pair(tmp_path, 8 / 1024, 8 / 1024)
  bad = tree["w"][0].copy()
  bad[5, 7] += 1.0
  bad[90, 0] = np.float32(np.nan)
  bad.view(np.uint32)[40, 3] ^= 1
  H.save_v0(tmp_path / "bad", {"w": bad, "s": tree["s"]})
  rep = verify_migration(tmp_path / "src", tmp_path / "bad", spec, slab_mb=2 / 1024)
  r = rep.leaf("w")
  assert r.status == "VALUE_MISMATCH" and rep.n_failed == 1
  _assert_same_stats(r.diff, arraydiff.diff_stats(tree["w"][0], bad, top_k=10))
  assert r.sha256 == leaf_sha256(bad) and r.source_sha256 == leaf_sha256(tree["w"][0])


def test_verifier_never_writes_into_either_checkpoint(gen, tmp_path):
  bad = H.deepcopy(gen["expected"])
  bad["params"]["embedding"][0, 0, 5] += 1
  mig = H.save_v1(tmp_path / "bad", bad)
  before = (hash_file_tree(gen["v0"]), hash_file_tree(mig))
  assert not verify_migration(gen["v0"], mig, SPEC, slab_mb=1e-4, spill_dir=tmp_path).passed
  assert verify_migration(gen["v0"], gen["migrated"], SPEC).passed
  assert (hash_file_tree(gen["v0"]), hash_file_tree(mig)) == before


def test_report_json_and_html(gen, tmp_path):
  rep = verify_migration(gen["v0"], gen["migrated"], SPEC)
  d = json.loads(rep.to_json())
  assert d["verdict"] == "PASS" and d["n_leaves"] == 14 and d["n_failed"] == 0
  assert "io" not in d  # local disk: no bucket requests to report
  entry = next(e for e in d["leaves"] if e["migrated_path"] == "params/embedding")
  assert entry["source_path"] == "params/emb" and entry["shape"] == [5, 10, 8] and entry["dtype"] == "float32"
  assert entry["bytes"] == 1600 and entry["status"] == "PASS" and entry["transform"] == "reshape[5, 10, 8]"
  assert entry["sha256"] == leaf_sha256(gen["expected"]["params"]["embedding"]) and entry["diff"] is None
  assert "VERDICT: PASS" in rep._repr_html_()
  assert repr(rep).startswith("VerifyReport('VERDICT: PASS") and repr(rep).endswith(", 14 leaves)"), repr(rep)
  rep.write_json(tmp_path / "r.json")
  assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "PASS"


# ---- fault injection ---------------------------------------------------------------------------


def _flip_bit(t):
  t["params"]["block_0"]["kernel"].view(np.uint32)[2, 3] ^= 1 << 4


def _nan_payload(t):
  t["params"]["embedding"][0, 0, 1] = H.nan32(H.NAN_B)


def _negative_zero(t):
  t["params"]["block_1"]["kernel"][0, 0] = -0.0


def _swap(t):
  b0, b1 = t["params"]["block_0"], t["params"]["block_1"]
  b0["kernel"], b1["kernel"] = b1["kernel"], b0["kernel"]


def _wrong_squeeze(t):
  t["params"]["odd"] = H.generated_source()["params"]["odd"][:, :, 0]  # (1, 5): squeezed axis 2, not 0


def _missing(t):
  del t["params"]["ids"]


def _extra(t):
  t["params"]["extra"] = np.zeros(3, np.float32)


def _dtype(t):
  t["params"]["block_1"]["bias"] = t["params"]["block_1"]["bias"].astype(np.float32)


def _shape(t):
  t["params"]["embedding"] = t["params"]["embedding"][:4]


def _step(t):
  t["step"] = np.array(8, np.int64)


FAULTS = {
    "flipped bit": (_flip_bit, {"params/block_0/kernel": "VALUE_MISMATCH"}),
    "NaN payload": (_nan_payload, {"params/embedding": "VALUE_MISMATCH"}),
    "-0.0 for +0.0": (_negative_zero, {"params/block_1/kernel": "VALUE_MISMATCH"}),
    "swapped same-shape leaves": (
        _swap,
        {"params/block_0/kernel": "VALUE_MISMATCH", "params/block_1/kernel": "VALUE_MISMATCH"},
    ),
    "squeeze on the wrong axis": (_wrong_squeeze, {"params/odd": "SHAPE_MISMATCH"}),
    "missing leaf": (_missing, {"params/ids": "MISSING"}),
    "extra leaf": (_extra, {"params/extra": "EXTRA"}),
    "dtype change": (_dtype, {"params/block_1/bias": "DTYPE_MISMATCH"}),
    "shape change": (_shape, {"params/embedding": "SHAPE_MISMATCH"}),
    "changed step": (_step, {"step": "VALUE_MISMATCH"}),
}


def _expected_verdict(want: dict[str, str], n: int) -> str:
  """The verdict line for failures with these statuses: "leaves differ" only when every one differs in content."""
  kind = {"MISSING": "missing", "EXTRA": "extra", "UNREADABLE": "unreadable"}
  counts = collections.Counter(kind.get(s, "differ") for s in want.values())
  if set(counts) == {"differ"}:
    return f"VERDICT: FAIL — {len(want)} of {n} leaves differ"
  parts = ", ".join(f"{counts[k]} {k}" for k in ("differ", "unreadable", "missing", "extra") if counts[k])
  return f"VERDICT: FAIL — {len(want)} of {n} leaves fail: {parts}"


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_fails_and_names_the_offending_leaf(gen, tmp_path, fault):
  inject, want = FAULTS[fault]
  tree = H.deepcopy(gen["expected"])
  inject(tree)
  # alternate the migrated layout so both are exercised under faults
  save = H.save_v0 if len(fault) % 2 else H.save_v1
  mig = save(tmp_path / "bad", tree)
  rep = verify_migration(gen["v0"], mig, SPEC, slab_mb=1e-4)
  assert not rep.passed
  got = {(r.migrated_path or r.source_path): r.status for r in rep.failures}
  assert got == want, rep.text()
  assert rep.verdict_line() == _expected_verdict(want, len(rep.leaves))
  text = rep.text()
  for path in want:
    assert path in text
  for r in rep.failures:
    if r.status == "VALUE_MISMATCH":
      expected_value = flatten(gen["expected"])[r.migrated_path]
      bad_value = flatten(tree)[r.migrated_path]
      _assert_same_stats(r.diff, arraydiff.diff_stats(np.asarray(expected_value), np.asarray(bad_value)))
      assert r.diff.n_diff >= 1 and r.sha256 == leaf_sha256(bad_value)


def test_nan_payload_and_signed_zero_details(gen, tmp_path):
  tree = H.deepcopy(gen["expected"])
  _nan_payload(tree)
  tree["params"]["embedding"][0, 0, 0] = -0.0
  rep = verify_migration(gen["v0"], H.save_v1(tmp_path / "bad", tree), SPEC)
  d = rep.leaf("params/embedding").diff
  assert d.n_diff == 2 and d.max_abs_diff == 0.0 and d.n_nan_mismatch == 0
  bits = {tuple(x.index): (x.a_bits, x.b_bits) for x in d.top_k}
  assert bits[(0, 0, 1)] == ("0x7fc00001", "0x7fc00002")
  assert bits[(0, 0, 0)] == ("0x00000000", "0x80000000")


def test_gate_up_mix_up_in_the_example_is_caught(tmp_path):
  src_ck, vals = _read_all(H.EXAMPLE / "source")
  src_tree = nest(vals)
  mig = H.example_expected_migrated(src_tree)
  comp = mig["components"]
  comp["layers.1.mlp.gate_proj"], comp["layers.1.mlp.up_proj"] = (
      comp["layers.1.mlp.up_proj"],
      comp["layers.1.mlp.gate_proj"],
  )
  rep = verify_migration(H.EXAMPLE / "source", H.save_v1(tmp_path / "bad", mig), H.EXAMPLE / "spec.json")
  got = sorted(r.migrated_path for r in rep.failures)
  assert got == [f"components/layers.1.mlp.{k}/{vu}" for k in ("gate_proj", "up_proj") for vu in ("U", "V")]
  assert all(r.status == "VALUE_MISMATCH" for r in rep.failures)
  assert rep.groups["components"].n_pass == 8 and rep.groups["components_opt_state"].passed


@pytest.mark.parametrize("damage", ["zeroed bytes", "truncated"])
def test_corrupted_data_file_is_a_clean_per_leaf_failure(tmp_path, damage):
  tree, spec = _big_pair(tmp_path, None, 4 / 1024)
  files = sorted((p for p in (tmp_path / "mig").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  victim = files[-1]  # the data file holding w's chunks
  data = bytearray(victim.read_bytes())
  mid = len(data) // 2
  victim.write_bytes(
      bytes(data[:mid] + bytes(64) + data[mid + 64 :]) if damage == "zeroed bytes" else bytes(data[:mid])
  )
  rep = verify_migration(tmp_path / "src", tmp_path / "mig", spec)
  assert [r.migrated_path for r in rep.failures] == ["w"]
  r = rep.failures[0]
  assert r.status in ("UNREADABLE", "VALUE_MISMATCH") and "\n" not in r.reason, r.reason
  assert rep.leaf("s").passed


def test_damaged_index_makes_every_leaf_unreadable_not_a_crash(gen, tmp_path):
  import shutil

  mig = tmp_path / "mig"
  shutil.copytree(gen["migrated"], mig)
  for f in (mig / "state" / "d").iterdir():  # small values live inline in these B-tree files
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    f.write_bytes(bytes(data[:mid] + bytes(64) + data[mid + 64 :]))
  rep = verify_migration(gen["v0"], mig, SPEC)
  assert len(rep.leaves) == 14 and rep.n_failed == 13
  assert rep.leaf("name").passed  # strings live in _strings.json, untouched
  assert {r.status for r in rep.failures} == {"UNREADABLE"}
  assert all("\n" not in r.reason for r in rep.failures)


def test_setup_errors_are_usage_errors(gen, tmp_path):
  with pytest.raises(UsageError, match="source checkpoint does not exist"):
    verify_migration(tmp_path / "nope", gen["migrated"], SPEC)
  (tmp_path / "empty").mkdir()
  with pytest.raises(UsageError, match="is not an Orbax checkpoint"):
    verify_migration(gen["v0"], tmp_path / "empty", SPEC)
  with pytest.raises(UsageError, match="looks like a CheckpointManager directory"):
    verify_migration(gen["root"] / "mngr", gen["migrated"], SPEC)
  with pytest.raises(UsageError, match="matches no rule"):
    verify_migration(gen["v0"], gen["migrated"], RemapSpec.from_rules([{"match": "^step$", "to": "step"}]))
  with pytest.raises(UsageError, match="lies inside a checkpoint"):
    verify_migration(gen["v0"], gen["migrated"], SPEC, spill_dir=gen["migrated"])


def test_compression_option(tmp_path):
  """Default output is uncompressed (written straight from memory); zstd is available and verifies too."""
  tree = {
      "z": np.zeros((1, 256, 64), np.float32),
      "r": np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32),
  }
  spec = RemapSpec.from_rules([{"match": "^z$", "to": "z", "squeeze": [0]}, {"match": "^r$", "to": "r"}])
  H.save_v0(tmp_path / "src", tree)
  sizes = {}
  for comp in ("none", "zstd"):
    res = migrate(tmp_path / "src", tmp_path / comp, spec, compression=comp)
    assert res.compression == comp
    assert verify_migration(tmp_path / "src", tmp_path / comp, spec).passed
    sizes[comp] = sum(p.stat().st_size for p in (tmp_path / comp).rglob("*") if p.is_file())
  assert sizes["zstd"] < sizes["none"] - 50_000  # 64 KiB of zeros compress away
  with pytest.raises(UsageError, match="compression must be"):
    migrate(tmp_path / "src", tmp_path / "x", spec, compression="lz4")


def test_storage_lines_name_where_each_side_was_read_and_the_bucket_requests():
  from parity_jax.checkpoint.verify import VerifyReport

  io_row = {"requests": 7, "reads": 5, "lists": 2, "retries": 1, "bytes_read": 4096}
  rep = VerifyReport(
      source="gs://b/src",
      migrated="/tmp/dst",
      spec_source=None,
      source_layout="v0",
      migrated_layout="v0",
      leaves=[],
      ignored_empty_nodes={},
      storage={
          "source": {"summary": "OCDBT, zarr3", "store": {"endpoint": "http://h:1"}},
          "migrated": {"summary": "zarr2"},
      },
      io={"gs": io_row, "s3": dict(io_row, requests=0)},  # no request to S3: no line
  )
  assert rep.storage_lines() == [
      "source storage:   OCDBT, zarr3 at http://h:1",
      "migrated storage: zarr2",
      "gs:// I/O:        7 requests (5 reads, 2 lists, 1 retries), 4096 bytes read",
  ]
  assert VerifyReport(**{**rep.__dict__, "storage": None, "io": None}).storage_lines() == []


def test_the_html_view_spells_out_20_failing_leaves_and_counts_the_rest():
  """A hand-built report: 23 missing leaves and one that passes; the HTML lists the first 20 and says 3 more."""
  from parity_jax.checkpoint import LeafResult, VerifyReport

  def report(n_missing):
    leaves = [
        LeafResult(f"w{i:02d}", None, "g", "MISSING", reason="not in the migrated checkpoint") for i in range(n_missing)
    ]
    leaves.append(LeafResult("ok", "ok", "g", "PASS", shape=(2,), dtype="float32", nbytes=8))
    return VerifyReport("src", "mig", None, "v0", "v1", leaves, {"source": [], "migrated": []})

  html = report(23)._repr_html_()
  assert "<summary>Failing leaves (23)</summary>" in html
  assert [f"<code>w{i:02d}</code>" in html for i in range(23)] == [True] * 20 + [False] * 3
  assert html.count("<td style='white-space:normal;max-width:40em'>not in the migrated checkpoint</td></tr>") == 20
  assert "<p>... and 3 more (the JSON report lists every leaf)</p></details>" in html
  html = report(20)._repr_html_()
  assert "<summary>Failing leaves (20)</summary>" in html and " more (the JSON report" not in html
  assert "Failing leaves" not in report(0)._repr_html_()


def test_a_string_leaf_against_an_array_is_a_kind_mismatch_either_way():
  """Structure phase on hand-built metadata: a string where an array was (and the reverse) is KIND_MISMATCH."""
  import types

  from parity_jax.checkpoint import LeafMeta
  from parity_jax.checkpoint.verify.structure import check_structure

  def meta(path, kind):
    if kind == "string":
      return LeafMeta(path, (path,), "string", (), None, (), path, "string")
    return LeafMeta(path, (path,), "array", (2,), np.dtype(np.float32), (2,), path, "np.ndarray")

  spec = RemapSpec.from_rules([{"match": "^(.)$", "to": r"\1"}])
  src = types.SimpleNamespace(leaves={"a": meta("a", "string"), "b": meta("b", "array")})
  mig = types.SimpleNamespace(leaves={"a": meta("a", "array"), "b": meta("b", "string")})
  results, to_compare = check_structure(spec.bind(src.leaves), spec, src, mig)
  assert to_compare == []
  assert [(r.source_path, r.status, r.reason) for r in results] == [
      ("a", "KIND_MISMATCH", "source is a string, migrated is a array"),
      ("b", "KIND_MISMATCH", "source is a array, migrated is a string"),
  ]


def test_a_leaf_result_describes_itself_by_the_sides_it_has():
  from parity_jax.checkpoint import LeafResult

  def row(src, mig):
    return LeafResult(src, mig, "g", "MISSING").describe()

  assert [row("a/s", "b/m"), row("a/s", None), row(None, "b/m"), row(None, None)] == ["b/m <- a/s", "a/s", "b/m", "?"]


def test_arguments_refused_before_any_leaf_is_compared(tmp_path):
  """A job and distributed=True together, a spill directory that does not exist, a source with unreadable leaves:
  each one line, before a value is read."""
  from tests.helpers import safetensors_files as W

  identity = RemapSpec.from_rules([{"match": "(.*)", "to": r"\1"}])
  good, bad = tmp_path / "good", tmp_path / "bad"
  good.mkdir()
  bad.mkdir()
  W.write_file(good / "model.safetensors", {"a": np.zeros(2, np.float32)})

  def lie(h):
    for k in ("a", "b", "c"):
      h[k]["shape"] = [9, 9]

  W.write_file(bad / "model.safetensors", {k: np.zeros(2, np.float32) for k in "abc"}, edit=lie)
  with pytest.raises(UsageError, match="^pass distributed=True or a job, not both$"):
    verify_migration(good, good, identity, distributed=True, job=object())
  with pytest.raises(UsageError, match=f"^spill directory does not exist: {re.escape(str(tmp_path / 'nope'))}$"):
    verify_migration(good, good, identity, spill_dir=tmp_path / "nope")
  with pytest.raises(UsageError) as e:
    verify_migration(bad, bad, identity)
  assert str(e.value).startswith(f"source checkpoint {bad}: cannot read leaf 'a' (and 2 more): model.safetensors: ")


def test_a_spill_file_is_made_in_the_spill_directory_given(tmp_path, monkeypatch):
  """With the default temporary directory gone, a leaf that spills still verifies: its file is in spill_dir."""
  import tempfile

  from tests.checkpoint.stream import test_stream as S

  src_kw, mig_kw, _ = S.MODES["spill"]
  tree = S._source_tree()
  src = S._save_source(tmp_path / "src", tree, **src_kw)
  mig = S._migrated(tmp_path, "good", {"w": tree["w"][0], "s": tree["s"]}, **mig_kw)
  (tmp_path / "spill").mkdir()
  monkeypatch.setattr(stream.plan, "SPILL_ABOVE_BYTES", 0)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
  rep = verify_migration(src, mig, S.SPEC, slab_mb=S.PIECE_MB, spill_dir=tmp_path / "spill")
  assert rep.passed and rep.leaf("w").read_mode.startswith("spill: "), rep.text()
  assert list((tmp_path / "spill").iterdir()) == []  # and removed after
