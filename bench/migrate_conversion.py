"""Benchmark: performing an HF -> MaxText (scanned) conversion with the streaming migrator vs. load-all-then-save.

  flock /tmp/parity_bench.lock .venv/bin/python bench/migrate_conversion.py [--scale=0.125] [--dtype=float32] [--source=DIR]

The HF side is bench/conversion.py's Qwen2.5-0.5B-shaped random model (``model.safetensors``, scaled by
--scale). Each in a fresh child process (peak RSS from ``os.wait4``'s rusage, above the child's RSS after its
imports):

* the migrator: ``migrate(hf, out, preset_spec("hf-to-maxtext-scanned"))`` (the verifier's evaluation, one
  destination chunk at a time, 64 MiB chunks, layout ``standard``);
* the usual way (MaxText's ``to_maxtext`` in its default mode): every HF tensor loaded, the MaxText tree built
  in numpy (kernels transposed and reshaped, layers stacked on axis 1), then
  ``ocp.StandardCheckpointer().save(out, tree)``.

Both outputs are compared leaf by leaf (bytes) at the end. Memory bound (issue 17 §6): the migrator's peak RSS
above that of an idle child (the same imports) within 2x the largest piece it must decode or encode whole (the
source is read by byte range: a slab; the destination is written a storage chunk at a time, chunk shapes from
its metadata) plus 64 MiB, printed PASS or MISS. ``--source`` reuses an HF directory (bench/conversion.py
--root's hf/). Prints a table and a JSON blob.
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
from bench.conversion import dims, generate  # noqa: E402

MIB = 1 << 20


def child(task: str, args: dict) -> None:
  if task == "generate":
    generate(args["root"], args["dims"], args["dtype"])
    print(json.dumps({"seconds": 0.0, "baseline_rss": 0}))
    return
  import numpy as np
  import orbax.checkpoint as ocp  # noqa: F401  (imported before the baseline by both)

  from parity_jax.checkpoint import migrate, open_checkpoint
  from parity_jax.checkpoint.migrate.schedule import ELEMENT_SLAB_BYTES
  from parity_jax.checkpoint.presets import preset_spec

  src, out = args["source"], args["out"]
  if task == "idle":  # the same imports, no work: the baseline of the memory bound
    print(json.dumps({"seconds": 0.0, "baseline_rss": children.rss()}))
    return
  if task == "migrate":
    spec = preset_spec("hf-to-maxtext-scanned", src)
    base = children.rss()
    t0 = time.perf_counter()
    migrate(src, out, spec, overwrite=True)
    res = {"seconds": time.perf_counter() - t0, "slab_bytes": ELEMENT_SLAB_BYTES}
  elif task == "usual":
    base = children.rss()
    t0 = time.perf_counter()
    ck = open_checkpoint(src)
    hf = {n: ck.read_whole(m) for n, m in ck.leaves.items()}
    d = args["dims"]
    D, H, KV, hd, F, L = d["hidden"], d["heads"], d["kv"], d["hd"], d["inter"], d["layers"]
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
    flat = {
        "token_embedder/embedding": hf["model.embed_tokens.weight"],
        "decoder/decoder_norm/scale": hf["model.norm.weight"],
    }
    for n, (to, shape) in kernel.items():
      per = [hf[f"model.layers.{i}.{n}"] for i in range(L)]
      flat["decoder/layers/" + to] = np.stack(
          [x.T.reshape(shape) if x.ndim == 2 else x.reshape(shape) for x in per], axis=1
      )
    tree: dict = {}
    for k, v in flat.items():
      node = tree.setdefault("params", {}).setdefault("params", {})
      parts = k.split("/")
      for p in parts[:-1]:
        node = node.setdefault(p, {})
      node[parts[-1]] = v
    saver = ocp.StandardCheckpointer()
    saver.save(out, tree, force=True)
    saver.wait_until_finished()
    saver.close()
    res = {"seconds": time.perf_counter() - t0}
  else:  # compare both outputs leaf by leaf
    a, b = open_checkpoint(args["out"]), open_checkpoint(args["other"])
    same = sorted(a.leaves) == sorted(b.leaves) and all(
        a.read_whole(a.leaves[k]).tobytes() == b.read_whole(b.leaves[k]).tobytes() for k in a.leaves
    )
    print(json.dumps({"seconds": 0.0, "baseline_rss": 0, "same": same}))
    return
  res["baseline_rss"] = base
  print(json.dumps(res))


def main() -> None:
  ap = children.conversion_parser(__doc__)
  ap.add_argument("--source", help="an HF directory bench/conversion.py --root wrote (its hf/), instead of a new one")
  a = ap.parse_args()
  if children.ran_as_child(a, child):
    return
  d = dims(a.scale)
  machine = children.machine()
  root = tempfile.mkdtemp(prefix="parity_migconv_bench_")
  try:
    if a.source:
      os.symlink(os.path.abspath(a.source), os.path.join(root, "hf"))
    else:
      children.run_child(__file__, "generate", root=root, dims=d, dtype=a.dtype)
    src = os.path.join(root, "hf")
    size = os.path.getsize(os.path.join(src, "model.safetensors"))
    os.system(f"cat {src}/model.safetensors > /dev/null")
    out = os.path.join(root, "out")  # each run writes it anew (the migrator's overwrite; the usual way's force)
    got = children.measure(__file__, ("migrate", "usual"), a.reps, source=src, out=out, dims=d)
    m, u = got["migrate"], got["usual"]
    mine = out + "_migrated"  # out now holds the usual way's output (the last run)
    children.run_child(__file__, "migrate", source=src, out=mine, dims=d)
    same = children.run_child(__file__, "compare", source=src, out=mine, other=out)["same"]
    # the source is read by byte range (a slab of the migrator's); the destination is written a chunk at a time
    bound = children.memory_bound(
        m["peak_above_idle"],
        [children.largest_chunk(src, m["slab_bytes"]), children.largest_chunk(mine, 0, written=True)],
    )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine,
        "scale": a.scale,
        "dtype": a.dtype,
        "dims": d,
        "model_bytes": size,
        "migrator": m,
        "usual": u,
        "outputs_equal": same,
        "peak_ratio": m["peak_above_baseline"] / max(1, u["peak_above_baseline"]),
        "time_ratio": m["seconds"] / u["seconds"],
        "memory_bound": bound,
    }
    print(f"model: {size / MIB:.0f} MiB {a.dtype} ({d['layers']} layers, vocab {d['vocab']}); outputs equal: {same}")
    print(f"{'':10s} {'seconds':>8s} {'peak MiB':>9s}")
    for name, r in (("migrator", m), ("usual", u)):
      print(f"{name:10s} {r['seconds']:8.2f} {r['peak_above_baseline'] / MIB:9.0f}")
    print(f"migrator/usual: peak {result['peak_ratio']:.3f}, time {result['time_ratio']:.2f}")
    print(
        f"memory bound: migrator peak above an idle child {bound['figure'] / MIB:.0f} MiB vs 2 x"
        f" {bound['largest_chunk'] / MIB:.1f} MiB ({bound['largest_chunk_leaf']}) + 64 MiB ="
        f" {bound['bound'] / MIB:.0f} MiB: {'PASS' if bound['met'] else 'MISS'}"
    )
    print(json.dumps(result))
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
