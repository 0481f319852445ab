"""The migration as one job of one or many processes (:mod:`parity_jax.runtime`): shares, commit, install.

**What each process writes.** Every process plans every leaf the same way:
its destination shape, dtype and storage chunk shape (orbax's own
``ArrayWriteSpec``, with the migrator's row-major chunks), and its *pieces*:
runs of whole destination chunks, each a contiguous C-order element range.
The leaves are laid end to end and split by bytes exactly as the verifier
splits them (:func:`parity_jax.checkpoint.distributed.assign`): a leaf in one
share goes whole to its owner; a leaf that crosses a share boundary is cut at
the piece boundaries nearest to it into one range per process, unless it is
smaller than half a share or its source cannot be read in parts without
decoding it whole (a compressed leaf stored as one chunk row). Strings (a few
bytes each) are process 0's.

Each process restores only its leaves and ranges from the source (tensorstore
reads of the boxes that tile each element range, in groups of whole chunks of
about ``batch_mb``, the next group read while the last one is written) and
writes them with tensorstore, under the same array specs orbax uses, into its
own OCDBT database ``<tmp>/checkpoint/state/ocdbt.process_<i>/``: the layout of
a multi-host orbax save. As in orbax, only the owner of a leaf's first range
writes its ``zarr.json``; the others write chunks only.

**Commit.** A process reports its share to process 0 only after every write of
it has committed; that report is the barrier. Process 0 then checks that the
reported ranges tile every leaf, merges the per-process databases into the
top-level manifest with orbax's own ``merge_ocdbt_per_process_files`` (by
index: the data files stay where they are), checks that the merged index
holds every leaf's metadata and every one of its chunks, writes
``_strings.json``, ``_METADATA``, ``_CHECKPOINT_METADATA`` and the v1 markers
(what the single-process migrator writes, ``value_type`` ``np.ndarray`` or
``string``), and renames the finished directory to ``dest``: the one atomic
step. Until then nothing is at ``dest``; a process lost before it makes the
others exit 2 (:mod:`parity_jax.runtime`), and process 0 removes the
temporary directory (a temporary left by a killed process 0 is removed by the
next run, as for one process). A process never deletes anything after it has
reported its share, and process 0 deletes only under a lock that the rename
also holds, so a cleanup cannot race the rename into ``dest``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import resource
import shutil
import signal
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

from parity_jax.checkpoint import geometry, keypath
from parity_jax.checkpoint.formats import orbax_writer
from parity_jax import stores
from parity_jax.checkpoint.formats.base import Checkpoint
from parity_jax.checkpoint.formats.orbax import STANDIN, on_bucket
from parity_jax.checkpoint.formats.tstore import quiet_orbax
from parity_jax.checkpoint.migrate.destination import (
    Interrupted,
    check_bucket_dest,
    check_dest,
    install,
    remove_stale,
    temporary_path,
)
from parity_jax.checkpoint.migrate.plan import TargetArray, groups, plan_arrays, read_cache_bytes
from parity_jax.checkpoint.migrate.result import MigrateResult
from parity_jax.checkpoint.shares import assign
from parity_jax.checkpoint.spec import LeafPlan, MigrationPlan, RemapSpec
from parity_jax.checkpoint.verify.elements import TargetValues, slab_elems
from parity_jax.errors import UsageError, first_line
from parity_jax.progress import progress as progress_bar
from parity_jax.provenance import default_provenance
from parity_jax.runtime import Job, stall_point

__all__ = ["AgreedError", "run"]

_MIB = 1 << 20
# an element target is evaluated in slabs of ELEMENT_SLAB_BYTES within a destination chunk, and reads its source
# ahead by ELEMENT_CACHE_BYTES, all members together: memory bounds only (test_transforms writes the same bytes
# with 1 KiB of each)
ELEMENT_SLAB_BYTES = 8 * _MIB  # no mutate: a memory bound; the bytes written do not depend on it
ELEMENT_CACHE_BYTES = 8 * _MIB  # no mutate: a memory bound; the bytes written do not depend on it


class AgreedError(UsageError):
  """A usage error every process raises with the same message (no need to tell the others)."""


class _Commit:
  """Who may delete what, and when (see the module docstring).

  A bucket destination (``bucket``) is written in place: process 0 deletes everything under it until the commit
  marker is written (``installed``), another process only its own database until it has reported its share.
  """

  def __init__(self, job: Job, tmp: str, own_db: str, bucket: Any = None, own_rel: str = ""):
    self.job, self.tmp, self.own_db = job, tmp, own_db
    self.bucket, self.own_rel = bucket, own_rel
    self.lock = threading.Lock()
    self.reported = False
    self.installed = False

  def cleanup(self) -> None:
    if not self.lock.acquire(timeout=30):
      return  # the main thread is stuck inside a commit step: leave the files (a later run removes them)
    try:
      if self.bucket is not None:
        self._cleanup_bucket()
      elif self.job.is_coordinator:  # once installed, only the empty shell of the temporary directory is left
        shutil.rmtree(self.tmp, ignore_errors=True)
      elif not self.reported:
        shutil.rmtree(self.own_db, ignore_errors=True)
    finally:
      self.lock.release()

  def _cleanup_bucket(self) -> None:
    where = None
    if self.job.is_coordinator and not self.installed:
      where = self.bucket
    elif not self.job.is_coordinator and not self.reported:
      where = self.bucket.child(self.own_rel)
    if where is None:
      return
    try:
      where.delete(recursive=True, missing_ok=True)
    except UsageError:  # unreachable now: the objects stay without a commit marker (the next run names them)
      pass


def run(
    job: Job,
    src: Checkpoint,
    spec: RemapSpec,
    plan: MigrationPlan,
    dest: str,
    *,
    chunk_bytes: int,
    overwrite: bool,
    progress: bool,
    batch_bytes: int | None,
    compression: str,
    log: Callable[[str], None],
    layout: str = "v1",
) -> MigrateResult:
  """The migration as one job (one process included): this process's share; process 0 assembles and installs.

  ``layout``: ``"v1"`` (the item in ``state/``) or ``"standard"`` (``ocp.StandardCheckpointer().save``'s).
  """
  t0 = time.perf_counter()
  init_ns = time.time_ns()
  bucket = stores.open_store(dest) if stores.is_remote(dest) else None
  if bucket is None:
    parent, name = os.path.dirname(dest), os.path.basename(dest)
    plan_dir = orbax_writer.item_path(os.path.join(parent, f".{name}.plan", "checkpoint"), layout)  # never created
  else:  # specs are built for a local stand-in directory, then moved onto the bucket (orbax.on_bucket)
    plan_dir = orbax_writer.item_path(STANDIN, layout)
  arrays, strings, hooked = plan_arrays(
      src, plan.leaves, plan_dir, chunk_bytes=chunk_bytes, compression=compression, elements=plan.elements
  )
  largest = max((a.nbytes for a in arrays), default=0)
  group_bytes = batch_bytes if batch_bytes is not None else max(min(chunk_bytes, largest), 8 * _MIB)
  pieces = [list(a.ends) if a.splittable else [a.size] for a in arrays]
  work = assign(
      [a.nbytes for a in arrays], [[e * a.dtype.itemsize for e in p] for a, p in zip(arrays, pieces)], job.num_processes
  )

  # -- the same plan everywhere; process 0 checks the destination and makes the temporary directory --
  fingerprint = hashlib.sha256(
      json.dumps(
          [dest, layout, chunk_bytes, compression, group_bytes, [p.dest for p in strings]]
          + [
              [a.plan.source, a.plan.dest, list(a.shape), str(a.dtype), list(a.chunk), len(a.ends), a.splittable]
              for a in arrays
          ]
      ).encode()
  ).hexdigest()
  tmp = _agree_and_make_tmp(job, fingerprint, src, dest, overwrite, log, layout, bucket)
  target = os.path.join(tmp, "checkpoint") if bucket is None else STANDIN
  item_dir = orbax_writer.item_path(target, layout)
  own_db = os.path.join(item_dir, f"ocdbt.process_{job.process_id}")
  commit = _Commit(job, tmp, own_db, bucket, own_rel=os.path.relpath(own_db, target))
  job.on_abort(commit.cleanup)
  try:
    if bucket is None and not os.path.isdir(item_dir):
      raise UsageError(
          f"process {job.process_id} cannot see the temporary directory {tmp} that process 0 made next"
          f" to the destination: --dest must be on storage that every process shares"
      )

    # -- this process's share --
    mine = work[job.process_id]
    stats, strings_table = _write_share(
        job,
        src,
        arrays,
        mine,
        item_dir,
        chunk_bytes=chunk_bytes,
        compression=compression,
        group_bytes=group_bytes,
        progress=progress,
        strings=strings,
        bucket=bucket,
    )
    stall_point("migrate.commit", job.process_id)
    if job.is_coordinator:
      reports = job.gather("committed", json.dumps(stats).encode())  # the barrier: every share committed
    else:
      with commit.lock:  # from here on this process deletes nothing (process 0 may rename at any moment)
        job.gather("committed", json.dumps(stats).encode())
        commit.reported = True

    answer = {}
    if job.is_coordinator:
      per = sorted((json.loads(r) for r in reports), key=lambda s: s["process"])
      result = _assemble_and_install(
          job,
          commit,
          src,
          spec,
          arrays,
          strings_table,
          per,
          work,
          target,
          dest,
          t0=t0,
          init_ns=init_ns,
          chunk_bytes=chunk_bytes,
          compression=compression,
          hooked=hooked,
          n_leaves=len(plan.leaves) + len(plan.elements),
          layout=layout,
          bucket=bucket,
      )
      answer = {"result": result.to_dict()}
    answer = json.loads(job.broadcast("installed", json.dumps(answer).encode()))
    job.barrier("done")
  except KeyboardInterrupt as e:  # SIGINT, SIGTERM (destination.interruptible): nothing left behind, one line
    commit.cleanup()
    sig = getattr(e, "signum", signal.SIGINT)
    raise Interrupted(sig, f"removed the unfinished migration; nothing written at {dest}") from None
  except BaseException:
    commit.cleanup()
    raise
  if job.is_coordinator and bucket is None:
    shutil.rmtree(tmp, ignore_errors=True)  # only the empty shell is left after the rename
  return MigrateResult.from_dict(answer["result"])


def _agree_and_make_tmp(
    job: Job,
    fingerprint: str,
    src: Checkpoint,
    dest: str,
    overwrite: bool,
    log: Callable[[str], None],
    layout: str = "v1",
    bucket: Any = None,
) -> str:
  """Every process planned the same; process 0 checks the destination and makes the temporary directory next
  to it. Its path on every process, or the same one line everywhere. A bucket destination has no temporary
  (``""``): it is written in place, the commit marker last; process 0 checks it (and, with ``overwrite``, deletes
  an earlier checkpoint or half-written attempt there) before any process writes."""
  bad = job.first_disagreeing("plan", fingerprint)
  answer: dict[str, Any] = {}
  if job.is_coordinator:
    try:
      if bad is not None:
        raise UsageError(
            f"process {bad} planned the migration differently from process 0 (different source,"
            f" spec, destination or flags on that host?)"
        )
      if bucket is not None:
        check_bucket_dest(src.path, bucket, overwrite, log)
        answer = {"tmp": ""}
      else:
        check_dest(src.path, dest, overwrite)
        remove_stale(dest, log)
        tmp = temporary_path(dest)
        os.makedirs(orbax_writer.item_path(os.path.join(tmp, "checkpoint"), layout))
        answer = {"tmp": tmp}
    except UsageError as e:
      answer = {"error": str(e)}
    except OSError as e:
      answer = {"error": f"cannot create a temporary directory next to {dest}: {first_line(e)}"}
  answer = json.loads(job.broadcast("tmp", json.dumps(answer).encode()))
  if "error" in answer:
    raise AgreedError(answer["error"])
  return answer["tmp"]


def _write_share(
    job: Job,
    src: Checkpoint,
    arrays: list[TargetArray],
    mine,
    item_dir: str,
    *,
    chunk_bytes: int,
    compression: str,
    group_bytes: int,
    progress: bool,
    strings: list[LeafPlan],
    bucket: Any = None,
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
  """Reads and writes this process's leaves and ranges (and, on process 0, reads the string leaves);
  every write has committed on return. Returns the share's figures and the strings read."""
  import tensorstore as ts

  t0 = time.perf_counter()
  ctx = orbax_writer.write_context(bucket)  # one context: one OCDBT writer for this process's database
  batch = _Batch(bucket is not None, group_bytes, item_dir if bucket is None else bucket.url)
  place = (lambda spec: spec) if bucket is None else (lambda spec: on_bucket(spec, bucket))
  written, n_groups, records = 0, 0, []
  share = sum(w.nbytes for w in mine)
  desc = f"migrate [{job.describe()}]" if job.distributed else "migrate"
  strings = strings if job.is_coordinator else []
  n_leaves = len(mine) + len(strings)
  table = {}
  with progress_bar(share, desc, enabled=progress) as bar, orbax_writer.row_major_chunks(), quiet_orbax():
    for p in strings:
      table[tuple(keypath.split(p.dest))] = src.read_string(src.leaves[p.source])
    for i, w in enumerate(mine):
      bar.set_postfix_str(f"{len(table) + i}/{n_leaves} leaves")
      leaf = arrays[w.pair]
      lo, hi = (w.lo, w.hi) if w.split else (0, len(leaf.ends))  # pieces of this leaf that are this process's
      a_el, b_el = (leaf.ends[lo - 1] if lo else 0), (leaf.ends[hi - 1] if hi else 0)
      cuts = groups(leaf.ends, lo, hi, max(1, group_bytes // leaf.dtype.itemsize))
      spec = orbax_writer.write_spec(
          leaf.name, leaf.shape, leaf.dtype, item_dir, job.process_id, chunk_bytes=chunk_bytes, compression=compression
      ).json
      first = not w.split or w.rank == 0
      if leaf.element is not None:
        spec = orbax_writer.write_spec(
            leaf.name,
            leaf.shape,
            leaf.dtype,
            item_dir,
            job.process_id,
            chunk_bytes=chunk_bytes,
            compression=compression,
            chunk_shape=leaf.chunk,
        ).json
      spec = place(spec)
      # a small leaf into a bucket: staged in the batch's transaction (committed with the next ones)
      txn = batch.transaction() if (len(cuts) <= 1 and leaf.element is None) else None
      kw = {} if txn is None else {"transaction": txn}
      try:
        if first:
          t = ts.open(spec, create=True, open=True, context=ctx, **kw).result()
        else:
          t = ts.open(spec, open=True, assume_metadata=True, context=ctx, **kw).result()
      except Exception as e:  # noqa: BLE001 -- disk full, permissions: one line
        raise UsageError(f"cannot create leaf {leaf.plan.dest!r} under {item_dir}: {first_line(e)}") from None
      pending: list[Any] = []

      def settle() -> None:
        try:
          for f in pending:
            (f.copy if txn is not None else f).result()  # in a transaction: staged; committed with the batch
        except Exception as e:  # noqa: BLE001
          raise UsageError(f"cannot write leaf {leaf.plan.dest!r} under {item_dir}: {first_line(e)}") from None
        pending.clear()

      if leaf.element is not None:  # computed from the source, one destination chunk at a time
        # slabs of at most ELEMENT_SLAB_BYTES within each chunk: the chunk buffer plus one slab, not two chunks
        slab = slab_elems(min(group_bytes, ELEMENT_SLAB_BYTES), leaf.element)
        with TargetValues(leaf.element, src, slab, ELEMENT_CACHE_BYTES) as values, _drained(pending):
          for box in _chunk_boxes(leaf, a_el, b_el):
            settle()  # no mutate: memory bound only (one chunk at a time); the last settle() waits for all
            buf = element_chunk(values, box)
            pending.append((t[box] if box else t).write(buf, can_reference_source_data_indefinitely=True))
            written += buf.nbytes
            n_groups += 1
            bar.update(buf.nbytes)
            job.tick()
            stall_point(f"migrate.group.{n_groups}", job.process_id)
            del buf
          settle()
        del t
        records.append([w.pair, a_el, b_el])
        continue
      with src.reader(leaf.src, read_cache_bytes(leaf.src, cuts)) as reader, _drained(pending):
        for a, b in cuts:
          buf = np.empty(b - a, leaf.dtype)
          futs = [
              reader.read_into_async(box, buf[off : off + _count(box)].reshape(geometry.box_shape(box)))
              for box, off in geometry.flat_range_boxes(leaf.src.shape, a, b)
          ]
          for f in futs:
            reader.wait(f)
          settle()  # no mutate: memory bound only (the previous group's writes, overlapped with this group's reads)
          for box, off in geometry.flat_range_boxes(leaf.shape, a, b):
            view = buf[off : off + _count(box)].reshape(geometry.box_shape(box))
            pending.append((t[box] if box else t).write(view, can_reference_source_data_indefinitely=True))
          del buf
          written += (b - a) * leaf.dtype.itemsize
          n_groups += 1
          bar.update((b - a) * leaf.dtype.itemsize)
          job.tick()
          stall_point(f"migrate.group.{n_groups}", job.process_id)
        settle()
      del t
      if txn is not None:
        batch.staged(leaf.plan.dest, (b_el - a_el) * leaf.dtype.itemsize)
      records.append([w.pair, a_el, b_el])
    batch.commit()  # every write of the share has committed from here on
    bar.set_postfix_str(f"{n_leaves}/{n_leaves} leaves")
  stats = {
      "process": job.process_id,
      "ranges": records,
      "bytes_read": written,
      "bytes_written": written,
      "groups": n_groups,
      "whole_leaves": [arrays[w.pair].plan.dest for w in mine if not w.split],
      "split_ranges": [f"{arrays[w.pair].plan.dest}#{w.rank}" for w in mine if w.split],
      "share_bytes": share,
      "write_s": round(time.perf_counter() - t0, 3),
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }
  return stats, table


class _Batch:
  """Small leaves written into a bucket, many per OCDBT commit.

  Each OCDBT commit is a few requests one after the other (a data object, the manifest read and rewritten), so
  a leaf opened and written on its own costs two commits of latency: for thousands of small leaves that adds
  up to minutes. Here consecutive small leaves (one group each) are staged in one tensorstore transaction,
  committed once ``limit`` bytes are staged and at the end of the share (memory: at most ``limit`` more).
  Disabled (local disk): every leaf commits on its own, as before.
  """

  def __init__(self, enabled: bool, limit: int, where: str):
    self.enabled, self.limit, self.where = enabled, max(1, int(limit)), where
    self.txn, self.nbytes, self.leaves = None, 0, []

  def transaction(self):
    if not self.enabled:
      return None
    if self.txn is None:
      import tensorstore as ts

      self.txn = ts.Transaction()
    return self.txn

  def staged(self, leaf: str, nbytes: int) -> None:
    self.leaves.append(leaf)
    self.nbytes += int(nbytes)
    if self.nbytes >= self.limit:
      self.commit()

  def commit(self) -> None:
    txn, leaves = self.txn, self.leaves
    self.txn, self.nbytes, self.leaves = None, 0, []
    if txn is None:
      return
    try:
      txn.commit_async().result()
    except Exception as e:  # noqa: BLE001 -- one line naming the batch
      what = f"leaf {leaves[0]!r}" if len(leaves) == 1 else f"{len(leaves)} leaves from {leaves[0]!r}"
      raise UsageError(f"cannot write {what} under {self.where}: {first_line(e)}") from None


@contextlib.contextmanager
def _drained(pending: list[Any]) -> Iterator[None]:
  """On the way out by an exception (a signal included), waits for the writes still in flight, so that a clean-up
  that follows removes every file: tensorstore would otherwise create some after the removal."""
  try:
    yield
  except BaseException:
    for f in pending:
      try:
        f.result()
      except Exception:  # noqa: BLE001 -- the first exception is the one that counts
        pass
    raise


def _chunk_boxes(leaf: TargetArray, a: int, b: int) -> Iterator[tuple[slice, ...]]:
  """The storage chunks of ``leaf`` whose first element lies in ``[a, b)`` (whole pieces), in C order."""
  if not leaf.shape:
    yield ()
    return
  grid = [range(0, d, max(1, c)) for d, c in zip(leaf.shape, leaf.chunk)]
  for corner in itertools.product(*grid):
    if a <= int(np.ravel_multi_index(corner, leaf.shape)) < b:
      yield tuple(slice(o, min(o + c, d)) for o, c, d in zip(corner, leaf.chunk, leaf.shape))


def element_chunk(values: TargetValues, box: tuple[slice, ...]) -> np.ndarray:
  """One box of an element target computed from the source: the verifier's own evaluation, slab by slab."""
  out = np.empty(_count(box), values.e.dst_dtype)
  for s in values.slabs(0, out.size, tuple((x.start, x.stop) for x in box)):
    out[s.lo : s.hi] = s.values
  return out.reshape(geometry.box_shape(box))


def _count(box) -> int:
  return int(np.prod(geometry.box_shape(box))) if box else 1


def _assemble_and_install(
    job: Job,
    commit: _Commit,
    src: Checkpoint,
    spec: RemapSpec,
    arrays: list[TargetArray],
    strings_table: dict[tuple[str, ...], str],
    per: list[dict[str, Any]],
    work,
    target: str,
    dest: str,
    *,
    t0: float,
    init_ns: int,
    chunk_bytes: int,
    compression: str,
    hooked: bool,
    n_leaves: int,
    layout: str = "v1",
    bucket: Any = None,
) -> MigrateResult:
  """Process 0, after every share is committed: one checkpoint in ``target``, renamed to ``dest``; in a bucket
  (``bucket``), merged and completed in place, the commit marker written last."""
  item_dir = orbax_writer.item_path(target, layout)
  _check_tiling(arrays, per)
  stall_point("migrate.merge", 0)  # the data written, no index or metadata yet (fault tests)
  t_merge = time.perf_counter()
  orbax_writer.merge(item_dir, bucket, job.num_processes)
  job.tick()
  orbax_writer.check_merged(item_dir, arrays, bucket)
  merge_s = time.perf_counter() - t_merge
  custom = custom_metadata(src, spec, chunk_bytes, compression, num_processes=job.num_processes)
  if bucket is not None:
    stall_point("migrate.install", 0)
    with commit.lock:  # the commit marker is the last write: from it on, the checkpoint exists
      orbax_writer.write_metadata(
          target, bucket.url, [a.keys for a in arrays], strings_table, custom, init_ns, layout, bucket=bucket
      )
      commit.installed = True
    dest = bucket.url
  else:
    orbax_writer.write_metadata(target, dest, [a.keys for a in arrays], strings_table, custom, init_ns, layout)
    stall_point("migrate.install", 0)
    with commit.lock:  # a cleanup waits for the rename, then removes only the temporary's empty shell
      install(target, dest)
  split = [
      {"path": arrays[i].plan.dest, "processes": [k for k, ws in enumerate(work) for w in ws if w.pair == i]}
      for i in sorted({w.pair for ws in work for w in ws if w.split})
  ]
  for s in per:
    del s["ranges"]
  return MigrateResult(
      source=src.path,
      dest=dest,
      n_leaves=n_leaves,
      nbytes=sum(a.nbytes for a in arrays),
      n_batches=sum(s["groups"] for s in per),
      chunk_bytes=chunk_bytes,
      compression=compression,
      elapsed_s=time.perf_counter() - t0,
      dropped_empty_nodes=tuple(src.empty_nodes),
      row_major_chunks=hooked,
      distributed=None
      if not job.distributed
      else {
          "num_processes": job.num_processes,
          "per_process": per,
          "split_leaves": split,
          "merge_s": round(merge_s, 3),
      },
  )


def _check_tiling(arrays: list[TargetArray], per: list[dict[str, Any]]) -> None:
  """Every element of every array was reported written exactly once."""
  got: dict[int, list[tuple[int, int]]] = {}
  for s in per:
    for i, a, b in s["ranges"]:
      got.setdefault(int(i), []).append((int(a), int(b)))
  for i, leaf in enumerate(arrays):
    rs = sorted(got.get(i, []))
    at = 0
    for a, b in rs:
      if a != at:
        break
      at = b
    if at != (leaf.size if leaf.ends else 0) or (not rs and leaf.ends):
      raise UsageError(
          f"leaf {leaf.plan.dest!r} was not written completely by the job (ranges {rs}); nothing" f" installed"
      )


def custom_metadata(
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
