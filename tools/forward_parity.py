"""``python -m tools.forward_parity`` from the repository root: the same tool as the console script ``parity-forward-parity`` (see parity_jax.cli.forward_parity)."""

from parity_jax.cli.forward_parity import run

if __name__ == "__main__":
  run()
