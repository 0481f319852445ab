"""Benchmarks: ``python -m bench.<name>`` from the repository root; results go to docs/benchmarks.md.

Importing the package keeps start-up chatter out of benchmark output: JAX's
backend probing ("Unable to initialize backend 'tpu'") is logged at INFO,
which absl's handler would print.
"""

import logging

logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
