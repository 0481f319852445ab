"""The migrator as a real 2-process jax.distributed job on 127.0.0.1 (gloo), and the supervisor of every job's tools.

Every job is two real tool processes on a port that was free a moment before.
Expected values come from the trees the tests wrote (numpy, hashlib) and from
what orbax's own single-process writer (the streaming migrator) puts on disk,
never from the distributed migrator itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from parity_jax.checkpoint import migrate, verify_migration
from parity_jax.checkpoint.formats.orbax_writer import row_major_chunks
from parity_jax.checkpoint.formats.tstore import quiet_orbax
from tests.helpers import ckpt as H
from tests.helpers import jobs, multiprocess_save

STALL = "PARITY_JAX_STALL"  # parity_jax.runtime.faults: "<point>@<process>"

_SPEC = dict(
    H.GENERATED_SPEC,
    rules=H.GENERATED_SPEC["rules"] + [{"match": r"^params/big$", "to": "params/big_t", "reshape": [8, 8, 1000]}],
)


def _save_chunked(path, tree) -> str:
  """orbax v1 save with zstd chunks of <= 16 KB in C-order rows: a leaf's range can be read without all of it."""
  from orbax.checkpoint import v1 as ocp_v1

  ctx = ocp_v1.Context()
  ctx.array.saving.storage_options.chunk_byte_size = 16_000
  with ctx, quiet_orbax(), row_major_chunks():
    ocp_v1.save(os.path.abspath(path), tree)
  return str(path)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _bytes(v) -> bytes:
  return v.encode() if isinstance(v, str) else np.ascontiguousarray(v).tobytes()


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
  root = tmp_path_factory.mktemp("distmig")
  src = H.generated_source()
  src["params"]["big"] = np.random.default_rng(5).standard_normal((1, 64, 1000)).astype(np.float32)  # 256 KB
  expected = H.expected_migrated(src)
  expected["params"]["big_t"] = src["params"]["big"].reshape(8, 8, 1000)
  d = {
      "src": _save_chunked(root / "src", src),
      "spec": H.write_spec(root / "spec.json", _SPEC),
      "expected": _flat(expected),
      "one": str(root / "one"),
  }
  migrate(d["src"], d["one"], d["spec"], chunk_mb=0.05)  # the single-process migrator: orbax's own writer
  d["one_report"] = verify_migration(d["src"], d["one"], d["spec"]).to_dict()
  return d


def _margs(ck, dest) -> list[str]:
  return [f"--source={ck['src']}", f"--dest={dest}", f"--spec={ck['spec']}", "--chunk_mb=0.05", "--noprogress"]


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


def _kv(path) -> dict[str, bytes]:
  import tensorstore as ts

  kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": str(path)}}).result()
  return {k.decode(): kv.read(k).result().value for k in kv.list().result()}


