"""Sharded loading and the spread SVF replay on this CPU: host memory of a sharded load, 1 vs 8 forced devices.

  flock -x /tmp/parity_cpu.lock .venv/bin/python -m bench.mesh_cpu [--layers=8] [--json=out.json]

Every measurement runs in a fresh child process (XLA fixes the CPU device count at start-up):

* **load memory**: a Qwen3-0.6B-shaped float32 checkpoint (``--layers`` layers,
  tied 151936 x 1024 embedding), written row block by row block, loaded
  unsharded on 1 device and sharded on ``tp:8`` and ``dp:2,tp:4``. Peak RSS
  growth during the load is ``VmHWM`` (reset through ``/proc/self/clear_refs``
  just before) minus ``VmRSS`` before; on CPU the devices are host memory, so
  the loaded model is part of it. Reported against the bound ``bytes on the
  devices + 1.2 x largest tensor shard``.
* **forward**: that model's float32 forward, batch 2, ``--seq`` tokens, in
  the same children: first call (compile) and the best of ``--reps``.
* **SVF**: the all-selected replay (``tools.svf_parity --all_selected_tensors``)
  of an oracle-made golden run (torch, ``parity_jax.oracle.svf_goldens`` at
  ``--svf_hidden``), on 1 device and spread over 8, wall time of the tool and
  whether the reports are identical (less ``backend``).

This machine has 2 cores: 8 forced devices share them, so no speed-up is
expected; the figures show what spreading costs here (compiles per device,
threads) and that memory stays at the model plus one shard.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_LAYERS = flags.DEFINE_integer("layers", 8, "Decoder layers of the Qwen3-0.6B-shaped checkpoint.")
_SEQ = flags.DEFINE_integer("seq", 128, "Forward sequence length (batch 2).")
_REPS = flags.DEFINE_integer("reps", 3, "Timed forward calls after the first.")
_SVF_HIDDEN = flags.DEFINE_integer("svf_hidden", 256, "Hidden size of the SVF golden model (Qwen3-0.6B proportions).")
_SVF_LAYERS = flags.DEFINE_integer(
    "svf_layers", 4, "Layers of the SVF golden model (>= 2: its sample is in layer 1).", lower_bound=2
)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/parity_mesh_bench", "Scratch directory (removed afterwards).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures here.")

CHILD = r"""
import json, sys, time
import jax, numpy as np
from parity_jax import qwen2

def status(key):
  for line in open("/proc/self/status"):
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024

path, spec, seq, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
mesh = qwen2.make_mesh(spec) if spec != "none" else None
jax.block_until_ready(jax.device_put(np.ones(1024, np.float32)))
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")
before = status("VmRSS")
t0 = time.perf_counter()
model = qwen2.load(path, mesh=mesh)
jax.block_until_ready(model.params)
load_s = time.perf_counter() - t0
peak = status("VmHWM")
leaves = jax.tree_util.tree_leaves(model.params)
resident = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
out = {"spec": spec, "devices": jax.device_count(), "load_s": load_s, "before": before, "peak": peak,
       "growth": peak - before, "model_bytes": sum(x.nbytes for x in leaves), "resident": resident,
       "largest_shard": max(s.data.nbytes for x in leaves for s in x.addressable_shards)}
tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, seq))
t0 = time.perf_counter()
jax.block_until_ready(qwen2.forward(model, tokens))
out["forward_first_s"] = time.perf_counter() - t0
times = []
for _ in range(reps):
  t0 = time.perf_counter()
  jax.block_until_ready(qwen2.forward(model, tokens))
  times.append(time.perf_counter() - t0)
