#!/usr/bin/env python3
"""Writes Orbax checkpoints with an OLD orbax-checkpoint release, for parity_jax's legacy-format tests.

Run it inside a throwaway venv made from one of the ``requirements-orbax-<ver>.txt``
files next to it (see README.md); it writes that release's fixtures into ``--out``:

    python make_fixtures.py --out orbax-0.5.10

Every fixture is ``<out>/<name>/`` holding the checkpoint (``ckpt/`` for a
PyTree checkpoint, ``root/`` for a CheckpointManager directory) and
``expected.json``: for each leaf its key path, dtype, shape and the sha256 of
``np.asarray(value).tobytes()`` (C order), computed here from the values that
were *saved* (never from a restore), plus the versions and options used.

All values come from ``np.random.default_rng(SEED)``; re-running the script
gives identical expected.json files (the checkpoints themselves differ only in
timestamps and OCDBT's data files: random names, a varying number of them).

The script branches on the orbax version only where the API differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

# Four host CPU devices, so that a sharded jax.Array is stored as several
# storage chunks (orbax writes one chunk per shard for zarr v2).
N_DEVICES = 4
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

SEED = 20240422
NAN_PAYLOAD_BITS = 0x7FC00123  # quiet NaN with a non-zero payload
NEG_NAN_BITS = 0xFFA00001  # signalling-pattern NaN, sign bit set (stored as raw bits; jax may quiet it on compute)


def _versions():
  import importlib.metadata as md

  out = {}
  for pkg in ("orbax-checkpoint", "jax", "jaxlib", "tensorstore", "numpy", "ml_dtypes", "etils"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  out["python"] = ".".join(map(str, sys.version_info[:3]))
  return out


# --------------------------------------------------------------------------- values


def make_tree(rng: np.random.Generator):
  """The main tree: several dtypes, nested dicts, zero leaves, scalars, special floats.

  Returns (tree, notes, sharded_leaf_keys). Leaves are jax.Arrays except where a
  numpy array is the point (int64 with x64 disabled, a plain np zero moment).
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = np.array(jax.devices()[:N_DEVICES])
  assert len(devices) == N_DEVICES, f"expected {N_DEVICES} host devices, got {jax.devices()}"
  mesh = Mesh(devices, ("x",))
  row_sharded = NamedSharding(mesh, P("x"))

  # float32 kernel with -0.0 and two NaNs with payloads (bit patterns kept).
  kernel = rng.standard_normal((6, 5)).astype(np.float32)
  kernel[0, 0] = -0.0
  kernel[1, 2] = np.array([NAN_PAYLOAD_BITS], dtype=np.uint32).view(np.float32)[0]
  kernel[3, 4] = np.array([NEG_NAN_BITS], dtype=np.uint32).view(np.float32)[0]
  kernel[5, 1] = 0.0

  # float32 (8, 8) sharded 4 ways along rows: shards 0 and 2 (rows 0-1, 4-5)
  # are all zero, shards 1 and 3 not -> some storage chunks equal the fill value.
  mixed = rng.standard_normal((8, 8)).astype(np.float32)
  mixed[0:2] = 0.0
  mixed[4:6] = 0.0

  # (16, 4) float32, single device; zarr3 fixtures save it with a small
  # chunk_byte_size so it becomes several read chunks inside one shard;
  # rows 0-3 and 8-11 are zero.
  sub = rng.standard_normal((16, 4)).astype(np.float32)
  sub[0:4] = 0.0
  sub[8:12] = 0.0

  big = rng.standard_normal((16, 32)).astype(np.float32)

  tree = {
      "params": {
          "dense": {
              "kernel": jnp.asarray(kernel),
              "bias": jnp.zeros((4, 8), jnp.float32),  # whole leaf == fill value
          },
          "embed": {"table": jnp.asarray(rng.standard_normal((8, 4)).astype(np.float32), dtype=jnp.bfloat16)},
          "norm": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, (5,)).astype(np.float16))},
          "mixed": jax.device_put(mixed, row_sharded),
          "sub": jnp.asarray(sub),
          # > 1024 compressed bytes: OCDBT stores it out of line in a data file
          # (smaller values are inlined in the B-tree nodes: max_inline_value_bytes=1024).
          "big": jnp.asarray(big),
          "negzero": jnp.full((4,), -0.0, jnp.float32),  # all -0.0: same value as fill 0.0 under ==, not bitwise
      },
      "opt_state": {
          "mu": {"kernel": np.zeros((4, 8), np.float32)},  # numpy zero moment
          "nu": {"kernel": jax.device_put(np.zeros((8, 4), np.float32), row_sharded)},  # sharded, all zero
          "count": jnp.asarray(np.int32(3)),
      },
      "ints": {
          "i32": jnp.asarray(rng.integers(-1000, 1000, (3, 4), dtype=np.int32)),
          "i64": rng.integers(-(2**40), 2**40, (6,), dtype=np.int64),  # numpy: jax x64 is off
          "u8": jnp.asarray(rng.integers(0, 256, (16,), dtype=np.uint8)),
      },
      "mask": jnp.asarray(rng.integers(0, 2, (7,)).astype(bool)),
      "step": 7,  # python int
      "lr": 0.125,  # python float
  }
  notes = {
      "params/dense/kernel": "float32 with -0.0 at [0,0], NaN bits 0x7fc00123 at [1,2], NaN bits 0xffa00001 at [3,4]",
      "params/dense/bias": "all zero (== zarr fill value): its only chunk may be omitted on disk",
      "params/mixed": f"sharded over {N_DEVICES} CPU devices along axis 0 (shard (2, 8)); rows 0-1 and 4-5 zero",
      "params/sub": "rows 0-3 and 8-11 zero; zarr3 fixtures store it as four (4, 4) chunks (options.save_args says how)",
      "params/big": "2 KiB of random float32: the one chunk too big to be inlined in OCDBT's B-tree (1024-byte limit)",
      "params/negzero": "all -0.0 (compares == to fill value 0.0 but differs bitwise)",
      "opt_state/mu/kernel": "numpy array, all zero",
      "opt_state/nu/kernel": f"sharded over {N_DEVICES} CPU devices, all zero",
      "ints/i64": "numpy int64 (jax x64 disabled)",
      "step": "python int",
      "lr": "python float",
  }
  return tree, notes


