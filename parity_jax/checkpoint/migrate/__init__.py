"""The streaming migrator: remap a checkpoint leaf by leaf, never holding the tree; one process or a job of many.

:func:`migrate` reads the source's metadata and binds the spec (all
validation before any data is read), plans every destination array
(:mod:`.plan`: shape, dtype, storage chunks, the pieces a job may cut it
into), then writes as one job of the JAX runtime's processes, a single
process being a job of one (:mod:`.schedule`): each process reads its share
of the source with tensorstore, a group of whole destination chunks at a
time (the next group read while the last one is written), and writes it with
tensorstore under the array specs orbax itself writes, into its own OCDBT
database (:mod:`parity_jax.checkpoint.formats.orbax_writer`). Process 0
merges the databases, writes the metadata and installs the result at
``dest`` (:mod:`.destination`): the one atomic step. Memory stays near one
group of chunks per process.

Storage is chunked (``chunk_mb``, default 64 MiB) and uncompressed by default
(``compression="zstd"`` for orbax's default codec), in *row-major* chunks:
leading axes are split first and trailing axes kept whole, so every chunk is
a contiguous C-order range and the verifier can stream the leaf chunk by
chunk. The migrated tree is nested dicts: a list index in a destination path
is a dict key (``"0"``, ``"1"``, ...), which keeps every leaf path unchanged.
Empty nodes of the source (``None``, ``{}``, ``[]``) hold no data and are not
carried over; the result names them.
"""

from __future__ import annotations

import math
import os
import sys

from parity_jax import runtime, stores
from parity_jax.checkpoint.formats import open_checkpoint
from parity_jax.checkpoint.formats.safetensors import SafetensorsCheckpoint
from parity_jax.checkpoint.migrate.destination import Interrupted, interruptible, leftovers
from parity_jax.checkpoint.migrate.result import MigrateResult
from parity_jax.checkpoint.migrate.schedule import AgreedError, run
from parity_jax.checkpoint.migrate.to_safetensors import migrate_to_safetensors
from parity_jax.checkpoint.presets import read_hf_config
from parity_jax.checkpoint.spec import RemapSpec
from parity_jax.errors import UsageError

__all__ = ["Interrupted", "MigrateResult", "leftovers", "migrate"]

_MIB = 1 << 20
COMPRESSIONS = ("none", "zstd")
LAYOUTS = ("auto", "standard", "v1")
DEST_FORMATS = ("orbax", "safetensors")


