"""``python -m tools.convert_svd_weights`` from the repository root: the same tool as the console script ``parity-convert-svd-weights`` (see parity_jax.cli.convert_svd_weights)."""

from parity_jax.cli.convert_svd_weights import run

if __name__ == "__main__":
  run()
