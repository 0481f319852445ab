"""``python -m tools.regen_goldens`` from the repository root: the same tool as the console script ``parity-regen-goldens`` (see parity_jax.cli.regen_goldens)."""

from parity_jax.cli.regen_goldens import run

if __name__ == "__main__":
  run()
