"""Canonical stage names of the Qwen2/Qwen3 forward pass, in execution order.

One table shared by the JAX model (which emits these names), the HF oracle
(which captures the same names with hooks) and the bundle comparison (which
orders stages by execution, not alphabetically, when a bundle carries no
``stage_order`` metadata).
"""

from __future__ import annotations

import re

# Per-layer stages, in execution order. ``q_norm``/``k_norm`` exist for Qwen3 only.
LAYER_STAGES: tuple[str, ...] = (
    "attn_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "q_norm",
    "k_norm",
    "q_rope",
    "k_rope",
    "attention",
    "attn_out",
    "post_attn_residual",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_silu",
    "ffn_swiglu",
    "ffn_out",
    "output",
)
QK_NORM_STAGES = frozenset({"q_norm", "k_norm"})

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def qwen_stage_names(num_layers: int, qk_norm: bool) -> list[str]:
  """All stage names of a forward pass, in execution order."""
  per_layer = [s for s in LAYER_STAGES if qk_norm or s not in QK_NORM_STAGES]
  names = ["embedding"]
  for i in range(num_layers):
    names += [f"layers.{i}.{s}" for s in per_layer]
  return names + ["final_norm", "logits"]


def parse_stage(name: str) -> tuple[int | None, str]:
  """``"layers.3.q_proj"`` -> ``(3, "q_proj")``; ``"logits"`` -> ``(None, "logits")``."""
  m = _LAYER_RE.match(name)
  return (int(m.group(1)), m.group(2)) if m else (None, name)


def qwen_stage_sort_key(name: str) -> tuple:
  """Sort key putting known Qwen stage names in execution order; unknown names last, by name."""
  layer, stage = parse_stage(name)
  if layer is None:
    if name == "embedding":
      return (0, 0, 0, name)
    if name == "final_norm":
      return (2, 0, 0, name)
    if name == "logits":
      return (2, 1, 0, name)
    return (3, 0, 0, name)
  pos = LAYER_STAGES.index(stage) if stage in LAYER_STAGES else len(LAYER_STAGES)
  return (1, layer, pos, name)


def is_qwen_stage_name(name: str) -> bool:
  layer, stage = parse_stage(name)
  return name in ("embedding", "final_norm", "logits") if layer is None else stage in LAYER_STAGES
