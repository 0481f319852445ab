"""Greedy decoding with a KV cache: parity_jax.qwen2.generate vs HF ``generate``, tokens/s, same weights, same run.

  flock /tmp/parity_bench.lock python -m bench.decode_vs_torch                 # Qwen2.5-0.5B shape, f32
  flock /tmp/parity_bench.lock python -m bench.decode_vs_torch --layers=4 --new_tokens=16 --rounds=3   # quick

Weights are random (``init_params``), built once in JAX and handed to torch
through the loader's HF names (as bench/forward_vs_torch.py does), so both
sides decode the same model; the run checks that the greedy tokens agree and
reports the worst per-step logits rel-L2. Timed: the whole ``generate`` call
(prefill + N decode steps, host round trips included), medians over
interleaved rounds after a warm-up (which also compiles the two JAX
programs: the prefill and the one decode step). tokens/s = batch x N / time.
The ratio is JAX time / torch time in the same run (lower is faster).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app, flags

# The model shape and the shared flags (--layers, --batch, --rounds, --json_out) are bench.forward_vs_torch's;
# its forward-only flags (--seq, --dtype, ...) do not apply here.
from bench.forward_vs_torch import _BATCH, _JSON, _LAYERS, _ROUNDS, qwen25_05b_config

_PROMPT = flags.DEFINE_integer("prompt", 32, "Prompt length.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens generated per row.")


def main(argv):
  del argv
  import jax
  import numpy as np
  import torch
  import transformers

  from parity_jax import qwen2

  load_start = os.getloadavg()
  cfg_dict = qwen25_05b_config(_LAYERS.value)
  cfg = qwen2.parse_config(cfg_dict, source="Qwen2.5-0.5B shape")
  b, t, n = _BATCH.value, _PROMPT.value, _NEW.value
  print(
      f"machine: {platform.machine()} {os.cpu_count()} cpus, jax {jax.__version__} "
      f"backend={jax.default_backend()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
      f"transformers {transformers.__version__}",
      flush=True,
  )
  params = qwen2.init_params(cfg, 0, scale=0.02)
  model = qwen2.Model(cfg, params)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size), np.int64)

  tcfg = transformers.Qwen2Config(
      **{k: v for k, v in cfg_dict.items() if k != "model_type"}, attn_implementation="sdpa"
  )
  from transformers.initialization import no_init_weights

  with no_init_weights():
    hf = transformers.Qwen2ForCausalLM(tcfg).to(torch.float32).eval()
  state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in qwen2.to_hf_tensors(params, cfg).items()}
  missing, unexpected = hf.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  hf.tie_weights()
  del state
  ids = torch.from_numpy(tokens)
  gen = transformers.GenerationConfig(
      do_sample=False,
      max_new_tokens=n,
      min_new_tokens=n,
      output_logits=True,
      return_dict_in_generate=True,
      eos_token_id=None,
      pad_token_id=0,
  )

  def torch_gen():
    with torch.inference_mode():
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return out.sequences.numpy(), np.stack([x.float().numpy() for x in out.logits])

  def jax_gen():
    return qwen2.generate(model, tokens, max_new_tokens=n)

  t0 = time.perf_counter()
  ours_tokens, ours_logits = jax_gen()
  first_call = time.perf_counter() - t0
  ref_tokens, ref_logits = torch_gen()
  same = bool(np.array_equal(ours_tokens, ref_tokens))
  rel = [float(np.linalg.norm(ours_logits[k] - ref_logits[k]) / np.linalg.norm(ref_logits[k])) for k in range(n)]
  print(f"tokens identical: {same}; worst step logits rel-L2 {max(rel):.3g}", flush=True)

  times = {"torch": [], "jax": []}
  for _ in range(_ROUNDS.value):
    for name, fn in (("torch", torch_gen), ("jax", jax_gen)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  ratios = statistics.median(j / tt for j, tt in zip(times["jax"], times["torch"]))
  figures = {
      "date": time.strftime("%Y-%m-%d"),
      "machine": f"{platform.machine()} {os.cpu_count()} cpus",
      "layers": _LAYERS.value,
      "batch": b,
      "prompt": t,
      "new_tokens": n,
      "torch_s": med["torch"],
      "jax_s": med["jax"],
      "torch_tokens_per_s": b * n / med["torch"],
      "jax_tokens_per_s": b * n / med["jax"],
      "jax_over_torch_time": med["jax"] / med["torch"],
      "median_per_round_ratio": ratios,
      "jax_first_call_s (compile + run)": first_call,
      "tokens_identical": same,
      "worst_step_logits_rel_l2": max(rel),
      "loadavg_start": load_start,
      "loadavg_end": os.getloadavg(),
  }
  print(json.dumps(figures, indent=1))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  app.run(main)
