"""Specs for the conversions others wrote, built from THEIR statements of the mapping (not parity_jax's presets).

* :func:`tunix_rules`: from google-tunix's own key map (``expected.json``'s ``tunix_key_map``: tunix's
  ``_get_key_and_transform_mapping`` permutes, reshapes and expert stacking), one rule per HF tensor.
* :func:`maxtext_rules`: from MaxText's mapping as transcribed in :mod:`tests.helpers.maxtext_layout` (scanned
  layers; hooks as ops: kernels transposed then reshaped, experts transposed, biases reshaped).
"""

from __future__ import annotations

import os
import re

from tests.helpers import maxtext_layout as MT

TUNIX_DIR = os.path.join(os.path.dirname(__file__), "..", "data", "conversions", "tunix")
# (fixture, tunix conversion, the cast between the HF dtype and the conversion's): every committed conversion
TUNIX_CONVERSIONS = [
    ("qwen3_dense_f32", "default", None),
    ("qwen3_moe_f32_sharded", "default", None),
    ("qwen2_dense_f32_tied", "default", None),
    ("qwen3_dense_bf16_tied_sharded", "default", None),
    ("qwen3_dense_bf16_tied_sharded", "f32", "float32"),  # tunix's dtype=float32: an exact widening cast
]


def tunix_rules(key_map: dict, cast: str | None = None) -> list[dict]:
  """One rule per HF tensor, straight from tunix's own key map (permute, reshape, stack axis and index)."""
  rules = []
  for hf, t in key_map.items():
    r = {"match": re.escape(hf), "to": t.get("stacked_into", t["tunix_key"]).replace(".", "/")}
    ops = ([{"transpose": t["permute"]}] if t.get("permute") else []) + (
        [{"reshape": t["reshape"]}] if t.get("reshape") else []
    )
    if ops:
      r["ops"] = ops
    if "stack_axis" in t:
      r["stack"] = [{"axis": t["stack_axis"], "index": str(t["stack_index"])}]
    if cast:
      r["cast"] = cast
    rules.append(r)
  return rules


def maxtext_rules(hf_config: dict, prefix: str = "") -> list[dict]:
  """One rule per HF tensor from MaxText's mapping (the helper's transcription): hooks as ops, stacks by position."""
  dims = MT.QwenDims.from_hf_config(hf_config)
  shapes = MT.maxtext_shapes(dims, True)
  hf_shapes = MT.hf_shapes(dims)
  rules = []
  for mt, src in MT.param_mapping(dims, True).items():
    to = prefix + mt.replace("-", "/")
    target = shapes[mt]
    if isinstance(src, str):
      members, axes, one = [(src, ())], [], target
    elif not isinstance(src[0], list):
      members, axes = [(k, (i,)) for i, k in enumerate(src)], [MT.PARAM_SCAN_AXIS]
      one = target[:1] + target[2:]
    else:
      members, axes, one = [(k, (e, l)) for e, inner in enumerate(src) for l, k in enumerate(inner)], [0, 1], target[2:]
    for hf, index in members:
      hs = hf_shapes[hf]
      ops = []
      if len(hs) == 2 and ("kernel" in mt or "wi_" in mt or "wo" in mt):
        ops.append({"transpose": [1, 0]})
        if tuple(hs[::-1]) != tuple(one):
          ops.append({"reshape": list(one)})
      elif tuple(hs) != tuple(one):
        ops.append({"reshape": list(one)})
      r = {"match": re.escape(hf), "to": to}
      if ops:
        r["ops"] = ops
      if axes:
        r["stack"] = [{"axis": a, "index": str(i)} for a, i in zip(axes, index)]
      rules.append(r)
  return rules
