"""The GPU checks in one call: f32 parity vs torch, bf16 7B prefill, SVF at 0.6B, determinism. Any backend.

  PYTHONPATH=. python -m bench.gpu_suite --out=DIR              # full: <= 6 min on an H100/H200-class GPU
  PYTHONPATH=. python -m bench.gpu_suite --out=DIR --quick      # <= 2 min: the same sections, fewer layers and reps
  PYTHONPATH=. python -m bench.gpu_suite --out=DIR --tiny       # seconds, any CPU: what the test suite runs
  PYTHONPATH=. python -m bench.gpu_suite --out=DIR --shapes=reduced   # the full suite at reduced shapes (CPU dry run)

Runs from the repository root with nothing installed beyond what the GPU
image has (jax, torch, transformers, orbax, safetensors, absl): it imports
parity_jax from the checkout, writes no weights to disk (random weights are
drawn on the device with ``jax.random``; the torch models are built with
HF's random init directly on the device), and without torch/transformers the
torch comparisons are reported as skipped while the rest runs. It writes
``DIR/gpu_suite.json`` (schema ``parity_jax.gpu_suite/1``) and
``DIR/gpu_suite.txt`` (the summary it also prints). Exit 0 when every
correctness check passes (parity, determinism), 1 when one fails; the
performance targets are reported, not enforced.

Sections:

* ``peaks`` -- the measured matmul peaks of this device: bf16 (``N^3`` bf16
  dot, f32 accumulation) and f32 at ``Precision.HIGHEST`` (no TF32), by JAX
  and by torch; the larger of the two is the peak the MFU figures use.
* ``parity`` -- a small random Qwen2 (GQA, q/k/v biases) and Qwen3 (q/k
  norms, explicit head_dim) built by the oracle
  (:mod:`parity_jax.oracle.forward_goldens`), their HF eager float32 forward
  on this device (torch, TF32 off, ``float32_matmul_precision("highest")``)
  against ours (float32, every einsum ``HIGHEST``, default matmul precision
  ``highest``) on the same device: every stage within the ``f32`` profile.
* ``prefill`` -- bf16 prefill at the Qwen2.5-7B shape (28 layers, hidden
  3584, 28/4 heads, intermediate 18944, vocab 152064), batch 1, seq 2048:
  tokens/s and MFU against the measured bf16 peak for our forward with HF's
  eager attention and with ``jax.nn.dot_product_attention`` (cuDNN on GPU),
  the capture overhead (``capture=True`` over plain), and the ratio to HF
  torch bf16 with SDPA on the same device. FLOPs: ``2 N`` per token for the
  ``N`` matmul weights (lm_head included, embedding gather not) plus
  ``4 L T d_attn`` per token for the two attention contractions over the
  full ``T x T`` score matrix (the PaLM count, no causal halving).
  Targets: MFU >= 50%, time <= 0.8x torch's.
* ``svf`` -- SVF all-selected reconstruction (``parity_jax.svf.reconstruct``,
  float32, HIGHEST) over Qwen3-0.6B's selected shapes (28 layers of q/k/v/o
  and gate/up/down plus the 151936 x 1024 embedding, full rank, 1221 GFLOP),
  components drawn on the device: TFLOP/s against the measured f32 HIGHEST
  peak and the ratio to the torch formula (TF32 off) on the same arrays
  (dlpack). Target >= 70% of the peak.
* ``determinism`` -- a 2-layer model of the prefill shape, bf16: the forward
  (plain and ``capture=True``) run twice in this process must give identical
  bytes, and again in a child process started with ``XLA_FLAGS`` plus
  :data:`DETERMINISM_FLAG` (on GPU, XLA's flag that excludes
  non-deterministic kernels and pins autotuning); the child's bytes are
  also compared with this process's.

``--quick``: prefill and SVF with 4 layers, fewer repetitions. ``--tiny``:
tiny shapes everywhere (the CPU test of this script). ``--shapes=reduced``:
the full suite's code paths at shapes a CPU runs in a minute.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Output directory (gpu_suite.json, gpu_suite.txt).")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer layers and repetitions (<= 2 min on an H100/H200-class GPU).")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes and one repetition: seconds on any CPU (the CI test).")
_SHAPES = flags.DEFINE_enum(
    "shapes", None, ["full", "reduced", "tiny"], "Shape set (default: full, or tiny with --tiny)."
)
_SECTIONS = flags.DEFINE_list("sections", ["peaks", "parity", "prefill", "svf", "determinism"], "Sections to run.")
_TORCH = flags.DEFINE_bool("torch", True, "Compare against torch when torch/transformers import.")
_CHILD = flags.DEFINE_string("child", None, "Internal: the determinism child's job (JSON).")

SCHEMA = "parity_jax.gpu_suite/1"
#: XLA flag the determinism child runs with (documented in docs/benchmarks.md); on CPU XLA is deterministic anyway.
DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=true"
#: Tried when an XLA build no longer knows DETERMINISM_FLAG (an unknown XLA flag aborts the process).
FALLBACK_DETERMINISM_FLAG = "--xla_gpu_exclude_nondeterministic_ops=true"
BUDGET_S = {"full": 360.0, "quick": 120.0, "reduced": 300.0, "tiny": 20.0}

QWEN25_7B = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
    use_sliding_window=False,
)

# Per shape set: prefill model/seq, SVF (hidden, q, kv, intermediate, vocab, layers), peak matmul size, parity models.
SHAPES: dict[str, dict[str, Any]] = {
    "full": {
        "prefill": dict(QWEN25_7B),
        "seq": 2048,
        "quick_layers": 4,
        "svf": dict(hidden=1024, q=2048, kv=1024, inter=3072, vocab=151936, layers=28),
        "svf_quick_layers": 4,
        "peak_n": 8192,
        "det_layers": 2,
        "parity": {
            "qwen2": dict(
                vocab_size=1024,
                hidden_size=256,
                intermediate_size=704,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=2,
                max_position_embeddings=4096,
            ),
            "qwen3": dict(
                vocab_size=1024,
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=64,
                max_position_embeddings=4096,
            ),
        },
        "parity_seq": 64,
    },
    "reduced": {
        "prefill": dict(QWEN25_7B, vocab_size=19008, hidden_size=448, intermediate_size=2368, num_hidden_layers=4),
        "seq": 256,
        "quick_layers": 2,
        "svf": dict(hidden=128, q=256, kv=128, inter=384, vocab=4748, layers=4),
        "svf_quick_layers": 2,
        "peak_n": 1024,
        "det_layers": 2,
        "parity": {
            "qwen2": dict(
                vocab_size=512,
                hidden_size=128,
                intermediate_size=352,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=4096,
            ),
            "qwen3": dict(
                vocab_size=512,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=32,
                max_position_embeddings=4096,
            ),
        },
        "parity_seq": 32,
    },
    "tiny": {
        "prefill": dict(
            QWEN25_7B,
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        "seq": 16,
        "quick_layers": 1,
        "svf": dict(hidden=32, q=32, kv=32, inter=32, vocab=160, layers=1),
        "svf_quick_layers": 1,
        "peak_n": 128,
        "det_layers": 1,
        "parity": {
            "qwen2": dict(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
            ),
            "qwen3": dict(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=256,
            ),
        },
        "parity_seq": 8,
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def _torch_or_reason() -> tuple[Any, Any, str | None]:
  """(torch, transformers, None) or (None, None, why not)."""
  if not _TORCH.value:
    return None, None, "--notorch"
  try:
    import torch
    import transformers
  except Exception as e:  # noqa: BLE001 -- any import failure means: no torch side
    return None, None, f"torch/transformers not importable: {type(e).__name__}: {e}"
  return torch, transformers, None


def _torch_device(torch: Any) -> str:
  import jax

  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_strict_f32(torch: Any) -> dict[str, Any]:
  """No TF32 anywhere in torch: what every float32 comparison and the f32 peak run under."""
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  torch.set_float32_matmul_precision("highest")
  return {
      "torch.backends.cuda.matmul.allow_tf32": False,
      "torch.backends.cudnn.allow_tf32": False,
      "torch.float32_matmul_precision": "highest",
  }


def _sync(torch: Any, device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


def _timeit(fn: Callable[[], Any], reps: int, sync: Callable[[Any], Any]) -> dict[str, float]:
  """First call (compile + run) and the best / median of ``reps`` further calls, in seconds."""
  t0 = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(max(1, reps)):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return {"first_s": first, "best_s": min(times), "median_s": statistics.median(times), "reps": len(times)}


def _jax_sync(x: Any) -> Any:
  import jax

  return jax.block_until_ready(x)


def _sha256_arrays(arrays: list[Any]) -> str:
  import numpy as np

  h = hashlib.sha256()
  for a in arrays:
    a = np.asarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
  return h.hexdigest()


def _section(name: str, fn: Callable[[], dict[str, Any]], results: dict[str, Any]) -> None:
  """Runs one section; an exception becomes ``{"error": ...}`` so the other sections still run."""
  t0 = time.perf_counter()
  print(f"[gpu_suite] {name} ...", flush=True)
  try:
    out = fn()
  except Exception as e:  # noqa: BLE001 -- a failed section is reported, never hides the others
    out = {
        "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        "traceback": traceback.format_exc(limit=6),
    }
  out["wall_s"] = time.perf_counter() - t0
  results[name] = out
  print(f"[gpu_suite] {name} done in {out['wall_s']:.1f} s", flush=True)
  gc.collect()


def _mode() -> tuple[str, bool]:
  shapes = _SHAPES.value or ("tiny" if _TINY.value else "full")
  return shapes, bool(_QUICK.value or _TINY.value)


def _reps(quick: bool, full: int, fast: int) -> int:
  return fast if quick else full


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


def section_peaks(shapes: dict[str, Any], quick: bool) -> dict[str, Any]:
  """Measured matmul peaks: bf16 and f32 HIGHEST, ``N^3`` dots, by JAX and by torch."""
  import jax
  import jax.numpy as jnp

  n = shapes["peak_n"]
  reps = _reps(quick, 10, 3)
  flop = 2.0 * n**3
  out: dict[str, Any] = {"n": n, "flop_per_matmul": flop}
  key = jax.random.key(0)
  for label, dtype, precision in (
      ("bf16", jnp.bfloat16, jax.lax.Precision.DEFAULT),
      ("f32_highest", jnp.float32, jax.lax.Precision.HIGHEST),
  ):
    a = jax.random.normal(key, (n, n), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
    mm = jax.jit(lambda x, y, p=precision: jnp.dot(x, y, precision=p, preferred_element_type=x.dtype))
    t = _timeit(lambda: mm(a, b), reps, _jax_sync)
    out[label] = {"jax_tflops": flop / t["best_s"] / 1e12, "jax_time": t}
    del a, b
  torch, _, why = _torch_or_reason()
  if torch is None:
    out["torch"] = {"skipped": why}
  else:
    dev = _torch_device(torch)
    _torch_strict_f32(torch)
    for label, dtype in (("bf16", torch.bfloat16), ("f32_highest", torch.float32)):
      g = torch.Generator(device=dev).manual_seed(0)
      a = torch.randn((n, n), dtype=dtype, device=dev, generator=g)
      b = torch.randn((n, n), dtype=dtype, device=dev, generator=g)
      t = _timeit(lambda: a @ b, reps, lambda _: _sync(torch, dev))
      out[label].update(torch_tflops=flop / t["best_s"] / 1e12, torch_time=t, torch_device=dev)
      del a, b
  for label in ("bf16", "f32_highest"):
    out[label]["peak_tflops"] = max(v for k, v in out[label].items() if k.endswith("_tflops"))
  return out


def _write_parity_checkpoint(directory: str, model_type: str, config: dict[str, Any], model: Any) -> None:
  """config.json (transformers 4.x keys our allowlist reads) and model.safetensors from the HF model's weights."""
  import numpy as np
  import safetensors.numpy

  from parity_jax.oracle import to_numpy

  cfg = dict(
      config,
      model_type=model_type,
      hidden_act="silu",
      rms_norm_eps=1e-6,
      rope_theta=1000000.0,
      tie_word_embeddings=False,
      use_sliding_window=False,
  )
  if model_type == "qwen3":
    cfg["attention_bias"] = False
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  tensors = {name: np.ascontiguousarray(to_numpy(p)) for name, p in model.state_dict().items()}
  safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def section_parity(shapes: dict[str, Any], quick: bool) -> dict[str, Any]:
  """HF eager f32 (torch, TF32 off) vs our f32 forward on this device, every stage within the f32 profile."""
  del quick
  torch, _, why = _torch_or_reason()
  if torch is None:
    return {"skipped": why}
  import jax
  import numpy as np

  from parity_jax import qwen2
  from parity_jax.bundles import StageBundle, compare_bundles
  from parity_jax.oracle import forward_goldens, hf_forward

  precision = _torch_strict_f32(torch)
  precision["jax_default_matmul_precision"] = getattr(jax.config, "jax_default_matmul_precision", "highest")
  dev = _torch_device(torch)
  out: dict[str, Any] = {"torch_device": dev, "jax_device": str(jax.devices()[0]), "precision": precision, "models": {}}
  seq = shapes["parity_seq"]
  for i, (model_type, config) in enumerate(shapes["parity"].items()):
    full = dict(config, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)
    if model_type == "qwen3":
      full["attention_bias"] = False
    model = forward_goldens.build_model(model_type, full, seed=4242 + i)  # float32, eager, widened weights
    tokens, mask = forward_goldens.make_inputs(
        config["vocab_size"], 4242 + i, {"batch": 2, "seq": seq, "pad": [("left", 3), (None, 0)]}
    )
    with tempfile.TemporaryDirectory() as d:
      _write_parity_checkpoint(d, model_type, config, model)
      model = model.to(dev)

      def inputs_to_device(module, args, kwargs):
        return (
            tuple(a.to(dev) if torch.is_tensor(a) else a for a in args),
            {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in kwargs.items()},
        )

      hook = model.register_forward_pre_hook(inputs_to_device, with_kwargs=True)
      try:
        golden = hf_forward.capture_hf_stages(model, tokens, mask)
      finally:
        hook.remove()
      ours = qwen2.capture_stages(d, tokens, attention_mask=mask)
    rep = compare_bundles(StageBundle(golden), ours, "f32")
    worst = max(rep.rows, key=lambda r: r.stats.rel_l2 if np.isfinite(r.stats.rel_l2) else np.inf)
    out["models"][model_type] = {
        "config": config,
        "tokens_shape": list(tokens.shape),
        "stages": len(rep.rows),
        "passed": rep.passed,
        "worst_stage": worst.name,
        "worst_rel_l2": float(worst.stats.rel_l2),
        "verdict": rep.verdict_line(),
    }
    del model
  out["passed"] = all(m["passed"] for m in out["models"].values())
  return out


