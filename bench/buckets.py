"""Benchmark: verifying checkpoints in a bucket behind a 20 ms-per-request latency proxy (issue 18).

  flock -x /tmp/parity_cpu.lock .venv/bin/python -m bench.buckets [--store=gs|s3] [--leaves=1000] [--big_mb=1024]
      [--shards=8] [--delay_ms=20] [--stream_mib_s=0,24] [--readahead=N (default: the product's)] [--parts=small,big]
      [--ranged=on,off]

An emulator runs on 127.0.0.1 (``--store=gs``, the default: the GCS emulator of
``tests/helpers/gcs_emulator.py``, which serves a range at a cost that follows the range, like a real store;
``--store=s3``: moto's S3 server, which reads the whole object for every range request, so ranges cost it
CPU in proportion to the object). A :class:`tests.helpers.http_proxy.DelayProxy` in front of it delays every
request by ``--delay_ms``, counts requests in flight, and, with ``--stream_mib_s``, caps every response body at
that many MiB/s (per request, for every request alike: the references and the verify). A real store serves
each stream at a bounded rate, which is why parallel ("sliced") downloads pay off there; on loopback one
stream runs at memory speed. Several values (``--stream_mib_s=0,24``; 0: no cap) are run one after the other
on the same uploaded trees.

Two pairs of trees are uploaded (both sides written locally first: the source by orbax's own
``ocp.v1.save_pytree``, the migrated tree by our migrator with its default 64 MiB row-major chunks,
uncompressed). The big leaf is written the way a training job writes it: a jax array sharded over
``--shards`` host devices (``--xla_force_host_platform_device_count``), so orbax stores one zstd chunk per
shard (8 chunks of 128 MiB for the 1 GiB leaf), not one chunk for the whole leaf.
Figures, each against a reference measured in the same run:

1. ``--leaves`` small leaves: verify time with the default request concurrency vs one request at a
   time (``Limits.concurrency=1``); target >= 8x. Both in a child process after a warm-up verify there: the
   verifier never shares a process (and its GIL) with the proxy; the proxy's figures are taken over the
   child's timed windows.
2. one ``--big_mb`` leaf, verified in a fresh child process, once with the product's reader (``--ranged=on``:
   each stored chunk fetched as range requests of <= 16 MiB, :mod:`parity_jax.checkpoint.formats.ocdbt_ranges`)
   and once with tensorstore's own (``off``: one request per stored chunk), each (as the tool runs; its peak RSS, ``VmHWM``,
   against an idle child's, and issue 17's memory bound, :func:`bench.children.memory_bound`): verify
   throughput (bytes read / s) vs one single-stream GET of the largest object; target >= 4x.
3. bytes read / bytes stored (both trees) for that verify; target <= 1.05.
4. that verify vs "download both trees, then verify locally", where the download is a strong one: every
   object and every 16 MiB slice of a big object (gcloud's sliced download) as its own request, 32 in flight;
   target: faster, and no local disk.

With the big leaf, the harness's ceiling: the largest object read as 8 and 32 ranges in flight, and the
emulator's share of one core meanwhile (1.0: one core busy serving), to tell a product limit from the
harness's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_MIB = 1 << 20
SLICE_BYTES = 16 * _MIB  # the reference download's slice of a big object
IN_FLIGHT = 32  # the reference download's requests in flight


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


def _big_tree(mib: int, shards: int) -> dict:
  """One float32 leaf of ``mib`` MiB, shape (rows, 8192), sharded by rows over ``shards`` host devices."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  cols = 8192
  rows = mib * _MIB // 4 // cols
  rows -= rows % shards
  x = np.random.default_rng(1).standard_normal((rows, cols), dtype=np.float32)
  mesh = Mesh(np.array(jax.devices()[:shards]), ("d",))
  return {"w": jax.device_put(x, NamedSharding(mesh, PartitionSpec("d", None)))}


def _verify(src: str, mig: str, spec: str, concurrency: int | None = None, readahead: int | None = None):
  from parity_jax import stores
  from parity_jax.checkpoint import verify_migration

  previous = stores.set_limits(**({"concurrency": concurrency} if concurrency else {}))
  try:
    t0 = time.perf_counter()
    rep = verify_migration(src, mig, spec, **({} if readahead is None else {"readahead": readahead}))
    return time.perf_counter() - t0, rep
  finally:
    stores.set_limits(**previous.__dict__)


