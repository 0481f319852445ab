"""The shipped example: a small parameter-decomposition training state and its remap spec.

``example_data/`` in this package (package data, so it ships with every
install; :func:`example_paths` finds it) holds (regenerate with
``parity-make-example-checkpoint --out=parity_jax/checkpoint/example_data``):

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
import importlib.resources
import json
import os
import pathlib
import shutil
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "DIMS",
    "KINDS",
    "SEED",
    "example_dir",
    "example_paths",
    "example_source_tree",
    "example_spec_dict",
    "leaf_sha256",
    "write_example",
]

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
    rules.append(
        {
            "match": rf"^(?P<grp>components|components_opt_state/(?:mu|nu))/(?P<layer>\d+)/{k}/(?P<vu>[VU])$",
            "to": rf"\g<grp>/layers.\g<layer>.mlp.{name}/\g<vu>",
            "squeeze": [0],
        }
    )
  for k, name in KINDS.items():
    rules.append(
        {
            "match": rf"^(?P<grp>ci_fn|ci_fn_opt_state/(?:mu|nu)|sources|sources_opt_state/(?:mu|nu))/(?P<layer>\d+)/{k}(?P<rest>/.+)?$",
            "to": rf"\g<grp>/layers.\g<layer>.mlp.{name}\g<rest>",
        }
    )
  rules.append({"match": r"^(?P<grp>\w+_opt_state)/count$", "to": r"\g<grp>/count"})
  rules.append({"match": r"^step$", "to": "step"})
  return {
      "comment": "Legacy parameter-decomposition state -> HF-style module names; squeeze the legacy singleton of V/U.",
      "rules": rules,
      "group_depth": 1,
  }


def leaf_sha256(x: Any) -> str:
  """sha256 of a leaf's C-order bytes (what the verifier reports)."""
  if isinstance(x, str):
    return hashlib.sha256(x.encode()).hexdigest()
  a = np.ascontiguousarray(np.asarray(x))
  return hashlib.sha256(a.reshape(-1).view(np.uint8).tobytes()).hexdigest()


def example_dir() -> pathlib.Path:
  """The shipped example's directory (``parity_jax/checkpoint/example_data``) in this installation."""
  return pathlib.Path(str(importlib.resources.files("parity_jax.checkpoint") / "example_data"))


def example_paths() -> tuple[str, str, str]:
  """``(source, migrated, spec)`` of the shipped example: what the verifier checks when given no paths."""
  d = example_dir()
  return str(d / "source"), str(d / "migrated"), str(d / "spec.json")


MANIFEST_FORMAT = "parity_jax.example_checkpoints/1"


def _write_into(out: pathlib.Path, seed: int) -> list[pathlib.Path]:
  import orbax.checkpoint as ocp

  from parity_jax.checkpoint import keypath
  from parity_jax.checkpoint.migrate import migrate
  from parity_jax.checkpoint.formats.tstore import quiet_orbax
  from parity_jax.files import file_sha256
  from parity_jax.provenance import default_provenance

  out.mkdir(parents=True)
  tree = example_source_tree(seed)
  with quiet_orbax():
    ocp.PyTreeCheckpointer().save(str(out / "source"), tree)
  spec_path = out / "spec.json"
  spec_path.write_text(json.dumps(example_spec_dict(), indent=2) + "\n")
  migrate(out / "source", out / "migrated", spec_path, chunk_mb=EXAMPLE_CHUNK_MB)
  leaves = {
      p: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype), "sha256": leaf_sha256(v)}
      for p, v in keypath.flatten(tree).items()
  }
  files = {str(p.relative_to(out)): file_sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
  manifest = {
      "format": MANIFEST_FORMAT,
      "generator": "parity-make-example-checkpoint",
      "note": (
          "source/ is a v0 PyTree checkpoint, migrated/ a v1 checkpoint written by parity_jax's migrator;"
          " leaf values are deterministic in the seed, file bytes are not (orbax writes timestamps and"
          " random file names)."
      ),
      "provenance": default_provenance(
          "parity_jax.checkpoint.example", seed=seed, dims=DIMS, chunk_mb=EXAMPLE_CHUNK_MB
      ),
      "source_leaves": leaves,
      "files": files,
  }
  (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  return [out / "source", out / "migrated", spec_path, out / "MANIFEST.json"]


def write_example(out: str | os.PathLike, seed: int = SEED) -> list[pathlib.Path]:
  """Writes the example (source/, spec.json, migrated/, MANIFEST.json) to ``out``; returns the paths.

  ``out`` may be missing, an empty directory, or a previous example (which is
  replaced only once the new one is complete); anything else is refused.
  """
  from parity_jax.errors import UsageError

  out = pathlib.Path(out).resolve()
  if out.exists() and not out.is_dir():
    raise UsageError(f"out={out} exists and is not a directory")
  if not out.parent.is_dir():
    raise UsageError(f"out: directory {out.parent} does not exist")
  old = None
  if out.exists() and any(out.iterdir()):
    manifest = out / "MANIFEST.json"
    if not (manifest.is_file() and MANIFEST_FORMAT in manifest.read_text(errors="replace")):
      raise UsageError(
          f"out={out} exists and does not hold a previous example (no {MANIFEST_FORMAT} MANIFEST); refusing to replace it"
      )
  if out.exists():
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
  try:
    paths = _write_into(out, seed)
  except BaseException:
    shutil.rmtree(out, ignore_errors=True)
    if old is not None:
      old.rename(out)
    raise
  if old is not None:
    shutil.rmtree(old)
  return paths
