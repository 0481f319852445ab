"""Spreading independent jobs over devices and processes: FLOP-balanced placement, one gather to every process.

What the all-selected SVF replay uses to run every tensor on its own device:

* :func:`balance` -- greedy LPT (longest processing time first): jobs sorted by
  cost (FLOPs), largest first, each to the device with the least work so far
  (ties: the lower index). Deterministic: the same jobs and device count give
  the same placement on every process, so no process needs to ask another.
* :func:`run_on_devices` -- one worker thread per device, each running its
  jobs in order with that device as JAX's default device (thread-local), the
  results returned in job order. The first error stops the others between jobs
  and is raised.
* :func:`initialize` / :func:`gather` -- under ``jax.distributed`` (several
  processes, each with its own devices), the placement is over the global
  device list; a process runs the jobs of its own devices and :func:`gather`
  hands every process every process's results (pickled, through
  ``multihost_utils.process_allgather``; on CPU over gloo).

Kept free of SVF specifics so that a generic multi-process helper can absorb it.
"""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from parity_jax.errors import UsageError

__all__ = ["balance", "gather", "initialize", "run_on_devices"]


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


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
  """``jax.distributed.initialize`` from the three launch arguments (gloo collectives on CPU); False when none
  is given (one process alone needs no coordinator). Call before anything touches a JAX backend.

  The same as :func:`parity_jax.distributed.initialize`, which the tools use (with ``--distributed`` for
  cluster detection and ``--peer_timeout``).
  """
  from parity_jax import distributed

  opts = distributed.Options(coordinator_address, num_processes, process_id)
  if not opts.requested:
    return False
  distributed.initialize(opts)
  return True


def gather(obj: Any) -> list[Any]:
  """Every process's ``obj``, in process order, on every process (``[obj]`` with one process)."""
  import jax

  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  try:
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  except Exception as e:  # noqa: BLE001 -- the collective fails when a process of the job is gone
    from parity_jax import distributed
    from parity_jax.errors import first_line

    me, others = jax.process_index(), [p for p in range(jax.process_count()) if p != jax.process_index()]
    who = "a process of the job"
    if len(others) == 1:
      who = f"process {others[0]}" + (" (the coordinator)" if others[0] == 0 else "")
    distributed.exit_lost(f"lost {who}: gathering the results failed ({first_line(e)})", me)
  return [pickle.loads(everything[p, : int(sizes[p])].tobytes()) for p in range(len(sizes))]
