"""Command-line tools: thin absl-flags programs over the parity_jax library."""