def make_extra_tree(rng: np.random.Generator):
  import jax.numpy as jnp

  return {
      "rng": np.asarray(rng.integers(0, 2**32, (2,), dtype=np.uint64).astype(np.uint32)),
      "epoch": 2,
      "ema": {"w": jnp.asarray(rng.standard_normal((3, 3)).astype(np.float32))},
  }


def _key_str(k) -> str:
  import jax

  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return str(k.name)
  return str(k)


def describe_leaves(tree, notes=None):
  """[{keys, dtype, shape, sha256, python_type?, note?}] from the values to be saved."""
  import jax

  out = []
  for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [_key_str(k) for k in kp]
    a = np.asarray(v)  # (not ascontiguousarray: it turns 0-d into 1-d)
    e = {
        "keys": keys,
        "dtype": str(a.dtype),
        "shape": list(a.shape),
        "sha256": hashlib.sha256(a.tobytes(order="C")).hexdigest(),
    }
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      e["python_type"] = type(v).__name__
      e["value"] = v
    elif isinstance(v, np.ndarray):
      e["saved_as"] = "np.ndarray"
    else:
      e["saved_as"] = "jax.Array"
      if len(v.sharding.device_set) > 1:
        e["sharding"] = f"{len(v.sharding.device_set)} devices, shard shape {list(v.sharding.shard_shape(v.shape))}"
    if notes and "/".join(keys) in notes:
      e["note"] = notes["/".join(keys)]
    out.append(e)
  out.sort(key=lambda e: e["keys"])
  return out


# --------------------------------------------------------------------------- writers


def _sub_save_args() -> dict:
  """SaveArgs fields for params/sub in zarr3 fixtures (several storage chunks for a (16, 4) f32 leaf).

  0.5.x has SaveArgs(write_chunk_shape, read_chunk_shape): one (16, 4) shard
  holding four (4, 4) inner chunks, so zero chunks are *entries missing from
  the shard index* of a shard file that exists. Later releases only have
  chunk_byte_size, which sets write and read chunk alike: four (4, 4) shards,
  so zero chunks are *whole shard files* missing.
  """
  import dataclasses

  import orbax.checkpoint as ocp

  fields = {f.name for f in dataclasses.fields(ocp.SaveArgs)}
  if "read_chunk_shape" in fields:
    return {"write_chunk_shape": (16, 4), "read_chunk_shape": (4, 4)}
  return {"chunk_byte_size": 64}


def _save_args_tree(tree, zarr3: bool):
  """SaveArgs per leaf: zarr3 saves params/sub in several chunks (see _sub_save_args)."""
  import jax
  import orbax.checkpoint as ocp

  def f(kp, v):
    keys = [_key_str(k) for k in kp]
    if zarr3 and keys == ["params", "sub"]:
      return ocp.SaveArgs(**_sub_save_args())
    return ocp.SaveArgs()

  return jax.tree_util.tree_map_with_path(f, tree)


