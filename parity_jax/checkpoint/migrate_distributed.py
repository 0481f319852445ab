"""The migrator as one job across processes (:mod:`parity_jax.runtime`).

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

import asyncio
import dataclasses
import hashlib
import json
import math
import os
import resource
import secrets
import shutil
import threading
import time
from typing import Any

import numpy as np

from parity_jax.checkpoint import geometry, keypath
from parity_jax.checkpoint.migrate import (
    MigrateResult,
    _batch_bytes,
    _check_dest,
    _custom_metadata,
    _install,
    _open_inputs,
    _remove_stale_temporaries,
    row_major_chunks,
)
from parity_jax.checkpoint.distributed import assign
from parity_jax.checkpoint.layout import Checkpoint, LeafMeta
from parity_jax.checkpoint.reader import LeafReader, read_string_leaf
from parity_jax.checkpoint.spec import LeafPlan
from parity_jax.checkpoint.tstore import memmap_reads, quiet_orbax
from parity_jax.runtime import Job, stall_point
from parity_jax.errors import UsageError, first_line
from parity_jax.progress import progress as progress_bar

__all__ = ["run"]

_MIB = 1 << 20
_MAX_PIECES = 4096  # per leaf: finer runs of chunks are merged (the split needs only a few cut points)
_STATE = "state"


class AgreedError(UsageError):
  """A usage error every process raises with the same message (no need to tell the others)."""


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One destination array: where it comes from and how it is stored and cut."""

  plan: LeafPlan
  src: LeafMeta
  keys: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype
  chunk: tuple[int, ...]
  ends: tuple[int, ...]  # element offsets where each piece (a run of whole chunks, C order) ends
  splittable: bool

  @property
  def name(self) -> str:
    return ".".join(self.keys)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape)) if self.shape else 1

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  @property
  def n_chunks(self) -> int:
    if not self.shape:
      return 1
    return int(np.prod([-(-d // max(1, c)) for d, c in zip(self.shape, self.chunk)])) if self.size else 0


def _chunk_ends(shape: tuple[int, ...], chunk: tuple[int, ...]) -> tuple[int, ...] | None:
  """Where each storage chunk ends in C order when every chunk is a contiguous range (None otherwise)."""
  n = int(np.prod(shape)) if shape else 1
  if not shape or n == 0:
    return (n,) if n else ()
  axes = [i for i, d in enumerate(shape) if d > 1]
  if not axes:
    return (n,)
  k = next((i for i in axes if chunk[i] != 1), axes[-1])
  if any(chunk[j] != shape[j] for j in axes if j > k):
    return None  # e.g. orbax's own column blocks: a chunk is not a C-order range
  c, d = min(int(chunk[k]), shape[k]), shape[k]
  inner = int(np.prod(shape[k + 1 :])) if k + 1 < len(shape) else 1
  per_block = -(-d // c)
  count = per_block * (n // (d * inner))
  step = max(1, -(-count // _MAX_PIECES))

  def end(i: int) -> int:
    b, j = divmod(i, per_block)
    return b * d * inner + min((j + 1) * c, d) * inner

  ends = [end(i) for i in range(step - 1, count, step)]
  if not ends or ends[-1] != n:
    ends.append(n)
  return tuple(ends)


def _readable_in_parts(meta: LeafMeta) -> bool:
  """A range of the source leaf can be read without decoding the whole leaf."""
  if meta.raw_chunks and memmap_reads():
    return True
  n = int(np.prod(meta.shape)) if meta.shape else 1
  return geometry.chunk_row_elems(meta.shape, meta.chunk_shape) < n


def _write_spec(
    leaf_name: str, shape, dtype, item_dir: str, process_id: int | None, *, chunk_bytes: int, compression: str
):
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  return tsu.ArrayWriteSpec(
      item_dir,
      leaf_name,
      global_shape=tuple(shape),
      write_shape=tuple(shape),
      dtype=dtype,
      chunk_byte_size=chunk_bytes,
      use_compression=compression == "zstd",
      use_zarr3=True,
      use_ocdbt=True,
      process_id=process_id,
  )


def _plan(
    src: Checkpoint, leaves: tuple[LeafPlan, ...], item_dir: str, *, chunk_bytes: int, compression: str
) -> tuple[list[_Leaf], list[LeafPlan], bool]:
  """The arrays (with their chunking and pieces), the string leaves, and whether row-major chunks apply."""
  arrays, strings = [], []
  with row_major_chunks() as hooked, quiet_orbax():
    for p in leaves:
      s = src.leaves[p.source]
      if s.kind == "string":
        strings.append(p)
        continue
      shape = tuple(int(d) for d in p.transform.dst_shape)
      spec = _write_spec(
          ".".join(keypath.split(p.dest)),
          shape,
          s.dtype,
          item_dir,
          None,
          chunk_bytes=chunk_bytes,
          compression=compression,
      )
      chunk = tuple(int(c) for c in spec.metadata.chunk_shape)
      ends = _chunk_ends(shape, chunk)
      n = int(np.prod(shape)) if shape else 1
      if ends is None:
        ends = (n,) if n else ()
      arrays.append(
          _Leaf(
              p, s, tuple(keypath.split(p.dest)), shape, s.dtype, chunk, ends, len(ends) > 1 and _readable_in_parts(s)
          )
      )
  return arrays, strings, hooked


def _groups(ends: tuple[int, ...], lo: int, hi: int, group_elems: int) -> list[tuple[int, int]]:
  """Pieces [lo, hi) as element ranges of whole pieces, each at most ``group_elems`` (or one piece)."""
  out = []
  a = cur = ends[lo - 1] if lo else 0
  for i in range(lo, hi):
    if ends[i] - a > group_elems and cur > a:
      out.append((a, cur))
      a = cur
    cur = ends[i]
  if cur > a:
    out.append((a, cur))
  return out


def _read_cache_bytes(meta: LeafMeta, groups: list[tuple[int, int]]) -> int:
  """A private chunk cache for the source reads of one range: none when every group decodes whole chunk rows."""
  if len(groups) <= 1 or (meta.raw_chunks and memmap_reads()):
    return 0
  n = int(np.prod(meta.shape)) if meta.shape else 1
  row = geometry.chunk_row_elems(meta.shape, meta.chunk_shape)
  if row < n and all(a % row == 0 and (b % row == 0 or b == n) for a, b in groups):
    return 0
  longest = max(b - a for a, b in groups)
  rows = min(math.ceil(longest / row) + 1, math.ceil(n / row))
  return int(rows * row * meta.dtype.itemsize * 1.05) + 4 * _MIB


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Commit:
  """Who may delete what, and when (see the module docstring)."""

  def __init__(self, job: Job, tmp: str, own_db: str):
    self.job, self.tmp, self.own_db = job, tmp, own_db
    self.lock = threading.Lock()
    self.reported = False

  def cleanup(self) -> None:
    if not self.lock.acquire(timeout=30):
      return  # the main thread is stuck inside a commit step: leave the files (a later run removes them)
    try:
      if self.job.is_coordinator:  # once installed, only the empty shell of the temporary directory is left
        shutil.rmtree(self.tmp, ignore_errors=True)
      elif not self.reported:
        shutil.rmtree(self.own_db, ignore_errors=True)
    finally:
      self.lock.release()


def run(
    job: Job,
    source,
    dest,
    spec,
    *,
    chunk_mb: float,
    overwrite: bool,
    progress: bool,
    batch_mb: float | None,
    compression: str,
) -> MigrateResult:
  """:func:`parity_jax.checkpoint.migrate` as one job: this process's share; process 0 assembles and installs."""
  t0 = time.perf_counter()
  init_ns = time.time_ns()
  spec, src, plan = _open_inputs(source, spec, chunk_mb=chunk_mb, compression=compression)
  dest = os.path.abspath(os.fspath(dest)).rstrip(os.sep)
  parent, name = os.path.dirname(dest), os.path.basename(dest)
  chunk_bytes = max(1, int(chunk_mb * _MIB))
  plan_dir = os.path.join(parent, f".{name}.plan", "checkpoint", _STATE)  # never created: only shapes the specs
  arrays, strings, hooked = _plan(src, plan.leaves, plan_dir, chunk_bytes=chunk_bytes, compression=compression)
  largest = max((a.nbytes for a in arrays), default=0)
  group_bytes = _batch_bytes(chunk_bytes, largest, batch_mb)
  pieces = [list(a.ends) if a.splittable else [a.size] for a in arrays]
  work = assign(
      [a.nbytes for a in arrays], [[e * a.dtype.itemsize for e in p] for a, p in zip(arrays, pieces)], job.num_processes
  )

  # -- the same plan everywhere; process 0 checks the destination and makes the temporary directory --
  fingerprint = hashlib.sha256(
      json.dumps(
          [dest, chunk_bytes, compression, group_bytes, [p.dest for p in strings]]
          + [
              [a.plan.source, a.plan.dest, list(a.shape), str(a.dtype), list(a.chunk), len(a.ends), a.splittable]
              for a in arrays
          ]
      ).encode()
  ).hexdigest()
  tmp = _agree_and_make_tmp(job, fingerprint, src, dest, overwrite)
  target = os.path.join(tmp, "checkpoint")
  item_dir = os.path.join(target, _STATE)
  own_db = os.path.join(item_dir, f"ocdbt.process_{job.process_id}")
  commit = _Commit(job, tmp, own_db)
  job.on_abort(commit.cleanup)
  try:
    if not os.path.isdir(item_dir):
      raise UsageError(
          f"process {job.process_id} cannot see the temporary directory {tmp} that process 0 made next"
          f" to the destination: --dest must be on storage that every process shares"
      )

    # -- this process's share --
    mine = work[job.process_id]
    stats = _write_share(
        job,
        src,
        arrays,
        mine,
        item_dir,
        chunk_bytes=chunk_bytes,
        compression=compression,
        group_bytes=group_bytes,
        progress=progress,
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
          strings,
          per,
          work,
          target,
          dest,
          t0=t0,
          init_ns=init_ns,
          chunk_bytes=chunk_bytes,
          compression=compression,
          hooked=hooked,
          n_leaves=len(plan.leaves),
      )
      answer = {"result": result.to_dict()}
    answer = json.loads(job.broadcast("installed", json.dumps(answer).encode()))
    job.barrier("done")
  except BaseException:
    commit.cleanup()
    raise
  if job.is_coordinator:
    shutil.rmtree(tmp, ignore_errors=True)  # only the empty shell is left after the rename
  return MigrateResult.from_dict(answer["result"])


def _agree_and_make_tmp(job: Job, fingerprint: str, src: Checkpoint, dest: str, overwrite: bool) -> str:
  """Every process planned the same; process 0 checks the destination and makes the temporary directory next
  to it. Its path on every process, or the same one line everywhere."""
  bad = job.first_disagreeing("plan", fingerprint)
  answer: dict[str, Any] = {}
  if job.is_coordinator:
    parent, name = os.path.dirname(dest), os.path.basename(dest)
    try:
      if bad is not None:
        raise UsageError(
            f"process {bad} planned the migration differently from process 0 (different source,"
            f" spec, destination or flags on that host?)"
        )
      _check_dest(src.path, dest, overwrite)
      _remove_stale_temporaries(parent, name)
      tmp = os.path.join(parent, f".{name}.migrating-{os.getpid()}-{secrets.token_hex(4)}")
      os.makedirs(os.path.join(tmp, "checkpoint", _STATE))
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
    arrays: list[_Leaf],
    mine,
    item_dir: str,
    *,
    chunk_bytes: int,
    compression: str,
    group_bytes: int,
    progress: bool,
) -> dict[str, Any]:
  """Reads and writes this process's leaves and ranges; every write has committed on return."""
  import tensorstore as ts
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  t0 = time.perf_counter()
  ctx = tsu.get_ts_context(use_ocdbt=True)  # one context: one OCDBT writer for this process's database
  written, n_groups, records = 0, 0, []
  share = sum(w.nbytes for w in mine)
  with progress_bar(share, f"migrate [{job.describe()}]", enabled=progress) as bar, row_major_chunks(), quiet_orbax():
    for w in mine:
      leaf = arrays[w.pair]
      lo, hi = (w.lo, w.hi) if w.split else (0, len(leaf.ends))  # pieces of this leaf that are this process's
      a_el, b_el = (leaf.ends[lo - 1] if lo else 0), (leaf.ends[hi - 1] if hi else 0)
      groups = _groups(leaf.ends, lo, hi, max(1, group_bytes // leaf.dtype.itemsize))
      spec = _write_spec(
          leaf.name, leaf.shape, leaf.dtype, item_dir, job.process_id, chunk_bytes=chunk_bytes, compression=compression
      ).json
      first = not w.split or w.rank == 0
      try:
        if first:
          t = ts.open(spec, create=True, open=True, context=ctx).result()
        else:
          t = ts.open(spec, open=True, assume_metadata=True, context=ctx).result()
      except Exception as e:  # noqa: BLE001 -- disk full, permissions: one line
        raise UsageError(f"cannot create leaf {leaf.plan.dest!r} under {item_dir}: {first_line(e)}") from None
      pending: list[Any] = []

      def settle() -> None:
        try:
          for f in pending:
            f.result()
        except Exception as e:  # noqa: BLE001
          raise UsageError(f"cannot write leaf {leaf.plan.dest!r} under {item_dir}: {first_line(e)}") from None
        pending.clear()

      with LeafReader(src, leaf.src, _read_cache_bytes(leaf.src, groups)) as reader:
        for a, b in groups:
          buf = np.empty(b - a, leaf.dtype)
          futs = [
              reader.read_into_async(box, buf[off : off + _count(box)].reshape(geometry.box_shape(box)))
              for box, off in geometry.flat_range_boxes(leaf.src.shape, a, b)
          ]
          for f in futs:
            reader.wait(f)
          settle()  # the previous group's writes (overlapped with this group's reads)
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
      records.append([w.pair, a_el, b_el])
  return {
      "process": job.process_id,
      "ranges": records,
      "bytes_read": written,
      "bytes_written": written,
      "groups": n_groups,
      "whole_leaves": [arrays[w.pair].plan.dest for w in mine if not w.split],
      "split_ranges": [f"{arrays[w.pair].plan.dest}#{w.rank}" for w in mine if w.split],
      "share_bytes": share,
      "write_s": round(time.perf_counter() - t0, 3),
      "peak_rss_bytes": _peak_rss(),
  }


def _count(box) -> int:
  return int(np.prod(geometry.box_shape(box))) if box else 1


def _assemble_and_install(
    job: Job,
    commit: _Commit,
    src: Checkpoint,
    spec,
    arrays: list[_Leaf],
    strings: list[LeafPlan],
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
) -> MigrateResult:
  """Process 0, after every share is committed: one checkpoint in ``target``, renamed to ``dest``."""
  item_dir = os.path.join(target, _STATE)
  _check_tiling(arrays, per)
  stall_point("migrate.merge", 0)
  t_merge = time.perf_counter()
  _merge(item_dir)
  job.tick()
  _check_merged(item_dir, arrays)
  merge_s = time.perf_counter() - t_merge
  if strings:
    table = {".".join(keypath.split(p.dest)): read_string_leaf(src, src.leaves[p.source]) for p in strings}
    with open(os.path.join(item_dir, "_strings.json"), "w", encoding="utf-8") as f:
      json.dump(table, f, separators=(",", ":"), ensure_ascii=False)
  entries = [(a.keys, "np.ndarray") for a in arrays] + [(tuple(keypath.split(p.dest)), "string") for p in strings]
  tree = {
      str(keys): {
          "key_metadata": [{"key": k, "key_type": 2} for k in keys],
          "value_metadata": {"value_type": vt, "skip_deserialize": False},
      }
      for keys, vt in sorted(entries)
  }
  with open(os.path.join(item_dir, "_METADATA"), "w", encoding="utf-8") as f:
    json.dump(
        {
            "tree_metadata": tree,
            "use_ocdbt": True,
            "use_zarr3": True,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        },
        f,
    )
  custom = _custom_metadata(src, spec, chunk_bytes, compression, num_processes=job.num_processes)
  with open(os.path.join(target, "_CHECKPOINT_METADATA"), "w", encoding="utf-8") as f:
    json.dump(
        {
            "item_handlers": {_STATE: _item_handler()},
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": init_ns,
            "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": custom,
        },
        f,
    )
  open(os.path.join(target, "orbax.checkpoint"), "w").close()
  with open(os.path.join(target, "commit_success.txt"), "w") as f:
    f.write(f"Checkpoint commit was successful to {dest}")
  stall_point("migrate.install", 0)
  with commit.lock:  # a cleanup waits for the rename, then removes only the temporary's empty shell
    _install(target, dest)
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
      distributed={
          "num_processes": job.num_processes,
          "per_process": per,
          "split_leaves": split,
          "merge_s": round(merge_s, 3),
      },
  )


def _check_tiling(arrays: list[_Leaf], per: list[dict[str, Any]]) -> None:
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


def _merge(item_dir: str) -> None:
  from etils import epath
  from orbax.checkpoint._src.serialization import ocdbt_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  with quiet_orbax():
    try:
      asyncio.run(
          ocdbt_utils.merge_ocdbt_per_process_files(
              epath.Path(item_dir), ts_context=tsu.get_ts_context(use_ocdbt=True), use_zarr3=True
          )
      )
    except Exception as e:  # noqa: BLE001
      raise UsageError(f"cannot merge the per-process databases under {item_dir}: {first_line(e)}") from None


def _check_merged(item_dir: str, arrays: list[_Leaf]) -> None:
  """The merged index holds every array's metadata and every one of its chunks (keys only, no data read)."""
  import tensorstore as ts
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  try:
    kv = ts.KvStore.open(
        tsu.build_kvstore_tspec(item_dir, use_ocdbt=True), context=tsu.get_ts_context(use_ocdbt=True)
    ).result()
    keys = [k.decode() for k in kv.list().result()]
  except Exception as e:  # noqa: BLE001
    raise UsageError(f"cannot list the merged checkpoint under {item_dir}: {first_line(e)}") from None
  meta, chunks = set(), {}
  for k in keys:
    name, _, rest = k.partition("/")
    if rest == "zarr.json":
      meta.add(name)
    elif rest == "c" or rest.startswith("c/"):
      chunks[name] = chunks.get(name, 0) + 1
  for leaf in arrays:
    if leaf.name not in meta or chunks.get(leaf.name, 0) != leaf.n_chunks:
      raise UsageError(
          f"the merged checkpoint lacks part of leaf {leaf.plan.dest!r}"
          f" ({chunks.get(leaf.name, 0)} of {leaf.n_chunks} chunks"
          f"{'' if leaf.name in meta else ', no zarr.json'}); nothing installed"
      )


def _item_handler() -> str:
  """The handler name the single-process migrator's checkpoints record for their item (orbax's v1 partial save)."""
  try:
    from orbax.checkpoint.experimental.v1._src.handlers import stateful_checkpointable_handler as h

    cls = h.StatefulCheckpointableHandler
    return f"{cls.__module__}.{cls.__qualname__}"
  except (ImportError, AttributeError):
    return (
        "orbax.checkpoint.experimental.v1._src.handlers.stateful_checkpointable_handler."
        "StatefulCheckpointableHandler"
    )
