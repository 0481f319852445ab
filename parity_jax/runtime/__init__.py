"""The job runtime every multi-process job uses: the verifier, the migrator and the SVF replay.

* :mod:`.launch` -- joining a job: launch :class:`Options` (the ecosystem's
  conventions), :func:`initialize` (``jax.distributed``), :func:`attach`,
  :func:`single_process`;
* :mod:`.job` -- :class:`Job`: exchanges over the runtime's key-value store
  (gather, broadcast, allgather, barrier, publish/wait), bounded by liveness
  (heartbeats and a watchdog: a lost process makes the others exit 2 with one
  line), clean-up hooks;
* :mod:`.devices` -- work spread over local devices (cost-balanced placement,
  a thread per device);
* :mod:`.faults` -- the one fault-injection seam (``PARITY_JAX_STALL``).

The tools' launch flags and the supervisor that turns a lost coordinator into
one line live in :mod:`parity_jax.cli.app`.
"""

from parity_jax.runtime.devices import balance, run_on_devices
from parity_jax.runtime.faults import stall_point
from parity_jax.runtime.job import DEFAULT_TIMEOUT_S, Job, JobAborted, exit_lost, left_job
from parity_jax.runtime.launch import Options, attach, initialize, process_count, process_index, single_process

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Job",
    "JobAborted",
    "Options",
    "attach",
    "balance",
    "exit_lost",
    "initialize",
    "left_job",
    "process_count",
    "process_index",
    "run_on_devices",
    "single_process",
    "stall_point",
]