def write_pytree(path, tree, *, use_ocdbt: bool, use_zarr3: bool):
  import orbax.checkpoint as ocp

  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
  ckptr = ocp.Checkpointer(handler)
  ckptr.save(path, args=ocp.args.PyTreeSave(tree, save_args=_save_args_tree(tree, use_zarr3)))
  ckptr.close() if hasattr(ckptr, "close") else None
  return {
      "api": "ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=%s, use_zarr3=%s)).save(path, args=ocp.args.PyTreeSave(tree, save_args=...))"
      % (use_ocdbt, use_zarr3),
      "use_ocdbt": use_ocdbt,
      "use_zarr3": use_zarr3,
      "save_args": {"params/sub": {k: list(v) if isinstance(v, tuple) else v for k, v in _sub_save_args().items()}}
      if use_zarr3
      else {},
  }


def write_pytree_checkpointer_default(path, tree):
  import orbax.checkpoint as ocp

  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(path, tree)  # the old one-argument form, as most code of the time did
  return {"api": "ocp.PyTreeCheckpointer().save(path, tree)", "use_ocdbt": "default", "use_zarr3": "default"}


def write_standard_default(path, tree):
  import orbax.checkpoint as ocp

  import inspect

  ckptr = ocp.StandardCheckpointer()
  if "state" in inspect.signature(ckptr.save).parameters:  # >= 0.6: save(directory, state) (async)
    ckptr.save(path, tree)
    api = "ocp.StandardCheckpointer().save(path, tree); wait_until_finished()"
  else:  # 0.5.x: a synchronous Checkpointer taking args=
    ckptr.save(path, args=ocp.args.StandardSave(tree))
    api = "ocp.StandardCheckpointer().save(path, args=ocp.args.StandardSave(tree))"
  ckptr.wait_until_finished() if hasattr(ckptr, "wait_until_finished") else None
  ckptr.close() if hasattr(ckptr, "close") else None
  return {"api": api, "use_ocdbt": "default", "use_zarr3": "default"}


def write_manager_default(root, tree):
  import orbax.checkpoint as ocp

  mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=3))
  mngr.save(1, args=ocp.args.StandardSave(tree))
  mngr.wait_until_finished()
  mngr.close()
  return {
      "api": "ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=3)); mngr.save(1, args=ocp.args.StandardSave(tree))",
      "use_ocdbt": "default",
      "use_zarr3": "default",
  }


def write_manager_legacy(root, tree):
  """The pre-`args` CheckpointManager API: a Checkpointer per item, `save(step, items)`."""
  import orbax.checkpoint as ocp

  mngr = ocp.CheckpointManager(root, ocp.PyTreeCheckpointer(), options=ocp.CheckpointManagerOptions(max_to_keep=3))
  mngr.save(1, tree)
  mngr.wait_until_finished()
  mngr.close()
  return {
      "api": "ocp.CheckpointManager(root, ocp.PyTreeCheckpointer(), options=...); mngr.save(1, tree)  (legacy API)",
      "use_ocdbt": "default",
      "use_zarr3": "default",
  }


def write_manager_noocdbt(root, tree):
  import orbax.checkpoint as ocp

  mngr = ocp.CheckpointManager(
      root,
      options=ocp.CheckpointManagerOptions(max_to_keep=3),
      item_names=("state",),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=False)},
  )
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
  mngr.wait_until_finished()
  mngr.close()
  return {
      "api": "ocp.CheckpointManager(root, item_names=('state',), item_handlers={'state': ocp.PyTreeCheckpointHandler(use_ocdbt=False)}); mngr.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))",
      "use_ocdbt": False,
      "use_zarr3": False,
  }


def write_manager_two_items(root, tree, extra):
  import orbax.checkpoint as ocp

  mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=3), item_names=("state", "extra"))
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), extra=ocp.args.PyTreeSave(extra)))
  mngr.wait_until_finished()
  mngr.close()
  return {
      "api": "ocp.CheckpointManager(root, item_names=('state', 'extra')); mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), extra=ocp.args.PyTreeSave(extra)))",
      "use_ocdbt": "default",
      "use_zarr3": "default",
  }


# --------------------------------------------------------------------------- main


