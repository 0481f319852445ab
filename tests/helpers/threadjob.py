"""A job of N "processes" as N threads of this process, over an in-memory key-value store.

The store answers the calls a :class:`parity_jax.runtime.Job` makes of JAX's coordination-service client, with
the same blocking semantics (a blocking get waits for the key or raises ``DEADLINE_EXCEEDED``). It lets a test
drive the job schedule of the verifier with any number of processes, in one process, with monkeypatched
constants -- what a real multi-process test (tests/helpers/jobs.py) cannot do.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from parity_jax.runtime import Job


class MemoryKV:
  """The key-value calls of the coordination-service client, in memory."""

  def __init__(self):
    self._d: dict[str, Any] = {}
    self._cv = threading.Condition()

  def key_value_set(self, key: str, value: Any, allow_overwrite: bool = False) -> None:
    with self._cv:
      if key in self._d and not allow_overwrite:
        raise RuntimeError(f"ALREADY_EXISTS: {key}")
      self._d[key] = value
      self._cv.notify_all()

  key_value_set_bytes = key_value_set

  def key_value_try_get(self, key: str) -> Any:
    with self._cv:
      if key not in self._d:
        raise RuntimeError(f"NOT_FOUND: {key}")
      return self._d[key]

  def blocking_key_value_get(self, key: str, timeout_ms: int) -> Any:
    with self._cv:
      if not self._cv.wait_for(lambda: key in self._d, timeout=timeout_ms / 1000):
        raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
      return self._d[key]

  blocking_key_value_get_bytes = blocking_key_value_get

  def key_value_dir_get(self, prefix: str) -> list[tuple[str, Any]]:
    with self._cv:
      return [(k, v) for k, v in self._d.items() if k.startswith(prefix)]


def run_threads(fn: Callable[[Job], Any], num_processes: int, op: str, timeout_s: float = 120.0) -> list[Any]:
  """``fn(job)`` on each of ``num_processes`` threads (process ``p`` = thread ``p``); their results in order.

  The watchdog's timeout is long: a lost "process" here would end the whole test process (os._exit).
  """
  kv = MemoryKV()
  jobs = [Job(kv, p, num_processes, timeout_s, op) for p in range(num_processes)]
  for j in jobs[1:]:
    j.ns = jobs[0].ns  # one job: every thread's keys in one namespace (processes count their jobs alike)
  results: list[Any] = [None] * num_processes
  errors: list[BaseException | None] = [None] * num_processes

  def body(p: int) -> None:
    try:
      results[p] = fn(jobs[p])
    except BaseException as e:  # noqa: BLE001 -- re-raised below, on the test's thread
      errors[p] = e

  threads = [threading.Thread(target=body, args=(p,), name=f"job-process-{p}") for p in range(num_processes)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout_s)
  for e in errors:
    if e is not None:
      raise e
  return results
