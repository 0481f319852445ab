"""The verifier's values phase as one job across processes (:mod:`parity_jax.runtime`).

**Split by bytes.** Every process plans every pair the same way (the same
pieces as a single process: :func:`.stream.plan_pair`, :func:`.stream.pieces_of`)
and lays the pairs end to end in the order of the report. Process ``k`` owns
the bytes ``[k B/P, (k+1) B/P)`` of that line (``B`` = bytes of one side).
A leaf that lies in one share is compared whole by its owner, exactly as in
one process (hashes, difference statistics and all). A leaf crossing a share
boundary is *split*: cut at the piece boundaries nearest the share
boundaries into contiguous C-order byte ranges, one per process, unless it is
smaller than half a share, in which case it goes whole to the process that
holds most of it. Each process reads only its own leaves and ranges, once per
side.

**sha256 of a split leaf.** sha256 is sequential, and the report must carry
the true ``sha256(leaf.tobytes())``. The ranges of a split leaf are hashed in
a relay: the owner of the first range hashes it while comparing and publishes
the hash's *intermediate state* (OpenSSL's ``SHA256_CTX``: 8 chaining words,
the length and the pending partial block; 112 bytes) through the runtime; the
owner of range ``k`` continues from the state of range ``k - 1``. Each
process compares its first ranges (and whole leaves) first and its later
ranges last, so the state it needs has usually arrived by the time it gets
there: then the range is hashed while it is compared, in one read. When the
state has not arrived yet, the range is compared without hashing, and once
the state arrives, one side of the range is read again (the uncompressed one
if any) to hash it; that re-read is counted apart (``hash_reread_bytes``).
Waiting on a state of rank ``k - 1`` never waits on rank ``k`` or later, so
the relay cannot deadlock. The last range's owner finalises the digest.

**When a split leaf is not bit-identical** (a range differs or cannot be
read), process 0 compares that leaf again, whole, exactly as one process does
(both hashes, difference statistics, the same first error): a failing leaf's
report is then identical by construction. That costs one more read of the
leaf, only on the way to a FAIL verdict.

**Results.** Each process sends the results of its leaves and ranges to
process 0 over the runtime; process 0 assembles the per-leaf results in the
report's order and sends the finished list back, so every process returns the
same report and exits with the same code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import resource
import time
from typing import Any, Callable

import numpy as np

from parity_jax import arraydiff
from parity_jax.checkpoint import geometry, stream
from parity_jax.checkpoint.layout import Checkpoint, LeafMeta
from parity_jax.checkpoint.reader import LeafReadError, LeafReader
from parity_jax.checkpoint.spec import LeafPlan
from parity_jax.runtime import Job, stall_point
from parity_jax.errors import UsageError

__all__ = ["Sha256State", "Work", "assign", "run_values"]


# ---------------------------------------------------------------------------------------------
# sha256 with an exportable intermediate state


class _Ctx(ctypes.Structure):
  # OpenSSL's SHA256_CTX (sha.h), unchanged since 0.9.8.
  _fields_ = [
      ("h", ctypes.c_uint32 * 8),
      ("Nl", ctypes.c_uint32),
      ("Nh", ctypes.c_uint32),
      ("data", ctypes.c_uint32 * 16),
      ("num", ctypes.c_uint),
      ("md_len", ctypes.c_uint),
  ]


_LIB: Any = None


def _libcrypto():
  global _LIB
  if _LIB is None:
    name = ctypes.util.find_library("crypto")
    lib = None
    for candidate in ([name] if name else []) + ["libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"]:
      try:
        lib = ctypes.CDLL(candidate)
        lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final  # noqa: B018 -- all three must exist
        break
      except (OSError, AttributeError):
        lib = None
    if lib is None:
      raise UsageError("splitting a leaf's sha256 across processes needs OpenSSL's libcrypto (not found)")
    lib.SHA256_Init.argtypes = [ctypes.POINTER(_Ctx)]
    lib.SHA256_Update.argtypes = [ctypes.POINTER(_Ctx), ctypes.c_void_p, ctypes.c_size_t]
    lib.SHA256_Final.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Ctx)]
    _LIB = lib
  return _LIB


class Sha256State:
  """sha256 whose intermediate state can be exported and resumed in another process (OpenSSL; GIL released).

  ``hashlib``-like: :meth:`update`, :meth:`hexdigest` (of a copy: the state
  stays usable); :meth:`export` / :meth:`resume` carry the state (112 bytes).
  """

  def __init__(self, state: bytes | None = None):
    self._lib = _libcrypto()
    if state is None:
      self._ctx = _Ctx()
      self._lib.SHA256_Init(ctypes.byref(self._ctx))
    else:
      if len(state) != ctypes.sizeof(_Ctx):
        raise ValueError(f"a sha256 state is {ctypes.sizeof(_Ctx)} bytes, got {len(state)}")
      self._ctx = _Ctx.from_buffer_copy(state)

  @classmethod
  def resume(cls, state: bytes) -> "Sha256State":
    return cls(state)

  def export(self) -> bytes:
    return bytes(self._ctx)

  def update(self, data) -> None:
    a = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if a.size:
      self._lib.SHA256_Update(ctypes.byref(self._ctx), ctypes.c_void_p(a.ctypes.data), ctypes.c_size_t(a.size))

  def hexdigest(self) -> str:
    c = _Ctx.from_buffer_copy(bytes(self._ctx))
    out = ctypes.create_string_buffer(32)
    self._lib.SHA256_Final(out, ctypes.byref(c))
    return out.raw.hex()


class _NoHash:
  """Stands in for a hasher when a range is compared before the state it continues has arrived."""

  def update(self, data) -> None:
    pass

  def hexdigest(self) -> str:
    return ""


# ---------------------------------------------------------------------------------------------
# Splitting the work


@dataclasses.dataclass(frozen=True)
class Work:
  """One process's unit: pair ``pair`` whole (``rank`` None) or its pieces [lo, hi) as range ``rank`` of ``n``."""

  pair: int
  lo: int
  hi: int
  rank: int | None = None
  n: int = 1
  nbytes: int = 0

  @property
  def split(self) -> bool:
    return self.rank is not None


