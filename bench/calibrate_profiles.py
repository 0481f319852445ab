"""Calibrates the built-in tolerance profiles on real transformer arithmetic (HF Qwen2/Qwen3, torch CPU).

  python -m bench.calibrate_profiles

For small seeded HF models (Qwen2 with q/k/v biases, Qwen3 with q/k norms;
initializer range 0.02, 0.1 and 0.2, the last two "widened" as in the
goldens), with the HF float32 forward pass as the golden:

* f32 row: candidate = the float64 forward pass rounded to float32, i.e. the
  correctly rounded answer, which is as far as an honest float32 port with a
  different reduction order can be expected to land;
* bf16 row: candidate = the HF forward pass with bfloat16 weights and
  activations.

It prints the worst per-stage figures the profiles bound (rel-L2, cosine,
logits KL, argmax agreement, top-5 overlap), the largest noise-floored growth
across any stage (must stay below the profile's jump factor), the margin of
each figure to the profile's bound, the verdict, and the verdict after one
layer's v_proj bias is zeroed (must name that stage). Needs the [oracle] extra.
"""

from __future__ import annotations

import copy
import sys

import numpy as np

from parity_jax.bundles import compare_bundles
from parity_jax.oracle import require_oracle
from parity_jax.bundles import BUILTIN_PROFILES


def _worst(report) -> dict[str, float]:
  rows = report.rows
  lg = report.row("logits").logits
  return {
      "rel_l2": max(r.stats.rel_l2 for r in rows),
      "one_minus_cos": max(1.0 - r.stats.cosine for r in rows),
      "growth": max(r.growth for r in rows if r.growth is not None),
      "kl_max": lg.kl_max,
      "kl_mean": lg.kl_mean,
      "argmax": lg.argmax_agreement,
      "top5": lg.topk_overlap_mean,
  }


def main() -> int:
  require_oracle()
  import torch

  from tests.helpers import hf as hf_capture

  torch.set_num_threads(2)
  tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
  print(f"torch {torch.__version__}; tokens {tokens.shape}; 4 layers, hidden 64, vocab 256\n")
  head = (
      f"{'model':<8} {'init':>5} {'cand':<5} {'max rel-L2':>10} {'max 1-cos':>9} {'max growth':>10} {'KL max':>9}"
      f" {'KL mean':>9} {'argmax':>7} {'top5':>6}  {'verdict':<6} v_proj bias dropped (qwen2) / weight x1.2 (qwen3), layer 2 ->"
  )
  print(head)
  print("-" * len(head))
  worst = {"f32": {}, "bf16": {}}
  for kind in ("qwen2", "qwen3"):
    for init in (0.02, 0.1, 0.2):
      model = hf_capture.tiny_qwen(kind, num_layers=4, init=init, seed=1)
      golden = hf_capture.capture(model, tokens)
      f64 = hf_capture.capture(copy.deepcopy(model).to(torch.float64), tokens)
      cands = {
          "f32": {k: v.astype(np.float32) for k, v in f64.items()},
          "bf16": hf_capture.capture(copy.deepcopy(model).to(torch.bfloat16), tokens),
      }
      broken = copy.deepcopy(model)
      with torch.no_grad():
        if broken.model.layers[2].self_attn.v_proj.bias is not None:
          broken.model.layers[2].self_attn.v_proj.bias.zero_()
        else:  # Qwen3 has no q/k/v biases: scale the v_proj weight by 1.2 instead
          broken.model.layers[2].self_attn.v_proj.weight.mul_(1.2)
      broken_c = {
          "f32": hf_capture.capture(broken, tokens),
          "bf16": hf_capture.capture(copy.deepcopy(broken).to(torch.bfloat16), tokens),
      }
      for prof in ("f32", "bf16"):
        rep = compare_bundles(golden, cands[prof], profile=prof)
        w = _worst(rep)
        for k, v in w.items():
          worst[prof][k] = v if k not in worst[prof] else (min if k in ("argmax", "top5") else max)(worst[prof][k], v)
        rb = compare_bundles(golden, broken_c[prof], profile=prof)
        print(
            f"{kind:<8} {init:>5} {prof:<5} {w['rel_l2']:>10.2e} {w['one_minus_cos']:>9.1e} {w['growth']:>10.2f}"
            f" {w['kl_max']:>9.1e} {w['kl_mean']:>9.1e} {w['argmax']:>7.3f} {w['top5']:>6.3f}  {rep.verdict.status:<6}"
            f" {rb.verdict.status}"
            + (f" at {rb.first_divergent} (x{rb.verdict.growth:.3g})" if rb.first_divergent else "")
        )
  print("\nworst case over all models vs the built-in bounds (margin = bound / observed):")
  for prof in ("f32", "bf16"):
    p = BUILTIN_PROFILES[prof]
    stage_rule, logit_rule = p.rule_for("layers.0.q_proj"), p.rule_for("logits")
    w = worst[prof]
    parts = [
        f"rel-L2 {w['rel_l2']:.2e} vs {stage_rule.max_rel_l2:g} (x{stage_rule.max_rel_l2 / w['rel_l2']:.1f})",
        f"growth {w['growth']:.2f} vs jump factor {p.jump_factor:g} (x{p.jump_factor / w['growth']:.1f})",
    ]
    if stage_rule.min_cosine is not None:
      parts.append(
          f"1-cos {w['one_minus_cos']:.1e} vs {1 - stage_rule.min_cosine:.0e} (x{(1 - stage_rule.min_cosine) / w['one_minus_cos']:.1f})"
      )
    if logit_rule.max_kl is not None:
      parts.append(
          f"KL max {w['kl_max']:.1e} vs {logit_rule.max_kl:g} (x{logit_rule.max_kl / max(w['kl_max'], 1e-300):.3g})"
      )
    if logit_rule.max_mean_kl is not None:
      parts.append(
          f"KL mean {w['kl_mean']:.1e} vs {logit_rule.max_mean_kl:g} (x{logit_rule.max_mean_kl / w['kl_mean']:.1f})"
      )
    if logit_rule.min_argmax_agreement is not None:
      parts.append(f"argmax {w['argmax']:.3f} vs {logit_rule.min_argmax_agreement:g}")
    if logit_rule.min_topk_overlap is not None:
      parts.append(f"top-5 overlap {w['top5']:.3f} vs {logit_rule.min_topk_overlap:g}")
    print(f"  {prof}: " + "; ".join(parts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
