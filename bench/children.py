"""What the checkpoint benchmarks share: one task in a fresh child, the best of repeats, the naive reference.

A benchmark script runs each measured task as ``python <script> --child TASK --args JSON`` and reads
its one-line JSON result; peak memory is the child's ``ru_maxrss`` from ``os.wait4`` (the child reports
its RSS after imports as ``baseline_rss``). The naive reference restores both full trees with orbax and
compares every leaf pair's bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss() -> int:
  """This process's resident set size now, in bytes (``VmRSS``)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def run_child(script: str, task: str, **args: Any) -> dict:
  """Runs ``task`` of ``script`` in a fresh child; its result plus peak RSS from wait4's rusage."""
  cmd = [sys.executable, os.path.abspath(script), "--child", task, "--args", json.dumps(args)]
  with tempfile.TemporaryFile(mode="w+") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    out_text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
      err.seek(0)
      raise SystemExit(f"{task} failed ({proc.returncode}):\n{err.read()[-3000:]}")
  result = json.loads(out_text.strip().splitlines()[-1])
  result["peak_rss"] = usage.ru_maxrss * 1024  # Linux: KiB
  result["peak_above_baseline"] = result["peak_rss"] - result["baseline_rss"]
  return result


def best(runs: list[dict]) -> dict:
  """The fastest of repeated runs, with the largest peak of any of them (and every run kept)."""
  out = dict(min(runs, key=lambda r: r["seconds"]))
  out["peak_above_baseline"] = max(r["peak_above_baseline"] for r in runs)
  out["passed"] = all(r.get("passed", True) for r in runs)
  out["runs"] = [{k: r[k] for k in ("seconds", "peak_above_baseline")} for r in runs]
  return out


class _ShapeOnly:
  """What ``RemapSpec.bind`` needs of a source leaf."""

  def __init__(self, shape):
    self.shape, self.kind = tuple(shape), "array"


def naive_restore_compare(source: str, migrated: str, spec: str, *, numpy: bool) -> tuple[bool, int]:
  """The reference: both full trees restored by orbax (jax arrays, or numpy), then ``bit_equal`` per pair.

  Returns (every pair bit-identical and nothing extra, number of pairs).
  """
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  from parity_jax import arraydiff
  from parity_jax.checkpoint import RemapSpec, open_checkpoint
  from parity_jax.checkpoint.keypath import flatten
  from parity_jax.checkpoint.formats.tstore import quiet_orbax

  def restore(path):
    item = open_checkpoint(path).item_dir
    with quiet_orbax():
      if numpy:
        meta = ocp.PyTreeCheckpointer().metadata(item).item_metadata.tree
        ra = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(restore_args=ra))
      return ocp.PyTreeCheckpointer().restore(item)

  src = flatten(restore(source))
  mig = flatten(restore(migrated))
  plan = RemapSpec.from_json(spec).bind({p: _ShapeOnly(np.shape(v)) for p, v in src.items()})
  ok = all(
      arraydiff.bit_equal(p.transform.apply(np.asarray(src[p.source])), np.asarray(mig[p.dest])) for p in plan.leaves
  )
  return bool(ok) and len(mig) == len(plan.leaves), len(plan.leaves)
