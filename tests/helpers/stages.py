"""Synthetic stage bundles with errors of known size at known stages (shared by the comparison tests).

The golden is random float32 data laid out like a small Qwen forward pass;
the candidate is the golden plus, per stage, an error of an exactly chosen
relative L2 size. Nothing here uses parity_jax's comparison code.
"""

from __future__ import annotations

import numpy as np

from parity_jax.bundles import qwen_graph as stage_names


def golden_stages(
    num_layers: int = 3, qk_norm: bool = False, seed: int = 0, tokens: int = 4, hidden: int = 16, vocab: int = 48
) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {}
  for name in stage_names.qwen_stage_names(num_layers, qk_norm):
    shape = (1, tokens, vocab) if name == "logits" else (1, tokens, hidden)
    out[name] = (rng.standard_normal(shape) * (4.0 if name == "logits" else 1.0)).astype(np.float32)
  return out


def with_error(golden: np.ndarray, rel: float, rng: np.random.Generator) -> np.ndarray:
  """``golden`` plus a random error of relative L2 size ``rel`` (in float64, then rounded to float32)."""
  g = golden.astype(np.float64)
  if rel == 0:
    return golden.copy()
  u = rng.standard_normal(g.shape)
  c = g + rel * np.linalg.norm(g) * u / np.linalg.norm(u)
  return c.astype(np.float32)


def candidate(golden: dict[str, np.ndarray], rel_of, seed: int = 1) -> dict[str, np.ndarray]:
  """``rel_of(index, name)`` gives the relative error of each stage (in execution order)."""
  rng = np.random.default_rng(seed)
  return {name: with_error(a, rel_of(i, name), rng) for i, (name, a) in enumerate(golden.items())}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.astype(np.float64), b.astype(np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))