def test_two_processes_write_one_checkpoint_that_loads_and_verifies_like_a_one_process_migration(ck, tmp_path):
  dest, report = tmp_path / "mig", tmp_path / "r.json"
  procs = jobs.start("migrate_checkpoint", _margs(ck, dest) + [f"--report={report}"])
  (rc0, out0, e0), (rc1, out1, e1) = jobs.finish(procs)
  assert (rc0, rc1) == (0, 0), e0 + e1
  assert _lines(out0)[-2].startswith("migrated 15 leaves") and _lines(out0)[-2].endswith(f"-> {dest}")
  assert _lines(out1) and _lines(out1)[-1].startswith("process 1 of 2: wrote ") and str(dest) in out1
  assert sorted(os.listdir(tmp_path)) == ["mig", "r.json"]  # no temporary left behind
  job = json.loads(report.read_text())["distributed"]
  arrays = sum(v.nbytes for v in ck["expected"].values() if not isinstance(v, str))
  assert job["num_processes"] == 2 and job["split_leaves"] == [{"path": "params/big_t", "processes": [0, 1]}]
  assert all(p["bytes_written"] > 0 for p in job["per_process"])
  assert sum(p["bytes_written"] for p in job["per_process"]) == arrays  # each byte written once

  # one checkpoint: plain ocp.v1.load restores every leaf, bit for bit
  from orbax.checkpoint import v1 as ocp_v1

  loaded = _flat(ocp_v1.load(str(dest)))
  assert sorted(loaded) == sorted(ck["expected"])
  for path, want in ck["expected"].items():
    got = loaded[path]
    assert type(got) is type(want) if isinstance(want, str) else (got.dtype, got.shape) == (want.dtype, want.shape)
    assert _bytes(got) == _bytes(want), path

  # the single-process verifier PASSes it with the one-process migration's statuses and hashes
  rep = verify_migration(ck["src"], str(dest), ck["spec"]).to_dict()
  assert rep["verdict"] == "PASS"
  row = lambda e: (e["source_path"], e["migrated_path"], e["status"], e["sha256"], e["source_sha256"])  # noqa: E731
  assert [row(e) for e in rep["leaves"]] == [row(e) for e in ck["one_report"]["leaves"]]
  for e in rep["leaves"]:
    assert e["sha256"] == hashlib.sha256(_bytes(ck["expected"][e["migrated_path"]])).hexdigest()

  # the layout orbax's single-process writer made: tree metadata, strings, every array's zarr.json and chunk
  item, one = dest / "state", os.path.join(ck["one"], "state")
  assert json.loads((item / "_METADATA").read_text()) == json.load(open(os.path.join(one, "_METADATA")))
  assert (item / "_strings.json").read_text() == open(os.path.join(one, "_strings.json")).read()
  assert _kv(item) == _kv(one)
  assert sorted(os.listdir(dest)) == sorted(os.listdir(ck["one"]))
  meta = json.loads((dest / "_CHECKPOINT_METADATA").read_text())
  assert meta["item_handlers"] == json.load(open(os.path.join(ck["one"], "_CHECKPOINT_METADATA")))["item_handlers"]

  # each process wrote its share into its own database; the big leaf's chunks are in both
  dbs = {i: _kv(item / f"ocdbt.process_{i}") for i in (0, 1)}
  assert set(dbs[0]).isdisjoint(set(dbs[1]) - {"params.big_t/zarr.json"})
  big = {i: sorted(k for k in db if k.startswith("params.big_t/c/")) for i, db in dbs.items()}
  assert big[0] and big[1] and len(big[0]) + len(big[1]) == 8
  assert "params.big_t/zarr.json" in dbs[0] and "params.big_t/zarr.json" not in dbs[1]  # as orbax: the first owner
  assert all(db for db in dbs.values()) and sum(len(db) for db in dbs.values()) == len(_kv(item))


def test_two_processes_migrate_straight_into_an_s3_bucket_as_one_process_does_on_disk(ck, s3_bucket, tmp_path):
  """Each process writes its share into its own database in the bucket (no local disk), process 0 merges there
  and writes the commit marker last: the same checkpoint as the one-process migration on disk."""
  dest = f"{s3_bucket.url}/mig"
  procs = jobs.start("migrate_checkpoint", _margs(ck, dest), env=dict(s3_bucket.emulator.env(), TMPDIR=str(tmp_path)))
  (rc0, out0, e0), (rc1, out1, e1) = jobs.finish(procs, timeout=240)
  assert (rc0, rc1) == (0, 0), e0 + e1
  assert _lines(out0)[-1].startswith("migrated 15 leaves") and _lines(out0)[-1].endswith(f"-> {dest}")
  assert not list(tmp_path.iterdir())  # nothing staged on local disk
  keys = s3_bucket.keys("mig/")
  assert any(k.startswith("mig/state/ocdbt.process_1/") for k in keys)  # process 1 wrote its share itself
  down = tmp_path / "down"
  s3_bucket.download_tree("mig", down)
  item, one = down / "state", os.path.join(ck["one"], "state")
  assert sorted(os.listdir(down)) == sorted(os.listdir(ck["one"]))  # commit_success.txt, orbax.checkpoint, ...
  assert json.loads((item / "_METADATA").read_text()) == json.load(open(os.path.join(one, "_METADATA")))
  assert (item / "_strings.json").read_text() == open(os.path.join(one, "_strings.json")).read()
  assert _kv(item) == _kv(one)  # the merged index: every key and every chunk's bytes

  from orbax.checkpoint import v1 as ocp_v1

  loaded = _flat(ocp_v1.load(str(down)))
  assert sorted(loaded) == sorted(ck["expected"])
  for path, want in ck["expected"].items():
    assert _bytes(loaded[path]) == _bytes(want), path