def _model_flops(cfg: Any, seq: int, batch: int = 1) -> float:
  """2 N per token (matmul weights incl. lm_head) + 4 L T d_attn per token (QK^T and PV, full T x T)."""
  d, hd = cfg.hidden_size, cfg.head_dim
  per_layer = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d + 3 * d * cfg.intermediate_size
  n_matmul = cfg.num_layers * per_layer + cfg.vocab_size * d
  tokens = batch * seq
  attention = 4.0 * cfg.num_layers * seq * cfg.num_heads * hd * tokens
  return 2.0 * n_matmul * tokens + attention


def section_prefill(shapes: dict[str, Any], quick: bool, peaks: dict[str, Any]) -> dict[str, Any]:
  """bf16 prefill at the Qwen2.5-7B shape: ours (eager and fused attention), capture overhead, HF torch SDPA."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from parity_jax import qwen2

  cfg_dict = dict(shapes["prefill"])
  if quick:
    cfg_dict["num_hidden_layers"] = min(cfg_dict["num_hidden_layers"], shapes["quick_layers"])
  cfg = qwen2.parse_config(cfg_dict)
  seq = shapes["seq"]
  reps = _reps(quick, 5, 2)
  flops = _model_flops(cfg, seq)
  peak = (peaks.get("bf16") or {}).get("peak_tflops")
  out: dict[str, Any] = {
      "config": cfg_dict,
      "batch": 1,
      "seq": seq,
      "model_flops": flops,
      "bf16_peak_tflops": peak,
      "flops_convention": "2 N per token + 4 L T d_attn per token (full T x T scores)",
  }
  t0 = time.perf_counter()
  model = qwen2.Model(cfg, _jax_sync(qwen2.random_params(cfg, seed=0, dtype=jnp.bfloat16)))
  out["weights_on_device_s"] = time.perf_counter() - t0
  out["weight_bytes"] = int(sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, seq)), jnp.int32)

  def figures(t: dict[str, float]) -> dict[str, Any]:
    tflops = flops / t["best_s"] / 1e12
    return dict(t, tokens_per_s=seq / t["best_s"], tflops=tflops, mfu=(tflops / peak) if peak else None)

  runs: dict[str, Any] = {}
  runs["eager"] = figures(_timeit(lambda: qwen2.forward(model, tokens), reps, _jax_sync))
  fused = "cudnn" if jax.default_backend() == "gpu" else "xla"
  try:
    runs[f"fused_{fused}"] = figures(_timeit(lambda: qwen2.forward(model, tokens, attention=fused), reps, _jax_sync))
  except Exception as e:  # noqa: BLE001 -- cuDNN may not take this shape/device; fall back to XLA's kernel
    runs[f"fused_{fused}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    if fused != "xla":
      runs["fused_xla"] = figures(_timeit(lambda: qwen2.forward(model, tokens, attention="xla"), reps, _jax_sync))
  cap = _timeit(lambda: qwen2.forward(model, tokens, capture=True), reps, _jax_sync)
  runs["eager_capture"] = figures(cap)
  out["runs"] = runs
  out["capture_overhead"] = cap["best_s"] / runs["eager"]["best_s"]
  ok = {k: v for k, v in runs.items() if "best_s" in v and k != "eager_capture"}
  best_name = min(ok, key=lambda k: ok[k]["best_s"])
  out["best"] = {"run": best_name, **{k: ok[best_name][k] for k in ("best_s", "tokens_per_s", "tflops", "mfu")}}
  logits = qwen2.forward(model, tokens)
  out["logits_finite"] = bool(jnp.isfinite(logits.astype(jnp.float32)).all())
  del model, logits
  gc.collect()

  torch, transformers, why = _torch_or_reason()
  if torch is None:
    out["torch"] = {"skipped": why}
    return out
  dev = _torch_device(torch)
  hf_cfg = {k: v for k, v in cfg_dict.items() if k != "model_type"}
  config = transformers.Qwen2Config(**hf_cfg, attn_implementation="sdpa")
  t0 = time.perf_counter()
  old = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)
  try:
    with torch.device(dev):
      hf = transformers.Qwen2ForCausalLM(config).eval()
  finally:
    torch.set_default_dtype(old)
  build_s = time.perf_counter() - t0
  ids = torch.from_numpy(np.asarray(tokens).astype(np.int64)).to(dev)
  with torch.inference_mode():
    t = _timeit(lambda: hf(input_ids=ids, use_cache=False).logits, reps, lambda _: _sync(torch, dev))
  out["torch"] = dict(
      t,
      device=dev,
      attn_implementation=config._attn_implementation,
      build_s=build_s,
      tokens_per_s=seq / t["best_s"],
      tflops=flops / t["best_s"] / 1e12,
  )
  out["ours_over_torch_time"] = out["best"]["best_s"] / t["best_s"]
  del hf, ids
  if dev == "cuda":
    torch.cuda.empty_cache()
  return out


def svf_shapes(hidden: int, q: int, kv: int, inter: int, vocab: int, layers: int) -> list[tuple[str, tuple[int, int]]]:
  """Qwen3-style selected tensors ``[out, in]``: q/k/v/o and gate/up/down per layer, then the embedding."""
  out = []
  for i in range(layers):
    p = f"model.layers.{i}."
    out += [
        (p + "self_attn.q_proj.weight", (q, hidden)),
        (p + "self_attn.k_proj.weight", (kv, hidden)),
        (p + "self_attn.v_proj.weight", (kv, hidden)),
        (p + "self_attn.o_proj.weight", (hidden, q)),
        (p + "mlp.gate_proj.weight", (inter, hidden)),
        (p + "mlp.up_proj.weight", (inter, hidden)),
        (p + "mlp.down_proj.weight", (hidden, inter)),
    ]
  return out + [("model.embed_tokens.weight", (vocab, hidden))]


def section_svf(shapes: dict[str, Any], quick: bool, peaks: dict[str, Any]) -> dict[str, Any]:
  """SVF all-selected at Qwen3-0.6B shapes, f32 HIGHEST: TFLOP/s vs the f32 peak, and vs the torch formula."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from parity_jax.svf import reconstruct

  sv = dict(shapes["svf"])
  if quick:
    sv["layers"] = min(sv["layers"], shapes["svf_quick_layers"])
  job = svf_shapes(**sv)
  reps = _reps(quick, 3, 2)
  total_flop = sum(2.0 * m * n * min(m, n) for _, (m, n) in job)
  peak = (peaks.get("f32_highest") or {}).get("peak_tflops")
  out: dict[str, Any] = {"shapes": sv, "tensors": len(job), "gflop": total_flop / 1e9, "f32_peak_tflops": peak}

  def components(i: int, m: int, n: int):
    k = min(m, n)
    key = jax.random.fold_in(jax.random.key(7), i)
    ku, kv_, ks, ko = jax.random.split(key, 4)
    u = jax.random.normal(ku, (m, k), jnp.float32) * np.float32(1 / np.sqrt(m))
    v = jax.random.normal(kv_, (n, k), jnp.float32) * np.float32(1 / np.sqrt(n))
    s = jnp.sort(jax.random.uniform(ks, (k,), jnp.float32, 0.05, 4.0))[::-1]
    o = jax.random.normal(ko, (k,), jnp.float32) * np.float32(0.1)
    return u, s, v, o

  items = [components(i, m, n) for i, (_, (m, n)) in enumerate(job)]
  _jax_sync(items)

  def jax_pass():
    return [reconstruct(u, s, v, o) for u, s, v, o in items]

  t = _timeit(jax_pass, reps, _jax_sync)
  out["jax"] = dict(t, tflops=total_flop / t["best_s"] / 1e12)
  out["jax"]["fraction_of_f32_peak"] = out["jax"]["tflops"] / peak if peak else None
  layer0 = [r for (name, _), r in zip(job, jax_pass()) if name.startswith("model.layers.0.")]
  layer0_bits = [np.asarray(r).view(np.uint16) for r in layer0]

  torch, _, why = _torch_or_reason()
  if torch is None:
    out["torch"] = {"skipped": why}
  else:
    dev = _torch_device(torch)
    _torch_strict_f32(torch)

    def to_torch(x):
      try:
        return torch.from_dlpack(x).to(dev)
      except Exception:  # noqa: BLE001 -- no dlpack path between these two builds: copy through the host
        return torch.from_numpy(np.asarray(x)).to(dev)

    titems = [tuple(to_torch(x) for x in it) for it in items]

    def torch_formula(u, s, v, o):
      ss = s * (1.0 + o)
      nrm = s.sum() / ss.sum()
      return ((u * ss.reshape(1, -1)) @ v.T * nrm).to(torch.bfloat16)

    with torch.inference_mode():
      tt = _timeit(lambda: [torch_formula(*it) for it in titems], reps, lambda _: _sync(torch, dev))
      tl0 = [torch_formula(*it) for (name, _), it in zip(job, titems) if name.startswith("model.layers.0.")]
    from parity_jax.oracle import to_numpy

    differing = sum(int((to_numpy(a).view(np.uint16) != b).sum()) for a, b in zip(tl0, layer0_bits))
    out["torch"] = dict(tt, device=dev, tflops=total_flop / tt["best_s"] / 1e12)
    out["jax_over_torch_time"] = t["best_s"] / tt["best_s"]
    out["layer0_bf16_elements_differing_from_torch"] = differing
    out["layer0_bf16_elements"] = int(sum(b.size for b in layer0_bits))
    del titems, tl0
    if dev == "cuda":
      torch.cuda.empty_cache()
  del items
  return out