def assign(pair_bytes: list[int], piece_ends: list[list[int]], num_processes: int) -> list[list[Work]]:
  """The work of each process: ``pair_bytes[i]`` bytes per pair, ``piece_ends[i]`` the byte offset where each piece ends.

  See the module docstring. Deterministic: every process computes the same lists.
  """
  P = int(num_processes)
  total = sum(pair_bytes)
  out: list[list[Work]] = [[] for _ in range(P)]
  if P == 1 or total == 0:
    for i, b in enumerate(pair_bytes):
      out[0].append(Work(i, 0, len(piece_ends[i]), None, 1, b))
    return out
  share = total / P
  owner_at = lambda x: min(P - 1, int(x // share))  # noqa: E731
  start = 0
  for i, b in enumerate(pair_bytes):
    end = start + b
    ends = piece_ends[i]
    first, last = owner_at(start), owner_at(max(start, end - 1))
    if first == last or b < share / 2 or len(ends) < 2:
      if first == last:
        who = first
      else:  # the process holding most of the leaf
        overlap = [(min(end, (k + 1) * share) - max(start, k * share), -k) for k in range(first, last + 1)]
        who = -max(overlap)[1]
      out[who].append(Work(i, 0, len(ends), None, 1, b))
    else:
      # cut at the piece boundary nearest each share boundary inside the leaf
      cuts = [0]
      for k in range(first + 1, last + 1):
        t = k * share - start
        j = min(range(1, len(ends)), key=lambda j: (abs(ends[j - 1] - t), j))  # cut after piece j-1
        cuts.append(max(j, cuts[-1]))
      cuts.append(len(ends))
      ranges = [(k, cuts[m], cuts[m + 1]) for m, k in enumerate(range(first, last + 1)) if cuts[m + 1] > cuts[m]]
      for rank, (k, lo, hi) in enumerate(ranges):
        lo_b = ends[lo - 1] if lo else 0
        out[k].append(Work(i, lo, hi, rank, len(ranges), ends[hi - 1] - lo_b))
    start = end
  for k in range(P):  # first ranges and whole leaves first, later ranges last (by rank): the relay order
    out[k].sort(key=lambda w: (w.rank or 0, w.pair))
  return out


# ---------------------------------------------------------------------------------------------
# The values phase


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _result_dict(res) -> dict[str, Any]:
  return {
      "status": res.status,
      "reason": res.reason,
      "sha256": res.sha256,
      "source_sha256": res.source_sha256,
      "diff": None if res.diff is None else res.diff.to_dict(),
      "read_mode": res.read_mode,
  }


def _apply(res, d: dict[str, Any]) -> None:
  res.status, res.reason = d["status"], d["reason"]
  res.sha256, res.source_sha256, res.read_mode = d["sha256"], d["source_sha256"], d["read_mode"]
  res.diff = None if d["diff"] is None else arraydiff.DiffStats.from_dict(d["diff"])


def run_values(
    job: Job,
    to_compare: list[tuple[LeafPlan, Any]],
    src_ckpt: Checkpoint,
    mig_ckpt: Checkpoint,
    *,
    compare_whole: Callable[[LeafPlan, Any, Callable[[int], None]], None],
    top_k: int,
    buffers: stream.Buffers,
    readahead: int,
    spill_dir: str,
    on_bytes: Callable[[int], None],
    prepare_whole: Callable[[list[int]], None] | None = None,
) -> dict[str, Any]:
  """Fills every result of ``to_compare`` on every process; returns the job's figures (bytes per process, ...).

  ``compare_whole(plan, result, on_bytes)`` compares one pair whole in this
  process, as the single-process verifier does.
  """
  t0 = time.perf_counter()
  plan = _plan_job(job, to_compare, src_ckpt, mig_ckpt, buffers, readahead)
  mine = plan.work[job.process_id]
  stall_point("verify.share", job.process_id)
  ranges = _Ranges(
      job,
      plan.metas,
      src_ckpt,
      mig_ckpt,
      buffers=buffers,
      readahead=readahead,
      spill_dir=spill_dir,
      top_k=top_k,
      on_bytes=on_bytes,
  )
  records: list[dict[str, Any]] = []
  if prepare_whole is not None:  # e.g. batch the small ones (the verifier's SmallPairs)
    prepare_whole([w.pair for w in mine if not w.split])
  for w in mine:
    p, res = to_compare[w.pair]
    if not w.split:
      compare_whole(p, res, ranges.count)
      records.append({"pair": w.pair, "whole": _result_dict(res)})
    else:
      records.append(ranges.compare(w))
  ranges.finish_deferred()

  mine_stats = {
      "process": job.process_id,
      "bytes_read": ranges.bytes_read,
      "hash_reread_bytes": ranges.hash_reread_bytes,
      "whole_leaves": [to_compare[w.pair][0].dest for w in mine if not w.split],
      "ranges": [f"{to_compare[w.pair][0].dest}#{w.rank}" for w in mine if w.split],
      "share_bytes": sum(w.nbytes for w in mine),
      "values_s": round(time.perf_counter() - t0, 3),
      "peak_rss_bytes": _peak_rss(),
  }
  payloads = job.gather("results", json.dumps({"records": records, "stats": mine_stats}).encode())

  final = b""
  if job.is_coordinator:
    per_process = [json.loads(x) for x in payloads]
    final = json.dumps(
        _assemble(per_process, to_compare, compare_whole, ranges.count, plan.work, plan.read_modes)
    ).encode()
  assembled = json.loads(job.broadcast("final", final))
  for (p, res), d in zip(to_compare, assembled["results"]):
    _apply(res, d)
  job.barrier("done")
  return assembled["job"]


@dataclasses.dataclass
class _JobPlan:
  metas: list[tuple[LeafMeta, LeafMeta]]  # per pair: (source, migrated)
  read_modes: list[str]  # per pair: how one process reads it
  work: list[list[Work]]  # per process: its share


def _plan_job(
    job: Job, to_compare, src_ckpt: Checkpoint, mig_ckpt: Checkpoint, buffers: stream.Buffers, readahead: int
) -> _JobPlan:
  """The same plan on every process, checked to be the same: any difference stops the job with one line."""
  metas, pair_bytes, piece_ends, read_modes = [], [], [], []
  for p, _ in to_compare:
    s, m = src_ckpt.leaves[p.source], mig_ckpt.leaves[p.dest]
    metas.append((s, m))
    if s.kind == "string":
      pair_bytes.append(0)
      piece_ends.append([0])
      read_modes.append("_strings.json")
      continue
    r = geometry.refinement(s.shape, m.shape)
    plan = stream.plan_pair(s, m, r, buffers.nbytes, readahead=int(readahead))
    pieces = stream.pieces_of(s, m, r, plan.slabs)
    read_modes.append(plan.describe())
    item = s.dtype.itemsize
    pair_bytes.append(s.nbytes)
    piece_ends.append([pc.flat_hi * item for pc in pieces])
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
          f" (different checkpoints, spec or flags on that host?)"
      ).encode()
  )
  verdict = job.broadcast("plan_ok", verdict)
  if verdict:
    raise UsageError(verdict.decode())
  return _JobPlan(metas, read_modes, work)


