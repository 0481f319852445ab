"""The Qwen2/Qwen3 stage graph: every stage's name, its place in execution order and its data-flow inputs.

One table shared by the JAX model (which emits these names), the HF oracle
(which captures the same names with hooks), the bundle comparison (which
orders stages by execution, not alphabetically, when a bundle carries no
``stage_order`` metadata) and the verdict (which measures a stage's error
growth over its real inputs: ``v_proj`` reads ``attn_norm``, ``output`` reads
``ffn_out`` and ``post_attn_residual``).

A layer of a mixture-of-experts model (Qwen2-MoE, Qwen3-MoE) has a sparse
block in place of the dense MLP: ``router_logits`` (``[B, T, experts]``),
``routing_weights`` (``[B, T, top_k]``: softmax, top-k and, with
``norm_topk_prob``, renormalised), ``selected_experts`` (``[B, T, top_k]``
int32, in the order of the weights), ``routed_out`` (the weighted sum of the
selected experts), on Qwen2-MoE ``shared_out`` (the shared expert's output)
and ``shared_gate`` (the logit of its sigmoid gate, ``[B, T, 1]``), then
``ffn_out`` (the block's output) as on a dense layer.
"""

from __future__ import annotations

import re
from typing import Any, Collection, Sequence

__all__ = [
    "DENSE_MLP_STAGES",
    "LAYER_STAGES",
    "MOE_STAGES",
    "QK_NORM_STAGES",
    "SHARED_EXPERT_STAGES",
    "is_qwen_stage_name",
    "parse_stage",
    "qwen_stage_inputs",
    "qwen_stage_names",
    "qwen_stage_sort_key",
]

# Per-layer stages, in execution order. ``q_norm``/``k_norm`` exist for Qwen3 only; a layer has either the dense
# MLP's stages or the sparse MoE block's (the shared expert's on Qwen2-MoE only).
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
    "router_logits",
    "routing_weights",
    "selected_experts",
    "routed_out",
    "shared_out",
    "shared_gate",
    "ffn_out",
    "output",
)
QK_NORM_STAGES = frozenset({"q_norm", "k_norm"})
DENSE_MLP_STAGES = frozenset({"ffn_gate", "ffn_up", "ffn_silu", "ffn_swiglu"})
MOE_STAGES = frozenset(
    {"router_logits", "routing_weights", "selected_experts", "routed_out", "shared_out", "shared_gate"}
)
SHARED_EXPERT_STAGES = frozenset({"shared_out", "shared_gate"})

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")

# Per-layer data flow: stage -> tuple of inputs; an input given as a tuple means
# "the first of these that is compared" (q_rope reads q_norm on Qwen3, q_proj on Qwen2).
# "@prev" is the previous layer's output (the embedding for layer 0).
_LAYER_INPUTS: dict[str, tuple[Any, ...]] = {
    "attn_norm": ("@prev",),
    "q_proj": ("attn_norm",),
    "k_proj": ("attn_norm",),
    "v_proj": ("attn_norm",),
    "q_norm": ("q_proj",),
    "k_norm": ("k_proj",),
    "q_rope": (("q_norm", "q_proj"),),
    "k_rope": (("k_norm", "k_proj"),),
    "attention": (("q_rope", "q_norm", "q_proj"), ("k_rope", "k_norm", "k_proj"), "v_proj"),
    "attn_out": ("attention",),
    "post_attn_residual": ("attn_out", "@prev"),
    "ffn_norm": ("post_attn_residual",),
    "ffn_gate": ("ffn_norm",),
    "ffn_up": ("ffn_norm",),
    "ffn_silu": ("ffn_gate",),
    "ffn_swiglu": ("ffn_silu", "ffn_up"),
    "router_logits": ("ffn_norm",),
    "routing_weights": ("router_logits",),
    "selected_experts": ("router_logits",),
    "routed_out": ("ffn_norm", "routing_weights", "selected_experts"),
    "shared_out": ("ffn_norm",),
    "shared_gate": ("ffn_norm",),
    # a dense layer's ffn_out reads ffn_swiglu; a sparse block's reads the routed and the shared expert's outputs
    "ffn_out": ("ffn_swiglu", "routed_out", "shared_out", "shared_gate"),
    "output": ("ffn_out", "post_attn_residual"),
}
assert set(_LAYER_INPUTS) == set(LAYER_STAGES)


def qwen_stage_inputs(name: str, compared: Collection[str]) -> tuple[str, ...] | None:
  """Data-flow inputs of a Qwen stage among the ``compared`` names; None if ``name`` is not a Qwen stage.

  An empty tuple means: a Qwen stage, but none of its inputs is compared. ``compared`` is only asked for
  membership and iterated once (a set is fastest).
  """
  layer, stage = parse_stage(name)
  if layer is None:
    if name == "embedding":
      return ()
    if name in ("final_norm", "logits"):
      if name == "logits":
        return ("final_norm",) if "final_norm" in compared else _last_layer_output(compared)
      return _last_layer_output(compared)
    return None
  if stage not in _LAYER_INPUTS:
    return None
  prev = f"layers.{layer - 1}.output" if layer > 0 else "embedding"
  out = []
  for spec in _LAYER_INPUTS[stage]:
    options = spec if isinstance(spec, tuple) else (spec,)
    for opt in options:
      full = prev if opt == "@prev" else f"layers.{layer}.{opt}"
      if full in compared:
        out.append(full)
        break
  return tuple(out)


def _last_layer_output(compared: Collection[str]) -> tuple[str, ...]:
  layers = [parse_stage(n)[0] for n in compared if parse_stage(n)[1] == "output" and parse_stage(n)[0] is not None]
  return (f"layers.{max(layers)}.output",) if layers else ()


def qwen_stage_names(
    num_layers: int, qk_norm: bool, moe_layers: Sequence[int] = (), shared_expert: bool = False
) -> list[str]:
  """All stage names of a forward pass, in execution order.

  ``moe_layers`` are the layers with a sparse MoE block (the others have the
  dense MLP); ``shared_expert``: those blocks have Qwen2-MoE's gated shared expert.
  """
  moe_layers = set(moe_layers)

  def keep(stage: str, moe: bool) -> bool:
    if stage in QK_NORM_STAGES and not qk_norm:
      return False
    if stage in DENSE_MLP_STAGES:
      return not moe
    if stage in SHARED_EXPERT_STAGES:
      return moe and shared_expert
    return moe or stage not in MOE_STAGES

  names = ["embedding"]
  for i in range(num_layers):
    names += [f"layers.{i}.{s}" for s in LAYER_STAGES if keep(s, i in moe_layers)]
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
