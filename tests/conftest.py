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


@pytest.fixture(scope="session")
def alt_svf_goldens(tmp_path_factory):
  """SVF goldens whose finals come from a second legitimate float32 summation order (tests/helpers/svf.py)."""
  from tests.helpers.svf import alternative_order_goldens

  return alternative_order_goldens(tmp_path_factory.mktemp("alt") / "svf")
