"""``python -m tools.svf_parity`` from the repository root: the same tool as the console script ``parity-svf-parity`` (see parity_jax.cli.svf_parity)."""

from parity_jax.cli.svf_parity import run

if __name__ == "__main__":
  run()
