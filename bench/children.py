"""What the checkpoint benchmarks share: one task in a fresh child, the best of repeats, the naive reference.

A benchmark script runs each measured task as ``python <script> --child TASK --args JSON`` and reads
its one-line JSON result; peak memory is the child's ``ru_maxrss`` from ``os.wait4`` (the child reports
its RSS after imports as ``baseline_rss``). :func:`measure` runs a set of tasks ``reps`` times each, plus
an ``idle`` task (the same imports, no work) whose peak RSS is the baseline of :func:`memory_bound`'s
figure. The naive reference restores both full trees with orbax and compares every leaf pair's bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss() -> int:
  """This process's resident set size now, in bytes (``VmRSS``)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def conversion_parser(doc: str) -> argparse.ArgumentParser:
  """The flags of the conversion benches (a Qwen2.5-0.5B shape scaled by --scale), and the --child/--args pair
  that :func:`run_child` passes to a child."""
  ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  ap.add_argument("--scale", type=float, default=0.125)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--child")
  ap.add_argument("--args")
  return ap


def ran_as_child(a: argparse.Namespace, child: Any) -> bool:
  """Runs ``child(task, args)`` when this process is a child :func:`run_child` started; False otherwise."""
  if not a.child:
    return False
  child(a.child, json.loads(a.args))
  return True


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


def measure(script: str, tasks: Sequence[str], reps: int, **args: Any) -> dict[str, dict]:
  """Each of ``tasks`` run ``reps`` times in fresh children (interleaved), the best of each (:func:`best`), and
  ``idle``: one run of the script's ``idle`` task (its imports only), whose ``peak_rss`` is the idle baseline;
  every task's ``peak_above_idle`` is its largest ``peak_rss`` minus that."""
  runs: dict[str, list[dict]] = {t: [] for t in tasks}
  for _ in range(reps):
    for t in tasks:
      runs[t].append(run_child(script, t, **args))
  idle = run_child(script, "idle", **args)
  out = {t: best(r) for t, r in runs.items()}
  for t, r in out.items():
    r["peak_rss"] = max(x["peak_rss"] for x in runs[t])
    r["peak_above_idle"] = r["peak_rss"] - idle["peak_rss"]
  out["idle"] = idle
  return out


def machine() -> str:
  """The CPU model, core count and load average (others' jobs on a shared machine show there)."""
  name = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
  except OSError:
    pass
  return f"{name}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start"


def largest_chunk(path: str, slab_bytes: int, *, written: bool = False) -> tuple[int, str]:
  """(bytes, leaf) of the largest piece of checkpoint ``path`` that must be decoded (or, ``written``, encoded)
  whole: a leaf read by byte range (safetensors, raw memory-mapped chunks) only ever needs ``slab_bytes`` of it
  at a time; any other leaf its storage chunk (the whole leaf when it has none). A written leaf is encoded a
  storage chunk at a time whatever its reads cost."""
  from parity_jax.checkpoint import open_checkpoint

  best_size, best_leaf = 0, ""
  for m in open_checkpoint(path).leaves.values():
    if m.dtype is None or not m.shape:
      continue
    if m.box_reads and not written:
      size = min(m.nbytes, slab_bytes)
    else:
      chunk = m.shape if m.chunk_shape is None else tuple(min(c, d) for c, d in zip(m.chunk_shape, m.shape))
      size = math.prod(chunk) * m.dtype.itemsize
    if size > best_size:
      best_size, best_leaf = size, m.path
  return best_size, best_leaf


def memory_bound(peak_above_idle: int, chunks: Sequence[tuple[int, str]]) -> dict:
  """Issue 17's bound: the peak above the idle child within 2x the largest chunk either side must decode whole,
  plus 64 MiB."""
  size, leaf = max(chunks)
  bound = 2 * size + (64 << 20)
  return {
      "figure": peak_above_idle,
      "largest_chunk": size,
      "largest_chunk_leaf": leaf,
      "bound": bound,
      "met": peak_above_idle <= bound,
  }


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