@pytest.mark.parametrize("point", ["migrate.group.1", "migrate.commit"])
def test_killing_process_1_mid_run_makes_process_0_exit_2_and_leaves_nothing(ck, tmp_path, point):
  """Mid-share, or with its share written but not yet reported: process 0 must not install anything."""
  dest = tmp_path / "mig"
  # the kill must come within the peer timeout of the stall, or process 0 rightly calls process 1 hung first
  procs = jobs.start("migrate_checkpoint", _margs(ck, dest) + ["--peer_timeout=4"], env={STALL: f"{point}@1"})
  t0 = time.monotonic()
  jobs.wait_for_line(procs[1], "stalling")
  procs[1].send_signal(signal.SIGKILL)
  (rc0, out0, err0), (rc1, _, _) = jobs.finish(procs, timeout=60)
  assert rc0 == 2 and rc1 == -signal.SIGKILL and "migrated" not in out0
  lines = _lines(err0)
  assert len(lines) == 1 and "error: process 1 of 2 lost" in lines[0] and "Traceback" not in err0, err0
  assert "stopped sending heartbeats" in lines[0]  # killed with its tool (not left running, hung)
  assert time.monotonic() - t0 < 30
  assert os.listdir(tmp_path) == []  # nothing at --dest, and process 0 removed the temporary directory


def test_killing_process_0_before_the_rename_makes_process_1_exit_2_with_one_line(ck, tmp_path):
  """The coordinator dies with the checkpoint complete but not yet renamed: nothing at --dest."""
  dest = tmp_path / "mig"
  procs = jobs.start("migrate_checkpoint", _margs(ck, dest) + ["--peer_timeout=30"], env={STALL: "migrate.install@0"})
  jobs.wait_for_line(procs[0], "stalling")
  t0 = time.monotonic()
  procs[0].send_signal(signal.SIGKILL)
  (rc0, _, _), (rc1, out1, err1) = jobs.finish(procs, timeout=60)
  assert rc0 == -signal.SIGKILL and rc1 == 2 and "wrote" not in out1
  lines = _lines(err1)
  assert len(lines) == 1 and "error: lost process 0 (the coordinator)" in lines[0] and "this is process 1" in lines[0]
  assert "Traceback" not in err1 and "stack trace" not in err1
  assert time.monotonic() - t0 < 15  # the runtime's abort, well before the 30 s peer timeout
  assert not dest.exists()
  assert all(p.startswith(".mig.migrating-") for p in os.listdir(tmp_path))  # only process 0's hidden temporary


def test_killing_process_0_of_a_verify_job_makes_process_1_exit_2_with_one_line(ck, tmp_path):
  args = [
      f"--source={ck['src']}",
      f"--migrated={ck['one']}",
      f"--spec={ck['spec']}",
      "--noprogress",
      "--slab_mb=0.02",
      "--peer_timeout=30",
      f"--report={tmp_path / 'r.json'}",
  ]
  procs = jobs.start("verify_migration", args, env={"PARITY_JAX_STALL": "verify.share@0"})
  jobs.wait_for_line(procs[0], "stalling")
  t0 = time.monotonic()
  procs[0].send_signal(signal.SIGKILL)
  (rc0, _, _), (rc1, out1, err1) = jobs.finish(procs, timeout=60)
  assert rc0 == -signal.SIGKILL and rc1 == 2 and "VERDICT" not in out1
  lines = _lines(err1)
  assert len(lines) == 1 and "error: lost process 0 (the coordinator)" in lines[0] and "Traceback" not in err1, err1
  assert time.monotonic() - t0 < 15
  assert not (tmp_path / "r.json").exists()


