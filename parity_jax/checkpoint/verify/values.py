"""Phase 2 of the verifier: every pair's values, bit for bit, by one process or as one job of many.

One schedule serves both: the pairs are divided among the job's processes by
bytes (:func:`parity_jax.checkpoint.shares.assign`; one process gets every
pair whole). A whole pair is compared by :class:`_PairComparer` exactly as
one process compares it (small pairs read in batches, big ones streamed by
:mod:`parity_jax.checkpoint.stream`). Each process sends its records to
process 0, which assembles the results in the report's order and sends the
finished list back, so every process returns the same report.

**Split leaves** (only in a job of several processes). A leaf crossing a
share boundary is cut into contiguous C-order piece ranges, one per process.
sha256 is sequential and the report carries the true ``sha256(leaf.tobytes())``,
so the ranges are hashed in a relay: the owner of the first range hashes it
while comparing and publishes the hash's intermediate state
(:class:`~parity_jax.checkpoint.stream.Sha256State`, 112 bytes) through the
job; the owner of range ``k`` continues from the state of range ``k - 1``.
Each process compares its first ranges (and whole leaves) first and its
later ranges last, so the state it needs has usually arrived by then: the
range is then hashed while it is compared, in one read. When the state has
not arrived yet, the range is compared without hashing, and once the state
arrives one side of the range is read again (the one read in small boxes if
any) to hash it; that re-read is counted apart (``hash_reread_bytes``).
Waiting on a state of rank ``k - 1`` never waits on rank ``k`` or later, so
the relay cannot deadlock. The last range's owner finalises the digest.

When a split leaf is not bit-identical (a range differs or cannot be read),
process 0 compares that leaf again, whole, exactly as one process does (both
hashes, difference statistics, the same first error): a failing leaf's
result is then identical by construction, at the cost of one more read of
that leaf on the way to a FAIL verdict.

Two counts, two names: *bytes read* (both sides, every pass: the report's
``bytes_read``) and *progress* (bytes of the checkpoint compared, one side:
what the progress bar shows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import time
from typing import Any, Callable

import numpy as np

from parity_jax import arraydiff, stores
from parity_jax.checkpoint import geometry, stream
from parity_jax.checkpoint.formats.base import Checkpoint, LeafMeta, LeafReadError
from parity_jax.checkpoint.shares import Work, assign
from parity_jax.checkpoint.spec import LeafPlan
from parity_jax.checkpoint.stream import Sha256State
from parity_jax.checkpoint.verify.report import PASS, UNREADABLE, VALUE_MISMATCH, LeafResult
from parity_jax.errors import UsageError
from parity_jax.progress import Progress, progress as progress_bar
from parity_jax.runtime import Job, stall_point

__all__ = ["Settings", "compare_values"]

Pair = tuple[LeafPlan, LeafResult]


@dataclasses.dataclass(frozen=True)
class Settings:
  """How pairs are compared (the verifier's arguments that shape the values phase)."""

  top_k: int
  buffers: stream.Buffers
  spill_dir: str
  readahead: int | None  # None: auto (rows ahead on a bucket side, none on local disk; see stream.plan_pair)
  log: Callable[[str], None] | None = None
  remote: bool = False  # a side lies in a bucket

  def plan(self, s_meta: LeafMeta, m_meta: LeafMeta, r: tuple[int, ...]) -> stream.PairPlan:
    """The read plan of one pair under these settings (the same everywhere a pair or a range of it is read)."""
    return stream.plan_pair(s_meta, m_meta, r, self.buffers.nbytes, readahead=self.readahead, remote=self.remote)


class _Meter:
  """Bytes read (both sides, every pass) and progress (bytes compared, one side); ticks the job."""

  def __init__(self, job: Job, bar):
    self.job, self.bar = job, bar
    self.bytes_read = 0

  def read(self, n: int) -> None:
    self.bytes_read += n
    self.job.tick()

  def compared(self, n: int) -> None:
    self.bar.update(n)


def compare_values(
    job: Job, to_compare: list[Pair], src: Checkpoint, mig: Checkpoint, settings: Settings, *, progress: bool
) -> tuple[int, dict[str, Any] | None]:
  """Fills the status, hashes and statistics of every pending result, on every process of ``job``.

  Returns the bytes read by the whole job and, in a job of several
  processes, the job's figures (``None`` for one process).
  """
  t0 = time.perf_counter()
  plan = _plan_job(job, to_compare, src, mig, settings)
  mine = plan.work[job.process_id]
  share = sum(w.nbytes for w in mine)
  desc = "verify" if not job.distributed else f"verify [{job.describe()}]"
  with progress_bar(share, desc, enabled=progress) as bar:
    meter = _Meter(job, bar)
    comparer = _PairComparer(src, mig, settings, meter)
    comparer.batch_small([to_compare[w.pair][0] for w in mine if not w.split])
    stall_point("verify.share", job.process_id)
    ranges = _Ranges(job, plan.metas, comparer)
    records: list[dict[str, Any]] = []
    try:
      for i, w in enumerate(mine):
        bar.set_postfix_str(f"{i}/{len(mine)} leaves")
        p, res = to_compare[w.pair]
        if not w.split:
          comparer.compare(p, res)
          records.append({"pair": w.pair, "whole": _result_dict(res)})
        else:
          records.append(ranges.compare(w))
      ranges.finish_deferred()
      bar.set_postfix_str(f"{len(mine)}/{len(mine)} leaves")
    finally:
      comparer.close()
  meter.bar = Progress()  # closed: a leaf process 0 compares again below is not progress of the share
  stats = {
      "process": job.process_id,
      "bytes_read": meter.bytes_read,
      "hash_reread_bytes": ranges.hash_reread_bytes,
      "whole_leaves": [to_compare[w.pair][0].dest for w in mine if not w.split],
      "ranges": [f"{to_compare[w.pair][0].dest}#{w.rank}" for w in mine if w.split],
      "share_bytes": share,
      "values_s": round(time.perf_counter() - t0, 3),
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }
  payloads = job.gather("results", json.dumps({"records": records, "stats": stats}).encode())
  final = b""
  if job.is_coordinator:
    per_process = [json.loads(x) for x in payloads]
    final = json.dumps(_assemble(per_process, to_compare, comparer, plan)).encode()
  assembled = json.loads(job.broadcast("final", final))
  for (_, res), d in zip(to_compare, assembled["results"]):
    _apply(res, d)
  job.barrier("done")
  figures = assembled["job"]
  total = sum(pp["bytes_read"] for pp in figures["per_process"])
  return total, (dict(figures, process=job.process_id) if job.distributed else None)


# ---------------------------------------------------------------------------------------------
# One pair, whole


class _PairComparer:
  """Compares one pair whole, as one process does: strings, small pairs from their batch, streamed arrays."""

  def __init__(self, src: Checkpoint, mig: Checkpoint, settings: Settings, meter: _Meter):
    self.src, self.mig, self.settings, self.meter = src, mig, settings, meter
    self.small: stream.SmallPairs | None = None
    self.down: str | None = None  # set once a side's store stopped answering: the reason of every later leaf

  def _check_stores(self) -> None:
    """After a leaf that could not be read: if a bucket side no longer answers at all (one read at the smallest
    retry bound, after the leaf's reads used up theirs), it is down for the rest of this run (:attr:`down`)."""
    for ck in (self.src, self.mig):
      if stores.is_remote(ck.path):
        err = stores.open_store(ck.path).ping()
        if err is not None:
          self.down = f"not tried: {err}; the store stopped answering during this run"
          return

  def batch_small(self, plans: list[LeafPlan]) -> None:
    """The small pairs among ``plans`` are read whole, in batches (:class:`.stream.SmallPairs`)."""
    pairs = [(self.src.leaves[p.source], self.mig.leaves[p.dest]) for p in plans]
    leaf_bytes = min(self.settings.buffers.nbytes, stream.SMALL_LEAF_BYTES)
    self.small = stream.SmallPairs(self.src, self.mig, pairs, leaf_bytes=leaf_bytes)

  def close(self) -> None:
    if self.small is not None:
      self.small.close()

  def compare(self, p: LeafPlan, res: LeafResult) -> None:
    """Fills ``res``: status, hashes, statistics (or the read error)."""
    meta = self.src.leaves[p.source]
    if self.down is not None:
      res.status, res.reason = UNREADABLE, self.down
      return
    try:
      if meta.kind == "string":
        self._strings(p, res)
      else:
        self._arrays(p, res)
    except LeafReadError as e:
      res.status, res.reason = UNREADABLE, str(e)
      res.sha256 = res.source_sha256 = None
      if self.down is None:
        self._check_stores()
    if self.settings.log is not None and not res.passed:
      self.settings.log(f"{res.status} {res.describe()}: {res.reason}")

  def _strings(self, p: LeafPlan, res: LeafResult) -> None:
    a = self.src.read_string(self.src.leaves[p.source])
    b = self.mig.read_string(self.mig.leaves[p.dest])
    res.source_sha256 = hashlib.sha256(a.encode()).hexdigest()
    res.sha256 = hashlib.sha256(b.encode()).hexdigest()
    res.read_mode = "_strings.json"
    if a == b:
      res.status = PASS
    else:
      res.status, res.reason = VALUE_MISMATCH, f"strings differ ({len(a)} vs {len(b)} characters)"

  def _arrays(self, p: LeafPlan, res: LeafResult) -> None:
    s_meta, m_meta = self.src.leaves[p.source], self.mig.leaves[p.dest]
    if self.small is not None:  # a small pair read whole in a batch; None: not batched, differs or unreadable
      out = self.small.take(s_meta, m_meta)
      if out is not None:
        res.read_mode = self.small.describe(p.source, p.dest)
        res.status, res.source_sha256, res.sha256 = PASS, out.source_sha256, out.sha256
        self.meter.read(2 * s_meta.nbytes)
        self.meter.compared(s_meta.nbytes)
        return
    r = geometry.refinement(s_meta.shape, m_meta.shape)
    if r is None:  # unreachable after the structure phase; keep the check honest
      raise UsageError(
          f"{p.source} -> {p.dest}: shapes {s_meta.shape} and {m_meta.shape} are not related by the transform"
      )
    st = self.settings
    plan = st.plan(s_meta, m_meta, r)
    res.read_mode = plan.describe()
    progressed = [0]

    def on_compared(n: int) -> None:
      progressed[0] += n
      self.meter.compared(n)

    out = stream.PairStreamer(
        self.src,
        self.mig,
        s_meta,
        m_meta,
        r,
        plan,
        st.buffers,
        spill_dir=st.spill_dir,
        on_bytes=self.meter.read,
        on_compared=on_compared,
    ).run(top_k=st.top_k)
    self.meter.compared(max(0, s_meta.nbytes - progressed[0]))  # a pair that stopped early: the rest is done too
    res.source_sha256, res.sha256 = out.source_sha256, out.sha256
    if out.equal:
      res.status = PASS
      return
    res.status = VALUE_MISMATCH
    if out.diff is not None:
      res.diff = out.diff
      res.reason = out.diff.summary()
    else:
      res.reason = (
          f"bytes differ (sha256 {res.source_sha256[:12]} vs {res.sha256[:12]}); no statistics: {out.diff_error}"
      )


# ---------------------------------------------------------------------------------------------
# The job's plan


@dataclasses.dataclass
class _JobPlan:
  metas: list[tuple[LeafMeta, LeafMeta]]  # per pair: (source, migrated)
  read_modes: list[str]  # per pair: how one process reads it ("" when not planned: one process)
  work: list[list[Work]]  # per process: its share


def _plan_job(job: Job, to_compare: list[Pair], src: Checkpoint, mig: Checkpoint, settings: Settings) -> _JobPlan:
  """The same plan on every process, checked to be the same: any difference stops the job with one line.

  One process gets every pair whole; nothing needs planning piece by piece.
  """
  metas = [(src.leaves[p.source], mig.leaves[p.dest]) for p, _ in to_compare]
  if not job.distributed:
    work = [[Work(i, 0, 0, None, 1, s.nbytes) for i, (s, _) in enumerate(metas)]]
    return _JobPlan(metas, [""] * len(metas), work)
  pair_bytes, piece_ends, read_modes = [], [], []
  for s, m in metas:
    if s.kind == "string":
      pair_bytes.append(0)
      piece_ends.append([0])
      read_modes.append("_strings.json")
      continue
    r = geometry.refinement(s.shape, m.shape)
    plan = settings.plan(s, m, r)
    pieces = stream.pieces_of(s, m, r, plan.slabs)
    read_modes.append(plan.describe())
    pair_bytes.append(s.nbytes)
    piece_ends.append([pc.flat_hi * s.dtype.itemsize for pc in pieces])
  work = assign(pair_bytes, piece_ends, job.num_processes)
  fingerprint = hashlib.sha256(
      json.dumps(
          [[p.source, p.dest, b, e[-1] if e else 0, len(e)] for (p, _), b, e in zip(to_compare, pair_bytes, piece_ends)]
      ).encode()
  ).hexdigest()
  bad = job.first_disagreeing("plan", fingerprint)
  verdict = (
      b""
      if bad is None
      else (
          f"process {bad} planned the comparison differently from process 0"
          " (different checkpoints, spec or flags on that host?)"
      ).encode()
  )
  verdict = job.broadcast("plan_ok", verdict)
  if verdict:
    raise UsageError(verdict.decode())
  return _JobPlan(metas, read_modes, work)


# ---------------------------------------------------------------------------------------------
# Split leaves: ranges and the sha256 relay


class _NoHash:
  """Stands in for a hasher when a range is compared before the state it continues has arrived."""

  def update(self, data) -> None:
    pass

  def hexdigest(self) -> str:
    return ""


class _Ranges:
  """This process's ranges of split leaves: compared at once; the sha256 state relayed between ranks.

  A range whose predecessor's state is there (or rank 0) is hashed inline; otherwise its hash is deferred
  and, once the state arrives, its bytes are read again (:meth:`finish_deferred`, by rank, so a state of
  rank k-1 never waits on rank k).
  """

  def __init__(self, job: Job, metas: list[tuple[LeafMeta, LeafMeta]], comparer: _PairComparer):
    self.job, self.metas, self.comparer = job, metas, comparer
    self.settings, self.meter = comparer.settings, comparer.meter
    self.hash_reread_bytes = 0
    self.deferred: list[tuple[Work, dict[str, Any]]] = []

  def compare(self, w: Work) -> dict[str, Any]:
    """One range: its record (equal, how it was hashed, the digest of the last rank)."""
    job = self.job
    rec = {"pair": w.pair, "rank": w.rank, "n": w.n, "equal": None, "hash": None, "digest": None}
    state_in = None
    if w.rank > 0:
      got = job.try_get(f"mid/{w.pair}/{w.rank - 1}")
      if got is not None and got == b"broken":
        rec["equal"], rec["hash"] = None, "skipped: an earlier range differs"
        _publish_state(job, w, None)
        return rec
      state_in = got
    made: list[Any] = []
    inline = w.rank == 0 or state_in is not None
    rec["hash"] = "inline" if inline else "deferred"

    def new_hash():
      h = Sha256State(state_in) if inline else _NoHash()
      made.append(h)
      return h

    s_meta, m_meta = self.metas[w.pair]
    r = geometry.refinement(s_meta.shape, m_meta.shape)
    st = self.settings
    plan = st.plan(s_meta, m_meta, r)
    src, mig = self.comparer.src, self.comparer.mig
    try:
      out = stream.PairStreamer(
          src,
          mig,
          s_meta,
          m_meta,
          r,
          plan,
          st.buffers,
          spill_dir=st.spill_dir,
          on_bytes=self.meter.read,
          on_compared=self.meter.compared,
          piece_range=(w.lo, w.hi),
          new_hash=new_hash,
      ).run(top_k=st.top_k, second_pass=False)
      rec["equal"] = bool(out.equal)
    except LeafReadError as e:
      rec["equal"], rec["error"] = False, str(e)
    if not rec["equal"]:
      _publish_state(job, w, None)
    elif not inline:
      self.deferred.append((w, rec))
    else:
      _finish_range(job, w, rec, made[0])
    return rec

  def finish_deferred(self) -> None:
    for w, rec in self.deferred:  # by rank: a state of rank k-1 never waits on rank k
      got = self.job.wait_for(f"mid/{w.pair}/{w.rank - 1}")
      if got == b"broken":
        rec["hash"] = "skipped: an earlier range differs"
        _publish_state(self.job, w, None)
        continue
      h = Sha256State(got)
      try:
        self.hash_reread_bytes += self._rehash(w, h)
        rec["hash"] = "re-read"
        _finish_range(self.job, w, rec, h)
      except LeafReadError as e:
        rec["equal"], rec["error"] = False, str(e)
        _publish_state(self.job, w, None)

  def _rehash(self, w: Work, h: Sha256State) -> int:
    """Reads one side of range ``w`` again (the one read in small boxes if any) into ``h``; returns the bytes."""
    s_meta, m_meta = self.metas[w.pair]
    st = self.settings
    r = geometry.refinement(s_meta.shape, m_meta.shape)
    plan = st.plan(s_meta, m_meta, r)
    pieces = stream.pieces_of(s_meta, m_meta, r, plan.slabs)[w.lo : w.hi]
    use_src = plan.src.mode == "raw" and plan.mig.mode != "raw"
    ckpt, meta, side = (self.comparer.src, s_meta, plan.src) if use_src else (self.comparer.mig, m_meta, plan.mig)
    n = 0
    buf = st.buffers.b
    with ckpt.reader(meta, side.cache_bytes) as reader:
      for pc in pieces:
        box = pc.src_box if use_src else pc.mig_box
        shape = geometry.box_shape(box) if box else ()
        count = int(np.prod(shape)) if shape else 1
        v = buf[: count * meta.dtype.itemsize].view(meta.dtype).reshape(shape)
        reader.wait(reader.read_into_async(box, v))
        h.update(v.reshape(-1).view(np.uint8))
        n += v.nbytes
        self.job.tick()
    return n


def _publish_state(job: Job, w: Work, h: Sha256State | None) -> None:
  if w.rank is not None and w.rank < w.n - 1:
    job.publish(f"mid/{w.pair}/{w.rank}", b"broken" if h is None else h.export())


def _finish_range(job: Job, w: Work, rec: dict[str, Any], h: Sha256State) -> None:
  if w.rank == w.n - 1:
    rec["digest"] = h.hexdigest()
  else:
    _publish_state(job, w, h)


# ---------------------------------------------------------------------------------------------
# Assembling the results


def _result_dict(res: LeafResult) -> dict[str, Any]:
  return {
      "status": res.status,
      "reason": res.reason,
      "sha256": res.sha256,
      "source_sha256": res.source_sha256,
      "diff": None if res.diff is None else res.diff.to_dict(),
      "read_mode": res.read_mode,
  }


def _apply(res: LeafResult, d: dict[str, Any]) -> None:
  res.status, res.reason = d["status"], d["reason"]
  res.sha256, res.source_sha256, res.read_mode = d["sha256"], d["source_sha256"], d["read_mode"]
  res.diff = None if d["diff"] is None else arraydiff.DiffStats.from_dict(d["diff"])


def _assemble(
    per_process: list[dict[str, Any]], to_compare: list[Pair], comparer: _PairComparer, plan: _JobPlan
) -> dict[str, Any]:
  """Process 0: one result per pair, in the report's order, from every process's records."""
  whole: dict[int, dict[str, Any]] = {}
  ranges: dict[int, list[dict[str, Any]]] = {}
  for pp in per_process:
    for rec in pp["records"]:
      if "whole" in rec:
        whole[rec["pair"]] = rec["whole"]
      else:
        ranges.setdefault(rec["pair"], []).append(rec)
  results, split_info, redone = [], [], []
  for i, (p, res) in enumerate(to_compare):
    if i in whole:
      results.append(whole[i])
      continue
    recs = sorted(ranges.get(i, []), key=lambda r: r["rank"])
    n = recs[0]["n"] if recs else 0
    ok = len(recs) == n and n > 0 and all(r["equal"] for r in recs) and recs[-1]["digest"]
    owners = [k for k, ws in enumerate(plan.work) for w in ws if w.pair == i]
    split_info.append({"path": p.dest, "processes": owners, "hash": [r["hash"] for r in recs]})
    if ok:
      res.status, res.reason = PASS, ""
      res.sha256 = res.source_sha256 = recs[-1]["digest"]
      res.read_mode = plan.read_modes[i]  # the plan every owner followed, as one process describes it
    else:  # compare it again here, whole, exactly as one process does
      comparer.compare(p, res)
      redone.append(p.dest)
    results.append(_result_dict(res))
  stats = sorted((pp["stats"] for pp in per_process), key=lambda s: s["process"])
  return {
      "results": results,
      "job": {
          "num_processes": len(per_process),
          "per_process": stats,
          "split_leaves": split_info,
          "redone_whole_by_process_0": redone,
      },
  }
