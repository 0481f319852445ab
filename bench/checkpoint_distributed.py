"""Benchmark: the verifier and the migrator as jobs of 1 vs 2 processes (jax.distributed on 127.0.0.1, gloo).

  flock -x /tmp/parity_cpu.lock .venv/bin/python -m bench.checkpoint_distributed [--what=verify|migrate|both]
      [--scale=1] [--reps=2] [--keep]

Writes a source tree of several leaves (at --scale=1: 1.19 GiB, the largest a
768 MiB float32 leaf, one zstd-compressed orbax chunk per 64 MiB row-major
block) and its migration with the streaming migrator (64 MiB uncompressed
chunks, squeeze of a leading axis), then runs ``python -m
tools.verify_migration`` on them as one process and as two processes of one
job, ``--reps`` times each, interleaved. For each run: wall time from the
start of the processes to the last exit (imports and runtime start included),
the values phase of each process (from the report), bytes read per process,
peak RSS per process (``os.wait4`` rusage of each child). Files are read from
a warm page cache (cat'ed first). Prints a table and a JSON blob.

``--what=migrate`` runs ``python -m tools.migrate_checkpoint`` on the same
source (same spec, 64 MiB uncompressed chunks) three ways, ``--reps`` times
each, interleaved, each into a fresh destination that is removed afterwards:
the streaming migrator (one process, orbax's partial save), the job with one
process and the job with two processes. Same figures per run (wall, the
migrator's own time from ``--report``, bytes read per process, peak RSS and
CPU-s per process from ``os.wait4``; for a job these include the supervising
parent, whose child does the work). Every migrated checkpoint is checked
against the first with the single-process verifier before it is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20

SPEC = {
    "rules": [
        {"match": r"^params/(?P<n>\w+)$", "to": r"params/\g<n>", "squeeze": [0]},
        {"match": r"^(opt/.+|step)$", "to": r"\1"},
    ],
    "group_depth": 1,
}


def _shapes(scale: float) -> dict[str, tuple[tuple[int, ...], str]]:
  rows = lambda n: max(64, int(n * scale))  # noqa: E731
  return {
      "params/big": ((1, rows(49152), 4096), "float32"),  # 768 MiB at scale 1
      "params/wide": ((1, 4096, rows(8192)), "float32"),  # 128 MiB
      "params/emb": ((1, rows(16384), 2048), "bfloat16"),  # 64 MiB
      "opt/mu": ((rows(32768), 2048), "float32"),  # 256 MiB
      "opt/small": ((rows(1024), 1024), "float32"),  # 4 MiB
      "step": ((), "int64"),
  }


def _generate(dest: str, scale: float) -> None:
  sys.path.insert(0, REPO)
  import ml_dtypes
  import numpy as np
  from orbax.checkpoint import v1 as ocp_v1

  from parity_jax.checkpoint.formats.orbax_writer import row_major_chunks
  from parity_jax.checkpoint.formats.tstore import quiet_orbax
  from parity_jax.checkpoint.keypath import nest

  rng = np.random.default_rng(0)
  flat: dict = {}
  for path, (shape, dtype) in _shapes(scale).items():
    if dtype == "int64":
      v = np.array(7, np.int64)
    else:
      v = rng.standard_normal(shape, dtype=np.float32)
      if dtype == "bfloat16":
        v = v.astype(ml_dtypes.bfloat16)
    flat[path] = v
  tree = nest(flat)
  ctx = ocp_v1.Context()
  ctx.memory.deepcopy_host_arrays = False
  ctx.array.saving.storage_options.chunk_byte_size = 64 * MIB
  with ctx, quiet_orbax(), row_major_chunks():
    ocp_v1.save(dest, tree)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(n: int, args: list[str], report_dir: str) -> dict:
  port = _free_port()
  procs = []
  t0 = time.perf_counter()
  for i in range(n):
    extra = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"] if n > 1 else []
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.verify_migration",
                *args,
                f"--report={report_dir}/r{n}.json",
                "--overwrite",
                "--noprogress",
                *extra,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )
  peaks, rcs, cpu = {}, {}, {}
  left = {p.pid: i for i, p in enumerate(procs)}
  while left:
    pid, status, ru = os.wait4(-1, 0)
    if pid in left:
      i = left.pop(pid)
      peaks[i] = ru.ru_maxrss * 1024
      cpu[i] = ru.ru_utime + ru.ru_stime
      rcs[i] = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t0
  for p in procs:
    p.stdout.close()
    p.stderr.close()
  if any(rcs.values()):
    raise SystemExit(f"verify with {n} process(es) failed: {rcs}")
  rep = json.load(open(f"{report_dir}/r{n}.json"))
  per = rep.get("distributed", {}).get("per_process") or [
      {"process": 0, "bytes_read": rep["bytes_read"], "hash_reread_bytes": 0}
  ]
  return {
      "wall_s": wall,
      "cpu_s": [cpu[i] for i in range(n)],
      "elapsed_s": rep["elapsed_s"],
      "peak_rss": [peaks[i] for i in range(n)],
      "bytes_read": [p["bytes_read"] for p in per],
      "hash_reread": [p["hash_reread_bytes"] for p in per],
      "values_s": [p.get("values_s") for p in per],
      "split": rep.get("distributed", {}).get("split_leaves"),
      "verdict": rep["verdict"],
  }


def _wait_all(procs) -> tuple[dict, dict, dict]:
  peaks, rcs, cpu = {}, {}, {}
  left = {p.pid: i for i, p in enumerate(procs)}
  while left:
    pid, status, ru = os.wait4(-1, 0)
    if pid in left:
      i = left.pop(pid)
      peaks[i] = ru.ru_maxrss * 1024
      cpu[i] = ru.ru_utime + ru.ru_stime
      rcs[i] = os.waitstatus_to_exitcode(status)
  return peaks, rcs, cpu


def _migrate_run(mode: str, args: list[str], root: str, tag: str) -> dict:
  """``mode``: "single" (the streaming migrator), "job1" or "job2" (the job with 1 or 2 processes)."""
  n = {"single": 1, "job1": 1, "job2": 2}[mode]
  dest, report = f"{root}/out_{tag}", f"{root}/out_{tag}.json"
  port = _free_port()
  procs = []
  t0 = time.perf_counter()
  for i in range(n):
    extra = (
        []
        if mode == "single"
        else [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"]
    )
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.migrate_checkpoint",
                *args,
                f"--dest={dest}",
                f"--report={report}",
                "--noprogress",
                *extra,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )
  peaks, rcs, cpu = _wait_all(procs)
  wall = time.perf_counter() - t0
  errs = [p.stderr.read().decode(errors="replace") for p in procs]
  for p in procs:
    p.stdout.close()
    p.stderr.close()
  if any(rcs.values()):
    raise SystemExit(f"migrate ({mode}) failed: {rcs} {errs}")
  rep = json.load(open(report))
  per = (rep.get("distributed") or {}).get("per_process") or [{"process": 0, "bytes_read": rep["nbytes"]}]
  return {
      "mode": mode,
      "wall_s": wall,
      "elapsed_s": rep["elapsed_s"],
      "cpu_s": [cpu[i] for i in range(n)],
      "peak_rss": [peaks[i] for i in range(n)],
      "bytes_read": [p["bytes_read"] for p in per],
      "write_s": [p.get("write_s") for p in per],
      "merge_s": (rep.get("distributed") or {}).get("merge_s"),
      "split": (rep.get("distributed") or {}).get("split_leaves"),
      "dest": dest,
      "report": report,
  }


def _bench_migrate(a, root: str, src: str, spec: str, total: int, largest: int) -> dict:
  sys.path.insert(0, REPO)
  from parity_jax.checkpoint import verify_migration

  args = [f"--source={src}", f"--spec={spec}"]
  modes = ("single", "job1", "job2")
  runs: dict[str, list[dict]] = {m: [] for m in modes}
  reference = None
  for rep in range(a.reps):
    for m in modes:
      r = _migrate_run(m, args, root, f"{m}{rep}")
      v = verify_migration(src, r["dest"], spec)  # each result proves itself before it is timed again
      if not v.passed:
        raise SystemExit(f"migrate ({m}) produced a checkpoint that does not verify: {v.verdict_line()}")
      hashes = [(e.migrated_path, e.sha256) for e in v.leaves]
      if reference is None:
        reference = hashes
      elif hashes != reference:
        raise SystemExit(f"migrate ({m}) produced different leaves from the first run")
      shutil.rmtree(r["dest"])
      os.remove(r["report"])
      runs[m].append(r)
  best = {m: min(rs, key=lambda r: r["wall_s"]) for m, rs in runs.items()}
  peak = {m: [max(r["peak_rss"][i] for r in rs) for i in range(len(rs[0]["peak_rss"]))] for m, rs in runs.items()}
  names = {"single": "1 (streaming migrator)", "job1": "1 (job)", "job2": "2 (job)"}
  print(
      f"migrate: tree {total / MIB:.0f} MiB, largest leaf {largest / MIB:.0f} MiB; {os.cpu_count()} cores;"
      f" {platform.processor() or platform.machine()}"
  )
  print(
      "| processes | wall (start to last exit) | migrate (process 0) | throughput (wall) | bytes read per process |"
      " write phase per process | merge | peak RSS per process | CPU-s per process |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for m in modes:
    b = best[m]
    merge = "-" if b["merge_s"] is None else f"{b['merge_s']:.2f} s"
    print(
        f"| {names[m]} | {b['wall_s']:.2f} s | {b['elapsed_s']:.2f} s | {total / b['wall_s'] / 2**30:.2f} GiB/s |"
        f" {', '.join(f'{x / MIB:.0f} MiB' for x in b['bytes_read'])} |"
        f" {', '.join(f'{x:.2f} s' for x in b['write_s'] if x is not None) or '-'} |"
        f" {merge} |"
        f" {', '.join(f'{x / MIB:.0f} MiB' for x in peak[m])} |"
        f" {', '.join(f'{x:.1f}' for x in b['cpu_s'])} |"
    )
  ratios = {
      ref: {
          "wall": best[ref]["wall_s"] / best["job2"]["wall_s"],
          "inside": min(r["elapsed_s"] for r in runs[ref]) / min(r["elapsed_s"] for r in runs["job2"]),
      }
      for ref in ("single", "job1")
  }
  for ref, r in ratios.items():
    print(
        f"throughput ratio 2 processes vs {names[ref]}: {r['wall']:.2f}x wall, {r['inside']:.2f}x inside migrate"
        f" (target >= 1.7x)"
    )
  return {"runs": runs, "ratios": ratios, "split": best["job2"]["split"]}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--what", choices=("verify", "migrate", "both"), default="verify")
  ap.add_argument("--scale", type=float, default=1.0)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--keep", action="store_true")
  ap.add_argument("--_prepare", default=None, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a._prepare:
    root = a._prepare
    _generate(f"{root}/src", a.scale)
    json.dump(SPEC, open(f"{root}/spec.json", "w"))
    sys.path.insert(0, REPO)
    from parity_jax.checkpoint import migrate

    migrate(f"{root}/src", f"{root}/mig", f"{root}/spec.json")
    return
  root = tempfile.mkdtemp(prefix="parity_dist_bench_")
  try:
    src, mig, spec = f"{root}/src", f"{root}/mig", f"{root}/spec.json"
    t = time.perf_counter()
    # in a child: the children timed below must not inherit this process's RSS high-water mark through fork
    subprocess.run(
        [sys.executable, "-m", "bench.checkpoint_distributed", "--_prepare", root, f"--scale={a.scale}"],
        cwd=REPO,
        check=True,
    )
    sys.path.insert(0, REPO)
    from parity_jax.checkpoint import open_checkpoint

    print(f"generated and migrated in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    total = open_checkpoint(src).nbytes
    largest = max(m.nbytes for m in open_checkpoint(src).leaves.values())
    subprocess.run(f"cat $(find {src} {mig} -type f) > /dev/null", shell=True, check=True)
    if a.what in ("migrate", "both"):
      out = _bench_migrate(a, root, src, spec, total, largest)
      print(json.dumps({"what": "migrate", "scale": a.scale, "total_bytes": total, "largest": largest, **out}))
      if a.what == "migrate":
        return
    args = [f"--source={src}", f"--migrated={mig}", f"--spec={spec}"]
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(a.reps):
      for n in (1, 2):
        runs[n].append(_run(n, args, root))
    best = {n: min(rs, key=lambda r: r["wall_s"]) for n, rs in runs.items()}
    peak = {n: [max(r["peak_rss"][i] for r in rs) for i in range(n)] for n, rs in runs.items()}
    print(
        f"tree: {total / MIB:.0f} MiB per side, largest leaf {largest / MIB:.0f} MiB; {os.cpu_count()} cores;"
        f" {platform.processor() or platform.machine()}"
    )
    print(
        "| processes | wall (start to last exit) | verify_migration (process 0) | values phase per process |"
        " throughput (both sides, wall) |"
        " bytes read per process | hash re-read | peak RSS per process | CPU-s per process |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in (1, 2):
      b = best[n]
      print(
          f"| {n} | {b['wall_s']:.2f} s | {b['elapsed_s']:.2f} s | {', '.join(f'{v:.2f} s' for v in b['values_s'] if v is not None) or '-'} |"
          f" {2 * total / b['wall_s'] / 2**30:.2f} GiB/s |"
          f" {', '.join(f'{x / MIB:.0f} MiB' for x in b['bytes_read'])} |"
          f" {', '.join(f'{x / MIB:.0f} MiB' for x in b['hash_reread'])} |"
          f" {', '.join(f'{x / MIB:.0f} MiB' for x in peak[n])} |"
          f" {', '.join(f'{x:.1f}' for x in b['cpu_s'])} |"
      )
    ratio = best[1]["wall_s"] / best[2]["wall_s"]
    inner = min(r["elapsed_s"] for r in runs[1]) / min(r["elapsed_s"] for r in runs[2])
    print(
        f"throughput ratio 2 vs 1 processes: {ratio:.2f}x wall, {inner:.2f}x inside verify_migration (target >= 1.7x)"
    )
    print(
        json.dumps(
            {
                "scale": a.scale,
                "total_bytes": total,
                "largest": largest,
                "runs": runs,
                "ratio": ratio,
                "ratio_inside": inner,
            }
        )
    )
  finally:
    if not a.keep:
      shutil.rmtree(root, ignore_errors=True)
    else:
      print(f"kept {root}", file=sys.stderr)


if __name__ == "__main__":
  main()
