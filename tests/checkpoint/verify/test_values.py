"""parity_jax.checkpoint.verify.values: the job schedule, with 2 and 3 "processes" as threads of this process
(tests/helpers/threadjob.py), through every read plan of the stream tests, a split leaf that spills included.

Expected values: hashlib of the arrays written here, and the one-process report of the same pair (which the
stream tests check against numpy); the job must give the same verdicts, hashes and statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from tests.checkpoint.stream import test_stream as S
from tests.helpers import ckpt as H
from tests.helpers.threadjob import run_threads
from parity_jax.checkpoint import RemapSpec, stream, verify_migration


def _job_reports(src, mig, spec, n, **kw):
  return run_threads(lambda job: verify_migration(src, mig, spec, job=job, **kw), n, "verify")


def _same_results(a, b):
  keep = ("status", "sha256", "source_sha256", "shape", "dtype", "reason")
  strip = lambda rep: [({k: r.to_dict()[k] for k in keep}, r.diff and r.diff.to_dict()) for r in rep.leaves]  # noqa: E731
  assert strip(a) == strip(b)


@pytest.mark.parametrize("mode", list(S.MODES))
def test_a_leaf_split_between_two_processes_in_every_read_plan(mode, tmp_path, monkeypatch):
  src_kw, mig_kw, ver_kw = S.MODES[mode]
  tree = S._source_tree()
  src = S._save_source(tmp_path / "src", tree, **src_kw)
  good = {"w": tree["w"][0], "s": tree["s"]}
  mig = S._migrated(tmp_path, "good", good, **mig_kw)
  bad_tree = {"w": good["w"].copy(), "s": good["s"]}
  S._flip(bad_tree["w"], (50, 17), 1 << 9)  # in the second process's range
  bad = S._migrated(tmp_path, "bad", bad_tree, **mig_kw)
  ver_kw = dict(ver_kw)
  if ver_kw.pop("spill", False):
    monkeypatch.setattr(stream.plan, "SPILL_ABOVE_BYTES", 0)
  kw = dict(slab_mb=S.PIECE_MB, spill_dir=tmp_path, **ver_kw)

  reps = _job_reports(src, mig, S.SPEC, 2, **kw)
  for rep in reps:  # every process returns the same report
    assert rep.passed, rep.text()
    (split,) = rep.distributed["split_leaves"]
    assert split["path"] == "w" and split["processes"] == [0, 1]
    assert rep.distributed["redone_whole_by_process_0"] == []
    w = rep.leaf("w")
    assert w.sha256 == w.source_sha256 == hashlib.sha256(good["w"].tobytes()).hexdigest()
    assert w.read_mode.startswith("spill: " if mode == "spill" else "stream: ")
  assert not list(tmp_path.glob("parity_jax_verify_spill_*"))

  one = verify_migration(src, bad, S.SPEC, **kw)
  reps = _job_reports(src, bad, S.SPEC, 2, **kw)
  for rep in reps:
    assert not rep.passed and rep.distributed["redone_whole_by_process_0"] == ["w"]
    _same_results(rep, one)
  assert one.leaf("w").diff.n_diff == 1
  assert one.leaf("w").sha256 == hashlib.sha256(bad_tree["w"].tobytes()).hexdigest()


def _tree(sizes):
  rng = np.random.default_rng(5)
  return {f"x{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}


IDENTITY = RemapSpec.from_rules([{"match": "(.*)", "to": r"\1"}])


@pytest.mark.parametrize(
    "sizes, n, split",
    [
        # x0 ends exactly on the share boundary (16 KiB of 32 KiB, 2 processes): nothing is split
        ([4096, 4096], 2, []),
        # x1 (12 KiB) crosses the boundary at 15 KiB and is between half a share (7.5 KiB) and a share: split
        ([2560, 3072, 2048], 2, ["x1"]),
        # three processes, x1 crossing two boundaries
        ([1024, 6144, 1024], 3, ["x1"]),
    ],
)
def test_share_boundaries(sizes, n, split, tmp_path):
  tree = _tree(sizes)
  src = H.save_v0(tmp_path / "src", tree)
  mig = H.save_v1(tmp_path / "mig", tree)
  reps = _job_reports(src, mig, IDENTITY, n, slab_mb=1 / 1024)
  for rep in reps:
    assert rep.passed, rep.text()
    assert [s["path"] for s in rep.distributed["split_leaves"]] == split
    for name, a in tree.items():
      assert rep.leaf(name).sha256 == hashlib.sha256(a.tobytes()).hexdigest()
    # the shares add up to one read of each side
    assert sum(p["bytes_read"] for p in rep.distributed["per_process"]) == 2 * sum(a.nbytes for a in tree.values())


def test_one_process_reads_each_small_leaf_once_per_side(tmp_path):
  tree = _tree([3, 5, 7, 11, 13])
  tree["i"] = np.arange(9, dtype=np.int16)
  src = H.save_v0(tmp_path / "src", tree)
  mig = H.save_v1(tmp_path / "mig", tree)
  rep = verify_migration(src, mig, IDENTITY)
  assert rep.passed
  assert rep.bytes_read == 2 * sum(a.nbytes for a in tree.values())


def test_a_string_leaf_that_differs_fails_with_both_hashes(tmp_path):
  tree = {"name": "qwen3-0.6b", "x": np.arange(4, dtype=np.float32)}
  src = H.save_v0(tmp_path / "src", tree)
  mig = H.save_v1(tmp_path / "mig", dict(tree, name="qwen3-0.6B"))
  rep = verify_migration(src, mig, IDENTITY)
  r = rep.leaf("name")
  assert (r.status, r.reason) == ("VALUE_MISMATCH", "strings differ (10 vs 10 characters)")
  assert r.source_sha256 == hashlib.sha256(b"qwen3-0.6b").hexdigest()
  assert r.sha256 == hashlib.sha256(b"qwen3-0.6B").hexdigest()
  assert [f.migrated_path for f in rep.failures] == ["name"]


def test_the_progress_lines_count_the_leaves_as_they_are_compared(tmp_path, monkeypatch, capsys):
  import itertools
  import re
  import types

  tree = S._source_tree()
  src = S._save_source(tmp_path / "src", tree)
  mig = S._migrated(tmp_path, "good", {"w": tree["w"][0], "s": tree["s"]})
  # stderr is not a terminal here: one plain line per LOG_INTERVAL_S; a clock that moves 10 s a call prints each update
  clock = itertools.count(0, 10.0)
  monkeypatch.setattr("parity_jax.progress.time", types.SimpleNamespace(monotonic=lambda: next(clock)))
  assert verify_migration(src, mig, S.SPEC, progress=True, slab_mb=S.PIECE_MB).passed
  lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("verify: ")]
  done = [int(m.group(1)) if m else None for ln in lines for m in [re.search(r" (\d+)/2 leaves$", ln)]]
  assert None not in done and done == sorted(done), lines  # every line names the leaves done so far, never fewer
  assert 1 in done[:-1] and done[-1] == 2, lines  # "1/2" while the second (the large, split one) is compared
  assert lines[-1].startswith("verify: 100% "), lines
  pct = [int(re.match(r"verify: (\d+)% ", ln).group(1)) for ln in lines]
  assert pct == sorted(pct) and len([p for p in pct if 0 < p < 100]) >= 3, lines  # the large leaf, slab by slab


def test_the_settings_of_the_values_phase_are_immutable(tmp_path):
  from parity_jax.checkpoint.verify.values import Settings

  st = Settings(top_k=3, buffers=stream.Buffers(4096), spill_dir=str(tmp_path), readahead=None)
  with pytest.raises(dataclasses.FrozenInstanceError):  # read by every pair's threads
    st.top_k = 4


def test_a_zero_sized_leaf_in_a_job_is_compared_whole_like_in_one_process(tmp_path):
  """A (0, 3) leaf beside others in a job of 2: it has no pieces to share out (it made the job's plan fail, while
  one process compared it); a flipped element in another leaf still fails that leaf alone."""
  from tests.helpers import safetensors_files as W

  x = np.arange(600, dtype=np.float32)
  bad_x = x.copy()
  bad_x[5] = -1
  for name, t in (
      ("src", {"z": np.zeros((0, 3), np.float32), "x": x}),
      ("mig", {"z": np.zeros((0, 3), np.float32), "x": bad_x}),
  ):
    (tmp_path / name).mkdir()
    W.write_file(tmp_path / name / "model.safetensors", t)
  one = verify_migration(tmp_path / "src", tmp_path / "mig", IDENTITY)
  for rep in _job_reports(tmp_path / "src", tmp_path / "mig", IDENTITY, 2):
    _same_results(rep, one)
    assert [r.migrated_path for r in rep.failures] == ["x"]
    z = rep.leaf("z")
    assert z.passed and z.sha256 == z.source_sha256 == hashlib.sha256(b"").hexdigest()
