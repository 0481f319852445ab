"""Speed and peak memory of the stage-bundle comparison on a Qwen3-0.6B-shaped capture.

  flock /tmp/parity_bench.lock python -m bench.compare_stages_bench [--tokens=64] [--dir=/tmp/cmp_bench]

Writes two stage bundles shaped like a Qwen3-0.6B forward pass (28 layers,
hidden 1024, 16/8 heads of 128, intermediate 3072, vocabulary 151936; 507
stages, float32) with BundleWriter, the candidate carrying float32-level noise
and one planted error. Then, each in a fresh subprocess:

* reference: read both bundles stage by stage (BundleReader.get), the I/O and
  deserialisation floor any comparison pays;
* compare_bundles on the two paths (all statistics, logits KL/top-k, verdict);
* the same plus the plot.

Prints wall time and the ratio to the reference, and peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``) next to the size of one bundle and
of the largest stage pair: path inputs are read one stage at a time, so peak
memory should follow the largest stage, not the bundle.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import numpy as np

from parity_jax import bundles as stages
from parity_jax.bundles import qwen_graph as stage_names

D, H, K, HD, I, V, L = 1024, 16, 8, 128, 3072, 151936, 28


def _shape(name: str, t: int) -> tuple[int, ...]:
  layer, s = stage_names.parse_stage(name)
  if name == "logits":
    return (1, t, V)
  return {
      "q_proj": (1, t, H * HD),
      "k_proj": (1, t, K * HD),
      "v_proj": (1, t, K * HD),
      "attention": (1, t, H * HD),
      "q_norm": (1, t, H, HD),
      "k_norm": (1, t, K, HD),
      "q_rope": (1, t, H, HD),
      "k_rope": (1, t, K, HD),
      "ffn_gate": (1, t, I),
      "ffn_up": (1, t, I),
      "ffn_silu": (1, t, I),
      "ffn_swiglu": (1, t, I),
  }.get(s, (1, t, D))


def write_bundles(d: str, t: int) -> tuple[int, int]:
  names = stage_names.qwen_stage_names(L, qk_norm=True)
  specs = [(n, _shape(n, t), np.float32) for n in names]
  rng = np.random.default_rng(0)
  planted = "layers.17.ffn_up"
  nbytes = largest = 0
  with (
      stages.BundleWriter(os.path.join(d, "golden.safetensors"), specs, {"producer": "bench"}) as wg,
      stages.BundleWriter(os.path.join(d, "candidate.safetensors"), specs, {"producer": "bench"}) as wc,
  ):
    for n, shape, _ in specs:
      g = rng.standard_normal(shape, dtype=np.float32)
      rel = 1e-3 if n == planted else 1e-7
      c = (g * (1 + rel * rng.standard_normal(shape, dtype=np.float32))).astype(np.float32)
      wg.write(n, g)
      wc.write(n, c)
      nbytes += g.nbytes
      largest = max(largest, 2 * g.nbytes)
  return nbytes, largest


_READ = """
import sys
from parity_jax.bundles import BundleReader
for p in sys.argv[1:]:
  pass
a, b = BundleReader(sys.argv[1]), BundleReader(sys.argv[2])
s = 0.0
for n in a.names:
  x, y = a.get(n), b.get(n)
  s += float(x.reshape(-1)[0]) + float(y.reshape(-1)[0])
"""

_COMPARE = """
import sys
from parity_jax.bundles import compare_bundles
r = compare_bundles(sys.argv[1], sys.argv[2], profile="f32")
assert r.first_divergent == "layers.17.ffn_up", r.verdict_line()
if len(sys.argv) > 3:
  r.plot(sys.argv[3])
"""


def _child(code: str, *args: str) -> tuple[float, int]:
  """Wall seconds and the child's peak RSS in bytes (fresh process each time)."""
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-c", code, *args], check=True, cwd=os.getcwd())
  wall = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return wall, peak * 1024


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=64)
  ap.add_argument("--dir", default="/tmp/cmp_bench")
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  t0 = time.perf_counter()
  nbytes, largest = write_bundles(args.dir, args.tokens)
  print(
      f"Qwen3-0.6B-shaped capture, {args.tokens} tokens: 507 stages, {nbytes / 2**20:.0f} MiB per bundle,"
      f" largest stage pair {largest / 2**20:.0f} MiB (written in {time.perf_counter() - t0:.1f} s)"
  )
  g, c = os.path.join(args.dir, "golden.safetensors"), os.path.join(args.dir, "candidate.safetensors")
  png = os.path.join(args.dir, "plot.png")
  # Each measurement in a fresh child; RUSAGE_CHILDREN keeps the max, so run the expected-smallest first.
  results = {}
  for label, code, extra in (
      ("read both bundles (reference)", _READ, ()),
      ("compare_bundles", _COMPARE, ()),
      ("compare_bundles + plot", _COMPARE, (png,)),
  ):
    walls = []
    peak = 0
    for _ in range(args.repeats):
      w, peak = _child(code, g, c, *extra)
      walls.append(w)
    results[label] = (min(walls), peak)
  ref = results["read both bundles (reference)"][0]
  print(f"{'':32} {'wall (best of %d)' % args.repeats:>18} {'x reference':>12} {'peak RSS (max so far)':>22}")
  for label, (w, peak) in results.items():
    print(f"{label:32} {w:>16.2f} s {w / ref:>12.2f} {peak / 2**20:>18.0f} MiB")
  extra = results["compare_bundles"][1] - results["read both bundles (reference)"][1]
  print(
      f"compare_bundles peak RSS over the reference (which holds both mmapped bundles' pages):"
      f" {extra / 2**20:.0f} MiB = {extra / largest:.2f} x the largest stage pair, {extra / nbytes:.2f} x one bundle"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
