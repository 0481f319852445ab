"""The migrator into a Hugging Face safetensors directory (``*-to-hf`` conversions), one process, atomic.

Every target tensor is produced in C-order slabs: a plain rule (rename,
squeeze, reshape: the same elements in the same order) reads its source leaf
range by range; an element rule (unstack, transpose, reshape chains, casts)
is evaluated by the verifier's own :class:`~parity_jax.checkpoint.verify.elements.TargetValues`.
The shards, index and ``config.json`` (from ``hf_config``) are written into a
hidden temporary beside ``dest`` and renamed to ``dest`` when complete
(:mod:`.destination`), so ``transformers.AutoModelForCausalLM.from_pretrained(dest)``
sees either nothing or the whole model.

**Into a bucket** (``gs://``, ``s3://``: no rename) the directory is written in
place, each file one object: ``config.json`` first, then the shards, and last
the object that makes it a safetensors directory -- ``model.safetensors.index.json``,
or ``model.safetensors`` when there is one shard. That last object is the
commit (HF has no commit marker, and a marker of our own would make every HF
directory uploaded by other tools look unfinished): shards without the index
are an unfinished migration to both tools (:mod:`parity_jax.checkpoint.formats.safetensors`),
``transformers`` finds no weights in them, and the next migration to the same
``dest`` names the half-written attempt and deletes it only with ``overwrite``
(:func:`~.destination.check_bucket_dest`). A failure or SIGINT/SIGTERM before
the commit deletes what was written. A shard is one upload, assembled in memory
(tensorstore's kvstore has no multipart upload or compose), so shards are cut
at most at :data:`BUCKET_SHARD_FLOOR` or the largest tensor, whichever is
bigger (and at ``max_shard_bytes`` if smaller): memory stays near three times
one leaf (the shard and the two copies tensorstore makes of it while it is
handed over), as a big model's largest tensors are bigger than the floor.
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
from parity_jax.checkpoint.formats.safetensors import CONFIG, detect
from parity_jax.checkpoint.formats.safetensors_writer import Tensor, write_safetensors_dir
from parity_jax import stores
from parity_jax.checkpoint.migrate.destination import (
    Interrupted,
    check_bucket_dest,
    check_dest,
    install,
    remove_stale,
    temporary_path,
)
from parity_jax.checkpoint.migrate.result import MigrateResult
from parity_jax.checkpoint.spec import LeafPlan, MigrationPlan
from parity_jax.checkpoint.transforms import ElementPlan
from parity_jax.checkpoint.verify.elements import TargetValues, slab_elems
from parity_jax.errors import UsageError, first_line
from parity_jax.progress import human_bytes
from parity_jax.progress import progress as progress_bar

__all__ = ["BUCKET_SHARD_FLOOR", "migrate_to_safetensors"]

_MIB = 1 << 20
BUCKET_SHARD_FLOOR = 256 * _MIB  # into a bucket, shards are cut at max(this, the largest tensor) at most


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
  total = sum(t.nbytes for t in tensors)
  if stores.is_remote(dest):
    return _to_bucket(src, tensors, stores.open_store(dest), max_shard_bytes, hf_config, overwrite, progress, log, t0)
  _check_dest(src, dest, overwrite)
  remove_stale(dest, log)
  tmp = temporary_path(dest)
  try:
    os.makedirs(tmp)
    with progress_bar(total, "migrate", enabled=progress) as bar:
      files = write_safetensors_dir(tmp, tensors, max_shard_bytes, bar.update)
    if hf_config is not None:
      with open(os.path.join(tmp, CONFIG), "wb") as f:
        f.write(_config_bytes(hf_config))
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
  return _result(src, dest, tensors, files, max_shard_bytes, t0)


def _result(src: Checkpoint, dest: str, tensors: list[Tensor], files: list[str], shard: int, t0: float):
  return MigrateResult(
      source=src.path,
      dest=dest,
      n_leaves=len(tensors),
      nbytes=sum(t.nbytes for t in tensors),
      n_batches=len([f for f in files if f.endswith(".safetensors")]),
      chunk_bytes=shard,
      compression="none",
      elapsed_s=time.perf_counter() - t0,
      dropped_empty_nodes=tuple(src.empty_nodes),
      row_major_chunks=False,
  )


def bucket_shard_bytes(tensors: list[Tensor], max_shard_bytes: int) -> int:
  """The shard limit into a bucket: ``max_shard_bytes``, but at most the larger of the floor and the largest
  tensor (a shard is assembled in memory before its one upload)."""
  largest = max((t.nbytes for t in tensors), default=0)
  return min(max_shard_bytes, max(largest, BUCKET_SHARD_FLOOR))


def _config_bytes(hf_config: dict) -> bytes:
  return (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode()


def _to_bucket(
    src: Checkpoint,
    tensors: list[Tensor],
    dest,
    max_shard_bytes: int,
    hf_config: dict | None,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None],
    t0: float,
) -> MigrateResult:
  """The directory written in place in a bucket, the commit (index, or the single file) last; see the docstring."""
  check_bucket_dest(src.path, dest, overwrite, log, safetensors=True)
  shard = bucket_shard_bytes(tensors, max_shard_bytes)
  if shard < max_shard_bytes and sum(t.nbytes for t in tensors) > shard:
    log(f"shards of at most {human_bytes(shard)} into {dest} (each is held in memory for its one upload)")
  try:
    if hf_config is not None:  # first: the commit (the index or the single file) is the last object written
      dest.child(CONFIG).write_bytes(_config_bytes(hf_config))
    with progress_bar(sum(t.nbytes for t in tensors), "migrate", enabled=progress) as bar:
      files = write_safetensors_dir(dest, tensors, shard, bar.update)
  except BaseException as e:
    try:  # nothing was there before (check_bucket_dest): everything under dest is this run's
      dest.delete(recursive=True, missing_ok=True)
    except UsageError:  # unreachable now: the objects stay without the commit (the next run names them)
      pass
    if isinstance(e, KeyboardInterrupt):
      raise Interrupted(
          getattr(e, "signum", 2), f"removed the unfinished migration; nothing written at {dest}"
      ) from None
    raise
  return _result(src, dest.url, tensors, files, shard, t0)