class _Ranges:
  """This process's ranges of split leaves: compared at once; the sha256 state relayed between ranks.

  A range whose predecessor's state is there (or rank 0) is hashed inline; otherwise its hash is deferred
  and, once the state arrives, its bytes are read again (:meth:`finish_deferred`, by rank, so a state of
  rank k-1 never waits on rank k).
  """

  def __init__(
      self,
      job: Job,
      metas,
      src_ckpt: Checkpoint,
      mig_ckpt: Checkpoint,
      *,
      buffers: stream.Buffers,
      readahead: int,
      spill_dir: str,
      top_k: int,
      on_bytes: Callable[[int], None],
  ):
    self.job, self.metas, self.src_ckpt, self.mig_ckpt = job, metas, src_ckpt, mig_ckpt
    self.buffers, self.readahead, self.spill_dir, self.top_k = buffers, readahead, spill_dir, top_k
    self.on_bytes = on_bytes
    self.bytes_read = self.hash_reread_bytes = 0
    self.deferred: list[tuple[Work, dict[str, Any]]] = []

  def count(self, n: int) -> None:
    self.bytes_read += n
    self.on_bytes(n)
    self.job.tick()

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
    plan = stream.plan_pair(s_meta, m_meta, r, self.buffers.nbytes, readahead=int(self.readahead))
    try:
      out = stream.PairStreamer(
          self.src_ckpt,
          self.mig_ckpt,
          s_meta,
          m_meta,
          r,
          plan,
          self.buffers,
          spill_dir=self.spill_dir,
          on_bytes=self.count,
          piece_range=(w.lo, w.hi),
          new_hash=new_hash,
      ).run(top_k=self.top_k, second_pass=False)
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
        self.hash_reread_bytes += _rehash(
            self.src_ckpt, self.mig_ckpt, self.metas[w.pair], w, self.buffers, self.readahead, h, self.job
        )
        rec["hash"] = "re-read"
        _finish_range(self.job, w, rec, h)
      except LeafReadError as e:
        rec["equal"], rec["error"] = False, str(e)
        _publish_state(self.job, w, None)


