"""The migrator into a Hugging Face safetensors directory (``*-to-hf`` conversions), one process, atomic.

Every target tensor is produced in C-order slabs: a plain rule (rename,
squeeze, reshape: the same elements in the same order) reads its source leaf
range by range; an element rule (unstack, transpose, reshape chains, casts)
is evaluated by the verifier's own :class:`~parity_jax.checkpoint.verify.elements.TargetValues`.
The shards, index and ``config.json`` (from ``hf_config``) are written into a
hidden temporary beside ``dest`` and renamed to ``dest`` when complete
(:mod:`.destination`), so ``transformers.AutoModelForCausalLM.from_pretrained(dest)``
sees either nothing or the whole model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Callable, Iterator

import numpy as np

from parity_jax.checkpoint import geometry
from parity_jax.checkpoint.formats.base import Checkpoint
from parity_jax.checkpoint.formats.safetensors import detect
from parity_jax.checkpoint.formats.safetensors_writer import Tensor, write_safetensors_dir
from parity_jax.checkpoint.migrate.destination import Interrupted, check_dest, install, remove_stale, temporary_path
from parity_jax.checkpoint.migrate.result import MigrateResult
from parity_jax.checkpoint.spec import LeafPlan, MigrationPlan
from parity_jax.checkpoint.transforms import ElementPlan
from parity_jax.checkpoint.verify.elements import TargetValues, slab_elems
from parity_jax.errors import UsageError, first_line
from parity_jax.progress import progress as progress_bar

__all__ = ["migrate_to_safetensors"]


def _plain_values(src: Checkpoint, p: LeafPlan, slab_bytes: int) -> Callable[[], Iterator[np.ndarray]]:
  def values() -> Iterator[np.ndarray]:
    meta = src.leaves[p.source]
    n = meta.size
    step = max(1, slab_bytes // meta.dtype.itemsize)
    with src.reader(meta) as r:
      for a in range(0, n, step):
        for box, _ in geometry.flat_range_boxes(meta.shape, a, min(n, a + step)):
          yield np.asarray(r.read(box)).reshape(-1)

  return values


def _element_values(src: Checkpoint, e: ElementPlan, slab_bytes: int) -> Callable[[], Iterator[np.ndarray]]:
  def values() -> Iterator[np.ndarray]:
    with TargetValues(e, src, slab_elems(slab_bytes, e)) as v:
      for s in v.slabs(0, math.prod(e.dst_shape)):
        yield s.values

  return values


def _check_dest(src: Checkpoint, dest: str, overwrite: bool) -> None:
  try:
    check_dest(src.path, dest, overwrite)
  except UsageError as e:  # an HF directory may be replaced as an Orbax checkpoint may
    if not (overwrite and "is not an Orbax checkpoint" in str(e) and detect(dest)):
      raise


def migrate_to_safetensors(
    src: Checkpoint,
    plan: MigrationPlan,
    dest: str,
    *,
    max_shard_bytes: int,
    hf_config: dict | None,
    overwrite: bool,
    progress: bool,
    slab_bytes: int,
    log: Callable[[str], None],
) -> MigrateResult:
  """Writes every target of ``plan`` as a safetensors directory at ``dest`` (plus ``config.json``); atomic."""
  t0 = time.perf_counter()
  strings = [p.dest for p in plan.leaves if src.leaves[p.source].kind == "string"]
  if strings:
    raise UsageError(f"safetensors holds no strings: leaf {strings[0]!r} (drop it in the spec)")
  tensors = [
      Tensor(
          p.dest,
          tuple(int(d) for d in p.transform.dst_shape),
          src.leaves[p.source].dtype,
          _plain_values(src, p, slab_bytes),
      )
      for p in plan.leaves
  ] + [Tensor(e.dest, e.dst_shape, e.dst_dtype, _element_values(src, e, slab_bytes)) for e in plan.elements]
  _check_dest(src, dest, overwrite)
  remove_stale(dest, log)
  tmp = temporary_path(dest)
  total = sum(t.nbytes for t in tensors)
  try:
    os.makedirs(tmp)
    with progress_bar(total, "migrate", enabled=progress) as bar:
      files = write_safetensors_dir(tmp, tensors, max_shard_bytes, bar.update)
    if hf_config is not None:
      with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
        f.write("\n")
    install(tmp, dest)
  except KeyboardInterrupt as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise Interrupted(getattr(e, "signum", 2), f"removed the unfinished migration; nothing written at {dest}") from None
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise UsageError(f"cannot write the safetensors directory next to {dest}: {first_line(e)}") from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return MigrateResult(
      source=src.path,
      dest=dest,
      n_leaves=len(tensors),
      nbytes=total,
      n_batches=len([f for f in files if f.endswith(".safetensors")]),
      chunk_bytes=max_shard_bytes,
      compression="none",
      elapsed_s=time.perf_counter() - t0,
      dropped_empty_nodes=tuple(src.empty_nodes),
      row_major_chunks=False,
  )
