"""The one seed of every test that draws fresh random data.

Fixed so that a run is reproducible, printed in pytest's session header (see
``tests/conftest.py``) and in the failure messages that use it. Set
``PARITY_JAX_TEST_SEED=N`` to replay another seed (e.g. one a CI log printed),
or ``PARITY_JAX_TEST_SEED=random`` for a fresh draw.
"""

from __future__ import annotations

import os
import secrets

__all__ = ["DEFAULT_SEED", "ENV", "TEST_SEED"]

DEFAULT_SEED = 20261129
ENV = "PARITY_JAX_TEST_SEED"


def _seed() -> int:
  value = os.environ.get(ENV, "").strip()
  if not value:
    return DEFAULT_SEED
  if value == "random":
    return secrets.randbits(30)
  try:
    return int(value, 0)
  except ValueError:
    raise SystemExit(f"{ENV}={value!r} is not an integer (or 'random')") from None


TEST_SEED = _seed()
