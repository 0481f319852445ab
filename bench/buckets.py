"""Benchmark: verifying checkpoints in a bucket behind a 20 ms-per-request latency proxy (issue 18).

  flock -x /tmp/parity_cpu.lock .venv/bin/python -m bench.buckets [--leaves=1000] [--big_mb=64] [--delay_ms=20]

moto's S3 server (threads: many requests at once, like a real store) runs on 127.0.0.1; a
:class:`tests.helpers.http_proxy.DelayProxy` in front of it delays every request by ``--delay_ms`` and
counts requests in flight. Two pairs of trees are uploaded (both sides written locally first: the source
by orbax's own ``ocp.v1.save``, the migrated tree by our migrator), and the verify tool's library call
reads them from the bucket through the proxy. Figures, each against a reference measured in the same run:

1. ``--leaves`` small leaves: verify time with the default request concurrency vs one request at a
   time (``Limits.concurrency=1``); target >= 8x.
2. one ``--big_mb`` leaf: verify throughput (bytes read / s) vs one single-stream GET of the same
   number of bytes; target >= 4x.
3. bytes read / bytes stored (both trees) for a verify; target <= 1.05.
4. the bucket verify vs "download both trees (32 objects in flight), then verify locally"; target: faster,
   and no local disk.

With the big leaf, the harness's own ceiling: the same object read as 8 and 32 ranges in flight, and the
emulator's share of one core meanwhile (1.0: one core busy serving), to tell a product limit from the
harness's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _trees(root: str, tree: dict, name: str) -> tuple[str, str, str]:
  import orbax.checkpoint as ocp

  from parity_jax.checkpoint import migrate

  src = os.path.join(root, f"{name}_src")
  ocp.v1.save_pytree(src, tree)
  spec = os.path.join(root, f"{name}_spec.json")
  with open(spec, "w") as f:
    json.dump({"rules": [{"match": "(.*)", "to": "\\1"}]}, f)
  mig = os.path.join(root, f"{name}_mig")
  migrate(src, mig, spec)
  return src, mig, spec


def _verify(src: str, mig: str, spec: str, concurrency: int | None = None):
  from parity_jax import stores
  from parity_jax.checkpoint import verify_migration

  previous = stores.set_limits(**({"concurrency": concurrency} if concurrency else {}))
  try:
    t0 = time.perf_counter()
    rep = verify_migration(src, mig, spec)
    return time.perf_counter() - t0, rep
  finally:
    stores.set_limits(**previous.__dict__)


def _cpu(pid: int) -> float:
  """CPU seconds (user + system) used so far by process ``pid`` (Linux /proc)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--leaves", type=int, default=1000)
  ap.add_argument("--big_mb", type=int, default=64)
  ap.add_argument("--delay_ms", type=float, default=20.0)
  args = ap.parse_args()

  import numpy as np

  from parity_jax import stores
  from tests.helpers.objectstores import Bucket, Emulator

  root = tempfile.mkdtemp(prefix="parity_bench_buckets-")
  emu = Emulator.start("s3")
  out: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "args": vars(args)}
  try:
    rng = np.random.default_rng(0)
    small = {f"layer{i:04d}": rng.standard_normal(256).astype(np.float32) for i in range(args.leaves)}
    n = args.big_mb * (1 << 20) // 4
    big = {"w": rng.standard_normal(n).astype(np.float32)}
    b = Bucket(emu, emu.create_bucket())
    pairs = {}
    for name, tree in (("small", small), ("big", big)):
      s, m, spec = _trees(root, tree, name)
      pairs[name] = (b.upload_tree(s, f"{name}/src"), b.upload_tree(m, f"{name}/mig"), spec, s, m)
    with emu.proxy(args.delay_ms / 1000) as proxy:
      os.environ.update(emu.env_vars(endpoint=proxy.url))

      # 1: many small leaves, concurrent vs one request at a time
      s_url, m_url, spec, _, _ = pairs["small"]
      _verify(s_url, m_url, spec)  # warm-up: imports, compilation
      proxy.reset_stats()
      t_conc, rep = _verify(s_url, m_url, spec)
      conc_stats = proxy.stats()
      assert rep.passed, rep.text()
      t_one, rep1 = _verify(s_url, m_url, spec, concurrency=1)
      assert rep1.passed
      out["small_leaves"] = {
          "leaves": args.leaves,
          "verify_s": round(t_conc, 2),
          "one_at_a_time_s": round(t_one, 2),
          "speedup": round(t_one / t_conc, 1),
          "requests": conc_stats["requests"],
          "mean_in_flight": round(conc_stats["mean_in_flight"], 1),
          "peak_in_flight": conc_stats["peak_in_flight"],
      }

      # 2 + 3: one big leaf; throughput vs a single-stream GET of as many bytes; bytes read / stored
      s_url, m_url, spec, s_dir, m_dir = pairs["big"]
      stored = sum(len(b.get(k)) for k in b.keys("big/"))
      proxy.reset_stats()
      c0 = _cpu(emu.proc.pid)
      t_big, rep = _verify(s_url, m_url, spec)
      big_cpu = _cpu(emu.proc.pid) - c0
      big_stats = proxy.stats()
      assert rep.passed
      row = rep.io["s3"]
      keys = sorted(b.keys("big/"), key=lambda k: -len(b.get(k)))
      obj = stores.open_store(f"{b.url}/{keys[0]}")
      proxy.reset_stats()
      t0 = time.perf_counter()
      one = obj.read_bytes()
      t_single = time.perf_counter() - t0
      single_stats = proxy.stats()
      # the ceiling of this harness: the same object as 8 and 32 range reads in flight at once (what "more reads
      # in flight for one leaf" could reach here), and the emulator's CPU time during each read
      ceiling = {}
      for n_ranges in (8, 32):
        step = -(-len(one) // n_ranges)
        c0, t0 = _cpu(emu.proc.pid), time.perf_counter()
        parts = stores.read_many([(obj, a, min(a + step, len(one))) for a in range(0, len(one), step)])
        dt = time.perf_counter() - t0
        assert b"".join(parts) == one
        ceiling[f"{n_ranges}_ranges_mib_s"] = round(len(one) / dt / (1 << 20), 1)
        ceiling[f"{n_ranges}_ranges_emulator_cpu_share"] = round((_cpu(emu.proc.pid) - c0) / dt, 2)
      out["big_leaf"] = {
          "mib": args.big_mb,
          "verify_s": round(t_big, 2),
          "verify_mib_s": round(row["bytes_read"] / t_big / (1 << 20), 1),
          "single_stream_mib_s": round(len(one) / t_single / (1 << 20), 1),
          "ratio": round((row["bytes_read"] / t_big) / (len(one) / t_single), 2),
          "bytes_read": row["bytes_read"],
          "bytes_stored": stored,
          "read_over_stored": round(row["bytes_read"] / stored, 3),
          "requests": big_stats["requests"],
          "mean_in_flight": round(big_stats["mean_in_flight"], 1),
          "peak_in_flight": big_stats["peak_in_flight"],
          "proxy_busy_s": round(big_stats["busy_s"], 2),
          "single_stream_requests": single_stats["requests"],
          "leaf_read_modes": sorted({leaf.read_mode for leaf in rep.leaves}),
          "emulator_cpu_share_during_verify": round(big_cpu / t_big, 2),
          **ceiling,
      }

      # 4: download both trees (32 in flight), then verify locally
      local = os.path.join(root, "download")
      t0 = time.perf_counter()
      for side in ("src", "mig"):
        base = stores.open_store(f"{b.url}/big/{side}")
        rels = base.walk()
        datas = stores.read_many([base.child(r) for r in rels], max_in_flight=32)
        for r, data in zip(rels, datas):
          p = os.path.join(local, side, r)
          os.makedirs(os.path.dirname(p), exist_ok=True)
          with open(p, "wb") as f:
            f.write(data)
      t_dl = time.perf_counter() - t0
      t_local, rep = _verify(os.path.join(local, "src"), os.path.join(local, "mig"), spec)
      assert rep.passed
      out["vs_download"] = {
          "bucket_verify_s": round(t_big, 2),
          "download_s": round(t_dl, 2),
          "local_verify_s": round(t_local, 2),
          "download_then_verify_s": round(t_dl + t_local, 2),
          "local_disk_bytes": stored,
      }
  finally:
    emu.stop()
    shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
