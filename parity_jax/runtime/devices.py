"""Spreading independent pieces of work over devices: cost-balanced placement, a thread per device.

What the all-selected SVF replay uses to run every tensor on its own device:

* :func:`balance` -- greedy LPT (longest processing time first): jobs sorted by
  cost (FLOPs), largest first, each to the device with the least work so far
  (ties: the lower index). Deterministic: the same jobs and device count give
  the same placement on every process, so no process needs to ask another.
* :func:`run_on_devices` -- one worker thread per device, each running its
  jobs in order with that device as JAX's default device (thread-local), the
  results returned in job order. The first error stops the others between jobs
  and is raised.

Under ``jax.distributed`` the placement is over the global device list: every
process computes the same placement, runs the work of its own devices, and the
results travel through the job (:meth:`parity_jax.runtime.job.Job.allgather`).
Nothing here knows about SVF.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from parity_jax.errors import UsageError

__all__ = ["balance", "run_on_devices"]


def balance(costs: Sequence[float], n_bins: int) -> list[list[int]]:
  """Greedy LPT: job indices per bin, each bin's jobs in the order they were placed (largest first)."""
  if n_bins < 1:
    raise UsageError(f"need at least one device, got {n_bins}")
  loads = [0.0] * n_bins
  bins: list[list[int]] = [[] for _ in range(n_bins)]
  for i in sorted(range(len(costs)), key=lambda j: (-float(costs[j]), j)):
    b = min(range(n_bins), key=lambda k: (loads[k], k))
    bins[b].append(i)
    loads[b] += float(costs[i])
  return bins


def run_on_devices(fn: Callable[[int, Any], Any], assignment: Sequence[tuple[Any, Sequence[int]]]) -> dict[int, Any]:
  """``fn(job_index, device)`` for every job of every ``(device, job indices)`` pair; job index -> result.

  One thread per device; within a thread, jobs run in the given order under
  ``jax.default_device(device)``. JAX dispatch, XLA, numpy and hashlib
  release the GIL for their heavy work, so devices (and host cores) overlap.
  """
  import jax

  results: dict[int, Any] = {}
  stop = threading.Event()
  lock = threading.Lock()

  def worker(device: Any, jobs: Sequence[int]) -> None:
    with jax.default_device(device):
      for i in jobs:
        if stop.is_set():
          return
        try:
          r = fn(i, device)
        except BaseException:
          stop.set()
          raise
        with lock:
          results[i] = r

  busy = [(d, list(jobs)) for d, jobs in assignment if jobs]
  if len(busy) <= 1:  # no threads for one device: same code path, plainer tracebacks
    for d, jobs in busy:
      worker(d, jobs)
    return results
  with ThreadPoolExecutor(max_workers=len(busy), thread_name_prefix="parity-device") as pool:
    futures = [pool.submit(worker, d, jobs) for d, jobs in busy]
    try:
      for f in futures:
        f.result()
    finally:
      stop.set()
  missing = [i for jobs in (j for _, j in busy) for i in jobs if i not in results]
  if missing:  # only when a worker returned early without an error, which should not happen
    raise RuntimeError(f"jobs {missing[:5]} did not run")
  return results
