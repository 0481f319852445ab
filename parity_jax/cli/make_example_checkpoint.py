"""Regenerates the shipped example checkpoint pair (deterministic in --seed).

  parity-make-example-checkpoint --out=parity_jax/checkpoint/example_data --overwrite   # the shipped example
  parity-make-example-checkpoint --out=/tmp/ex                              # somewhere else

(``python -m tools.make_example_checkpoint`` from the repository root is the same tool.)
Writes source/ (a legacy v0 PyTree checkpoint of a small parameter-decomposition
training state), spec.json, migrated/ (made by parity_jax's migrator with 1 KiB
chunks) and MANIFEST.json (seed, dims, versions, sha256 of every file and of
every source leaf), and prints their paths. --out may be missing or empty; a
previous example there is replaced (once the new one is complete) only with
--overwrite, and a directory holding anything else never. Leaf values are
identical on every run; orbax writes timestamps and random file names, so the
file hashes are not.
"""

from __future__ import annotations

from absl import flags

from parity_jax.cli import app

_OUT = flags.DEFINE_string(
    "out", None, "Output directory (the shipped example: parity_jax/checkpoint/example_data in a checkout)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a previous example in --out.")
_SEED = flags.DEFINE_integer("seed", None, "Random seed (default: the shipped example's seed).", lower_bound=0)

_WRITES = ("source", "spec.json", "migrated", "MANIFEST.json")  # what write_example puts in --out


def main(argv):
  del argv
  from parity_jax.files import check_output_dir

  app.require(_OUT)
  check_output_dir(_OUT.value, (), "--out", overwrite=_OVERWRITE.value, will_write=_WRITES)
  from parity_jax.checkpoint import example  # orbax, jax: after the checks

  for p in example.write_example(_OUT.value, example.SEED if _SEED.value is None else _SEED.value):
    print(p)
  return 0


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
