"""The value-exact verifier: is every migrated leaf bit-identical to its transformed source?

:func:`verify_migration` works in two phases and never holds a whole tree
(:mod:`.structure`, :mod:`.values`; the result is a :class:`VerifyReport`,
:mod:`.report`):

1. **Structure, metadata only.** The spec is bound to the source leaves (the
   same validation the migrator runs); its inverse map must cover the
   migrated checkpoint 1:1. Every pair's shape and dtype is checked against
   the transform. Missing, extra, reshaped or retyped leaves FAIL by name
   before any array data is read.
2. **Values, one leaf pair at a time.** Both leaves are read in C-order
   pieces of the common refinement of their shapes (:mod:`parity_jax.checkpoint.geometry`): a
   piece is a box in the source leaf AND in the migrated leaf, so a squeeze or
   reshape is applied by index arithmetic, never by copying. Each piece pair
   is compared byte for byte (:func:`parity_jax.arraydiff.bit_equal` semantics:
   NaN payloads and -0.0 count). How each side is read (memory-mapped boxes of
   uncompressed chunks, whole chunk rows per piece, or one cached chunk row at
   a time), how sha256 is computed (one hash serves both sides of a
   bit-identical pair; it runs in a thread beside the comparison) and when a
   source leaf is spilled to a temporary file are planned per pair by
   :mod:`parity_jax.checkpoint.stream` from a memory model: about one storage chunk row per side
   plus a few piece buffers, never a whole tree and never both copies of a big
   leaf. A pair that differs gets a second pass that hashes both sides and
   accumulates :class:`parity_jax.arraydiff.DiffAccumulator` statistics piece by
   piece. Reported hashes always equal ``sha256(leaf.tobytes())``.

Both checkpoints are opened read-only; nothing is ever written into them.
"""

from __future__ import annotations

import concurrent.futures
import os
import tempfile
import time
from typing import Callable

from parity_jax import runtime, stores
from parity_jax.checkpoint import stream
from parity_jax.checkpoint.formats import Checkpoint, open_checkpoint
from parity_jax.checkpoint.spec import RemapSpec
from parity_jax.checkpoint.verify import elements, values
from parity_jax.checkpoint.verify.report import (
    DTYPE_MISMATCH,
    EXTRA,
    KIND_MISMATCH,
    MISSING,
    PASS,
    REPORT_FORMAT,
    SHAPE_MISMATCH,
    STATUSES,
    UNREADABLE,
    VALUE_MISMATCH,
    GroupResult,
    LeafResult,
    VerifyReport,
)
from parity_jax.checkpoint.verify.structure import PENDING, check_structure
from parity_jax.errors import UsageError
from parity_jax.files import is_inside

__all__ = [
    "DTYPE_MISMATCH",
    "EXTRA",
    "GroupResult",
    "KIND_MISMATCH",
    "LeafResult",
    "MISSING",
    "PASS",
    "REPORT_FORMAT",
    "SHAPE_MISMATCH",
    "STATUSES",
    "UNREADABLE",
    "VALUE_MISMATCH",
    "VerifyReport",
    "verify_migration",
]

_MIB = 1 << 20


def verify_migration(
    source: str | os.PathLike,
    migrated: str | os.PathLike,
    spec: RemapSpec | str | os.PathLike,
    *,
    top_k: int = 10,
    slab_mb: float = 8.0,
    spill_dir: str | os.PathLike | None = None,
    readahead: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    distributed: bool = False,
    peer_timeout_s: float | None = None,
    job: runtime.Job | None = None,
) -> VerifyReport:
  """Proves (or refutes) that ``migrated`` is ``source`` remapped by ``spec``, bit for bit.

  Raises :class:`~parity_jax.errors.UsageError` for setup problems (a path
  that is not a checkpoint, a spec that is malformed or does not fit the
  source). Every difference in the checkpoints themselves -- missing/extra
  leaves, shape/dtype changes, differing or unreadable values -- is reported
  per leaf in the returned :class:`VerifyReport` (``passed`` False).

  ``slab_mb`` is the size of one compared piece (a few such buffers are
  allocated once); ``readahead`` = N decodes the next N storage chunk rows of
  a compressed leaf while the current one is compared -- faster with free
  cores, about N more chunk rows plus their compressed bytes in memory (so
  above the chunked-storage memory target; 0 meets it). ``None``, the
  default, is 0 on local disk; with a checkpoint in a bucket, where each
  stored chunk is one request, it keeps up to
  :data:`~parity_jax.checkpoint.stream.plan.REMOTE_READAHEAD` chunk rows in
  flight within about 1 GiB (one row for a leaf whose big chunks are fetched
  as many range requests), and a pair is streamed rather than spilled to
  local disk (see :func:`~parity_jax.checkpoint.stream.plan_pair`).

  ``distributed=True`` runs the comparison as one job of every process of
  the JAX runtime (:func:`jax.distributed.initialize` must have been called
  in each, and each calls this with the same arguments): the bytes are
  split across processes (see :mod:`.values`), and
  every process returns the same report, identical to one process's apart
  from ``elapsed_s``, ``provenance`` and the added ``distributed`` figures. A
  process that dies, or shows no progress for ``peer_timeout_s`` seconds,
  makes every other process print one line naming it and exit with code 2
  (see :mod:`parity_jax.runtime`).

  ``job`` runs it as that :class:`parity_jax.runtime.Job` instead (a job over
  another key-value store than the JAX runtime's; not with ``distributed``).
  """
  args = dict(top_k=top_k, slab_mb=slab_mb, spill_dir=spill_dir, readahead=readahead, progress=progress, log=log)
  if job is not None and distributed:
    raise UsageError("pass distributed=True or a job, not both")
  if job is None and not distributed:
    return _verify(source, migrated, spec, job=runtime.single_process("verify"), **args)
  if job is None:
    job = runtime.attach(peer_timeout_s or runtime.DEFAULT_TIMEOUT_S, "verify")
  with job:
    try:
      return _verify(source, migrated, spec, job=job, **args)
    except UsageError as e:
      job.fail(str(e))
      raise


