"""SVF all-selected spread over devices and processes: the report and our stage bundle are the single-device ones.

The reference runs here, on this process's one device; the spread runs are
tools.svf_parity in child processes with 8 forced host devices (tensors spread
over all 8, threads per device), and under jax.distributed as 2 processes of 2
devices each (gloo on CPU). The goldens are the committed ones re-summed in a
second float32 order (tests/helpers/svf.py), so there are real bf16 ties and
the explained-mismatch accounting has something to count.
"""

from __future__ import annotations

import copy
import json
import signal
import time

import pytest

from parity_jax.errors import UsageError
from parity_jax.files import file_sha256
from parity_jax.svf import replay
from tests.helpers import jobs
from tests.helpers import svf as svf_testlib
from tests.helpers.devices import device_env, run_module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Golden dir with real ties, and the single-device replay's report and stage bundle."""
  root = tmp_path_factory.mktemp("svf_devices")
  golden_dir, n_ties = svf_testlib.alternative_order_goldens(root / "golden")
  assert n_ties > 0
  res = replay(golden_dir=str(golden_dir), all_selected=True, stage_dir=str(root / "one"), chunk_mb=0.05, row_block=32)
  report = res.to_dict()
  assert report["summary"]["n_explained"] > 0 and report["summary"]["n_unexplained"] == 0
  assert report["backend"]["placement"]["devices"] == 1
  return {
      "golden": golden_dir,
      "report": report,
      "bundle": root / "one" / "svf_all_selected_stage_debug.safetensors",
      "root": root,
  }


def _comparable(report: dict) -> dict:
  """The report without where it ran (``backend``) and where our bundle went (``stage_debug``)."""
  r = copy.deepcopy(report)
  del r["backend"]
  r.pop("stage_debug")
  return r


def _check_placement(placement: dict, n_devices: int, n_processes: int) -> None:
  assert placement["devices"] == n_devices and placement["processes"] == n_processes
  assert len(set(placement["device_of_tensor"].values())) == n_devices  # 16 tensors: every device gets work
  loads = sorted(placement["gflop_per_device"].values())
  assert loads[-1] - loads[0] <= max(loads) / 2  # LPT: no device has more than the largest job over the least


def test_eight_devices_give_the_single_device_report_and_bundle(reference):
  out, stage_dir = reference["root"] / "eight.json", reference["root"] / "eight"
  p = run_module(
      "tools.svf_parity",
      [
          f"--golden_dir={reference['golden']}",
          "--all_selected_tensors",
          "--devices=0",
          f"--out={out}",
          f"--stage_dir={stage_dir}",
          "--chunk_mb=0.05",
          "--row_block=32",
          "--progress=false",
      ],
  )
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  report = json.loads(out.read_text())
  _check_placement(report["backend"]["placement"], 8, 1)
  assert _comparable(report) == _comparable(reference["report"])
  assert file_sha256(stage_dir / "svf_all_selected_stage_debug.safetensors") == file_sha256(reference["bundle"])


def test_two_processes_give_the_single_device_report(reference):
  out = reference["root"] / "two_processes.json"
  args = [
      f"--golden_dir={reference['golden']}",
      "--all_selected_tensors",
      f"--out={out}",
      "--chunk_mb=0.05",
      "--row_block=32",
      "--progress=false",
  ]
  # 2 x 2 devices: each process compiles for its own devices, so fewer keep the test quick
  procs = jobs.start("svf_parity", args, env=device_env(2))
  outs = jobs.finish(procs, timeout=240)
  for rc, so, se in outs:
    assert rc == 0, so[-2000:] + se[-3000:]
  assert "SVF parity PASS" in outs[0][1] and "SVF parity" not in outs[1][1]  # process 0 speaks for the run
  report = json.loads(out.read_text())
  _check_placement(report["backend"]["placement"], 4, 2)
  assert _comparable(report) == _comparable(reference["report"])


def test_bad_spread_arguments_are_usage_errors(reference):
  with pytest.raises(UsageError, match=r"devices must lie in \[0, 1\] \(0: all\), got 2"):
    replay(golden_dir=str(reference["golden"]), all_selected=True, devices=2)


def test_killing_process_0_makes_process_1_exit_2_with_one_line(reference, tmp_path):
  out = tmp_path / "r.json"
  args = [
      f"--golden_dir={reference['golden']}",
      "--all_selected_tensors",
      f"--out={out}",
      "--chunk_mb=0.05",
      "--row_block=32",
      "--progress=false",
      "--peer_timeout=30",
  ]
  # process 0 replays its tensors, then stalls before the results are gathered; process 1 waits in the gather
  procs = jobs.start("svf_parity", args, env=dict(device_env(2), PARITY_JAX_STALL="svf.gather@0"))
  jobs.wait_for_line(procs[0], "stalling")
  t0 = time.monotonic()
  procs[0].send_signal(signal.SIGKILL)
  (rc0, _, _), (rc1, out1, err1) = jobs.finish(procs, timeout=60)
  lines = [line for line in err1.splitlines() if line.strip()]
  assert rc0 == -signal.SIGKILL and rc1 == 2, (rc1, out1, err1)
  assert len(lines) == 1 and "error: lost process 0 (the coordinator)" in lines[0] and "Traceback" not in err1, err1
  assert time.monotonic() - t0 < 20 and not out.exists()
