"""Launch options of a job, and the placement of work over devices (no processes started here)."""

from __future__ import annotations

import pytest

from parity_jax import runtime
from parity_jax.errors import UsageError


def test_launch_options_are_checked_before_anything_starts():
  assert not runtime.Options().requested
  assert runtime.Options(auto=True).requested and runtime.Options(num_processes=2).requested
  runtime.Options(auto=True).check()
  runtime.Options("127.0.0.1:1", 2, 1).check()
  with pytest.raises(
      UsageError, match="a distributed launch needs coordinator_address, num_processes and process_id together"
  ):
    runtime.Options(None, 2, None).check()
  with pytest.raises(UsageError, match=r"process_id must be in \[0, 2\), got 2"):
    runtime.Options("127.0.0.1:1", 2, 2).check()
  with pytest.raises(UsageError, match="coordinator_address must be HOST:PORT"):
    runtime.Options("localhost", 2, 0).check()
  with pytest.raises(UsageError, match="num_processes must be at least 1"):
    runtime.Options("127.0.0.1:1", 0, 0).check()
  with pytest.raises(UsageError, match="the peer timeout must be positive"):
    runtime.Options(auto=True, timeout_s=0).check()


def test_balance_is_longest_first_to_the_least_loaded():
  assert runtime.balance([5, 4, 3, 3, 3], 2) == [[0, 3], [1, 2, 4]]
  assert runtime.balance([1, 1, 1], 4) == [[0], [1], [2], []]
  assert runtime.balance([2, 2, 2, 2], 2) == [[0, 2], [1, 3]]  # ties go to the lower index, in job order
  with pytest.raises(UsageError, match="need at least one device"):
    runtime.balance([1], 0)


def test_a_single_process_job_exchanges_locally():
  job = runtime.single_process("unit")
  assert not job.distributed and job.is_coordinator and job.describe() == "process 0 of 1"
  assert job.allgather("x", b"mine") == [b"mine"]
  assert job.gather("y", b"g") == [b"g"] and job.broadcast("z", b"b") == b"b"
  job.publish("k", b"v")
  assert job.try_get("k") == b"v" and job.wait_for("k") == b"v" and job.try_get("absent") is None
  assert job.first_disagreeing("plan", "fp") is None
  job.barrier("done")
