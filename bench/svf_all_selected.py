"""SVF all-selected reconstruction: JAX against the torch formula, and the chunked gate's memory.

  flock /tmp/parity_bench.lock /work/venv/bin/python bench/svf_all_selected.py [--json=out.json]

Random full-rank SVD components (U [m, k], S [k], V [n, k], k = min(m, n),
float32) shaped like Qwen3-0.6B's selected tensors: 28 layers of q/k/v/o and
gate/up/down projections (hidden 1024, q 2048 = 16 x 128, kv 1024 = 8 x 128,
intermediate 3072) plus the 151936 x 1024 embedding: 1221 GFLOP of matmul.

Measured in the same run, best of ``--reps`` passes each, on CPU:

* the torch formula (``S * (1 + o)``, sums, ``(U * s) @ V.T * norm``, ``.to(bf16)``);
* ``parity_jax.svf.reconstruct`` (jitted, float32, HIGHEST precision) on the same arrays;
* the reference f32 matmul rate on the job's own shapes: a jitted ``U @ V.T``
  (same operands, float32 out) over every tensor, and torch's ``U @ V.T``;
* torch against itself (1 thread vs the default) and JAX against torch on
  layer 0 and the embedding: bf16 flips, and how many of ours are explained;
* peak RSS (``ru_maxrss`` of a child process) of ``tools.svf_parity`` on the
  embedding against a torch golden bundle, chunked (``--chunk_mb``) and
  unchunked (``--chunk_mb=0``), and whether their stage hashes are identical.

Targets (issue 4): JAX <= 0.7x torch time; JAX >= 90% of the f32 matmul rate.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from parity_jax.provenance import default_provenance
from parity_jax import bundles as stages  # noqa: E402
from parity_jax.oracle import to_numpy  # noqa: E402
from parity_jax.oracle.svf_goldens import STAGE_NAMES, torch_formula  # noqa: E402
from parity_jax.svf import reconstruct, tensor_key  # noqa: E402
from parity_jax.svf.bounds import FormulaConstants, MismatchAccounting  # noqa: E402

_LAYERS = flags.DEFINE_integer("layers", 28, "Decoder layers.")
_VOCAB = flags.DEFINE_integer("vocab", 151936, "Embedding rows.")
_REPS = flags.DEFINE_integer("reps", 2, "Timed passes per contender (best is reported).")
_RSS = flags.DEFINE_bool("rss", True, "Measure the chunked gate's peak RSS against an unchunked run.")
_CHUNK_MB = flags.DEFINE_float("chunk_mb", 512.0, "Budget of the chunked gate run (the tool default).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/parity_svf_bench", "Scratch directory (removed afterwards).")
_JSON = flags.DEFINE_string("json", None, "Write the figures here as JSON.")

HIDDEN, Q, KV, INTER = 1024, 2048, 1024, 3072
EMBED = "model.embed_tokens.weight"


def shapes(layers: int, vocab: int) -> list[tuple[str, tuple[int, int]]]:
  out = []
  for i in range(layers):
    p = f"model.layers.{i}."
    out += [
        (p + "self_attn.q_proj.weight", (Q, HIDDEN)),
        (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
        (p + "self_attn.v_proj.weight", (KV, HIDDEN)),
        (p + "self_attn.o_proj.weight", (HIDDEN, Q)),
        (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
    ]
  return out + [(EMBED, (vocab, HIDDEN))]


def components(shape, rng):
  m, n = shape
  k = min(m, n)
  u = rng.standard_normal((m, k), dtype=np.float32)
  u *= np.float32(1 / np.sqrt(m))
  v = rng.standard_normal((n, k), dtype=np.float32)
  v *= np.float32(1 / np.sqrt(n))
  s = np.sort(rng.uniform(0.05, 4.0, k).astype(np.float32))[::-1].copy()
  o = (rng.standard_normal(k) * 0.1).astype(np.float32)
  return u, s, v, o


def gflop(shape) -> float:
  m, n = shape
  return 2.0 * m * n * min(m, n) / 1e9


def torch_final(u, s, v, o):
  ss = s * (1.0 + o)
  nrm = s.sum() / ss.sum()
  return ((u * ss.reshape(1, -1)) @ v.T * nrm).to(torch.bfloat16)


_MM = jax.jit(lambda a, b: jnp.einsum("mk,nk->mn", a, b, precision=jax.lax.Precision.HIGHEST))


def timed_pass(fn, items) -> float:
  t0 = time.perf_counter()
  for it in items:
    fn(*it)
  return time.perf_counter() - t0


def _peak_rss(cmd: list[str], rss_file: str) -> tuple[int, float, int]:
  """Runs ``cmd`` under a fresh parent that reports RUSAGE_CHILDREN.ru_maxrss (KiB)."""
  wrapper = (
      "import resource, subprocess, sys, time;"
      "t = time.perf_counter(); r = subprocess.run(sys.argv[2:]); t = time.perf_counter() - t;"
      "open(sys.argv[1], 'w').write(f'{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {t} {r.returncode}')"
  )
  subprocess.run([sys.executable, "-c", wrapper, rss_file, *cmd], cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
  kib, secs, rc = open(rss_file).read().split()
  return int(kib), float(secs), int(rc)


def build_embedding_golden(workdir: str, vocab: int, seed: int = 7) -> None:
  """Components, offsets, a torch golden all-selected bundle and report for the embedding alone."""
  import hashlib

  rng = np.random.default_rng(seed)
  u, s, v, o = components((vocab, HIDDEN), rng)
  prov = default_provenance("bench.svf_all_selected", seed=seed)
  with stages.BundleWriter(
      os.path.join(workdir, "svf_components.safetensors"),
      [(f"{EMBED}.U", u.shape, u.dtype), (f"{EMBED}.S", s.shape, s.dtype), (f"{EMBED}.V", v.shape, v.dtype)],
      prov,
  ) as w:
    w.write(f"{EMBED}.U", u)
    w.write(f"{EMBED}.S", s)
    w.write(f"{EMBED}.V", v)
  with stages.BundleWriter(
      os.path.join(workdir, "svf_scale_offsets.safetensors"), [(EMBED, o.shape, o.dtype)], prov
  ) as w:
    w.write(EMBED, o)
  ut, st, vt, ot = (torch.from_numpy(x) for x in (u, s, v, o))
  with torch.no_grad():
    stg = torch_formula(ut, st, vt, ot)
    stg["source_f32"] = stg["zero_source_f32"]  # the "original" matrix these components reproduce

  specs = [
      (tensor_key(EMBED, k), tuple(stg[k].shape), ml_dtypes.bfloat16 if k == "final_bf16" else np.float32)
      for k in STAGE_NAMES
  ]
  with stages.BundleWriter(os.path.join(workdir, "svf_all_selected_stage_debug.safetensors"), specs, prov) as w:
    for k in STAGE_NAMES:
      w.write(tensor_key(EMBED, k), to_numpy(stg[k]))
  final_sha = hashlib.sha256(to_numpy(stg["final_bf16"]).tobytes()).hexdigest()
  del stg
  report = {
      "format": "parity_jax.svf_report/1",
      "producer": "bench.svf_all_selected (torch formula)",
      "layout": "torch_v",
      "stage_debug": {"all_selected_stage_tensor_file": "svf_all_selected_stage_debug.safetensors"},
      "tensors": [{"name": EMBED, "final_bf16_sha256": final_sha}],
  }
  with open(os.path.join(workdir, "svf_report.json"), "w") as f:
    json.dump(report, f)


def rss_section(workdir: str, vocab: int, chunk_mb: float) -> dict:
  golden = os.path.join(workdir, "golden")  # the tool's input; its reports go beside it, never inside
  os.makedirs(golden, exist_ok=True)
  t0 = time.perf_counter()
  build_embedding_golden(golden, vocab)
  gc.collect()
  setup_s = time.perf_counter() - t0
  out = {"setup_s": setup_s}
  for label, mb in (("chunked", chunk_mb), ("unchunked", 0.0)):
    rep = os.path.join(workdir, f"{label}.json")
    cmd = [
        sys.executable,
        "-m",
        "tools.svf_parity",
        f"--golden_dir={golden}",
        "--all_selected_tensors",
        f"--chunk_mb={mb}",
        f"--out={rep}",
        "--progress=false",
    ]
    kib, secs, rc = _peak_rss(cmd, os.path.join(workdir, f"{label}.rss"))
    r = json.load(open(rep))
    t = r["tensors"][0]
    out[label] = {
        "chunk_mb": mb,
        "peak_rss_mib": kib / 1024,
        "wall_s": secs,
        "exit": rc,
        "n_chunks": t["chunking"]["n_chunks"],
        "rows_per_chunk": t["chunking"]["rows_per_chunk"],
        "verdict": r["verdict"],
        "stage_sha256": {s: v["sha256"] for s, v in t["stages"].items()},
        "explained": {
            k: t["explained"][k]
            for k in (
                "n_mismatch",
                "n_explained",
                "n_explained_tie",
                "n_explained_multi_ulp",
                "n_unexplained",
                "max_ulp_explained",
                "max_explained_ratio",
            )
        },
    }
  out["chunked_equals_unchunked"] = out["chunked"]["stage_sha256"] == out["unchunked"]["stage_sha256"]
  return out


def flips_section(items) -> dict:
  """torch 1 vs default threads, and JAX vs torch, on the given tensors."""
  default = torch.get_num_threads()
  res = {
      "threads_default": default,
      "n_elements": 0,
      "torch_1_vs_default": 0,
      "jax_vs_torch": 0,
      "jax_explained": 0,
      "jax_unexplained": 0,
      "torch_explained": 0,
      "torch_unexplained": 0,
      "jax_multi_ulp_explained": 0,
  }
  for name, (u, s, v, o), _ in items:
    ut, st, vt, ot = (torch.from_numpy(x) for x in (u, s, v, o))
    multi = to_numpy(torch_final(ut, st, vt, ot)).view(np.uint16)
    torch.set_num_threads(1)
    try:
      single = to_numpy(torch_final(ut, st, vt, ot)).view(np.uint16)
    finally:
      torch.set_num_threads(default)
    ours = np.asarray(reconstruct(u, s, v, o)).view(np.uint16)
    fc = FormulaConstants.from_components(s, o)
    a, b = MismatchAccounting(fc), MismatchAccounting(fc)
    a.update(multi, single, u, v)
    b.update(multi, ours, u, v)
    res["n_elements"] += multi.size
    res["torch_1_vs_default"] += a.n_mismatch
    res["torch_explained"] += a.n_explained
    res["torch_unexplained"] += a.n_unexplained
    res["jax_vs_torch"] += b.n_mismatch
    res["jax_explained"] += b.n_explained
    res["jax_multi_ulp_explained"] += b.n_explained_multi_ulp
    res["jax_unexplained"] += b.n_unexplained
  return res


def main(argv):
  del argv
  figures: dict = {
      "date": time.strftime("%Y-%m-%d"),
      "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
      "versions": {"jax": jax.__version__, "torch": torch.__version__, "numpy": np.__version__},
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in jax.devices()],
      "torch_threads": torch.get_num_threads(),
  }
  if _RSS.value:
    shutil.rmtree(_WORKDIR.value, ignore_errors=True)
    try:
      figures["rss"] = rss_section(_WORKDIR.value, _VOCAB.value, _CHUNK_MB.value)
    finally:
      shutil.rmtree(_WORKDIR.value, ignore_errors=True)
    print(json.dumps({k: v for k, v in figures["rss"].items()}, indent=1, default=str)[:3000], flush=True)
    gc.collect()

  rng = np.random.default_rng(0)
  job = shapes(_LAYERS.value, _VOCAB.value)
  items = [(name, components(shp, rng), shp) for name, shp in job]
  total_gflop = sum(gflop(shp) for _, shp in job)
  torch_items = [tuple(torch.from_numpy(x) for x in c) for _, c, _ in items]
  jax_items = [tuple(jax.device_put(x) for x in c) for _, c, _ in items]
  print(f"{len(items)} tensors, {total_gflop:.1f} GFLOP", flush=True)

  def run_torch(u, s, v, o):
    torch_final(u, s, v, o)  # synchronous on CPU; the result is dropped at once

  def run_jax(u, s, v, o):
    reconstruct(u, s, v, o).block_until_ready()

  def run_mm(u, s, v, o):
    _MM(u, v).block_until_ready()

  def torch_mm(u, s, v, o):
    u @ v.T

  # warm-up: compile every distinct shape, prime torch/MKL
  seen = set()
  for (name, _, shp), ti, ji in zip(items, torch_items, jax_items):
    if shp not in seen:
      seen.add(shp)
      run_jax(*ji)
      run_mm(*ji)
      run_torch(*ti)
  contenders = {
      "torch_formula": (run_torch, torch_items),
      "jax_reconstruct": (run_jax, jax_items),
      "jax_f32_matmul": (run_mm, jax_items),
      "torch_f32_matmul": (torch_mm, torch_items),
  }
  times = {k: [] for k in contenders}
  with torch.no_grad():
    for rep in range(_REPS.value):
      for label, (fn, its) in contenders.items():
        gc.collect()
        times[label].append(timed_pass(fn, its))
        print(f"pass {rep}: {label} {times[label][-1]:.2f} s", flush=True)
  best = {k: min(v) for k, v in times.items()}
  figures["gflop"] = total_gflop
  figures["times_s"] = times
  figures["best_s"] = best
  figures["gflops"] = {k: total_gflop / v for k, v in best.items()}
  figures["jax_over_torch_time"] = best["jax_reconstruct"] / best["torch_formula"]
  figures["jax_fraction_of_matmul_rate"] = best["jax_f32_matmul"] / best["jax_reconstruct"]
  figures["targets"] = {
      "jax_time_le_0.7x_torch": figures["jax_over_torch_time"] <= 0.7,
      "jax_ge_90pct_matmul_rate": figures["jax_fraction_of_matmul_rate"] >= 0.9,
  }

  # flips: layer 0 and the embedding
  sel = [it for it in items if it[0].startswith("model.layers.0.") or it[0] == EMBED]
  with torch.no_grad():
    figures["flips"] = flips_section(sel)
  print(
      json.dumps(
          {
              k: figures[k]
              for k in (
                  "gflop",
                  "best_s",
                  "gflops",
                  "jax_over_torch_time",
                  "jax_fraction_of_matmul_rate",
                  "targets",
                  "flips",
              )
          },
          indent=1,
      ),
      flush=True,
  )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=1, default=str)


def _cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == "__main__":
  app.run(main)