def test_processes_that_plan_differently_all_stop_with_one_line_and_write_nothing(ck, tmp_path):
  dest = tmp_path / "mig"
  extra = {1: ["--chunk_mb=0.1"]}  # process 1 would chunk differently
  for rc, _, err in jobs.finish(jobs.start("migrate_checkpoint", _margs(ck, dest), extra=extra)):
    lines = _lines(err)
    assert rc == 2 and len(lines) == 1 and "error: process 1 planned the migration differently" in lines[0], err
  assert os.listdir(tmp_path) == []


def test_a_process_that_cannot_read_its_share_stops_the_job_with_one_line_on_each_process(ck, tmp_path):
  """Process 1 is given a copy of the source whose data files are damaged (the metadata is intact)."""
  bad = tmp_path / "bad_src"
  shutil.copytree(ck["src"], bad)
  for f in (bad / "state").glob("ocdbt.process_*/d/*"):
    data = bytearray(f.read_bytes())
    for i in range(100, len(data) - 100, 97):
      data[i] ^= 0xFF
    f.write_bytes(bytes(data))
  dest = tmp_path / "mig"
  (rc0, _, err0), (rc1, _, err1) = jobs.finish(
      jobs.start("migrate_checkpoint", _margs(ck, dest) + ["--peer_timeout=5"], extra={1: [f"--source={bad}"]})
  )
  l0, l1 = _lines(err0), _lines(err1)
  assert rc1 == 2 and len(l1) == 1 and "error: cannot read leaf" in l1[0], err1
  assert rc0 == 2 and len(l0) == 1 and "error: process 1 failed: cannot read leaf" in l0[0], err0
  assert os.listdir(tmp_path) == ["bad_src"]  # nothing at --dest, no temporary


def test_a_two_process_written_source_migrated_by_two_processes_verifies(tmp_path):
  """A source written by orbax from a real 2-process job (ocdbt.process_0/ and _1/), migrated by a 2-process job."""
  src = tmp_path / "src"
  port = jobs.free_port()
  writers = [
      subprocess.Popen(
          [sys.executable, "-m", "tests.helpers.multiprocess_save", str(src), str(port), str(i)],
          cwd=H.REPO,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in (0, 1)
  ]
  for rc, _, err in jobs.finish(writers):
    assert rc == 0, err
  spec = H.write_spec(
      tmp_path / "spec.json",
      {
          "rules": [
              {"match": r"^params/w$", "to": "params/w", "squeeze": [0]},
              {"match": r"^(params/(?:big|bias)|mu/big|step)$", "to": r"\1"},
          ]
      },
  )
  mig = tmp_path / "mig"
  args = [f"--source={src}", f"--dest={mig}", f"--spec={spec}", "--chunk_mb=0.004", "--noprogress"]
  (rc0, _, e0), (rc1, _, e1) = jobs.finish(jobs.start("migrate_checkpoint", args))
  assert (rc0, rc1) == (0, 0), e0 + e1
  assert (mig / "state" / "ocdbt.process_0").is_dir() and (mig / "state" / "ocdbt.process_1").is_dir()
  t = multiprocess_save.tree()
  want = {
      "params/w": t["params"]["w"][0],
      "params/big": t["params"]["big"],
      "params/bias": t["params"]["bias"],
      "mu/big": t["mu"]["big"],
      "step": t["step"],
  }
  rep = verify_migration(str(src), str(mig), spec).to_dict()
  assert rep["verdict"] == "PASS" and rep["n_leaves"] == 5
  for e in rep["leaves"]:
    assert e["sha256"] == hashlib.sha256(_bytes(want[e["migrated_path"]])).hexdigest()
  from orbax.checkpoint import v1 as ocp_v1

  loaded = _flat(ocp_v1.load(str(mig)))
  assert sorted(loaded) == sorted(want) and all(_bytes(loaded[k]) == _bytes(v) for k, v in want.items())
