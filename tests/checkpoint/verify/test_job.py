"""The verifier (and the runtime under it) as a real 2-process jax.distributed job on 127.0.0.1 (gloo).

Every job here is two real tool processes started by the test, on a port that
was free a moment before. The expected values come from numpy/hashlib on the
trees the tests wrote, never from the verifier itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from parity_jax.checkpoint import migrate
from parity_jax.checkpoint.shares import assign
from parity_jax.checkpoint.stream import Sha256State
from tests.helpers import ckpt as H
from tests.helpers import multiprocess_save
from tests.helpers.jobs import finish, free_port, start

SLAB = "--slab_mb=0.02"  # 20 KiB pieces: the 256 KB leaf below has a dozen of them


def _leaf_tree() -> dict:
  src = H.generated_source()
  rng = np.random.default_rng(5)
  src["params"]["big"] = rng.standard_normal((1, 64, 1000)).astype(np.float32)  # 256 KB: split across both
  return src


_SPEC = dict(
    H.GENERATED_SPEC,
    rules=H.GENERATED_SPEC["rules"] + [{"match": r"^params/big$", "to": "params/big_t", "reshape": [8, 8, 1000]}],
)


def _expected(src: dict) -> dict:
  e = H.expected_migrated(src)
  e["params"]["big_t"] = src["params"]["big"].reshape(8, 8, 1000)
  return e


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
  root = tmp_path_factory.mktemp("dist")
  src = _leaf_tree()
  d = {"root": root, "src_tree": src, "src": H.save_v0(root / "src", src), "expected": _expected(src)}
  d["spec"] = H.write_spec(root / "spec.json", _SPEC)
  d["mig"] = str(root / "mig")
  migrate(d["src"], d["mig"], d["spec"], chunk_mb=0.05)
  return d


def _args(ck, migrated, report):
  return [
      f"--source={ck['src']}",
      f"--migrated={migrated}",
      f"--spec={ck['spec']}",
      f"--report={report}",
      "--noprogress",
      SLAB,
  ]


def _comparable(rep: dict) -> dict:
  rep = dict(rep)
  for k in ("elapsed_s", "provenance", "distributed"):
    rep.pop(k, None)
  # each process batches the small leaves of its own share: only the batch sizes may differ
  rep["leaves"] = [
      dict(leaf, read_mode=re.sub(r"a batch of \d+ pairs", "a batch", leaf["read_mode"] or ""))
      for leaf in rep["leaves"]
  ]
  return rep


def test_two_processes_give_the_single_process_report_and_the_split_leaf_its_true_sha256(ck, tmp_path):
  single = tmp_path / "single.json"
  proc = H.run_tool("verify_migration", *_args(ck, ck["mig"], single))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  job = tmp_path / "job.json"
  # process 1 starts its share 1.5 s late: the relayed state is there when it reaches its range (hashed inline)
  (rc0, out0, err0), (rc1, out1, err1) = finish(
      start("verify_migration", _args(ck, ck["mig"], job), env={"PARITY_JAX_STALL": "verify.share@1=1.5"})
  )
  assert (rc0, rc1) == (0, 0), err0 + err1
  assert out0.splitlines()[-2] == "VERDICT: PASS" and "[PASS] params  9/9 leaves bit-identical" in out0
  assert "VERDICT: PASS" in out1 and "[PASS]" not in out1  # process 1 prints one line, no table
  rep, ref = json.loads(job.read_text()), json.loads(single.read_text())
  assert _comparable(rep) == _comparable(ref)
  d = rep["distributed"]
  assert d["num_processes"] == 2
  # each process read only its share: the shares add up to one read of each side
  total = sum(np.asarray(v).nbytes for v in H.deepcopy(_flat(ck["expected"])).values() if not isinstance(v, str))
  per = [p["bytes_read"] for p in d["per_process"]]
  assert all(b > 0 for b in per) and sum(per) == 2 * total
  assert all(0.3 < p["share_bytes"] / total < 0.7 for p in d["per_process"])
  (split,) = d["split_leaves"]
  assert split["path"] == "params/big_t" and split["processes"] == [0, 1] and split["hash"] == ["inline", "inline"]
  # the relayed digest was accepted as it came: process 0 compared nothing again (a broken hand-off would make it
  # compare the leaf again, whole, and still report PASS)
  assert d["redone_whole_by_process_0"] == []
  leaf = next(e for e in rep["leaves"] if e["migrated_path"] == "params/big_t")
  want = hashlib.sha256(ck["src_tree"]["params"]["big"].tobytes()).hexdigest()
  assert leaf["sha256"] == leaf["source_sha256"] == want
  for e in rep["leaves"]:  # every other leaf's hash too, from the trees the test wrote
    v = _flat(ck["expected"])[e["migrated_path"]]
    data = v.encode() if isinstance(v, str) else np.ascontiguousarray(v).tobytes()
    assert e["sha256"] == hashlib.sha256(data).hexdigest(), e["migrated_path"]


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    p = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, p + "/"))
    else:
      out[p] = v
  return out


def test_relay_resumes_from_a_state_that_arrives_late(ck, tmp_path):
  """Process 0 starts late: process 1 compares its range first, then re-reads it to hash from the relayed state."""
  job = tmp_path / "job.json"
  (rc0, _, e0), (rc1, _, e1) = finish(
      start("verify_migration", _args(ck, ck["mig"], job), env={"PARITY_JAX_STALL": "verify.share@0=2"})
  )
  assert (rc0, rc1) == (0, 0), e0 + e1
  rep = json.loads(job.read_text())
  (split,) = rep["distributed"]["split_leaves"]
  assert split["hash"] == ["inline", "re-read"]
  assert rep["distributed"]["per_process"][1]["hash_reread_bytes"] > 0
  leaf = next(e for e in rep["leaves"] if e["migrated_path"] == "params/big_t")
  assert leaf["sha256"] == hashlib.sha256(ck["src_tree"]["params"]["big"].tobytes()).hexdigest()


def test_bit_flip_in_a_leaf_of_process_1_and_in_the_split_leaf(ck, tmp_path):
  """Process 0 reports a flip that only process 1 read; a flip in the split leaf gets the single-process statistics."""
  probe = tmp_path / "probe.json"
  finish(start("verify_migration", _args(ck, ck["mig"], probe)))
  p1 = json.loads(probe.read_text())["distributed"]["per_process"][1]
  owned = p1["whole_leaves"]
  assert p1["ranges"] == ["params/big_t#1"]  # the tail of the split leaf
  assert "params/block_1/kernel" in owned or "params/embedding" in owned, owned
  victim = "params/block_1/kernel" if "params/block_1/kernel" in owned else "params/embedding"
  bad = H.deepcopy(ck["expected"])
  _flat(bad)[victim].reshape(-1).view(np.uint32)[17] ^= 1 << 3
  bad["params"]["big_t"].reshape(-1).view(np.uint32)[60_000] ^= 1  # in process 1's range of the split leaf
  bad_dir = H.save_v1(tmp_path / "bad", bad)
  job, single = tmp_path / "job.json", tmp_path / "single.json"
  (rc0, out0, e0), (rc1, out1, e1) = finish(start("verify_migration", _args(ck, bad_dir, job)))
  assert (rc0, rc1) == (1, 1), e0 + e1
  assert "VERDICT: FAIL — 2 of 15 leaves differ" in out0 and f"VALUE_MISMATCH  {victim}" in out0
  assert "VERDICT: FAIL" in out1
  proc = H.run_tool("verify_migration", *_args(ck, bad_dir, single))
  assert proc.returncode == 1
  rep, ref = json.loads(job.read_text()), json.loads(single.read_text())
  # bytes_read is what this run read: here the ranges up to the flip, then the split leaf again on process 0
  assert _comparable(rep) | {"bytes_read": 0} == _comparable(ref) | {"bytes_read": 0}
  assert rep["distributed"]["redone_whole_by_process_0"] == ["params/big_t"]
  leaf = next(e for e in rep["leaves"] if e["migrated_path"] == "params/big_t")
  assert leaf["diff"]["n_diff"] == 1 and leaf["diff"]["top_k"][0]["index"] == [7, 4, 0]
  assert leaf["sha256"] == hashlib.sha256(bad["params"]["big_t"].tobytes()).hexdigest()
  assert leaf["source_sha256"] == hashlib.sha256(ck["src_tree"]["params"]["big"].tobytes()).hexdigest()


@pytest.mark.parametrize("how", ["sigkill", "hang"])
def test_a_lost_process_makes_the_other_exit_2_naming_it(ck, tmp_path, how):
  job = tmp_path / "job.json"
  # killed: process 1 stops its progress at the stall and its heartbeats at the kill; the kill must come within the
  # peer timeout of the stall, or process 0 rightly calls it hung first (a loaded machine needs a few seconds)
  timeout = 4 if how == "sigkill" else 2
  procs = start(
      "verify_migration",
      _args(ck, ck["mig"], job) + [f"--peer_timeout={timeout}"],
      env={"PARITY_JAX_STALL": "verify.share@1"},
  )
  t0 = time.monotonic()
  if how == "sigkill":
    line = procs[1].stderr.readline()  # "stalling": process 1 is mid-run (structure done, values not)
    assert "stalling" in line, line
    procs[1].send_signal(signal.SIGKILL)
  (rc0, out0, err0), (rc1, _, err1) = finish(procs, timeout=60)
  elapsed = time.monotonic() - t0
  assert rc0 == 2 and "VERDICT" not in out0
  lines = [l for l in err0.splitlines() if l.strip()]
  assert lines == [lines[0]] and "error: process 1 of 2 lost" in lines[0], err0
  assert ("hung" in lines[0]) == (how == "hang")
  assert rc1 == (-signal.SIGKILL if how == "sigkill" else 2), err1
  assert elapsed < 30
  assert not job.exists()


def test_two_process_written_checkpoint_verifies_against_its_migration(tmp_path):
  """A source written by orbax from a real 2-process job (ocdbt.process_0/ and _1/), single- and multi-process."""
  src = tmp_path / "src"
  port = free_port()
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
  for rc, _, err in finish(writers):
    assert rc == 0, err
  item = src / "state"
  assert (item / "ocdbt.process_0").is_dir() and (item / "ocdbt.process_1").is_dir()
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
  migrate(str(src), str(mig), spec, chunk_mb=0.004)
  args = [f"--source={src}", f"--migrated={mig}", f"--spec={spec}", "--noprogress", "--slab_mb=0.005"]
  job = tmp_path / "job.json"
  (rc0, out0, e0), (rc1, _, e1) = finish(start("verify_migration", args + [f"--report={job}"]))
  assert (rc0, rc1) == (0, 0), e0 + e1
  rep = json.loads(job.read_text())
  assert rep["verdict"] == "PASS" and rep["n_leaves"] == 5 and rep["source"]["layout"] == "v1"
  t = multiprocess_save.tree()
  want = {
      "params/w": t["params"]["w"][0],
      "params/big": t["params"]["big"],
      "params/bias": t["params"]["bias"],
      "mu/big": t["mu"]["big"],
      "step": t["step"],
  }
  for e in rep["leaves"]:
    assert e["sha256"] == hashlib.sha256(np.ascontiguousarray(want[e["migrated_path"]]).tobytes()).hexdigest()
  # and the migrated copy back against the 2-process-written original, the other way round, in one process
  back = H.write_spec(
      tmp_path / "back.json",
      {
          "rules": [
              {"match": r"^params/w$", "to": "params/w", "reshape": [1, 8, 24]},
              {"match": r"^(params/(?:big|bias)|mu/big|step)$", "to": r"\1"},
          ]
      },
  )
  proc = H.run_tool("verify_migration", f"--source={mig}", f"--migrated={src}", f"--spec={back}", "--noprogress")
  assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "VERDICT: PASS", proc.stdout + proc.stderr


def test_sha256_state_resumes_exactly():
  data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 77, dtype=np.uint8)
  for cut in (0, 1, 63, 64, 65, 4096, data.size):
    a = Sha256State()
    a.update(data[:cut])
    b = Sha256State.resume(a.export())
    b.update(data[cut:])
    assert b.hexdigest() == hashlib.sha256(data.tobytes()).hexdigest(), cut


def test_assign_splits_by_bytes_and_orders_the_relay():
  # three leaves: 100, 1000 (ten pieces), 100 bytes; two processes: 600 bytes each
  ends = [[100], [100 * (k + 1) for k in range(10)], [100]]
  work = assign([100, 1000, 100], ends, 2)
  got = [[(w.pair, w.lo, w.hi, w.rank) for w in ws] for ws in work]
  assert got == [[(0, 0, 1, None), (1, 0, 5, 0)], [(2, 0, 1, None), (1, 5, 10, 1)]]
  assert [sum(w.nbytes for w in ws) for ws in work] == [600, 600]
  # a leaf under half a share goes whole to the process that holds most of it
  work = assign([500, 200, 500], [[500], [100, 200], [500]], 2)
  assert [[(w.pair, w.rank) for w in ws] for ws in work] == [[(0, None), (1, None)], [(2, None)]]


# A coordinator that dies between two calls of one exchange: the store answers one call and fails the next.
_LOST_MID_EXCHANGE = """
import sys
from parity_jax.runtime import Job

