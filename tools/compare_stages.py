"""``python -m tools.compare_stages`` from the repository root: the same tool as the console script ``parity-compare-stages`` (see parity_jax.cli.compare_stages)."""

from parity_jax.cli.compare_stages import run

if __name__ == "__main__":
  run()
