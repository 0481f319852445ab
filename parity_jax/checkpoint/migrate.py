"""The streaming migrator: remap an Orbax checkpoint leaf by leaf, never holding the tree.

:func:`migrate` reads the source's metadata, binds the spec (all validation
before any data is read), then loops: restore a small batch of leaves through
orbax with every other leaf ``PLACEHOLDER`` (a big leaf is always alone in its
batch), apply each leaf's squeeze/reshape (a view, no copy), and append the
batch with ``ocp.v1.partial.save``; ``ocp.v1.partial.finalize`` merges the
pieces into one v1 checkpoint. Host arrays are not deep-copied
(``deepcopy_host_arrays=False``), so memory stays near one leaf.

Storage is chunked (``chunk_mb``, default 64 MiB) and uncompressed by
default (``compression="zstd"`` for orbax's default codec; see :func:`migrate`
for the memory cost), in *row-major* chunks:
leading axes are split first and trailing axes kept whole, so every chunk is
a contiguous C-order range and the verifier can stream the leaf chunk by
chunk. (orbax's own ``chunk_byte_size`` heuristic splits the largest axis
first, which for wide matrices gives column blocks; we supply the chunk shape
through orbax's chunk-shape hook for the duration of our save only, and fall
back to orbax's heuristic if that hook ever disappears.)

The migrated tree is nested dicts: a list index in a destination path is a
dict key (``"0"``, ``"1"``, ...), which keeps every leaf path unchanged (leaf
paths cannot tell the two apart). Empty nodes of the source (``None``, ``{}``,
``[]``) hold no data and are not carried over; the tool prints them.

Atomicity: everything is written under a hidden sibling directory
``.<dest>.migrating-<pid>-<token>/`` and renamed to ``dest`` only when
complete. A crash or SIGKILL leaves nothing at ``dest``; the next run removes
stale temporaries whose process is gone. An existing ``dest`` is refused
unless ``overwrite=True``, and even then only if it is an Orbax checkpoint or
an empty directory, never the source or anything that contains it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import sys
import time
import warnings
from typing import Any, Iterator

import numpy as np

from parity_jax.checkpoint import geometry, keypath
from parity_jax.checkpoint.layout import Checkpoint, open_checkpoint, resolve_item_dir
from parity_jax.checkpoint.reader import restore_leaves
from parity_jax.checkpoint.spec import LeafPlan, MigrationPlan, RemapSpec
from parity_jax.checkpoint.tstore import quiet_orbax
from parity_jax.errors import UsageError
from parity_jax.files import is_inside
from parity_jax.progress import human_bytes, progress as progress_bar
from parity_jax.provenance import default_provenance
from parity_jax.report import Report
from parity_jax.runtime import stall_point

__all__ = ["MigrateResult", "migrate", "row_major_chunks"]

_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class MigrateResult(Report):
  """What :func:`migrate` wrote. A result exists only for a completed migration, so ``passed`` is True."""

  source: str
  dest: str
  n_leaves: int
  nbytes: int
  n_batches: int
  chunk_bytes: int
  compression: str
  elapsed_s: float
  dropped_empty_nodes: tuple[str, ...]
  row_major_chunks: bool
  distributed: dict[str, Any] | None = None  # the job's figures when written by several processes

  @property
  def passed(self) -> bool:
    return True

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["dropped_empty_nodes"] = list(self.dropped_empty_nodes)
    d["elapsed_s"] = round(self.elapsed_s, 3)
    if d["distributed"] is None:
      del d["distributed"]
    return {"format": "parity_jax.migrate_result/1", **d}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MigrateResult":
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    kw["dropped_empty_nodes"] = tuple(kw.get("dropped_empty_nodes", ()))
    return cls(**kw)

  def text(self) -> str:
    rate = f"{human_bytes(self.nbytes / self.elapsed_s)}/s" if self.elapsed_s > 0 else "-"
    return (
        f"migrated {self.n_leaves} leaves ({human_bytes(self.nbytes)}) in {self.elapsed_s:.2f} s"
        f" ({rate}): {self.source} -> {self.dest}"
    )


@contextlib.contextmanager
def row_major_chunks() -> Iterator[bool]:
  """While active, orbax writes chunked arrays in row-major chunks (see module doc).

  Yields True when the hook is installed, False when this orbax has no such
  hook (then orbax's own chunk shapes are used; everything still works).
  """
  try:
    from orbax.checkpoint._src.arrays import subchunking

    original = subchunking.choose_chunk_shape
  except (ImportError, AttributeError):
    warnings.warn("orbax has no chunk-shape hook; using orbax's chunk shapes", RuntimeWarning)
    yield False
    return

  def choose(global_shape, write_shape, dtype, target_byte_size, *, shard_axes=()):
    if target_byte_size is None or shard_axes or tuple(global_shape) != tuple(write_shape):
      return original(global_shape, write_shape, dtype, target_byte_size, shard_axes=shard_axes)
    return geometry.row_major_chunk_shape(tuple(write_shape), np.dtype(dtype).itemsize, target_byte_size)

  subchunking.choose_chunk_shape = choose
  try:
    yield True
  finally:
    subchunking.choose_chunk_shape = original


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_stale_temporaries(parent: str, name: str) -> None:
  pat = re.compile(rf"^\.{re.escape(name)}\.(?:migrating|replaced)-(\d+)-[0-9a-f]+$")
  for entry in os.listdir(parent):
    m = pat.match(entry)
    if m and not _pid_alive(int(m.group(1))):
      print(
          f"parity_jax: removing stale temporary {os.path.join(parent, entry)} from an interrupted run", file=sys.stderr
      )
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _check_dest(src_path: str, dest: str, overwrite: bool) -> None:
  parent = os.path.dirname(dest)
  if not os.path.isdir(parent):
    raise UsageError(f"destination's parent directory does not exist: {parent}")
  if os.path.realpath(dest) == os.path.realpath(src_path):
    raise UsageError(f"destination {dest} is the source checkpoint; migrate to a new directory")
  if is_inside(dest, src_path):
    raise UsageError(f"destination {dest} lies inside the source checkpoint {src_path}")
  if is_inside(src_path, dest):
    raise UsageError(f"destination {dest} is or contains the source checkpoint {src_path}")
  if not os.path.lexists(dest):
    return
  if not overwrite:
    raise UsageError(f"destination already exists: {dest} (pass --overwrite to replace it)")
  if not os.path.isdir(dest) or os.path.islink(dest):
    raise UsageError(f"destination exists and is not a directory: {dest}; refusing to replace it")
  if os.listdir(dest):
    try:
      resolve_item_dir(dest, "destination")
    except UsageError:
      raise UsageError(f"destination {dest} exists and is not an Orbax checkpoint; refusing to replace it") from None


def _batches(plan: tuple[LeafPlan, ...], sizes: dict[str, int], batch_bytes: int) -> Iterator[list[LeafPlan]]:
  batch: list[LeafPlan] = []
  acc = 0
  for p in plan:
    n = sizes[p.source]
    if batch and acc + n > batch_bytes:
      yield batch
      batch, acc = [], 0
    batch.append(p)
    acc += n
  if batch:
    yield batch


def _nest(items: list[tuple[str, Any]]) -> dict[str, Any]:
  root: dict[str, Any] = {}
  for dest, value in items:
    comps = keypath.split(dest)
    node = root
    for c in comps[:-1]:
      node = node.setdefault(c, {})
    node[comps[-1]] = value
  return root


def migrate(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    spec: RemapSpec | str | os.PathLike,
    *,
    chunk_mb: float = 64.0,
    overwrite: bool = False,
    progress: bool = False,
    batch_mb: float | None = None,
    compression: str = "none",
    distributed: bool = False,
    peer_timeout_s: float | None = None,
) -> MigrateResult:
  """Writes ``source`` remapped by ``spec`` to ``dest`` as a v1 checkpoint; atomic.

  ``batch_mb`` bounds how many small leaves are restored and saved together
  (default: the smaller of ``chunk_mb`` and the largest leaf, at least 8 MiB);
  a leaf bigger than that is always alone. ``compression`` is ``"none"``
  (default) or ``"zstd"`` (orbax's default). Uncompressed chunks are written
  straight from the leaf's memory; with zstd, OCDBT holds every compressed
  chunk of a leaf until the leaf is committed (about one more copy of the
  largest leaf) and every later read pays for decoding, for a few percent
  less disk on float weights. Raises
  :class:`~parity_jax.errors.UsageError` (nothing written) for bad input.

  ``distributed=True`` writes the checkpoint as one job of every process of
  the JAX runtime (:func:`jax.distributed.initialize` must have been called
  in each, and each calls this with the same arguments; ``dest`` must be on
  storage every process sees): each process restores and writes only its
  share of the leaves (and of big leaves), process 0 assembles the one
  checkpoint and installs it at ``dest`` only after every share is committed
  (see :mod:`parity_jax.checkpoint.migrate_distributed`). Every process
  returns the same result. A process that dies, or shows no progress for
  ``peer_timeout_s`` seconds, makes every other process print one line naming
  it and exit with code 2; nothing appears at ``dest``.
  """
  if distributed:
    return _migrate_as_job(
        source,
        dest,
        spec,
        chunk_mb=chunk_mb,
        overwrite=overwrite,
        progress=progress,
        batch_mb=batch_mb,
        compression=compression,
        peer_timeout_s=peer_timeout_s,
    )
  t0 = time.perf_counter()
  spec, src, plan = _open_inputs(source, spec, chunk_mb=chunk_mb, compression=compression)
  dest = os.path.abspath(os.fspath(dest)).rstrip(os.sep)
  _check_dest(src.path, dest, overwrite)
  parent, name = os.path.dirname(dest), os.path.basename(dest)
  _remove_stale_temporaries(parent, name)

  chunk_bytes = max(1, int(chunk_mb * _MIB))
  sizes = {p.source: src.leaves[p.source].nbytes for p in plan.leaves}
  batch_bytes = _batch_bytes(chunk_bytes, max(sizes.values(), default=0), batch_mb)

  tmp = os.path.join(parent, f".{name}.migrating-{os.getpid()}-{secrets.token_hex(4)}")
  os.mkdir(tmp)
  target = os.path.join(tmp, "checkpoint")
  try:
    custom = _custom_metadata(src, spec, chunk_bytes, compression)
    n_batches, hooked = _write(
        src,
        plan.leaves,
        sizes,
        target,
        custom,
        chunk_bytes=chunk_bytes,
        batch_bytes=batch_bytes,
        compression=compression,
        show_progress=progress,
    )
    stall_point("migrate.install")
    _install(target, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(tmp, ignore_errors=True)
  return MigrateResult(
      source=src.path,
      dest=dest,
      n_leaves=len(plan.leaves),
      nbytes=sum(sizes.values()),
      n_batches=n_batches,
      chunk_bytes=chunk_bytes,
      compression=compression,
      elapsed_s=time.perf_counter() - t0,
      dropped_empty_nodes=tuple(src.empty_nodes),
      row_major_chunks=hooked,
  )


def _open_inputs(source, spec, *, chunk_mb: float, compression: str) -> tuple[RemapSpec, Checkpoint, MigrationPlan]:
  """Every check that needs no destination: options, the source's metadata, the spec bound to it."""
  spec = spec if isinstance(spec, RemapSpec) else RemapSpec.from_json(spec)
  if compression not in ("none", "zstd"):
    raise UsageError(f"compression must be 'none' or 'zstd', got {compression!r}")
  if not (isinstance(chunk_mb, (int, float)) and chunk_mb > 0 and np.isfinite(chunk_mb)):
    raise UsageError(f"chunk_mb must be a positive number, got {chunk_mb!r}")
  src = open_checkpoint(source, "source checkpoint")
  bad = src.unreadable()
  if bad:
    p0 = next(iter(bad))
    raise UsageError(f"source checkpoint {src.path}: cannot read leaf {p0!r}: {bad[p0]}")
  return spec, src, spec.bind(src.leaves, what="source checkpoint")


def _batch_bytes(chunk_bytes: int, largest: int, batch_mb: float | None) -> int:
  return max(min(chunk_bytes, largest), 8 * _MIB) if batch_mb is None else max(1, int(batch_mb * _MIB))


def _custom_metadata(
    src: Checkpoint, spec: RemapSpec, chunk_bytes: int, compression: str, **extra: Any
) -> dict[str, Any]:
  """What the migrator records in the checkpoint's ``custom_metadata``."""
  return {
      "parity_jax_migration": {
          "source": src.path,
          "source_layout": src.layout,
          "spec": spec.to_dict(),
          "chunk_bytes": chunk_bytes,
          "compression": compression,
          **extra,
          "provenance": default_provenance("parity_jax.checkpoint.migrate"),
      }
  }


def _migrate_as_job(source, dest, spec, *, peer_timeout_s: float | None, **kw: Any) -> MigrateResult:
  from parity_jax import runtime
  from parity_jax.checkpoint import migrate_distributed

  job = runtime.attach(peer_timeout_s or runtime.DEFAULT_TIMEOUT_S, "migrate")
  with job:
    try:
      return migrate_distributed.run(job, source, dest, spec, **kw)
    except migrate_distributed.AgreedError:
      raise  # every process raises the same error
    except UsageError as e:
      job.fail(str(e))
      raise


def _write(
    src: Checkpoint,
    leaves: tuple[LeafPlan, ...],
    sizes: dict[str, int],
    target: str,
    custom: dict[str, Any],
    *,
    chunk_bytes: int,
    batch_bytes: int,
    compression: str,
    show_progress: bool,
) -> tuple[int, bool]:
  """Restores, transforms and appends the leaves batch by batch, then finalizes ``target``. Returns (batches, hooked)."""
  import orbax.checkpoint as ocp  # noqa: F401 -- registers the handlers v1 uses
  from orbax.checkpoint import v1 as ocp_v1

  ctx = ocp_v1.Context()
  ctx.memory.deepcopy_host_arrays = False
  ctx.array.saving.storage_options.chunk_byte_size = chunk_bytes
  ctx.array.saving.use_compression = compression == "zstd"
  done = n_batches = 0
  with (
      progress_bar(sum(sizes.values()), "migrate", enabled=show_progress) as bar,
      ctx,
      row_major_chunks() as hooked,
      quiet_orbax(),
  ):
    for batch in _batches(leaves, sizes, batch_bytes):
      values = restore_leaves(src, [p.source for p in batch])
      items = [
          (
              p.dest,
              p.transform.apply(values.pop(p.source))
              if src.leaves[p.source].kind != "string"
              else values.pop(p.source),
          )
          for p in batch
      ]
      ocp_v1.partial.save(target, _nest(items), custom_metadata=custom if n_batches == 0 else None)
      del items, values
      n_batches += 1
      done += len(batch)
      bar.update(sum(sizes[p.source] for p in batch))
      bar.set_postfix_str(f"{done}/{len(leaves)} leaves")
      stall_point(f"migrate.group.{n_batches}")
    ocp_v1.partial.finalize(target)
  return n_batches, hooked


def _install(target: str, dest: str) -> None:
  """Renames the finished checkpoint to ``dest``; an existing ``dest`` (overwrite) is swapped out, then removed."""
  if os.path.lexists(dest):
    parent, name = os.path.dirname(dest), os.path.basename(dest)
    old = os.path.join(parent, f".{name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(dest, old)
    os.rename(target, dest)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(target, dest)
