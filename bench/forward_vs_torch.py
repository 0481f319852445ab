"""JAX Qwen2 forward vs HF transformers (torch) forward, same random weights, same run.

  flock /tmp/parity_bench.lock python -m bench.forward_vs_torch          # Qwen2.5-0.5B shape, f32, batch 1, seq 128

Qwen2.5-0.5B shape: hidden 896, 24 layers, 14 query / 2 kv heads, head_dim 64,
intermediate 4864, vocab 151936, tied embeddings. Weights are random
(``init_params``), built once in JAX and handed to torch through the HF names
of the loader's key table, so both sides compute with bit-identical weights
(the run checks the logits agree).

Reported, all measured in this run, medians over interleaved rounds after
warm-up (torch, JAX, JAX capture and the matmul reference alternate, so a
neighbour's load hits all of them alike):

* JAX/torch forward-time ratio (target <= 0.7);
* the f32 matmul rate on the forward's own matmul shapes -- every projection,
  both attention contractions and the lm_head, each shape jitted alone with the
  forward's einsum spec and precision -- and the fraction of that rate the
  whole forward achieves (target >= 90%);
* capture=True time over plain (target <= 1.25);
* compile time of the plain and the capture program, separately.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags

_LAYERS = flags.DEFINE_integer("layers", 24, "Decoder layers (24 for Qwen2.5-0.5B).")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 9, "Timed rounds (each times every contender once).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed warm-up rounds.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weight/activation dtype (both sides).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the HF torch forward.")
_ATTN = flags.DEFINE_string("torch_attn", "sdpa", "HF attn_implementation for the torch side (sdpa is HF's default).")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures to this JSON file.")


def qwen25_05b_config(layers: int) -> dict:
  return {
      "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
      "num_hidden_layers": layers, "num_attention_heads": 14, "num_key_value_heads": 2,
      "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
      "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 32768,
      "max_window_layers": 21, "torch_dtype": "bfloat16",
  }


def _median_time(fn, n: int) -> float:
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def matmul_shapes(cfg, b: int, t: int):
  """Every contraction of the forward: (name, einsum spec, lhs shape, rhs shape, count per forward, flops each)."""
  d, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  h, k, g, hd, n = cfg.num_heads, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim, cfg.num_layers
  rows = [
      ("q_proj", "btd,nhd->btnh", (b, t, d), (h, hd, d), n),
      ("k_proj/v_proj", "btd,khd->btkh", (b, t, d), (k, hd, d), 2 * n),
      ("scores", "btkgh,bskh->bkgts", (b, t, k, g, hd), (b, t, k, hd), n),
      ("attn@v", "bkgts,bskh->btkgh", (b, k, g, t, t), (b, t, k, hd), n),
      ("o_proj", "btnh,dnh->btd", (b, t, h, hd), (d, h, hd), n),
      ("gate/up", "btd,id->bti", (b, t, d), (i, d), 2 * n),
      ("down", "bti,di->btd", (b, t, i), (d, i), n),
      ("lm_head", "btd,vd->btv", (b, t, d), (v, d), 1),
  ]
  out = []
  for name, spec, ls, rs, count in rows:
    import numpy as np
    lhs_axes, rest = spec.split(",")
    rhs_axes, out_axes = rest.split("->")
    sizes = dict(zip(lhs_axes, ls)) | dict(zip(rhs_axes, rs))
    flops = 2 * int(np.prod([sizes[a] for a in set(lhs_axes + rhs_axes)]))
    out.append((name, spec, ls, rs, count, flops))
  return out


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from parity_jax import qwen2
  from parity_jax.compare import diff_stats
  from parity_jax.qwen2 import model as qmodel

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_DTYPE.value]
  cfg = qwen2.parse_config(qwen25_05b_config(_LAYERS.value), source="Qwen2.5-0.5B shape")
  b, t = _BATCH.value, _SEQ.value
  print(f"machine: {platform.machine()} {os.cpu_count()} cpus, jax {jax.__version__} backend={jax.default_backend()} "
        f"devices={jax.devices()}", flush=True)
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  t0 = time.perf_counter()
  params = qwen2.init_params(cfg, 0, dtype=dtype, scale=0.02)
  model = qwen2.Model(cfg, params)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size), np.int64)
  positions = np.arange(t, dtype=np.int32)[None]
  print(f"built random weights in {time.perf_counter() - t0:.1f}s", flush=True)

  # Compile times, each from a cold cache.
  compile_s = {}
  for capture in (False, True):
    jax.clear_caches()
    t0 = time.perf_counter()
    qmodel._forward.lower(model, tokens, None, positions, capture).compile()
    compile_s["capture" if capture else "plain"] = time.perf_counter() - t0
  jax.clear_caches()

  def jax_plain():
    qwen2.forward(model, tokens).block_until_ready()

  def jax_capture():
    logits, stages = qwen2.forward(model, tokens, capture=True)
    jax.block_until_ready((logits, stages))

  # The matmul reference: each of the forward's contraction shapes, alone, jitted, same spec and precision.
  mm = []
  rng = np.random.default_rng(2)
  for name, spec, ls, rs, count, flops in matmul_shapes(cfg, b, t):
    fn = jax.jit(lambda x, w, spec=spec: jnp.einsum(spec, x, w, precision=jax.lax.Precision.HIGHEST))
    x = jnp.asarray(rng.standard_normal(ls, dtype=np.float32), dtype)
    w = params.embed if name == "lm_head" else jnp.asarray(rng.standard_normal(rs, dtype=np.float32) * 0.02, dtype)
    fn(x, w).block_until_ready()
    mm.append(dict(name=name, fn=fn, x=x, w=w, count=count, flops=flops))
  total_flops = sum(m["count"] * m["flops"] for m in mm)

  hf = None
  if _TORCH.value:
    import torch
    import transformers

    tcfg = transformers.Qwen2Config(**{k: v for k, v in qwen25_05b_config(_LAYERS.value).items() if k != "model_type"},
                                    attn_implementation=_ATTN.value)
    t0 = time.perf_counter()
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[_DTYPE.value]
    try:
      from transformers.initialization import no_init_weights  # skip HF's random init: we load our weights
    except ImportError:  # older transformers
      import contextlib
      no_init_weights = contextlib.nullcontext
    with no_init_weights():
      hf = transformers.Qwen2ForCausalLM(tcfg).to(tdtype).eval()
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(tdtype)
             for k, v in qwen2.to_hf_tensors(params, cfg).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied
    del state
    print(f"built HF model in {time.perf_counter() - t0:.1f}s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, attn={_ATTN.value}", flush=True)
    ids = torch.from_numpy(tokens)

    def torch_fwd():
      with torch.inference_mode():
        return hf(input_ids=ids, use_cache=False).logits

    ref = torch_fwd().float().numpy()
    ours = np.asarray(qwen2.forward(model, tokens)).astype(np.float32)
    parity = diff_stats(ref, ours)
    print(f"logits JAX vs torch: rel_l2={parity.rel_l2:.3g} max|diff|={parity.max_abs_diff:.3g} "
          f"top1 agree={np.mean(ref.argmax(-1) == ours.argmax(-1)):.3f}", flush=True)

  contenders = [("jax", jax_plain), ("jax_capture", jax_capture)]
  if hf is not None:
    contenders.insert(0, ("torch", torch_fwd))
  times: dict[str, list[float]] = {name: [] for name, _ in contenders}
  mm_times: dict[str, list[float]] = {m["name"]: [] for m in mm}
  for r in range(_WARMUP.value + _ROUNDS.value):
    for name, fn in contenders:
      t0 = time.perf_counter()
      fn()
      if r >= _WARMUP.value:
        times[name].append(time.perf_counter() - t0)
    for m in mm:
      dt = _median_time(lambda m=m: m["fn"](m["x"], m["w"]).block_until_ready(), 3 if m["name"] == "lm_head" else 7)
      if r >= _WARMUP.value:
        mm_times[m["name"]].append(dt)
    if r >= _WARMUP.value:
      print(f"round {r - _WARMUP.value + 1}: " + " ".join(f"{n}={times[n][-1]:.3f}s" for n in times), flush=True)

  med = {n: statistics.median(v) for n, v in times.items()}
  mm_med = {n: statistics.median(v) for n, v in mm_times.items()}
  matmul_s = sum(m["count"] * mm_med[m["name"]] for m in mm)
  matmul_rate = total_flops / matmul_s
  fwd_rate = total_flops / med["jax"]
  res = {
      "date": time.strftime("%Y-%m-%d"),
      "shape": f"Qwen2.5-0.5B ({cfg.num_layers} layers), batch {b}, seq {t}, {_DTYPE.value}",
      "forward_gflop": total_flops / 1e9,
      "jax_s": med["jax"],
      "jax_capture_s": med["jax_capture"],
      "capture_over_plain": med["jax_capture"] / med["jax"],
      "compile_plain_s": compile_s["plain"],
      "compile_capture_s": compile_s["capture"],
      "matmul_only_s": matmul_s,
      "matmul_gflops": matmul_rate / 1e9,
      "jax_forward_gflops": fwd_rate / 1e9,
      "fraction_of_matmul_rate": fwd_rate / matmul_rate,
      "per_shape_gflops": {m["name"]: m["flops"] / mm_med[m["name"]] / 1e9 for m in mm},
      "rounds": _ROUNDS.value,
  }
  if hf is not None:
    res |= {"torch_s": med["torch"], "jax_over_torch": med["jax"] / med["torch"],
            "torch_gflops": total_flops / med["torch"] / 1e9, "torch_attn": _ATTN.value}
  print()
  print(f"forward: {total_flops / 1e9:.1f} GFLOP in matmuls")
  if hf is not None:
    print(f"torch forward      {med['torch']:.3f} s  ({res['torch_gflops']:.1f} GFLOP/s)")
  print(f"JAX forward        {med['jax']:.3f} s  ({res['jax_forward_gflops']:.1f} GFLOP/s)"
        + (f"   JAX/torch = {res['jax_over_torch']:.3f}  (target <= 0.7)" if hf is not None else ""))
  print(f"matmuls alone      {matmul_s:.3f} s  ({res['matmul_gflops']:.1f} GFLOP/s)   "
        f"forward achieves {100 * res['fraction_of_matmul_rate']:.1f}% of it  (target >= 90%)")
  print("  per shape GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in res["per_shape_gflops"].items()))
  print(f"JAX capture=True   {med['jax_capture']:.3f} s   capture/plain = {res['capture_over_plain']:.3f}  (target <= 1.25)")
  print(f"compile            plain {compile_s['plain']:.1f} s, capture {compile_s['capture']:.1f} s")
  print(json.dumps(res))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(res, f, indent=2)
  return 0


if __name__ == "__main__":
  app.run(main)