def _dumps(obj, indent: int = 0) -> str:
  """JSON with sorted keys, nested dicts indented, lists of scalars and leaf records on one line."""
  pad, pad1 = " " * indent, " " * (indent + 1)
  if isinstance(obj, dict) and not ("keys" in obj and "sha256" in obj):
    if not obj:
      return "{}"
    body = ",\n".join(f"{pad1}{json.dumps(k)}: {_dumps(obj[k], indent + 1)}" for k in sorted(obj))
    return "{\n" + body + "\n" + pad + "}"
  if isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
    return "[\n" + ",\n".join(pad1 + _dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
  return json.dumps(obj, sort_keys=True)


def _write_expected(fixture_dir, record):
  with open(os.path.join(fixture_dir, "expected.json"), "w", encoding="utf-8") as f:
    f.write(_dumps(record) + "\n")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="output folder, e.g. orbax-0.5.10 (must not exist, or --force)")
  ap.add_argument("--force", action="store_true", help="delete --out first")
  ap.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
  args = ap.parse_args(argv)

  import jax

  versions = _versions()
  out = os.path.abspath(args.out)
  if os.path.exists(out):
    if not args.force:
      sys.exit(f"{out} exists (pass --force to replace it)")
    shutil.rmtree(out)
  os.makedirs(out)

  rng = np.random.default_rng(SEED)
  tree, notes = make_tree(rng)
  extra = make_extra_tree(rng)
  leaves = describe_leaves(tree, notes)
  extra_leaves = describe_leaves(extra)
  assert jax.device_count() == N_DEVICES

  # name -> (writer, kind)
  fixtures = {
      "pytree_ocdbt_zarr2": ("pytree", lambda p: write_pytree(p, tree, use_ocdbt=True, use_zarr3=False)),
      "pytree_noocdbt_zarr2": ("pytree", lambda p: write_pytree(p, tree, use_ocdbt=False, use_zarr3=False)),
      "pytree_ocdbt_zarr3": ("pytree", lambda p: write_pytree(p, tree, use_ocdbt=True, use_zarr3=True)),
      "pytree_noocdbt_zarr3": ("pytree", lambda p: write_pytree(p, tree, use_ocdbt=False, use_zarr3=True)),
      "pytree_checkpointer_default": ("pytree", lambda p: write_pytree_checkpointer_default(p, tree)),
      "standard_default": ("pytree", lambda p: write_standard_default(p, tree)),
      "manager_step_default": ("manager", lambda r: write_manager_default(r, tree)),
      "manager_step_legacy_api": ("manager", lambda r: write_manager_legacy(r, tree)),
      "manager_step_noocdbt": ("manager", lambda r: write_manager_noocdbt(r, tree)),
      "manager_step_two_items": ("manager2", lambda r: write_manager_two_items(r, tree, extra)),
  }
  only = [s for s in args.only.split(",") if s]
  written, skipped = [], {}
  for name, (kind, writer) in fixtures.items():
    if only and name not in only:
      continue
    fdir = os.path.join(out, name)
    os.makedirs(fdir)
    sub = "ckpt" if kind == "pytree" else "root"
    target = os.path.join(fdir, sub)
    try:
      opts = writer(target)
    except Exception as e:  # noqa: BLE001 -- a release without the API: record, go on
      shutil.rmtree(fdir)
      skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      print(f"SKIP {name}: {skipped[name]}", file=sys.stderr)
      continue
    if kind == "pytree":
      items = {"": {"item_dir": sub, "leaves": leaves}}
      checkpoint_path = sub
    else:
      steps = sorted(d for d in os.listdir(target) if os.path.isdir(os.path.join(target, d)))
      assert steps == ["1"], steps
      step = os.path.join(sub, "1")
      item_names = sorted(d for d in os.listdir(os.path.join(target, "1")) if os.path.isdir(os.path.join(target, "1", d)))
      items = {}
      for it in item_names:
        items[it] = {"item_dir": os.path.join(step, it), "leaves": extra_leaves if it == "extra" else leaves}
      checkpoint_path = step
    record = {
        "fixture": name,
        "kind": "pytree" if kind == "pytree" else "manager_step",
        "checkpoint_path": checkpoint_path,
        "items": items,
        "options": opts,
        "versions": versions,
        "seed": SEED,
        "jax_devices": N_DEVICES,
        "generator": "tests/data/orbax_legacy/make_fixtures.py",
    }
    _write_expected(fdir, record)
    written.append(name)
    print(f"wrote {name}")

  # git keeps no empty directories (zarr3 without OCDBT leaves e.g. `c/0/` empty
  # when every chunk under it equals the fill value); drop them here so that
  # the committed tree is exactly what this script wrote. Nothing reads them.
  removed = 0
  for dirpath, dirnames, filenames in os.walk(out, topdown=False):
    if dirpath != out and not os.listdir(dirpath):
      os.rmdir(dirpath)
      removed += 1
  if removed:
    print(f"removed {removed} empty directories (git cannot hold them)")

  # Check: nothing absolute leaked into the files we wrote, no symlinks.
  needle = out.encode()
  for dirpath, dirnames, filenames in os.walk(out):
    for fn in filenames + dirnames:
      p = os.path.join(dirpath, fn)
      if os.path.islink(p):
        sys.exit(f"symlink written: {p}")
    for fn in filenames:
      with open(os.path.join(dirpath, fn), "rb") as f:
        if needle in f.read():
          print(f"WARNING: absolute output path appears in {os.path.join(dirpath, fn)}", file=sys.stderr)
  with open(os.path.join(out, "fixtures.json"), "w", encoding="utf-8") as f:
    json.dump({"versions": versions, "written": written, "skipped": skipped}, f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"{len(written)} fixtures in {out}; skipped: {skipped or 'none'}")


if __name__ == "__main__":
  main()
