"""Benchmark: the verifier on many leaves (leaves/s) vs. a naive full restore, and its peak memory.

  flock -x /tmp/parity_cpu.lock .venv/bin/python -m bench.checkpoint_small_leaves [--only=small|medium] [--reps=2]

Two trees, each written by orbax's own ``ocp.v1.save`` (OCDBT, zarr3, zstd,
one chunk per leaf: what a training script writes), migrated with
:func:`parity_jax.checkpoint.migrate` under a renaming spec (our default
layout: uncompressed, 64 MiB row-major chunks), then verified:

* ``small``: 5,000 leaves of float32 (64, 64) (16 KiB each, 78 MiB per tree),
  shaped like per-layer parameters x optimizer moments;
* ``medium``: 200 leaves of float32 (2048, 2048) (16 MiB each, 3.1 GiB per tree).

Each measurement runs in a fresh subprocess; peak RSS is that child's
``ru_maxrss`` from ``os.wait4`` minus its RSS after imports. The reference,
measured in the same run and interleaved with the verifier (``--reps`` times,
fastest time and largest peak reported), is the naive way: restore both full
trees with ``PyTreeCheckpointer().restore`` (as numpy arrays, and as jax
arrays) and compare every pair with :func:`parity_jax.arraydiff.bit_equal`.
Target: the verifier's leaves/s >= 2x the naive restore's on both trees.
Files are read from a warm page cache (cat'ed first). The generated
checkpoints under /tmp are removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import children  # noqa: E402

MIB = 1 << 20

SPEC = {
    "rules": [{"match": r"^params/(?P<rest>.+)$", "to": r"model/\g<rest>"}, {"match": r"^(opt/.+|step)$", "to": r"\1"}],
    "group_depth": 2,
}


def _tree_paths(n: int) -> list[str]:
  """``n`` leaf paths like a training state: per-layer params plus two optimizer moments of each."""
  per_layer = 8
  params = max(1, n // 3)
  out = [f"params/layer_{i // per_layer}/w{i % per_layer}" for i in range(params)]
  for moment in ("mu", "nu"):
    out += [f"opt/{moment}/layer_{i // per_layer}/w{i % per_layer}" for i in range(params)]
  k = 0
  while len(out) < n:  # round up to exactly n
    out.append(f"opt/extra/x{k}")
    k += 1
  return out[:n]


def _child(task: str, args: dict) -> dict:
  sys.path.insert(0, REPO)
  import numpy as np
  import orbax.checkpoint as ocp  # noqa: F401 -- loaded before the baseline RSS (the naive task uses it)
  from orbax.checkpoint import v1 as ocp_v1

  import jax  # noqa: F401

  from parity_jax import arraydiff  # noqa: F401
  from parity_jax.checkpoint import migrate, verify_migration
  from parity_jax.checkpoint.formats.tstore import quiet_orbax
  from parity_jax.checkpoint.keypath import nest

  baseline = children.rss()
  t0 = time.perf_counter()
  out: dict = {}
  if task == "generate":
    rng = np.random.default_rng(0)
    shape = tuple(args["shape"])
    tree = nest((p, rng.standard_normal(shape, dtype=np.float32)) for p in _tree_paths(args["n"]))
    tree["step"] = np.array(1234, np.int64)
    ctx = ocp_v1.Context()
    ctx.memory.deepcopy_host_arrays = False
    with ctx, quiet_orbax():
      ocp_v1.save(args["dest"], tree)
  elif task == "migrate":
    migrate(args["source"], args["dest"], args["spec"])
  elif task == "verify":
    rep = verify_migration(args["source"], args["migrated"], args["spec"])
    out["passed"] = rep.passed
    out["n_leaves"] = len(rep.leaves)
    modes: dict = {}
    for r in rep.leaves:
      modes[r.read_mode] = modes.get(r.read_mode, 0) + 1
    out["modes"] = modes
  elif task == "naive":
    out["passed"], out["n_leaves"] = children.naive_restore_compare(
        args["source"], args["migrated"], args["spec"], numpy=args["numpy"]
    )
  else:
    raise SystemExit(f"unknown task {task}")
  out.update(task=task, baseline_rss=baseline, seconds=time.perf_counter() - t0)
  return out


def _run(task: str, **args) -> dict:
  """Runs one task in a fresh child (see :mod:`bench.children`)."""
  return children.run_child(__file__, task, **args)


def _warm(*dirs: str) -> None:
  files = [os.path.join(root, n) for d in dirs for root, _, names in os.walk(d) for n in names]
  for i in range(0, len(files), 500):
    subprocess.run(["cat", *files[i : i + 500]], stdout=subprocess.DEVNULL, check=True)


CASES = {"small": {"n": 5000, "shape": [64, 64]}, "medium": {"n": 200, "shape": [2048, 2048]}}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", choices=sorted(CASES), default=None, help="run one case only")
  ap.add_argument("--reps", type=int, default=2, help="interleaved runs of verifier and naive restore (fastest kept)")
  ap.add_argument("--medium_leaves", type=int, default=CASES["medium"]["n"], help="leaves in the medium case")
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--keep", action="store_true")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--args", default="{}", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    print(json.dumps(_child(a.child, json.loads(a.args))))
    return
  cases = dict(CASES)
  cases["medium"] = dict(cases["medium"], n=a.medium_leaves)
  work = a.workdir or tempfile.mkdtemp(prefix="parity_bench_small_", dir="/tmp")
  os.makedirs(work, exist_ok=True)
  spec = os.path.join(work, "spec.json")
  with open(spec, "w") as f:
    json.dump(SPEC, f)
  results: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}"}
  lines = []

  def say(line: str) -> None:
    lines.append(line)
    print(line, flush=True)

  try:
    print(f"workdir {work}", flush=True)
    for name, case in cases.items():
      if a.only and name != a.only:
        continue
      src, mig = os.path.join(work, f"{name}_src"), os.path.join(work, f"{name}_mig")
      if not os.path.exists(src):
        g = _run("generate", dest=src, n=case["n"], shape=case["shape"])
        say(f"[{name}] generated {case['n']} leaves of float32 {tuple(case['shape'])} in {g['seconds']:.1f}s")
      if not os.path.exists(mig):
        m = _run("migrate", source=src, dest=mig, spec=spec)
        say(f"[{name}] migrated in {m['seconds']:.1f}s (peak +{m['peak_above_baseline'] / MIB:.0f} MiB)")
      _warm(src, mig)
      runs: dict = {"verify": [], "naive_numpy": [], "naive_jax": []}
      for _ in range(a.reps):
        runs["verify"].append(_run("verify", source=src, migrated=mig, spec=spec))
        runs["naive_numpy"].append(_run("naive", source=src, migrated=mig, spec=spec, numpy=True))
        runs["naive_jax"].append(_run("naive", source=src, migrated=mig, spec=spec, numpy=False))
      best = {k: children.best(v) for k, v in runs.items()}
      assert all(b["passed"] for b in best.values()), best
      n = best["verify"]["n_leaves"]
      rate = {k: n / b["seconds"] for k, b in best.items()}
      naive = max(rate["naive_numpy"], rate["naive_jax"])
      results[name] = {
          "n_leaves": n,
          "shape": case["shape"],
          **best,
          "leaves_per_s": rate,
          "ratio_vs_faster_naive": rate["verify"] / naive,
      }
      say(
          f"[{name}] {n} leaf pairs; verify {best['verify']['seconds']:.2f}s = {rate['verify']:.0f} leaves/s,"
          f" peak +{best['verify']['peak_above_baseline'] / MIB:.0f} MiB; modes {best['verify']['modes']}"
      )
      for k in ("naive_numpy", "naive_jax"):
        b = best[k]
        say(
            f"[{name}]   {k:12s} {b['seconds']:.2f}s = {rate[k]:.0f} leaves/s, peak +{b['peak_above_baseline'] / MIB:.0f} MiB"
            f" -> verifier {rate['verify'] / rate[k]:.2f}x"
        )
      say(f"[{name}] verifier / faster naive = {rate['verify'] / naive:.2f}x (target >= 2x)")
  finally:
    if not a.keep:
      shutil.rmtree(work, ignore_errors=True)
  print("\n".join(["", "SUMMARY"] + lines))
  print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
  main()
