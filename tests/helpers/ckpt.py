"""Shared builders for the checkpoint tests: a generated source tree, its hand-built migration.

The expected migrated tree is written out by hand below (not produced by the
spec engine or the migrator), so the tests check the migrator and the
verifier against an independent statement of what a correct migration is.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "parity_jax" / "checkpoint" / "example_data"
NAN_A = 0x7FC00001  # quiet NaN, payload 1 (the source value)
NAN_B = 0x7FC00002  # quiet NaN, payload 2 (a corrupted copy)


def nan32(bits: int) -> np.float32:
  return np.array(bits, np.uint32).view(np.float32)


def generated_source() -> dict:
  """Nested dicts and lists, python scalars, 0-d arrays, bf16/f32/int/bool leaves, a string."""
  rng = np.random.default_rng(7)
  emb = rng.standard_normal((50, 8)).astype(np.float32)
  emb[0, 0] = 0.0
  emb[0, 1] = nan32(NAN_A)
  emb[0, 2] = -0.0
  emb[0, 3] = np.inf
  w1 = rng.standard_normal((1, 6, 40)).astype(np.float32)
  w1[0, 0, 0] = 0.0  # a +0.0 in a leaf without NaNs: only a bitwise comparison can see it turn into -0.0
  return {
      "params": {
          "blocks": [
              {
                  "w": rng.standard_normal((1, 6, 40)).astype(np.float32),
                  "b": rng.standard_normal((1, 40)).astype(ml_dtypes.bfloat16),
              },
              {"w": w1, "b": rng.standard_normal((1, 40)).astype(ml_dtypes.bfloat16)},
          ],
          "emb": emb,
          "ids": np.arange(2**40, 2**40 + 7, dtype=np.int64),  # does not fit int32
          "mask": rng.integers(0, 2, 9).astype(bool),
          "odd": rng.standard_normal((1, 5, 1)).astype(np.float32),
      },
      "opt": {
          "count": np.array(3, np.int32),
          "lr": 3e-4,  # python float: an orbax scalar leaf (float64)
          "mu": [np.full((2, 3), 1e-3, np.float64), np.array(-7, np.int8)],
      },
      "step": 7,  # python int: an orbax scalar leaf (int64)
      "name": "run-42",
  }


GENERATED_SPEC = {
    "rules": [
        {"match": r"^params/blocks/(\d+)/w$", "to": r"params/block_\1/kernel", "squeeze": [0]},
        {"match": r"^params/blocks/(\d+)/b$", "to": r"params/block_\1/bias", "squeeze": [0]},
        {"match": r"^params/emb$", "to": "params/embedding", "reshape": [5, 10, 8]},
        {"match": r"^params/odd$", "to": "params/odd", "squeeze": [0]},
        {"match": r"^(params/(?:ids|mask)|opt/.+|step|name)$", "to": r"\1"},
    ],
    "group_depth": 1,
}


def expected_migrated(src: dict) -> dict:
  """The correct migration of :func:`generated_source`, written out by hand."""
  p, o = src["params"], src["opt"]
  return {
      "params": {
          "block_0": {"kernel": p["blocks"][0]["w"][0], "bias": p["blocks"][0]["b"][0]},
          "block_1": {"kernel": p["blocks"][1]["w"][0], "bias": p["blocks"][1]["b"][0]},
          "embedding": p["emb"].reshape(5, 10, 8),
          "ids": p["ids"],
          "mask": p["mask"],
          "odd": p["odd"][0],
      },
      "opt": {"count": o["count"], "lr": np.array(o["lr"], np.float64), "mu": {"0": o["mu"][0], "1": o["mu"][1]}},
      "step": np.array(src["step"], np.int64),
      "name": src["name"],
  }


def example_expected_migrated(src: dict) -> dict:
  """The correct migration of the shipped example's source tree, written out by hand."""
  names = {"g": "gate_proj", "u": "up_proj", "d": "down_proj"}

  def rename(tree, squeeze):
    return {
        f"layers.{l}.mlp.{names[k]}": (
            {vu: (v[0] if squeeze else v) for vu, v in leaf.items()} if isinstance(leaf, dict) else leaf
        )
        for l, kinds in tree.items()
        for k, leaf in kinds.items()
    }

  out = {"step": src["step"]}
  for grp, squeeze in (("components", True), ("ci_fn", False), ("sources", False)):
    out[grp] = rename(src[grp], squeeze)
    opt = src[f"{grp}_opt_state"]
    out[f"{grp}_opt_state"] = {
        "mu": rename(opt["mu"], squeeze),
        "nu": rename(opt["nu"], squeeze),
        "count": opt["count"],
    }
  return out


def deepcopy(tree):
  return copy.deepcopy(tree)


def save_v0(path, tree) -> str:
  import orbax.checkpoint as ocp

  from parity_jax.checkpoint.formats.tstore import quiet_orbax

  with quiet_orbax():
    ocp.PyTreeCheckpointer().save(os.path.abspath(path), tree)
  return str(path)


def save_v1(path, tree) -> str:
  from orbax.checkpoint import v1 as ocp_v1

  from parity_jax.checkpoint.formats.tstore import quiet_orbax

  with quiet_orbax():
    ocp_v1.save(os.path.abspath(path), tree)
  return str(path)


def save_manager_step(root, step: int, tree) -> str:
  """A CheckpointManager directory; returns the step directory (one item, 'default')."""
  import orbax.checkpoint as ocp

  from parity_jax.checkpoint.formats.tstore import quiet_orbax

  with quiet_orbax():
    with ocp.CheckpointManager(os.path.abspath(root)) as mngr:
      mngr.save(step, args=ocp.args.PyTreeSave(tree))
      mngr.wait_until_finished()
  return os.path.join(str(root), str(step))


def write_spec(path, spec: dict) -> str:
  pathlib.Path(path).write_text(json.dumps(spec))
  return str(path)


def run_tool(module: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
  """Runs ``python -m tools.<module> args`` from the repository root."""
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(
      [sys.executable, "-m", f"tools.{module}", *args],
      cwd=REPO,
      env=full_env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
  return [l for l in proc.stderr.splitlines() if l.strip()]
