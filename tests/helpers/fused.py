"""Tiny fused-projection sides for the concat / split tests: HF-style separate q/k/v and gate/up tensors, and
the fused layouts computed from them with plain numpy (``np.concatenate`` / ``np.stack``), never by parity_jax.

Forward (concat): ``layers/{l}/attn/qkv/kernel`` is ``[q.T | k.T | v.T]`` along axis 1 (transpose, then
concat: sizes 8, 4, 4 differ), and ``mlp/gate_up`` stacks the layers on axis 0 of ``[gate; up]`` concatenated
along axis 0 of each layer (target axis 1). Backward (split): an HF fused ``qkv_proj`` ``[q; k; v]`` and
``gate_up_proj`` ``[gate; up]`` (rows), split into the separate tensors.
"""

from __future__ import annotations

import os

import numpy as np

from tests.helpers import safetensors_files as W

L, D, Q, KV, F = 2, 8, 8, 4, 6


def separate(seed: int = 0) -> dict[str, np.ndarray]:
  """HF-style separate projections, float32."""
  rng = np.random.default_rng(seed)
  out = {}
  for layer in range(L):
    for p, n in (("q", Q), ("k", KV), ("v", KV)):
      out[f"model.layers.{layer}.self_attn.{p}_proj.weight"] = rng.standard_normal((n, D)).astype(np.float32)
    for p in ("gate", "up"):
      out[f"model.layers.{layer}.mlp.{p}_proj.weight"] = rng.standard_normal((F, D)).astype(np.float32)
  return out


def fused(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The concat rules' expected target, in numpy."""
  a = "model.layers.{}.self_attn.{}_proj.weight"
  m = "model.layers.{}.mlp.{}_proj.weight"
  out = {
      f"layers/{layer}/attn/qkv/kernel": np.concatenate([t[a.format(layer, p)].T for p in "qkv"], axis=1)
      for layer in range(L)
  }
  out["mlp/gate_up"] = np.stack([np.concatenate([t[m.format(i, "gate")], t[m.format(i, "up")]]) for i in range(L)])
  return out


CONCAT_RULES = [
    {
        "match": r"model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.weight",
        "to": r"layers/\1/attn/qkv/kernel",
        "ops": [{"transpose": [1, 0]}],
        "concat": {"axis": 1, "index": r"\2", "order": ["q", "k", "v"]},
    },
    {
        "match": r"model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.weight",
        "to": "mlp/gate_up",
        "stack": [{"axis": 0, "index": r"\1"}],
        "concat": {"axis": 1, "index": r"\2", "order": ["gate", "up"]},
    },
]


def hf_fused(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF fused projections (Phi-3 style rows): ``qkv_proj`` ``[q; k; v]``, ``gate_up_proj`` ``[gate; up]``."""
  out = {}
  for layer in range(L):
    pre = f"model.layers.{layer}."
    out[pre + "self_attn.qkv_proj.weight"] = np.concatenate([t[pre + f"self_attn.{p}_proj.weight"] for p in "qkv"])
    out[pre + "mlp.gate_up_proj.weight"] = np.concatenate([t[pre + f"mlp.{p}_proj.weight"] for p in ("gate", "up")])
  return out


SPLIT_RULES = [
    {
        "match": r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight",
        "to": r"model.layers.\1.self_attn.{p}_proj.weight",
        "split": {"axis": 0, "sizes": [Q, KV, KV], "name": "p", "names": ["q", "k", "v"]},
    },
    {
        "match": r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight",
        "to": r"model.layers.\1.mlp.{p}_proj.weight",
        "split": {"axis": 0, "sections": 2, "name": "p", "names": ["gate", "up"]},
    },
]


def write(directory, flat: dict[str, np.ndarray]) -> str:
  """``flat`` as one hand-written ``model.safetensors`` in ``directory``."""
  os.makedirs(directory, exist_ok=True)
  W.write_file(os.path.join(directory, "model.safetensors"), flat)
  return str(directory)