out["forward_best_s"] = min(times)
print(json.dumps(out))
"""


def _env(n: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return env


def write_checkpoint(path: str, layers: int) -> int:
  """Qwen3-0.6B shape, ``layers`` layers, float32, streamed to disk; returns the file's tensor bytes."""
  import numpy as np

  from parity_jax import bundles, qwen2

  cfg = {
      "model_type": "qwen3",
      "vocab_size": 151936,
      "hidden_size": 1024,
      "intermediate_size": 3072,
      "num_hidden_layers": layers,
      "num_attention_heads": 16,
      "num_key_value_heads": 8,
      "head_dim": 128,
      "max_position_embeddings": 40960,
      "rms_norm_eps": 1e-6,
      "rope_theta": 1000000.0,
      "tie_word_embeddings": True,
      "hidden_act": "silu",
      "attention_bias": False,
      "use_sliding_window": False,
  }
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  qc = qwen2.parse_config(cfg)
  shapes = {name: a.shape for name, a in qwen2.to_hf_tensors(qwen2.init_params(qc, put=None, scale=0.0), qc).items()}
  specs = [(n, s, np.float32) for n, s in shapes.items()]
  rng = np.random.default_rng(0)
  with bundles.BundleWriter(os.path.join(path, "model.safetensors"), specs) as w:
    for name, shape, _ in specs:
      cols = int(np.prod(shape[1:], dtype=np.int64))
      step = max(1, (16 << 20) // (4 * cols))
      for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        block = rng.standard_normal((r1 - r0,) + tuple(shape[1:]), dtype=np.float32) * np.float32(0.02)
        if name.endswith("norm.weight"):
          block[...] = 1.0
        w.write_rows(name, block)
  return sum(int(np.prod(s)) * 4 for s in shapes.values())


def load_and_forward(path: str) -> list[dict]:
  out = []
  for n, spec in ((1, "none"), (8, "tp:8"), (8, "dp:2,tp:4")):
    p = subprocess.run(
        [sys.executable, "-c", CHILD, path, spec, str(_SEQ.value), str(_REPS.value)],
        cwd=ROOT,
        env=_env(n),
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
      raise RuntimeError(p.stderr[-2000:])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["bound"] = r["resident"] + 1.2 * r["largest_shard"]
    r["growth_over_bound"] = r["growth"] / r["bound"]
    r["overhead_over_resident_mib"] = (r["growth"] - r["resident"]) / 2**20
    out.append(r)
    print(
        json.dumps(
            {
                k: (round(v / 2**20, 1) if k in ("growth", "model_bytes", "resident", "largest_shard", "bound") else v)
                for k, v in r.items()
                if k not in ("before", "peak")
            }
        ),
        flush=True,
    )
  return out


def svf_runs(workdir: str) -> dict:
  """An oracle golden run at a small Qwen3 shape, replayed on 1 device and spread over 8."""
  from parity_jax.oracle import svf_goldens

  h = _SVF_HIDDEN.value
  svf_goldens.MODEL.update(
      hidden_size=h,
      num_attention_heads=16,
      head_dim=2 * h // 16,
      num_key_value_heads=8,
      intermediate_size=3 * h,
      vocab_size=16 * h,
      num_hidden_layers=_SVF_LAYERS.value,
  )
  golden = os.path.join(workdir, "svf_golden")
  t0 = time.perf_counter()
  svf_goldens.regenerate(golden)
  out: dict = {"model": dict(svf_goldens.MODEL), "golden_s": time.perf_counter() - t0}
  golden = os.path.join(golden, "svf")
  reports = {}
  for n in (1, 8):
    rep = os.path.join(workdir, f"svf_{n}.json")
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.svf_parity",
            f"--golden_dir={golden}",
            "--all_selected_tensors",
            f"--out={rep}",
            "--progress=false",
        ],
        cwd=ROOT,
        env=_env(n),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if p.returncode not in (0, 1):
      raise RuntimeError(p.stderr[-2000:])
    reports[n] = json.load(open(rep))
    out[f"devices_{n}"] = {
        "wall_s": wall,
        "verdict": reports[n]["verdict"],
        "gflop_per_device": reports[n]["backend"]["placement"]["gflop_per_device"],
    }
    print(f"svf on {n} device(s): {wall:.1f} s, {reports[n]['verdict']}", flush=True)
  strip = lambda r: {k: v for k, v in r.items() if k != "backend"}  # noqa: E731
  out["reports_identical_less_backend"] = strip(reports[1]) == strip(reports[8])
  out["tensors"] = len(reports[1]["tensors"])
  out["gflop"] = sum(2 * t["shape"][0] * t["shape"][1] * t["rank"] for t in reports[1]["tensors"]) / 1e9
  return out


def main(argv):
  del argv
  workdir = _WORKDIR.value
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  figures: dict = {
      "date": time.strftime("%Y-%m-%d"),
      "cpu": _cpu(),
      "cores": os.cpu_count(),
      "platform": platform.platform(),
  }
  try:
    t0 = time.perf_counter()
    figures["checkpoint_bytes"] = write_checkpoint(os.path.join(workdir, "model"), _LAYERS.value)
    figures["write_s"] = time.perf_counter() - t0
    figures["layers"], figures["seq"], figures["batch"] = _LAYERS.value, _SEQ.value, 2
    figures["load_and_forward"] = load_and_forward(os.path.join(workdir, "model"))
    shutil.rmtree(os.path.join(workdir, "model"))
    figures["svf"] = svf_runs(workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  print(json.dumps(figures["svf"], indent=1, default=str))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=1, default=str)


def _cpu() -> str:
  try:
    return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


if __name__ == "__main__":
  app.run(main)
