"""``python -m tools.make_example_checkpoint`` from the repository root: the same tool as the console script ``parity-make-example-checkpoint`` (see parity_jax.cli.make_example_checkpoint)."""

from parity_jax.cli.make_example_checkpoint import run

if __name__ == "__main__":
  run()
