"""``python -m tools.capture_stages`` from the repository root: the same tool as the console script ``parity-capture-stages`` (see parity_jax.cli.capture_stages)."""

from parity_jax.cli.capture_stages import run

if __name__ == "__main__":
  run()