def _verify(source, migrated, spec, *, top_k, slab_mb, spill_dir, readahead, progress, log, job) -> VerifyReport:
  t0, io0 = time.perf_counter(), stores.io_stats()
  spec = spec if isinstance(spec, RemapSpec) else RemapSpec.from_json(spec)
  src_ckpt, mig_ckpt = _open_both(source, migrated)
  spill_dir = _check_spill_dir(spill_dir, (src_ckpt, mig_ckpt))
  bad = src_ckpt.unreadable()
  if bad:
    p0 = next(iter(bad))
    raise UsageError(
        f"source checkpoint {src_ckpt.path}: cannot read leaf {p0!r}"
        f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: {bad[p0]}"
    )
  plan = spec.bind(src_ckpt.leaves, what="source checkpoint")
  results, to_compare = check_structure(plan, spec, src_ckpt, mig_ckpt)
  element_pairs = []
  for e in plan.elements:
    res = elements.element_result(e, mig_ckpt.leaves.get(e.dest))
    results.append(res)
    if res.status == PENDING:
      element_pairs.append((e, res))
  settings = values.Settings(
      top_k=top_k,
      buffers=stream.Buffers(max(4096, int(slab_mb * _MIB))),
      spill_dir=spill_dir,
      readahead=None if readahead is None else int(readahead),
      log=log,
      remote=any(stores.is_remote(c.path) for c in (src_ckpt, mig_ckpt)),
  )
  bytes_read, job_figures = values.compare_values(job, to_compare, src_ckpt, mig_ckpt, settings, progress=progress)
  del settings  # its slab buffers: not held while the element targets are compared
  for e, res in element_pairs:  # every process checks every element target (the same result everywhere)
    bytes_read += elements.compare_element_leaf(e, res, src_ckpt, mig_ckpt, elements.slab_elems(slab_mb * _MIB, e))
  return VerifyReport(
      source=src_ckpt.path,
      migrated=mig_ckpt.path,
      spec_source=spec.source,
      source_layout=src_ckpt.layout,
      migrated_layout=mig_ckpt.layout,
      leaves=results,
      ignored_empty_nodes={"source": src_ckpt.empty_nodes, "migrated": mig_ckpt.empty_nodes},
      elapsed_s=time.perf_counter() - t0,
      bytes_read=bytes_read,
      spec=spec.to_dict(),
      distributed=job_figures,
      io=stores.io_stats(since=io0),
      storage={
          "source": {**src_ckpt.storage_facts(), "summary": src_ckpt.storage_summary()},
          "migrated": {**mig_ckpt.storage_facts(), "summary": mig_ckpt.storage_summary()},
      },
  )


def _open_both(source, migrated) -> tuple[Checkpoint, Checkpoint]:
  """Both checkpoints opened at once (metadata only): on a bucket each open is a chain of small requests
  (listing, metadata, OCDBT manifest and index), so the two chains overlap instead of adding up. A source that
  cannot be opened is reported first, as when they were opened one after the other."""
  with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="parity_jax-open") as pool:  # no mutate: speed only
    src = pool.submit(open_checkpoint, source, "source checkpoint")
    mig = pool.submit(open_checkpoint, migrated, "migrated checkpoint")
    return src.result(), mig.result()


def _check_spill_dir(spill_dir: str | os.PathLike | None, checkpoints: tuple[Checkpoint, ...]) -> str:
  spill_dir = os.fspath(spill_dir) if spill_dir is not None else tempfile.gettempdir()
  for ck in checkpoints:
    if is_inside(spill_dir, ck.path):
      raise UsageError(f"spill directory {spill_dir} lies inside a checkpoint ({ck.path}); choose another")
  if not os.path.isdir(spill_dir):
    raise UsageError(f"spill directory does not exist: {spill_dir}")
  return spill_dir
