"""Shared pytest setup: one seed for every test that draws fresh random data.

The seed is fixed so that a run is reproducible; it is printed in the session
header and in every failure message that uses it. Set ``PARITY_JAX_TEST_SEED``
to replay another one (e.g. the seed a CI log printed), or to ``random`` for a
fresh draw.
"""

from __future__ import annotations

import os
import secrets

import pytest

DEFAULT_SEED = 20261129
_ENV = "PARITY_JAX_TEST_SEED"


def _session_seed() -> int:
  value = os.environ.get(_ENV, "").strip()
  if not value:
    return DEFAULT_SEED
  if value == "random":
    return secrets.randbits(30)
  try:
    return int(value, 0)
  except ValueError:
    raise pytest.UsageError(f"{_ENV}={value!r} is not an integer (or 'random')") from None


SEED = _session_seed()


def pytest_report_header(config):
  return f"parity_jax test seed: {SEED} (override with {_ENV}=N)"


@pytest.fixture
def test_seed() -> int:
  """The session's seed (see the module docstring)."""
  return SEED
