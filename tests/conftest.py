"""Shared pytest setup: the session seed (tests/helpers/seed.py) in the header and as a fixture."""

from __future__ import annotations

import pytest

from tests.helpers.seed import ENV, TEST_SEED


def pytest_report_header(config):
  return f"parity_jax test seed: {TEST_SEED} (override with {ENV}=N or {ENV}=random)"


@pytest.fixture
def test_seed() -> int:
  """The session's seed (tests/helpers/seed.py)."""
  return TEST_SEED
