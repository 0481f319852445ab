"""``python -m tools.verify_migration`` from the repository root: the same tool as the console script ``parity-verify-migration`` (see parity_jax.cli.verify_migration)."""

from parity_jax.cli.verify_migration import run

if __name__ == "__main__":
  run()
