"""Shared pytest setup: the session seed (tests/helpers/seed.py) in the header and as a fixture."""

from __future__ import annotations

import os
import tempfile

import pytest

# Every test process and the tools' subprocesses (dozens of short-lived ones, compiling the same small models)
# share a persistent XLA compilation cache; XLA's compilation is deterministic, so a cached executable is the one
# a fresh compilation gives. The GPU suite's test opts out (its determinism check compiles twice on purpose).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"parity_jax_tests_xla_cache_{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from tests.helpers.seed import ENV, TEST_SEED

# the object-store emulators' fixtures (s3_emulator, gcs_emulator, bucket, ...) for every test module
pytest_plugins = ("tests.helpers.objectstores",)


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