def _cpu(pid: int) -> float:
  """CPU seconds (user + system) used so far by process ``pid`` (Linux /proc)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_bytes(path: str) -> dict[str, int]:
  """Relative path -> size of every file below ``path`` (what a bucket listing with sizes gives)."""
  out = {}
  for dp, _, fns in os.walk(path):
    for fn in fns:
      p = os.path.join(dp, fn)
      out[os.path.relpath(p, path).replace(os.sep, "/")] = os.path.getsize(p)
  return out


def _download(base_url: str, sizes: dict[str, int], dest: str) -> int:
  """gcloud-style download of a tree: one listing, then every object (big ones as SLICE_BYTES slices) as its own
  request, IN_FLIGHT at once, written at its offset as it arrives. Returns the bytes written."""
  from parity_jax import stores

  base = stores.open_store(base_url)
  listed = base.walk()
  assert sorted(listed) == sorted(sizes), (listed, sorted(sizes))
  files = {}
  for rel, n in sizes.items():
    p = os.path.join(dest, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    files[rel] = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  jobs = [(rel, a, min(a + SLICE_BYTES, n)) for rel, n in sizes.items() for a in range(0, max(n, 1), SLICE_BYTES)]
  window: collections.deque = collections.deque()
  written = 0

  def finish() -> int:
    rel, a, p = window.popleft()
    data = p.result()
    os.pwrite(files[rel], data, a)
    return len(data)

  try:
    for rel, a, b in jobs:
      if len(window) >= IN_FLIGHT:
        written += finish()
      obj = base.child(rel)
      window.append((rel, a, obj.read_range_async(a, b) if b > a else obj.read_bytes_async()))
    while window:
      written += finish()
  finally:
    for fd in files.values():
      os.close(fd)
  return written


# ---- the big verify in a fresh child (peak memory from wait4, as the other benches measure it)
def _child(task: str, a: dict) -> None:
  from bench.children import rss

  os.environ.update(a["env"])
  from parity_jax import stores  # noqa: F401 -- the imports the verify needs, before the baseline
  from parity_jax.checkpoint import verify_migration  # noqa: F401
  from parity_jax.checkpoint.formats import ocdbt_ranges

  if not a.get("ranged", True):  # the reference reader: tensorstore's own, one request per stored chunk
    ocdbt_ranges.RANGED_ABOVE_BYTES = float("inf")

  out = {"baseline_rss": rss()}
  if task == "small":  # a warm-up verify (imports, compilation, the bucket checks), then the two timed ones
    _verify(a["src"], a["mig"], a["spec"])
    for name, conc in (("concurrent", None), ("one_at_a_time", 1)):
      t0 = time.monotonic()
      t, rep = _verify(a["src"], a["mig"], a["spec"], concurrency=conc)
      out[name] = {"seconds": t, "passed": rep.passed, "window": [t0, time.monotonic()]}
  if task == "verify":
    t, rep = _verify(a["src"], a["mig"], a["spec"], readahead=a["readahead"])
    scheme = a["src"].split("://", 1)[0]
    out.update(
        seconds=t,
        passed=rep.passed,
        bytes_read=rep.io[scheme]["bytes_read"],
        requests=rep.io[scheme].get("requests"),
        read_modes=sorted({leaf.read_mode for leaf in rep.leaves}),
    )
  out["vm_hwm"] = _vm_hwm()
  ru = resource.getrusage(resource.RUSAGE_SELF)
  out["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
  print(json.dumps(out))


def _vm_hwm() -> int:
  """This process's peak resident set size (``VmHWM``), in bytes.

  Not ``ru_maxrss`` from ``wait4`` (what the other benches use): Linux carries the forking process's peak
  across ``exec`` into the child's ``ru_maxrss``, and this bench's parent holds the proxy's buffers and the
  trees it wrote; ``VmHWM`` belongs to the child's own address space.
  """
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return 0


def _big_figures(args, b, emu, proxy, pairs, store_env, cap_mib: float) -> dict:
  from bench import children
  from parity_jax import stores

  s_url, m_url, spec, s_dir, m_dir = pairs["big"]
  stored = sum(_tree_bytes(s_dir).values()) + sum(_tree_bytes(m_dir).values())
  # in a bucket every chunk is read whole (no memory map), so both sides count their storage chunks
  chunks = [children.largest_chunk(d, 8 * _MIB, written=True) for d in (s_dir, m_dir)]
  child_args = dict(env=store_env, src=s_url, mig=m_url, spec=spec, readahead=args.readahead)
  idle = children.run_child(__file__, "idle", **child_args)
  runs = {}
  for ranged in [r == "on" for r in args.ranged.split(",")]:
    proxy.reset_stats()
    c0 = _cpu(emu.proc.pid)
    res = children.run_child(__file__, "verify", **child_args, ranged=ranged)
    res["emulator_cpu"] = _cpu(emu.proc.pid) - c0
    res["proxy"] = proxy.stats()
    assert res["passed"]
    runs[ranged] = res
  sizes = {f"big/src/{k}": n for k, n in _tree_bytes(s_dir).items()}
  sizes.update({f"big/mig/{k}": n for k, n in _tree_bytes(m_dir).items()})
  key = max(sizes, key=sizes.get)
  obj = stores.open_store(f"{b.url}/{key}")
  size = sizes[key]
  proxy.reset_stats()
  t0 = time.perf_counter()
  one = obj.read_bytes()
  t_single = time.perf_counter() - t0
  assert len(one) == size
  single_stats = proxy.stats()
  del one
  ceiling = {}
  for n_ranges in (8, 32):
    step = -(-size // n_ranges)
    c0, t0 = _cpu(emu.proc.pid), time.perf_counter()
    parts = stores.read_many([(obj, a, min(a + step, size)) for a in range(0, size, step)])
    dt = time.perf_counter() - t0
    assert sum(len(p) for p in parts) == size
    del parts
    ceiling[f"{n_ranges}_ranges_mib_s"] = round(size / dt / _MIB, 1)
    ceiling[f"{n_ranges}_ranges_emulator_cpu_share"] = round((_cpu(emu.proc.pid) - c0) / dt, 2)
  single_rate = size / t_single
  assert not cap_mib or single_rate <= 1.02 * cap_mib * _MIB, "the proxy's per-stream cap is not in force"
  out = {}
  for ranged, res in runs.items():
    t_big, stats = res["seconds"], res["proxy"]
    peak_above_idle = res["vm_hwm"] - idle["vm_hwm"]
    verify_rate = res["bytes_read"] / t_big
    out["big_leaf" if ranged else "big_leaf_one_request_per_chunk"] = {
        "mib": args.big_mb,
        "reader": "range requests per chunk (ocdbt_ranges)" if ranged else "tensorstore's, one request per chunk",
        "verify_s": round(t_big, 2),
        "verify_mib_s": round(verify_rate / _MIB, 1),
        "single_stream_object_bytes": size,
        "single_stream_s": round(t_single, 2),
        "single_stream_mib_s": round(single_rate / _MIB, 1),
        "ratio": round(verify_rate / single_rate, 2),
        "bytes_read": res["bytes_read"],
        "bytes_stored": stored,
        "read_over_stored": round(res["bytes_read"] / stored, 3),
        "requests": stats["requests"],
        "mean_in_flight": round(stats["mean_in_flight"], 1),
        "peak_in_flight": stats["peak_in_flight"],
        "single_stream_requests": single_stats["requests"],
        "leaf_read_modes": res["read_modes"],
        "emulator_cpu_share_during_verify": round(res["emulator_cpu"] / t_big, 2),
        "verify_cpu_s": res["cpu_s"],
        "peak_rss_above_idle_mib": round(peak_above_idle / _MIB, 1),
        "memory_bound": children.memory_bound(peak_above_idle, chunks),
        **ceiling,
    }

  # 4: download both trees (sliced, 32 in flight), then verify locally
  local = tempfile.mkdtemp(prefix="parity_bench_download-", dir=args.tmp)
  try:
    t0 = time.perf_counter()
    n = 0
    for side, d in (("src", s_dir), ("mig", m_dir)):
      n += _download(f"{b.url}/big/{side}", _tree_bytes(d), os.path.join(local, side))
    t_dl = time.perf_counter() - t0
    t_local, rep = _verify(os.path.join(local, "src"), os.path.join(local, "mig"), spec)
    assert rep.passed
  finally:
    shutil.rmtree(local, ignore_errors=True)
  t_big = runs[True]["seconds"] if True in runs else runs[False]["seconds"]
  vs = {
      "bucket_verify_s": round(t_big, 2),
      "download_s": round(t_dl, 2),
      "download_mib_s": round(n / t_dl / _MIB, 1),
      "local_verify_s": round(t_local, 2),
      "download_then_verify_s": round(t_dl + t_local, 2),
      "local_disk_bytes": n,
  }
  return {**out, "vs_download": vs}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--store", choices=["gs", "s3"], default="gs")
  ap.add_argument("--leaves", type=int, default=1000)
  ap.add_argument("--big_mb", type=int, default=1024)
  ap.add_argument("--shards", type=int, default=8)
  ap.add_argument("--delay_ms", type=float, default=20.0)
  ap.add_argument("--stream_mib_s", default="0", help="per-stream caps to run, comma-separated (0: no cap)")
  ap.add_argument(
      "--readahead", type=int, default=None, help="verify_migration(readahead=); unset: the product's default (auto)"
  )
  ap.add_argument("--parts", default="small,big")
  ap.add_argument(
      "--ranged",
      default="on,off",
      help="big leaf readers to time: on (the product's: range requests per chunk), off (one request per chunk)",
  )
  ap.add_argument("--tmp", default=None, help="where the local trees and the reference download go")
  ap.add_argument("--child")
  ap.add_argument("--args")
  args = ap.parse_args()
  if args.child:
    _child(args.child, json.loads(args.args))
    return
  flag = f"--xla_force_host_platform_device_count={args.shards}"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

  import numpy as np

  from bench import children
  from tests.helpers.http_proxy import DelayProxy
  from tests.helpers.objectstores import Bucket, Emulator

  parts = set(args.parts.split(","))
  caps = [float(c) for c in args.stream_mib_s.split(",")]
  root = tempfile.mkdtemp(prefix="parity_bench_buckets-", dir=args.tmp)
  emu = Emulator.start(args.store)
  out: dict = {"machine": children.machine(), "args": vars(args), "runs": []}
  try:
    b = Bucket(emu, emu.create_bucket())
    pairs = {}
    trees = {}
    if "small" in parts:
      rng = np.random.default_rng(0)
      trees["small"] = lambda: {
          f"layer{i:04d}": rng.standard_normal(256).astype(np.float32) for i in range(args.leaves)
      }
    if "big" in parts:
      trees["big"] = lambda: _big_tree(args.big_mb, args.shards)
    for name, make in trees.items():
      t0 = time.perf_counter()
      s, m, spec = _trees(root, make(), name)
      pairs[name] = (b.upload_tree(s, f"{name}/src"), b.upload_tree(m, f"{name}/mig"), spec, s, m)
      out[f"{name}_setup_s"] = round(time.perf_counter() - t0, 1)
    for cap in caps:
      run: dict = {"stream_mib_s": cap or None, "load_average_at_start": round(os.getloadavg()[0], 1)}
      with DelayProxy(emu.url, args.delay_ms / 1000, stream_bytes_s=cap * _MIB if cap else None) as proxy:
        env = emu.env_vars(endpoint=proxy.url)
        os.environ.update(env)
        if "small" in parts:
          s_url, m_url, spec, _, _ = pairs["small"]
          proxy.reset_stats()
          res = children.run_child(__file__, "small", env=env, src=s_url, mig=m_url, spec=spec)
          conc, one = res["concurrent"], res["one_at_a_time"]
          assert conc["passed"] and one["passed"]
          conc_stats = proxy.stats(*conc["window"])
          run["small_leaves"] = {
              "leaves": args.leaves,
              "verify_s": round(conc["seconds"], 2),
              "one_at_a_time_s": round(one["seconds"], 2),
              "speedup": round(one["seconds"] / conc["seconds"], 1),
              "requests": conc_stats["requests"],
              "mean_in_flight": round(conc_stats["mean_in_flight"], 1),
              "peak_in_flight": conc_stats["peak_in_flight"],
              "one_at_a_time_peak_in_flight": proxy.stats(*one["window"])["peak_in_flight"],
          }
        if "big" in parts:
          run.update(_big_figures(args, b, emu, proxy, pairs, env, cap))
      out["runs"].append(run)
      print(json.dumps(run), flush=True)
  finally:
    emu.stop()
    shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
