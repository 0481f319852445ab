"""``python -m tools.migrate_checkpoint`` from the repository root: the same tool as the console script ``parity-migrate-checkpoint`` (see parity_jax.cli.migrate_checkpoint)."""

from parity_jax.cli.migrate_checkpoint import run

if __name__ == "__main__":
  run()