def determinism_hashes(job: dict[str, Any]) -> dict[str, Any]:
  """Hashes of the logits (plain forward) and of every stage (capture=True), each run twice."""
  import jax.numpy as jnp
  import numpy as np

  from parity_jax import qwen2

  cfg = qwen2.parse_config(job["config"])
  model = qwen2.Model(cfg, _jax_sync(qwen2.random_params(cfg, seed=job["seed"], dtype=jnp.dtype(job["dtype"]))))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, job["seq"])), jnp.int32)
  plain = [_sha256_arrays([qwen2.forward(model, tokens)]) for _ in range(2)]
  captured = []
  for _ in range(2):
    logits, stages = qwen2.forward(model, tokens, capture=True)
    captured.append(_sha256_arrays([logits, *stages.values()]))
  return {"plain": plain, "capture": captured}


def _determinism_job(shapes: dict[str, Any]) -> dict[str, Any]:
  cfg_dict = dict(shapes["prefill"], num_hidden_layers=shapes["det_layers"])
  return {"config": cfg_dict, "seq": shapes["seq"], "dtype": "bfloat16", "seed": 0}


def start_determinism_child(shapes: dict[str, Any], flag: str = DETERMINISM_FLAG) -> tuple[subprocess.Popen, float]:
  """The child process: this script with ``--child``, ``XLA_FLAGS`` plus ``flag``."""
  env = dict(
      os.environ,
      XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip(),
      PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
  )
  job = _determinism_job(shapes)
  proc = subprocess.Popen(
      [sys.executable, "-m", "bench.gpu_suite", f"--child={json.dumps(job)}"],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  return proc, time.perf_counter()


def section_determinism(
    shapes: dict[str, Any], quick: bool, child: tuple[subprocess.Popen, float] | None = None
) -> dict[str, Any]:
  """Byte-identical forwards: twice in this process, twice in a child with the determinism flag, and across.

  ``child``: one started earlier (CPU runs overlap it with the other sections; on an accelerator it starts
  here, after the timed sections, so it never shares the device with them).
  """
  del quick
  job = _determinism_job(shapes)
  here = determinism_hashes(job)
  out: dict[str, Any] = {
      "config": job["config"],
      "seq": shapes["seq"],
      "dtype": "bfloat16",
      "flag": DETERMINISM_FLAG,
      "this_process": here,
      "this_process_identical": (here["plain"][0] == here["plain"][1] and here["capture"][0] == here["capture"][1]),
  }
  proc, t0 = child if child is not None else start_determinism_child(shapes)
  out["child_overlapped"] = child is not None

  def wait(proc: subprocess.Popen) -> tuple[str, str]:
    try:
      return proc.communicate(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()

  stdout, stderr = wait(proc)
  if proc.returncode != 0 and DETERMINISM_FLAG.split("=")[0].lstrip("-") in stderr:  # this XLA rejects the flag
    out["flag_rejected"] = (stderr.strip().splitlines() or [""])[-1]
    out["flag"] = FALLBACK_DETERMINISM_FLAG
    proc, t0 = start_determinism_child(shapes, FALLBACK_DETERMINISM_FLAG)
    stdout, stderr = wait(proc)
  out["child_s"] = time.perf_counter() - t0
  if proc.returncode != 0:
    out["child_error"] = (stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
    out["identical"] = False
    return out
  child_hashes = json.loads(stdout.strip().splitlines()[-1])
  child = child_hashes
  out["child_with_flag"] = child
  out["child_identical"] = child["plain"][0] == child["plain"][1] and child["capture"][0] == child["capture"][1]
  out["across_processes_identical"] = (
      child["plain"][0] == here["plain"][0] and child["capture"][0] == here["capture"][0]
  )
  out["identical"] = out["this_process_identical"] and out["child_identical"]
  return out


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
  import jax

  from parity_jax.provenance import package_versions

  devs = jax.devices()
  info: dict[str, Any] = {
      "backend": jax.default_backend(),
      "device_kind": devs[0].device_kind,
      "devices": len(devs),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "versions": package_versions(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
  except (OSError, StopIteration):
    info["cpu"] = platform.processor()
  torch, transformers, _ = _torch_or_reason()
  if torch is not None:
    info["torch"] = torch.__version__
    info["transformers"] = transformers.__version__
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
      info["torch_device_name"] = torch.cuda.get_device_name(0)
  return info


def _fmt(x: Any, spec: str = ".3g") -> str:
  return "n/a" if x is None else format(x, spec)


def summary(doc: dict[str, Any]) -> str:
  """The readable summary: one block per section, the targets last."""
  m = doc["machine"]
  lines = [
      f"parity_jax GPU suite ({doc['mode']['shapes']}{', quick' if doc['mode']['quick'] else ''}) on "
      f"{m['backend']} {m['device_kind']} x{m['devices']}; jax {m['versions'].get('jax')}, "
      f"torch {m.get('torch', 'absent')}, transformers {m.get('transformers', 'absent')}; {doc['wall_s']:.1f} s"
  ]
  s = doc["sections"]
  pk = s.get("peaks", {})
  if "bf16" in pk:
    lines.append(
        f"peaks (N={pk['n']}): bf16 {_fmt(pk['bf16']['peak_tflops'])} TFLOP/s, "
        f"f32 HIGHEST {_fmt(pk['f32_highest']['peak_tflops'])} TFLOP/s"
    )
  for name, sec in s.items():
    if "error" in sec:
      lines.append(f"{name}: ERROR {sec['error']}")
    elif "skipped" in sec:
      lines.append(f"{name}: skipped ({sec['skipped']})")
  par = s.get("parity", {})
  for mt, r in par.get("models", {}).items():
    lines.append(
        f"parity {mt}: {'PASS' if r['passed'] else 'FAIL'} f32 vs HF torch on {par['torch_device']}, "
        f"{r['stages']} stages, worst {r['worst_stage']} rel-L2 {r['worst_rel_l2']:.2e}"
    )
  pf = s.get("prefill", {})
  if "best" in pf:
    lines.append(
        f"prefill bf16 {pf['config']['num_hidden_layers']} layers x seq {pf['seq']}: best {pf['best']['run']} "
        f"{pf['best']['best_s'] * 1e3:.1f} ms, {pf['best']['tokens_per_s']:.0f} tok/s, "
        f"{pf['best']['tflops']:.1f} TFLOP/s, MFU {_fmt(pf['best']['mfu'], '.1%')}; "
        f"eager {pf['runs']['eager']['best_s'] * 1e3:.1f} ms; capture overhead {pf['capture_overhead']:.2f}x"
    )
    if "best_s" in pf.get("torch", {}):
      lines.append(
          f"prefill torch SDPA: {pf['torch']['best_s'] * 1e3:.1f} ms; ours/torch time "
          f"{pf['ours_over_torch_time']:.2f}"
      )
  sv = s.get("svf", {})
  if "jax" in sv:
    lines.append(
        f"svf f32 {sv['tensors']} tensors {sv['gflop']:.1f} GFLOP: {sv['jax']['best_s'] * 1e3:.1f} ms, "
        f"{sv['jax']['tflops']:.2f} TFLOP/s = {_fmt(sv['jax']['fraction_of_f32_peak'], '.1%')} of the f32 peak"
        + (
            f"; torch {sv['torch']['best_s'] * 1e3:.1f} ms, ours/torch time {sv['jax_over_torch_time']:.2f}"
            if "best_s" in sv.get("torch", {})
            else ""
        )
    )
  dt = s.get("determinism", {})
  if "this_process_identical" in dt:
    lines.append(
        f"determinism: in-process identical {dt['this_process_identical']}; child with {dt['flag']} "
        f"identical {dt.get('child_identical', dt.get('child_error'))}; across processes "
        f"{dt.get('across_processes_identical')}"
    )
  lines.append(
      "targets: "
      + ", ".join(f"{k} {'met' if v else ('n/a' if v is None else 'NOT met')}" for k, v in doc["targets"].items())
  )
  lines.append(f"verdict: {'PASS' if doc['passed'] else 'FAIL'} (correctness: parity and determinism)")
  return "\n".join(lines)


def _targets(doc: dict[str, Any]) -> dict[str, Any]:
  s = doc["sections"]
  pf, sv, par, dt = (s.get(k, {}) for k in ("prefill", "svf", "parity", "determinism"))
  mfu = (pf.get("best") or {}).get("mfu")
  ratio = pf.get("ours_over_torch_time")
  frac = (sv.get("jax") or {}).get("fraction_of_f32_peak")
  return {
      "parity_f32_every_stage": par.get("passed"),
      "prefill_mfu_ge_50pct": None if mfu is None else mfu >= 0.5,
      "prefill_time_le_0.8x_torch": None if ratio is None else ratio <= 0.8,
      "svf_ge_70pct_of_f32_peak": None if frac is None else frac >= 0.7,
      "deterministic": dt.get("identical"),
      "within_budget": doc["wall_s"] <= doc["budget_s"],
  }


def main(argv) -> int:
  del argv
  if _CHILD.value:
    print(json.dumps(determinism_hashes(json.loads(_CHILD.value))))
    return 0
  if not _OUT.value:
    print("gpu_suite: error: --out=DIR is required", file=sys.stderr)
    return 2
  unknown = sorted(set(_SECTIONS.value) - {"peaks", "parity", "prefill", "svf", "determinism"})
  if unknown:
    print(f"gpu_suite: error: unknown --sections {unknown}", file=sys.stderr)
    return 2
  os.makedirs(_OUT.value, exist_ok=True)
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)  # no backend-probing chatter
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")  # explicit: no TF32 / bf16 passes for f32 anywhere
  shapes_name, quick = _mode()
  shapes = SHAPES[shapes_name]
  t0 = time.perf_counter()
  doc: dict[str, Any] = {
      "schema": SCHEMA,
      "mode": {"shapes": shapes_name, "quick": quick},
      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "machine": _machine(),
      "sections": {},
  }
  sections = doc["sections"]
  want = set(_SECTIONS.value)
  child = None
  if "determinism" in want and jax.default_backend() == "cpu":  # no device to share: overlap the child's start-up
    child = start_determinism_child(shapes)
  if "peaks" in want:
    _section("peaks", lambda: section_peaks(shapes, quick), sections)
  if "parity" in want:
    _section("parity", lambda: section_parity(shapes, quick), sections)
  if "prefill" in want:
    _section("prefill", lambda: section_prefill(shapes, quick, sections.get("peaks", {})), sections)
  if "svf" in want:
    _section("svf", lambda: section_svf(shapes, quick, sections.get("peaks", {})), sections)
  if "determinism" in want:
    _section("determinism", lambda: section_determinism(shapes, quick, child), sections)
  doc["wall_s"] = time.perf_counter() - t0
  doc["budget_s"] = BUDGET_S["quick" if quick and shapes_name == "full" else shapes_name]
  doc["targets"] = _targets(doc)
  errors = [k for k, v in sections.items() if "error" in v]
  doc["passed"] = (
      not errors
      and doc["targets"]["parity_f32_every_stage"] is not False
      and doc["targets"]["deterministic"] is not False
  )
  text = summary(doc)
  from parity_jax import jsonio

  with open(os.path.join(_OUT.value, "gpu_suite.json"), "w") as f:
    f.write(jsonio.dumps(doc, indent=1) + "\n")
  with open(os.path.join(_OUT.value, "gpu_suite.txt"), "w") as f:
    f.write(text + "\n")
  print(text)
  return 0 if doc["passed"] else 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
