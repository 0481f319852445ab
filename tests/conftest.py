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


# The slowest test files, slowest first (pytest-xdist's `--dist=loadfile` hands out whole files in collection
# order; xdist's own reordering goes by number of tests, which puts a file of four 10-s tests last and leaves one
# worker running it alone at the end). The order comes from the seconds per file on this 2-core machine, measured with
# `pytest -p tests.helpers.durations` (see BUILD.md) on 2026-12-07. A file missing here only loses its place in the queue.
SLOWEST_FIRST = (
    "tests/checkpoint/verify/test_job.py",
    "tests/tools/test_checkpoint_tools.py",
    "tests/tools/test_every_tool.py",
    "tests/tools/test_forward_parity.py",
    "tests/checkpoint/test_buckets.py",
    "tests/checkpoint/formats/test_orbax_legacy.py",
    "tests/checkpoint/migrate/test_job.py",
    "tests/tools/test_gpu_suite.py",
    "tests/tools/test_compare_stages.py",
    "tests/qwen2/test_sharding_mesh.py",
    "tests/oracle/test_regeneration.py",
    "tests/tools/test_bucket_tools.py",
    "tests/qwen2/test_model_long_context.py",
    "tests/tools/test_conversion_tools.py",
    "tests/checkpoint/migrate/test_conversions.py",
    "tests/svf/test_gate_devices.py",
    "tests/svf/test_gate_goldens.py",
    "tests/tools/test_svf_parity.py",
)


def pytest_collection_modifyitems(session, config, items):
  rank = {f: i for i, f in enumerate(SLOWEST_FIRST)}
  counts: dict[str, int] = {}
  for item in items:
    counts[item.nodeid.split("::")[0]] = counts.get(item.nodeid.split("::")[0], 0) + 1

  def key(item):
    f = item.nodeid.split("::")[0]
    return (rank.get(f, len(rank)), -counts[f], f)

  items.sort(key=key)  # stable: the tests of one file keep their order
