"""Benchmark: verifying an HF -> MaxText (scanned) conversion element by element vs. the anchor's method.

  flock /tmp/parity_bench.lock .venv/bin/python bench/conversion.py [--scale=0.125] [--dtype=float32] [--keep] [--root=DIR]

A Qwen2.5-0.5B-shaped model (hidden 896, 14 heads of 64, 2 kv heads, intermediate 4864, tied; 24 layers and
a 151936 vocabulary at --scale=1, both scaled by --scale) with random weights is written as an HF
``model.safetensors``; its MaxText scanned layout (kernels transposed and reshaped to heads, the layers
stacked on axis 1: MaxText's to_maxtext hooks, written out here in numpy) as a second safetensors side.
Then, each in a fresh child process (peak RSS from ``os.wait4``'s rusage, above the child's RSS after its
imports):

* the verifier: ``verify_migration`` with the ``hf-to-maxtext-scanned`` preset (every element compared bit
  for bit, 8 MiB slabs);
* the anchor's method (MaxText's ``compare_hf_ckpt.py``): both whole models loaded into memory, the MaxText
  one mapped back to HF names and shapes, then ``np.allclose(rtol=1e-2, atol=1e-2)`` per tensor.

Targets (issue 17): verifier peak <= 1/4 of the anchor's, and its time no worse; and the memory bound: the
verifier's peak RSS above that of an idle child (the same imports) within 2x the largest chunk either side
must decode whole (both sides are read by byte range: a slab) plus 64 MiB, printed PASS or MISS. Prints a
table and a JSON blob; the files under /tmp are removed at the end unless --keep.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import children  # noqa: E402

MIB = 1 << 20
SLAB_MB = 8.0  # the verifier's slabs
FULL = dict(hidden=896, heads=14, kv=2, hd=64, inter=4864, layers=24, vocab=151936)


def dims(scale: float) -> dict:
  d = dict(FULL)
  d["layers"] = max(1, round(FULL["layers"] * scale))
  d["vocab"] = max(64, round(FULL["vocab"] * scale))
  return d


def config(d: dict) -> dict:
  return {
      "model_type": "qwen2",
      "hidden_size": d["hidden"],
      "num_attention_heads": d["heads"],
      "num_key_value_heads": d["kv"],
      "head_dim": d["hd"],
      "intermediate_size": d["inter"],
      "num_hidden_layers": d["layers"],
      "vocab_size": d["vocab"],
      "tie_word_embeddings": True,
  }


def _save(path: str, tensors: dict) -> None:
  """A safetensors file from numpy arrays (header + raw bytes, written tensor by tensor)."""
  import struct

  from parity_jax.dtypes import safetensors_name

  header, offset = {}, 0
  for name, a in tensors.items():
    header[name] = {
        "dtype": safetensors_name(a.dtype),
        "shape": list(a.shape),
        "data_offsets": [offset, offset + a.nbytes],
    }
    offset += a.nbytes
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for a in tensors.values():
      f.write(a.tobytes())


def generate(root: str, d: dict, dtype: str) -> tuple[str, str]:
  import ml_dtypes
  import numpy as np

  dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  rng = np.random.default_rng(0)
  D, H, KV, hd, F, L = d["hidden"], d["heads"], d["kv"], d["hd"], d["inter"], d["layers"]

  def w(*shape):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dt)

  hf = {"model.embed_tokens.weight": w(d["vocab"], D), "model.norm.weight": w(D)}
  shapes = {
      "input_layernorm.weight": (D,),
      "post_attention_layernorm.weight": (D,),
      "self_attn.q_proj.weight": (H * hd, D),
      "self_attn.k_proj.weight": (KV * hd, D),
      "self_attn.v_proj.weight": (KV * hd, D),
      "self_attn.o_proj.weight": (D, H * hd),
      "self_attn.q_proj.bias": (H * hd,),
      "self_attn.k_proj.bias": (KV * hd,),
      "self_attn.v_proj.bias": (KV * hd,),
      "mlp.gate_proj.weight": (F, D),
      "mlp.up_proj.weight": (F, D),
      "mlp.down_proj.weight": (D, F),
  }
  for i in range(L):
    for n, s in shapes.items():
      hf[f"model.layers.{i}.{n}"] = w(*s)
  src, mig = os.path.join(root, "hf"), os.path.join(root, "maxtext")
  os.makedirs(src)
  os.makedirs(mig)
  _save(os.path.join(src, "model.safetensors"), hf)
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(config(d), f)
  # MaxText's to_maxtext, scanned: reshape_kernel = x.T.reshape(target); reshape_bias; np.stack(axis=1)
  lay = "params/params/decoder/layers/"
  kernel = {
      "self_attn.q_proj.weight": ("self_attention/query/kernel", (D, H, hd)),
      "self_attn.k_proj.weight": ("self_attention/key/kernel", (D, KV, hd)),
      "self_attn.v_proj.weight": ("self_attention/value/kernel", (D, KV, hd)),
      "self_attn.o_proj.weight": ("self_attention/out/kernel", (H, hd, D)),
      "mlp.gate_proj.weight": ("mlp/wi_0/kernel", (D, F)),
      "mlp.up_proj.weight": ("mlp/wi_1/kernel", (D, F)),
      "mlp.down_proj.weight": ("mlp/wo/kernel", (F, D)),
      "self_attn.q_proj.bias": ("self_attention/query/bias", (H, hd)),
      "self_attn.k_proj.bias": ("self_attention/key/bias", (KV, hd)),
      "self_attn.v_proj.bias": ("self_attention/value/bias", (KV, hd)),
      "input_layernorm.weight": ("pre_self_attention_layer_norm/scale", (D,)),
      "post_attention_layernorm.weight": ("post_self_attention_layer_norm/scale", (D,)),
  }
  mt = {"params/params/token_embedder/embedding": hf["model.embed_tokens.weight"]}
  mt["params/params/decoder/decoder_norm/scale"] = hf["model.norm.weight"]
  for n, (to, shape) in kernel.items():
    per = [hf[f"model.layers.{i}.{n}"] for i in range(L)]
    per = [x.T.reshape(shape) if x.ndim == 2 else x.reshape(shape) for x in per]
    mt[lay + to] = np.stack(per, axis=1)
    del per
  _save(os.path.join(mig, "model.safetensors"), mt)
  return src, mig


def child(task: str, args: dict) -> None:
  import numpy as np

  if task == "generate":  # in a child, so that the measured children fork from a small parent
    generate(args["root"], args["dims"], args["dtype"])
    print(json.dumps({"seconds": 0.0, "baseline_rss": 0}))
    return

  if task in ("verify", "idle"):
    from parity_jax.checkpoint import verify_migration
    from parity_jax.checkpoint.presets import preset_spec

    import parity_jax.checkpoint.verify.elements  # noqa: F401  (imports before the baseline, as the anchor's)
    import tensorstore  # noqa: F401

    spec = preset_spec("hf-to-maxtext-scanned", args["source"])
    base = children.rss()
    t0 = time.perf_counter()
    if task == "idle":  # the same imports and spec, no work: the baseline of the memory bound
      print(json.dumps({"seconds": 0.0, "baseline_rss": base}))
      return
    rep = verify_migration(args["source"], args["migrated"], spec, slab_mb=SLAB_MB)
    out = {"seconds": time.perf_counter() - t0, "passed": rep.passed, "bytes_read": rep.bytes_read}
  else:  # the anchor: load both whole, map MaxText back to HF (the inverse hooks), np.allclose per tensor
    import struct

    from parity_jax.dtypes import SAFETENSORS_DTYPES

    def load_file(
        path,
    ):  # the whole file into memory, every tensor a view of it (safetensors' numpy loader has no bf16)
      with open(path, "rb") as f:
        data = f.read()
      (n,) = struct.unpack("<Q", data[:8])
      header = json.loads(data[8 : 8 + n])
      buf = np.frombuffer(data, np.uint8, offset=8 + n)
      return {
          k: buf[v["data_offsets"][0] : v["data_offsets"][1]].view(SAFETENSORS_DTYPES[v["dtype"]]).reshape(v["shape"])
          for k, v in header.items()
          if k != "__metadata__"
      }

    base = children.rss()
    t0 = time.perf_counter()
    hf = load_file(os.path.join(args["source"], "model.safetensors"))
    mt = load_file(os.path.join(args["migrated"], "model.safetensors"))
    d = args["dims"]
    lay = "params/params/decoder/layers/"
    ok = np.allclose(hf["model.embed_tokens.weight"], mt["params/params/token_embedder/embedding"], 1e-2, 1e-2)
    names = {
        "self_attn.q_proj.weight": "self_attention/query/kernel",
        "self_attn.k_proj.weight": "self_attention/key/kernel",
        "self_attn.v_proj.weight": "self_attention/value/kernel",
        "self_attn.o_proj.weight": "self_attention/out/kernel",
        "mlp.gate_proj.weight": "mlp/wi_0/kernel",
        "mlp.up_proj.weight": "mlp/wi_1/kernel",
        "mlp.down_proj.weight": "mlp/wo/kernel",
        "self_attn.q_proj.bias": "self_attention/query/bias",
        "self_attn.k_proj.bias": "self_attention/key/bias",
        "self_attn.v_proj.bias": "self_attention/value/bias",
        "input_layernorm.weight": "pre_self_attention_layer_norm/scale",
        "post_attention_layernorm.weight": "post_self_attention_layer_norm/scale",
    }
    for i in range(d["layers"]):
      for n, to in names.items():
        x = hf[f"model.layers.{i}.{n}"]
        y = np.take(mt[lay + to], i, axis=1)
        y = y.reshape(x.shape[::-1]).T if x.ndim == 2 else y.reshape(x.shape)
        ok = ok and np.allclose(x, y, 1e-2, 1e-2)
    out = {"seconds": time.perf_counter() - t0, "passed": bool(ok)}
  out["baseline_rss"] = base
  print(json.dumps(out))


def main() -> None:
  ap = children.conversion_parser(__doc__)
  ap.add_argument("--keep", action="store_true")
  ap.add_argument("--root", help="where the two sides are written (reused when there, and then kept)")
  a = ap.parse_args()
  if children.ran_as_child(a, child):
    return
  d = dims(a.scale)
  machine = children.machine()
  root = a.root or tempfile.mkdtemp(prefix="parity_conv_bench_")
  try:
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(root, "maxtext", "model.safetensors")):
      os.makedirs(root, exist_ok=True)
      children.run_child(__file__, "generate", root=root, dims=d, dtype=a.dtype)
    src, mig = os.path.join(root, "hf"), os.path.join(root, "maxtext")
    gen_s = time.perf_counter() - t0
    size = os.path.getsize(os.path.join(src, "model.safetensors"))
    os.system(f"cat {src}/model.safetensors {mig}/model.safetensors > /dev/null")
    got = children.measure(__file__, ("verify", "anchor"), a.reps, source=src, migrated=mig, dims=d)
    v, n = got["verify"], got["anchor"]
    # both sides are safetensors, read by byte range: the largest piece decoded whole is a slab
    bound = children.memory_bound(
        v["peak_above_idle"], [children.largest_chunk(p, int(SLAB_MB * MIB)) for p in (src, mig)]
    )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine,
        "scale": a.scale,
        "dtype": a.dtype,
        "dims": d,
        "model_bytes": size,
        "generate_s": round(gen_s, 1),
        "verifier": v,
        "anchor": n,
        "idle_peak_rss": got["idle"]["peak_rss"],
        "peak_ratio": v["peak_above_baseline"] / max(1, n["peak_above_baseline"]),
        "time_ratio": v["seconds"] / n["seconds"],
        "memory_bound": bound,
    }
    print(f"model: {size / MIB:.0f} MiB {a.dtype} ({d['layers']} layers, vocab {d['vocab']}); {machine}")
    print(f"{'':10s} {'seconds':>8s} {'peak MiB':>9s} {'verdict':>8s}")
    for name, r in (("verifier", v), ("anchor", n)):
      print(f"{name:10s} {r['seconds']:8.2f} {r['peak_above_baseline'] / MIB:9.0f} {str(r['passed']):>8s}")
    print(
        f"verifier/anchor: peak {result['peak_ratio']:.3f} (target <= 0.25), time {result['time_ratio']:.2f} (target <= 1)"
    )
    print(
        f"memory bound: verifier peak above an idle child {bound['figure'] / MIB:.0f} MiB vs 2 x"
        f" {bound['largest_chunk'] / MIB:.1f} MiB + 64 MiB = {bound['bound'] / MIB:.0f} MiB:"
        f" {'PASS' if bound['met'] else 'MISS'}"
    )
    print(json.dumps(result))
  finally:
    if not a.keep and not a.root:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