def _publish_state(job: Job, w: Work, h: Sha256State | None) -> None:
  if w.rank is not None and w.rank < w.n - 1:
    job.publish(f"mid/{w.pair}/{w.rank}", b"broken" if h is None else h.export())


def _finish_range(job: Job, w: Work, rec: dict[str, Any], h: Sha256State) -> None:
  if w.rank == w.n - 1:
    rec["digest"] = h.hexdigest()
  else:
    _publish_state(job, w, h)


def _rehash(
    src_ckpt, mig_ckpt, metas, w: Work, buffers: stream.Buffers, readahead: int, h: Sha256State, job: Job
) -> int:
  """Reads one side of range ``w`` again (the uncompressed one if any) and hashes it into ``h``; returns the bytes."""
  s_meta, m_meta = metas
  r = geometry.refinement(s_meta.shape, m_meta.shape)
  plan = stream.plan_pair(s_meta, m_meta, r, buffers.nbytes, readahead=int(readahead))
  pieces = stream.pieces_of(s_meta, m_meta, r, plan.slabs)[w.lo : w.hi]
  use_src = plan.src.mode == "raw" and plan.mig.mode != "raw"
  ckpt, meta, side = (src_ckpt, s_meta, plan.src) if use_src else (mig_ckpt, m_meta, plan.mig)
  n = 0
  buf = buffers.b
  with LeafReader(ckpt, meta, side.cache_bytes) as reader:
    for pc in pieces:
      box = pc.src_box if use_src else pc.mig_box
      shape = geometry.box_shape(box) if box else ()
      count = int(np.prod(shape)) if shape else 1
      v = buf[: count * meta.dtype.itemsize].view(meta.dtype).reshape(shape)
      reader.wait(reader.read_into_async(box, v))
      h.update(v.reshape(-1).view(np.uint8))
      n += v.nbytes
      job.tick()
  return n


def _assemble(
    per_process: list[dict[str, Any]], to_compare, compare_whole, count, work, read_modes: list[str]
) -> dict[str, Any]:
  """Process 0: one result per pair, in the report's order, from every process's records."""
  from parity_jax.checkpoint.verify import PASS

  whole: dict[int, dict[str, Any]] = {}
  ranges: dict[int, list[dict[str, Any]]] = {}
  for pp in per_process:
    for rec in pp["records"]:
      if "whole" in rec:
        whole[rec["pair"]] = rec["whole"]
      else:
        ranges.setdefault(rec["pair"], []).append(rec)
  results = []
  split_info = []
  redone = []
  for i, (p, res) in enumerate(to_compare):
    if i in whole:
      results.append(whole[i])
      continue
    recs = sorted(ranges.get(i, []), key=lambda r: r["rank"])
    n = recs[0]["n"] if recs else 0
    ok = len(recs) == n and n > 0 and all(r["equal"] for r in recs) and recs[-1]["digest"]
    owners = [k for k, ws in enumerate(work) for w in ws if w.pair == i]
    split_info.append({"path": p.dest, "processes": owners, "hash": [r["hash"] for r in recs]})
    if ok:
      res.status, res.reason = PASS, ""
      res.sha256 = res.source_sha256 = recs[-1]["digest"]
      res.read_mode = read_modes[i]  # the plan every owner followed, as one process describes it
      results.append(_result_dict(res))
    else:  # compare it again here, whole, exactly as one process does
      compare_whole(p, res, count)
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
