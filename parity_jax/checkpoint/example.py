"""The shipped example: a small parameter-decomposition training state and its remap spec.

``goldens/checkpoints/`` holds (regenerate with ``python -m tools.make_example_checkpoint``):

* ``source/``   -- a legacy v0 PyTree checkpoint (``PyTreeCheckpointer``) of
  :func:`example_source_tree`: groups ``ci_fn``, ``ci_fn_opt_state``,
  ``components`` (per layer and kind g/u/d, a ``V`` of shape (1, d_in, C) and a
  ``U`` of shape (1, C, d_out) -- the leading singleton is legacy),
  ``components_opt_state``, ``sources``, ``sources_opt_state`` and a scalar
  ``step``. V and U differ in shape, so a V/U swap cannot pass a shape check;
  gate and up share shapes, so a gate<->up mix-up is caught only by values.
  Some ``sources`` elements are -0.0, +inf and a NaN with a non-default
  payload, so the example also proves that those survive bit for bit.
* ``spec.json`` -- :func:`example_spec`: kinds g/u/d become
  ``layers.<i>.mlp.{gate,up,down}_proj``, the singleton is squeezed from
  ``components`` and their optimizer moments, everything else keeps its value.
* ``migrated/`` -- a v1 checkpoint written by OUR migrator (tiny chunks, so
  the default verification streams chunk by chunk). The verifier checks it
  against ``source/`` independently; the tests additionally build migrated
  trees by hand and inject faults.
* ``MANIFEST.json`` -- seed, dimensions, library versions, the sha256 of every
  file, and the sha256 of every source leaf's bytes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["DIMS", "KINDS", "SEED", "example_source_tree", "example_spec_dict", "flatten", "leaf_sha256"]

SEED = 20261123
DIMS = {"layers": 2, "d_model": 16, "d_ff": 32, "C": 8, "ci_hidden": 4, "source_batch": 3}
KINDS = {"g": "gate_proj", "u": "up_proj", "d": "down_proj"}
EXAMPLE_CHUNK_MB = 1.0 / 1024  # 1 KiB chunks: the bigger leaves are stored in several chunks
NAN_PAYLOAD_BITS = 0x7FC0BEEF  # a quiet NaN with a non-default payload


def _shapes(d: dict[str, int]) -> dict[str, tuple[int, int]]:
  return {"g": (d["d_model"], d["d_ff"]), "u": (d["d_model"], d["d_ff"]), "d": (d["d_ff"], d["d_model"])}


def example_source_tree(seed: int = SEED, dims: dict[str, int] | None = None) -> dict[str, Any]:
  """The source training state as nested dicts of numpy arrays (deterministic in ``seed``)."""
  d = dict(DIMS, **(dims or {}))
  rng = np.random.default_rng(seed)
  layers = [str(i) for i in range(d["layers"])]
  c, h, b = d["C"], d["ci_hidden"], d["source_batch"]

  def f32(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  components = {
      l: {k: {"V": f32(1, din, c, scale=0.1), "U": f32(1, c, dout, scale=0.1)} for k, (din, dout) in _shapes(d).items()}
      for l in layers
  }
  ci_fn = {
      l: {k: {"w": f32(c, h).astype(ml_dtypes.bfloat16), "b": f32(h).astype(ml_dtypes.bfloat16)} for k in KINDS}
      for l in layers
  }
  sources = {l: {k: f32(b, c) for k in KINDS} for l in layers}
  # Values that must survive bit for bit: -0.0, +inf and a NaN with a payload.
  s = sources[layers[0]]["g"]
  s[0, 0] = -0.0
  s[0, 1] = np.inf
  s[0, 2] = np.array(NAN_PAYLOAD_BITS, np.uint32).view(np.float32)

  def moments(tree, count):
    mu = _map(lambda x: (rng.standard_normal(x.shape) * 1e-3).astype(np.float32), tree)
    nu = _map(lambda x: np.abs(rng.standard_normal(x.shape) * 1e-6).astype(np.float32), tree)
    return {"mu": mu, "nu": nu, "count": np.array(count, np.int32)}

  return {
      "ci_fn": ci_fn,
      "ci_fn_opt_state": moments(ci_fn, 1200),
      "components": components,
      "components_opt_state": moments(components, 1200),
      "sources": sources,
      "sources_opt_state": moments(sources, 1200),
      "step": np.array(1200, np.int64),
  }


def _map(fn, tree):
  if isinstance(tree, dict):
    return {k: _map(fn, v) for k, v in tree.items()}
  return fn(tree)


def example_spec_dict() -> dict[str, Any]:
  """The remap spec for the example, as the JSON object written to ``spec.json``."""
  rules = []
  for k, name in KINDS.items():
    rules.append({
        "match": rf"^(?P<grp>components|components_opt_state/(?:mu|nu))/(?P<layer>\d+)/{k}/(?P<vu>[VU])$",
        "to": rf"\g<grp>/layers.\g<layer>.mlp.{name}/\g<vu>",
        "squeeze": [0],
    })
  for k, name in KINDS.items():
    rules.append({
        "match": rf"^(?P<grp>ci_fn|ci_fn_opt_state/(?:mu|nu)|sources|sources_opt_state/(?:mu|nu))/(?P<layer>\d+)/{k}(?P<rest>/.+)?$",
        "to": rf"\g<grp>/layers.\g<layer>.mlp.{name}\g<rest>",
    })
  rules.append({"match": r"^(?P<grp>\w+_opt_state)/count$", "to": r"\g<grp>/count"})
  rules.append({"match": r"^step$", "to": "step"})
  return {
      "comment": "Legacy parameter-decomposition state -> HF-style module names; squeeze the legacy singleton of V/U.",
      "rules": rules,
      "group_depth": 1,
  }


def flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  """Leaf path ('/'-joined keys, list indices as decimal strings) -> leaf, in key order."""
  if isinstance(tree, dict):
    out: dict[str, Any] = {}
    for k in sorted(tree, key=str):
      out.update(flatten(tree[k], prefix + (str(k),)))
    return out
  if isinstance(tree, (list, tuple)):
    out = {}
    for i, v in enumerate(tree):
      out.update(flatten(v, prefix + (str(i),)))
    return out
  return {"/".join(prefix): tree}


def leaf_sha256(x: Any) -> str:
  """sha256 of a leaf's C-order bytes (what the verifier reports)."""
  if isinstance(x, str):
    return hashlib.sha256(x.encode()).hexdigest()
  a = np.ascontiguousarray(np.asarray(x))
  return hashlib.sha256(a.reshape(-1).view(np.uint8).tobytes()).hexdigest()