def _positive(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
    raise UsageError(f"{name} must be a positive number, got {value!r}")


def _log(line: str) -> None:
  """The migrator's notes (stale temporaries removed, uploads), one line each on stderr."""
  print(f"parity_jax: {line}", file=sys.stderr)


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
    layout: str = "auto",
    dest_format: str = "orbax",
    max_shard_mb: float = 5000.0,
    hf_config: str | os.PathLike | None = None,
) -> MigrateResult:
  """Writes ``source`` remapped by ``spec`` to ``dest`` as a v1 checkpoint; atomic.

  ``batch_mb`` bounds the bytes read and written together: small leaves are
  grouped up to it, a bigger leaf is cut into groups of whole chunks of about
  that size (default: the smaller of ``chunk_mb`` and the largest leaf, at
  least 8 MiB). ``compression`` is ``"none"`` (default) or ``"zstd"`` (orbax's
  default): uncompressed chunks are written straight from memory and read
  back box by box; zstd saves a few percent of disk on float weights and
  makes every later read decode. Raises :class:`~parity_jax.errors.UsageError`
  (nothing written) for bad input. SIGINT or SIGTERM during the run removes
  everything it wrote and raises :class:`Interrupted`.

  ``distributed=True`` writes the checkpoint as one job of every process of
  the JAX runtime (:func:`jax.distributed.initialize` must have been called
  in each, and each calls this with the same arguments; ``dest`` must be on
  storage every process sees): each process reads and writes only its share
  of the leaves (and of big leaves), and process 0 installs the one
  checkpoint at ``dest`` only after every share is committed (see
  :mod:`.schedule`). Every process returns the same result. A process that
  dies, or shows no progress for ``peer_timeout_s`` seconds, makes every
  other process print one line naming it and exit with code 2; nothing
  appears at ``dest``.

  Element rules (transpose/reshape/pad/slice ops, stacks, casts: presets such
  as ``hf-to-tunix``) are performed with the verifier's own evaluation
  (:class:`parity_jax.checkpoint.verify.elements.TargetValues`), one
  destination chunk at a time; a stacked target gets one chunk per stack
  member (at most ``chunk_mb``). ``layout``: ``"v1"`` (the item in
  ``state/``, what ``ocp.v1.save`` writes; also a ``CheckpointManager`` step
  with item ``state``), ``"standard"`` (the item at the top, what
  ``ocp.StandardCheckpointer().save`` writes, so
  ``ocp.StandardCheckpointer().restore(dest, abstract_tree)`` restores it),
  or ``"auto"`` (default): ``standard`` from a safetensors source, else ``v1``.

  ``dest_format="safetensors"`` writes a Hugging Face directory instead
  (:mod:`.to_safetensors`; one process): shards of at most ``max_shard_mb``
  (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` and
  ``model.safetensors.index.json``) and ``config.json`` copied from
  ``hf_config`` (a config.json or an HF directory holding one), so that
  ``transformers`` loads it.

  ``dest`` may be a ``gs://`` or ``s3://`` URL for every format and layout:
  a bucket has no rename, so the checkpoint is written in place and its
  commit last (``commit_success.txt``; for safetensors the index or
  ``model.safetensors``, see :mod:`.to_safetensors`); a failure or a signal
  before the commit deletes what was written, and an earlier half-written
  attempt there is refused, or deleted with ``overwrite``.
  """
  if dest_format not in DEST_FORMATS:
    raise UsageError(f"dest_format must be one of {', '.join(DEST_FORMATS)}, got {dest_format!r}")
  if dest_format == "safetensors" and distributed:
    raise UsageError("a safetensors destination is written by one process: run without a job")
  _positive("max_shard_mb", max_shard_mb)
  if layout not in LAYOUTS:
    raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
  if compression not in COMPRESSIONS:
    raise UsageError(f"compression must be 'none' or 'zstd', got {compression!r}")
  _positive("chunk_mb", chunk_mb)
  if batch_mb is not None:
    _positive("batch_mb", batch_mb)
  job = runtime.attach(peer_timeout_s or runtime.DEFAULT_TIMEOUT_S, "migrate") if distributed else None
  job = job or runtime.single_process("migrate")
  with job:
    try:
      spec = spec if isinstance(spec, RemapSpec) else RemapSpec.from_json(spec)
      src = open_checkpoint(source, "source checkpoint")
      bad = src.unreadable()
      if bad:
        p0 = next(iter(bad))
        raise UsageError(f"source checkpoint {src.path}: cannot read leaf {p0!r}: {bad[p0]}")
      plan = spec.bind(src.leaves, what="source checkpoint")
      remote = stores.is_remote(dest)
      local_dest = None if remote else os.path.abspath(os.fspath(dest)).rstrip(os.sep)
      # a bucket is written in place, the commit last (check_bucket_dest first; no local staging); a local --dest
      # goes to a temporary directory, renamed last
      target = stores.open_store(dest).url if remote else local_dest
      if dest_format == "safetensors":
        cfg = None if hf_config is None else read_hf_config(hf_config)
        with interruptible():
          return migrate_to_safetensors(
              src,
              plan,
              target,
              max_shard_bytes=max(1, int(max_shard_mb * _MIB)),
              hf_config=cfg,
              overwrite=overwrite,
              progress=progress,
              slab_bytes=int((batch_mb or 8) * _MIB),
              log=_log,
          )
      if layout == "auto":
        layout = "standard" if isinstance(src, SafetensorsCheckpoint) else "v1"
      with interruptible():
        return run(
            job,
            src,
            spec,
            plan,
            target,
            chunk_bytes=max(1, int(chunk_mb * _MIB)),
            overwrite=overwrite,
            progress=progress,
            batch_bytes=None if batch_mb is None else max(1, int(batch_mb * _MIB)),
            compression=compression,
            layout=layout,
            log=_log,
        )
    except AgreedError:
      raise  # every process raises the same error
    except UsageError as e:
      job.fail(str(e))
      raise
