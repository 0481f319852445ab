"""Joining a job: the ecosystem's launch conventions and the JAX multi-controller runtime (``jax.distributed``).

* ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``: the
  arguments of :func:`jax.distributed.initialize`;
* ``--distributed``: :func:`jax.distributed.initialize` with no arguments, so
  that JAX's own cluster detection (SLURM, Cloud TPU, GKE/Kubernetes, MPI)
  fills them in;
* none of these: one process, nothing changes.

:func:`initialize` starts the runtime from such :class:`Options` (on CPU it
selects the gloo collectives that multi-process CPU jobs need);
:func:`attach` returns a :class:`~parity_jax.runtime.job.Job` on the started
runtime (the caller's or :func:`initialize`'s); :func:`single_process` a job of
one process, whose exchanges are local. JAX's own heartbeat
(``heartbeat_timeout_seconds``, which on expiry aborts every process with a
stack trace) is set well above the job's peer timeout, so the job's watchdog
acts first.
"""

from __future__ import annotations

import dataclasses

from parity_jax.errors import UsageError, first_line
from parity_jax.runtime.job import DEFAULT_TIMEOUT_S, Job

__all__ = ["Options", "attach", "initialize", "process_count", "process_index", "single_process"]


@dataclasses.dataclass(frozen=True)
class Options:
  """How to join a job: the arguments of :func:`jax.distributed.initialize`, or ``auto`` for cluster detection."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False
  timeout_s: float = DEFAULT_TIMEOUT_S

  @property
  def requested(self) -> bool:
    """True when any launch parameter was given (otherwise: one process)."""
    return self.auto or any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))

  def check(self) -> None:
    if not (self.timeout_s > 0):
      raise UsageError(f"the peer timeout must be positive, got {self.timeout_s}")
    if self.auto:
      return
    given = {
        "coordinator_address": self.coordinator_address,
        "num_processes": self.num_processes,
        "process_id": self.process_id,
    }
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise UsageError(
          f"a distributed launch needs coordinator_address, num_processes and process_id together"
          f" (missing {', '.join(missing)}), or `distributed` alone for cluster detection"
      )
    if ":" not in str(self.coordinator_address):
      raise UsageError(f"coordinator_address must be HOST:PORT, got {self.coordinator_address!r}")
    if self.num_processes < 1:
      raise UsageError(f"num_processes must be at least 1, got {self.num_processes}")
    if not 0 <= self.process_id < self.num_processes:
      raise UsageError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")


def _use_gloo_on_cpu() -> None:
  """Multi-process collectives on CPU need gloo; select it unless the user chose an implementation."""
  import jax

  try:
    current = jax.config.read("jax_cpu_collectives_implementation")
  except (AttributeError, KeyError):
    return
  if current in (None, "", "gloo"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(opts: Options) -> None:
  """Starts the JAX runtime for this process from ``opts`` (nothing when it is already started)."""
  opts.check()
  import jax

  if jax.distributed.is_initialized():
    return
  _use_gloo_on_cpu()
  kwargs = {}
  if not opts.auto:
    kwargs = dict(
        coordinator_address=opts.coordinator_address,
        num_processes=int(opts.num_processes),
        process_id=int(opts.process_id),
    )
  try:
    jax.distributed.initialize(
        **kwargs,
        initialization_timeout=int(max(30, opts.timeout_s)),
        heartbeat_timeout_seconds=int(3 * opts.timeout_s + 30),
    )
  except Exception as e:  # noqa: BLE001 -- connection refused, cluster not detected, timeouts: all one line
    raise UsageError(f"cannot join the distributed job: {first_line(e)}") from None


def attach(timeout_s: float = DEFAULT_TIMEOUT_S, op: str = "job") -> Job:
  """A :class:`Job` on a runtime that :func:`jax.distributed.initialize` already started."""
  import jax
  from jax._src import distributed as jd  # the key-value client has no public accessor in jax 0.10

  if not jax.distributed.is_initialized() or jd.global_state.client is None:
    raise UsageError("distributed=True needs jax.distributed.initialize() to have been called in this process")
  st = jd.global_state
  return Job(st.client, int(st.process_id), int(st.num_processes), float(timeout_s), op)


def process_index() -> int:
  """This process's index in the started runtime (0 without one); initialises no XLA backend."""
  from jax._src import distributed as jd

  return int(jd.global_state.process_id) if jd.global_state.client is not None else 0


def process_count() -> int:
  """Processes in the started runtime (1 without one); initialises no XLA backend."""
  from jax._src import distributed as jd

  return int(jd.global_state.num_processes) if jd.global_state.client is not None else 1


def single_process(op: str = "job") -> Job:
  """A :class:`Job` of one process (no runtime): every exchange is local."""
  return Job(None, 0, 1, DEFAULT_TIMEOUT_S, op)
