"""Regenerates the shipped example in goldens/checkpoints/ (deterministic in --seed).

  python -m tools.make_example_checkpoint                 # rewrites goldens/checkpoints/
  python -m tools.make_example_checkpoint --out=/tmp/ex   # somewhere else

Writes source/ (a legacy v0 PyTree checkpoint of a small parameter-decomposition
training state), spec.json, migrated/ (made by parity_jax's migrator with 1 KiB
chunks) and MANIFEST.json (seed, dims, versions, sha256 of every file and of
every source leaf). Leaf values are identical on every run; orbax writes
timestamps and random file names, so the file hashes are not.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from absl import flags, logging

from parity_jax.provenance import file_sha256
from tools import _cli

REPO = pathlib.Path(__file__).resolve().parents[1]
_OUT = flags.DEFINE_string("out", str(REPO / "goldens" / "checkpoints"), "Output directory (replaced if it holds a previous example).")
_SEED = flags.DEFINE_integer("seed", None, "Random seed (default: the shipped example's seed).")

MANIFEST_FORMAT = "parity_jax.example_checkpoints/1"


def write_example(out: pathlib.Path, seed: int) -> list[pathlib.Path]:
  import numpy as np
  import orbax.checkpoint as ocp

  from parity_jax.checkpoint import example, migrate
  from parity_jax.checkpoint.layout import quiet_orbax
  from parity_jax.stages import default_provenance

  out.mkdir(parents=True)
  tree = example.example_source_tree(seed)
  with quiet_orbax():
    ocp.PyTreeCheckpointer().save(str(out / "source"), tree)
  spec_path = out / "spec.json"
  spec_path.write_text(json.dumps(example.example_spec_dict(), indent=2) + "\n")
  migrate(out / "source", out / "migrated", spec_path, chunk_mb=example.EXAMPLE_CHUNK_MB)
  leaves = {
      p: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype), "sha256": example.leaf_sha256(v)}
      for p, v in example.flatten(tree).items()
  }
  files = {str(p.relative_to(out)): file_sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
  manifest = {
      "format": MANIFEST_FORMAT,
      "generator": "python -m tools.make_example_checkpoint",
      "note": ("source/ is a v0 PyTree checkpoint, migrated/ a v1 checkpoint written by parity_jax's migrator;"
               " leaf values are deterministic in the seed, file bytes are not (orbax writes timestamps and"
               " random file names)."),
      "provenance": default_provenance("tools.make_example_checkpoint", seed=seed, dims=example.DIMS,
                                       chunk_mb=example.EXAMPLE_CHUNK_MB),
      "source_leaves": leaves,
      "files": files,
  }
  (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  return [out / "source", out / "migrated", spec_path, out / "MANIFEST.json"]


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  from parity_jax.checkpoint import example
  from parity_jax.errors import UsageError

  out = pathlib.Path(_OUT.value).resolve()
  seed = example.SEED if _SEED.value is None else _SEED.value
  old = None
  if out.exists():
    manifest = out / "MANIFEST.json"
    ours = manifest.is_file() and MANIFEST_FORMAT in manifest.read_text(errors="replace")
    if any(out.iterdir()) and not ours:
      raise UsageError(f"{out} exists and does not hold a previous example (no {MANIFEST_FORMAT} MANIFEST); refusing to replace it")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
  try:
    paths = write_example(out, seed)
  except BaseException:
    shutil.rmtree(out, ignore_errors=True)
    if old is not None:
      old.rename(out)
    raise
  if old is not None:
    shutil.rmtree(old)
  for p in paths:
    print(p)
  return 0


if __name__ == "__main__":
  _cli.run(main)
