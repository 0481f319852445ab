"""Benchmark: streaming migrator and value-exact verifier vs. a naive full restore.

  flock /tmp/parity_bench.lock /work/venv/bin/python bench/checkpoint_migration.py [--scale=1.0] [--keep]

Generates a checkpoint of several leaves, the largest 1 GiB at --scale=1
(float32 (1, 65536, 4096)), in two storage layouts (orbax's default single
chunk per leaf, and 64 MiB chunks), migrates both with the streaming migrator
(64 MiB chunks, and one big chunk per leaf), then measures, each in a fresh
subprocess (peak RSS from ``os.wait4``'s rusage of that child, i.e.
``getrusage`` for exactly that process; baseline = the child's RSS after its
imports, right before the work):

* migrator peak RSS above baseline / largest leaf          (target <= 1.5x)
* verifier peak RSS above baseline / largest leaf, single-chunk storage (target <= 2.2x)
* verifier peak RSS above baseline vs 2 x chunk + 64 MiB, chunked storage
* naive full restore of both trees + leaf-by-leaf bit compare: peak RSS and time
* verifier throughput (bytes of both trees / s) vs the naive restore (target >= 2x)
  and as a fraction of ``cat`` of the same files (page cache warm).

Verifier and naive runs are repeated ``--reps`` times, interleaved; the fastest
time and the largest peak of the repeats are reported (page-fault costs on this
VM swing with what ran just before, which otherwise favours whichever side runs
right after another process freed its memory).

Everything is read from the page cache (files are cat'ed first). Prints one
table and a JSON blob; the generated checkpoints under /tmp are removed at
the end unless --keep.
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
GIB = 1 << 30

SPEC = {
    "rules": [
        {
            "match": r"^components/(?P<l>\d+)/g/(?P<vu>[VU])$",
            "to": r"components/layers.\g<l>.mlp.gate_proj/\g<vu>",
            "squeeze": [0],
        },
        {
            "match": r"^components/(?P<l>\d+)/u/(?P<vu>[VU])$",
            "to": r"components/layers.\g<l>.mlp.up_proj/\g<vu>",
            "squeeze": [0],
        },
        {"match": r"^(opt/.+|step)$", "to": r"\1"},
    ],
    "group_depth": 1,
}


def _shapes(scale: float) -> dict[str, tuple[tuple[int, ...], str]]:
  rows = max(64, int(65536 * scale))
  return {
      "components/0/g/V": ((1, rows, 4096), "float32"),  # the big one: 1 GiB at scale 1
      "components/0/g/U": ((1, 4096, max(64, int(8192 * scale))), "float32"),  # 128 MiB, wide (column blocks)
      "components/0/u/V": ((1, max(64, int(4096 * scale)), 4096), "bfloat16"),  # 32 MiB
      "components/0/u/U": ((1, 4096, 1024), "bfloat16"),  # 8 MiB
      "opt/mu": ((max(64, int(8192 * scale)), 1024), "float32"),  # 32 MiB
      "step": ((), "int64"),
  }


# ---------------------------------------------------------------------------------------------
# Child tasks (run in fresh processes)


def _child(task: str, args: dict) -> dict:
  sys.path.insert(0, REPO)
  import numpy as np  # noqa: F401
  import ml_dtypes  # noqa: F401
  import orbax.checkpoint as ocp  # noqa: F401
  from orbax.checkpoint import v1 as ocp_v1  # noqa: F401

  from parity_jax import arraydiff  # noqa: F401
  from parity_jax.checkpoint import migrate, verify_migration  # noqa: F401
  from parity_jax.checkpoint.formats.tstore import quiet_orbax
  from parity_jax.checkpoint.keypath import nest

  import jax  # noqa: F401

  baseline = children.rss()
  t0 = time.perf_counter()
  out: dict = {}
  if task == "generate":
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(0)
    flat: dict = {}
    for path, (shape, dtype) in _shapes(args["scale"]).items():
      if dtype == "int64":
        value = np.array(123456789012, np.int64)
      else:
        value = rng.standard_normal(shape, dtype=np.float32)
        if dtype == "bfloat16":
          value = value.astype(ml_dtypes.bfloat16)
      flat[path] = value
    tree = nest(flat)
    import contextlib

    from parity_jax.checkpoint.formats.orbax_writer import row_major_chunks

    ctx = ocp_v1.Context()
    ctx.memory.deepcopy_host_arrays = False
    if args["chunk_mb"]:
      ctx.array.saving.storage_options.chunk_byte_size = int(args["chunk_mb"] * MIB)
    with ctx, quiet_orbax(), row_major_chunks() if args.get("row_major") else contextlib.nullcontext():
      ocp_v1.save(args["dest"], tree)
  elif task == "migrate":
    migrate(
        args["source"],
        args["dest"],
        args["spec"],
        chunk_mb=args["chunk_mb"],
        compression=args.get("compression", "none"),
    )
  elif task == "verify":
    rep = verify_migration(
        args["source"], args["migrated"], args["spec"], spill_dir=args["spill_dir"], readahead=args.get("readahead", 0)
    )
    out["passed"] = rep.passed
    out["bytes_read"] = rep.bytes_read
    out["modes"] = {r.migrated_path: r.read_mode for r in rep.leaves}
  elif task == "decode_floor":
    # tensorstore alone decoding the leaf into its cache (no copy out): the least any reader of a
    # single-chunk zstd leaf holds at once (compressed + decoded chunk).
    from parity_jax.checkpoint import open_checkpoint

    ck = open_checkpoint(args["source"])
    meta = ck.leaves[args["leaf"]]
    with ck.reader(meta, cache_bytes=int(meta.nbytes * 1.1)) as r:
      baseline = children.rss()
      t0 = time.perf_counter()
      r.read(tuple(slice(0, 1) for _ in meta.shape))
  elif task == "naive":
    out["passed"], out["n_leaves"] = children.naive_restore_compare(
        args["source"], args["migrated"], args["spec"], numpy=args["numpy"]
    )
  else:
    raise SystemExit(f"unknown task {task}")
  out.update(task=task, baseline_rss=baseline, seconds=time.perf_counter() - t0)
  return out


# ---------------------------------------------------------------------------------------------
# Parent


def _run(task: str, **args) -> dict:
  """Runs one task in a fresh child (see :mod:`bench.children`)."""
  return children.run_child(__file__, task, **args)


def _files(*dirs: str) -> list[str]:
  out = []
  for d in dirs:
    for root, _, names in os.walk(d):
      out.extend(os.path.join(root, n) for n in names)
  return out


def _du(*dirs: str) -> int:
  return sum(os.path.getsize(f) for f in _files(*dirs))


def _cat_seconds(*dirs: str) -> float:
  files = _files(*dirs)
  subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    best = min(best, time.perf_counter() - t0)
  return best


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--scale", type=float, default=1.0, help="1.0: largest leaf 1 GiB")
  ap.add_argument("--workdir", default=None, help="where to generate (default: a new dir under /tmp)")
  ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
  ap.add_argument("--reps", type=int, default=2, help="runs of each verifier/naive measurement (fastest reported)")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--args", default="{}", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    print(json.dumps(_child(a.child, json.loads(a.args))))
    return

  work = a.workdir or tempfile.mkdtemp(prefix="parity_bench_ckpt_", dir="/tmp")
  os.makedirs(work, exist_ok=True)
  spec = os.path.join(work, "spec.json")
  with open(spec, "w") as f:
    json.dump(SPEC, f)
  shapes = _shapes(a.scale)
  import numpy as np
  import ml_dtypes

  sizes = {
      p: int(np.prod(s)) * np.dtype(ml_dtypes.bfloat16 if d == "bfloat16" else d).itemsize
      for p, (s, d) in shapes.items()
  }
  largest = max(sizes.values())
  total = sum(sizes.values())
  chunk = 64 * MIB
  names = (
      "src_single",
      "src_rowmajor",
      "src_orbax_chunked",
      "mig_chunked",
      "mig_single",
      "mig_from_rowmajor",
      "mig_from_orbax_chunked",
      "mig_zstd",
  )
  d = {k: os.path.join(work, k) for k in names}
  results: dict = {
      "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
      "largest_leaf_bytes": largest,
      "tree_bytes": total,
      "chunk_bytes": chunk,
      "scale": a.scale,
  }
  lines = [
      f"{len(shapes)} leaves, {total / MIB:.0f} MiB per tree, largest leaf {largest / MIB:.0f} MiB,"
      f" chunk {chunk / MIB:.0f} MiB; peaks are RSS above the child's post-import baseline"
  ]

  def say(line: str) -> None:
    lines.append(line)
    print(line, flush=True)

  try:
    print(f"workdir {work}", flush=True)
    # Sources: orbax's default (one chunk per leaf, zstd); 64 MiB row-major chunks, zstd (the layout our
    # migrator writes, compressed like orbax); 64 MiB chunks chosen by orbax's own heuristic (column blocks
    # for wide leaves).
    _run("generate", dest=d["src_single"], scale=a.scale, chunk_mb=0)
    _run("generate", dest=d["src_rowmajor"], scale=a.scale, chunk_mb=64, row_major=True)
    _run("generate", dest=d["src_orbax_chunked"], scale=a.scale, chunk_mb=64)
    _cat_seconds(d["src_single"])
    fl = _run("decode_floor", source=d["src_single"], leaf="components/0/g/V")
    results["decode_floor single-chunk zstd leaf"] = fl
    say(
        f"-- tensorstore alone decoding the largest leaf of the single-chunk source into its cache: peak"
        f" +{fl['peak_above_baseline'] / MIB:.0f} MiB = {fl['peak_above_baseline'] / largest:.2f}x (compressed +"
        f" decoded chunk; the floor for any reader of that leaf)"
    )
    say("-- migrator (peak over largest leaf; target <= 1.5x)")
    for name, src, out, cmb, comp in [
        ("from single-chunk source", "src_single", "mig_chunked", 64, "none"),
        ("from row-major chunked source", "src_rowmajor", "mig_from_rowmajor", 64, "none"),
        ("from orbax-chunked source", "src_orbax_chunked", "mig_from_orbax_chunked", 64, "none"),
        ("single-chunk output", "src_single", "mig_single", 4096, "none"),
        ("zstd output, chunked source", "src_rowmajor", "mig_zstd", 64, "zstd"),
    ]:
      _cat_seconds(d[src])
      r = _run("migrate", source=d[src], dest=d[out], spec=spec, chunk_mb=cmb, compression=comp)
      results[f"migrate {name}"] = r
      say(
          f"migrate {name:30s} peak +{r['peak_above_baseline'] / MIB:6.0f} MiB = {r['peak_above_baseline'] / largest:.2f}x;"
          f" {r['seconds']:5.1f}s ({total / r['seconds'] / MIB:.0f} MiB/s)"
      )
    say("-- verifier vs naive full restore of both trees (same files, page cache warm)")
    for label, src, mig, readahead in [
        ("single-chunk storage", "src_single", "mig_single", 0),
        ("chunked storage", "src_rowmajor", "mig_from_rowmajor", 0),
        ("chunked storage, readahead=1", "src_rowmajor", "mig_from_rowmajor", 1),
        ("chunked storage, readahead=2", "src_rowmajor", "mig_from_rowmajor", 2),
        ("single-chunk src -> chunked", "src_single", "mig_chunked", 0),
        ("orbax-chunked src -> chunked", "src_orbax_chunked", "mig_from_orbax_chunked", 0),
        ("orbax-chunked, readahead=1", "src_orbax_chunked", "mig_from_orbax_chunked", 1),
    ]:
      cat_s = _cat_seconds(d[src], d[mig])
      nbytes = _du(d[src], d[mig])
      r = {"files_bytes": nbytes, "cat_seconds": cat_s}
      key = (src, mig)
      naive = results.setdefault("_naive", {})
      runs: dict = {"verify": []}
      for _ in range(a.reps):  # interleaved, so that neither side always runs on a freshly freed page pool
        runs["verify"].append(
            _run("verify", source=d[src], migrated=d[mig], spec=spec, spill_dir=work, readahead=readahead)
        )
        if len(naive.get(key, ([], []))[0]) < a.reps:
          jn = naive.setdefault(key, ([], []))
          jn[0].append(_run("naive", source=d[src], migrated=d[mig], spec=spec, numpy=False))
          jn[1].append(_run("naive", source=d[src], migrated=d[mig], spec=spec, numpy=True))
      r["verify"] = v = children.best(runs["verify"])
      nj, nn = children.best(naive[key][0]), children.best(naive[key][1])
      r["naive_jax"], r["naive_numpy"] = nj, nn
      assert v["passed"] and nj["passed"] and nn["passed"]
      results[f"verify {label}"] = r
      peak = v["peak_above_baseline"]
      extra = ""
      if label.startswith("chunked"):
        extra = f" = {peak / (2 * chunk + 64 * MIB):.2f}x (2 x chunk + 64 MiB)"
      say(f"verify {label:31s} peak +{peak / MIB:6.0f} MiB = {peak / largest:.2f}x largest leaf{extra}")
      say(
          f"  naive restore (jax / numpy)  peak +{nj['peak_above_baseline'] / MIB:6.0f} / +{nn['peak_above_baseline'] / MIB:.0f} MiB"
      )
      say(
          f"  time verify {v['seconds']:.1f}s vs naive {nj['seconds']:.1f}s / {nn['seconds']:.1f}s -> verifier"
          f" {nj['seconds'] / v['seconds']:.2f}x / {nn['seconds'] / v['seconds']:.2f}x the naive throughput;"
          f" {nbytes / v['seconds'] / MIB:.0f} MiB/s of files = {cat_s / v['seconds']:.3f} of cat"
          f" ({nbytes / cat_s / MIB:.0f} MiB/s)"
      )
  finally:
    if not a.keep:
      shutil.rmtree(work, ignore_errors=True)
  results.pop("_naive", None)
  print("\n".join(["", "SUMMARY"] + lines))
  print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
  main()
