"""Writes an Orbax checkpoint from a real 2-process JAX job (one ``ocdbt.process_N/`` per process).

  python -m tests.helpers.multiprocess_save DEST PORT PROCESS_ID

Run twice (process ids 0 and 1) with the same DEST and PORT. Arrays sharded
across both processes are jax.Arrays whose rows each process writes itself;
the numpy leaves and the scalar are written by process 0, as orbax does for a
multi-host training state. :func:`tree` is the full tree, for checking.
"""

from __future__ import annotations

import sys

import numpy as np


def tree() -> dict:
  """The checkpoint's values (every process builds the same)."""
  rng = np.random.default_rng(11)
  return {
      "params": {
          "w": rng.standard_normal((1, 8, 24)).astype(np.float32),  # numpy: process 0
          "big": rng.standard_normal((64, 96)).astype(np.float32),  # sharded: 32 rows per process
          "bias": rng.standard_normal((6,)).astype(np.float32),  # numpy: process 0
      },
      "mu": {"big": rng.standard_normal((64, 96)).astype(np.float32)},  # sharded
      "step": np.array(12, np.int64),
  }


SHARDED = (("params", "big"), ("mu", "big"))


def main(dest: str, port: int, process_id: int) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=60
  )
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from orbax.checkpoint import v1 as ocp_v1

  t = tree()
  mesh = Mesh(np.array(jax.devices()), ("p",))
  sharding = NamedSharding(mesh, PartitionSpec("p"))
  for a, b in SHARDED:
    full = t[a][b]
    local = [jax.device_put(full[idx], d) for d, idx in sharding.addressable_devices_indices_map(full.shape).items()]
    t[a][b] = jax.make_array_from_single_device_arrays(full.shape, sharding, local)
  ocp_v1.save(dest, t)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