class Client:
  def key_value_try_get(self, key):
    return "1"  # the count of parts is there...
  def blocking_key_value_get_bytes(self, key, timeout_ms):
    raise RuntimeError("UNAVAILABLE: recvmsg:Connection reset by peer")  # ...but the store is gone
  def key_value_set_bytes(self, key, value):
    raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
  key_value_set = key_value_set_bytes

job = Job(Client(), 1, 2, 5.0, "t")
job.on_abort(lambda: print("cleanup ran", flush=True))
getattr(job, sys.argv[1])(*[a.encode() if i else a for i, a in enumerate(sys.argv[2:])])  # publish takes bytes
print("returned", flush=True)
"""


@pytest.mark.parametrize("call", [["try_get", "k"], ["publish", "k", "v"]], ids=["read", "write"])
def test_a_store_lost_mid_exchange_is_one_line_and_exit_2(call):
  p = subprocess.run(
      [sys.executable, "-c", _LOST_MID_EXCHANGE, *call], cwd=H.REPO, capture_output=True, text=True, timeout=60
  )
  assert p.returncode == 2, p.stdout + p.stderr
  assert p.stdout == "cleanup ran\n"  # the job's clean-ups ran; the call never returned
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and "lost process 0 (the coordinator) of 2" in lines[0] and "UNAVAILABLE" in lines[0], lines
