"""Streaming one leaf pair in bounded memory: the plan (a memory model) and the read/hash pipeline.

The verifier compares a source leaf and its migrated counterpart in *pieces*:
C-order slabs of the common refinement of the two shapes (:mod:`.geometry`),
each a box in both leaves, so a squeeze or reshape costs nothing. How a side
is read depends on how it is stored:

* ``raw`` -- uncompressed chunks read memory-mapped (:func:`.tstore.memmap_reads`):
  any box costs just its own bytes, so pieces can be small and need no cache.
* ``direct`` -- compressed chunks whose rows (:func:`.geometry.chunk_row_elems`)
  line up with the piece boundaries: every piece is made of whole chunk rows,
  so each chunk is decoded exactly once, without a cache.
* ``rows`` -- compressed chunk rows bigger than a piece (a single-chunk leaf
  is one row): a private tensorstore cache holds the current row while pieces
  are cut from it. Before the next row is decoded the reader is reopened,
  which drops the old row, so at most one row plus the next row's decode
  transient (its compressed bytes and the decoded chunk) is alive. With
  ``readahead`` = N, readers of their own decode the next N rows while the
  current one is compared: faster with free cores, about N more rows and
  their transients in memory.
* ``spill`` (pair level) -- both sides are ``rows`` and holding a row of each
  costs more than streaming the source once into a temporary file (outside
  both checkpoints) and comparing the migrated leaf against it.

**Many small leaves** (:class:`SmallPairs`): a pair whose leaves fit in one
piece is read whole, in batches of pairs read concurrently through the
handles each checkpoint opened once in its shared tensorstore context, one
batch ahead of the comparison; thousands of them cost little more than their
bytes. A differing or unreadable small pair is streamed the ordinary way.

Pieces are read straight into buffers allocated once per verification
(:class:`Buffers`): tensorstore writes into them, no array is allocated per
read. On this 2-core VM the page faults of fresh per-read arrays cost about as
much as zstd decoding, so this matters as much as anything else here.

**sha256.** When a pair is bit-identical both leaves are the same byte string,
so one hash serves both. By default (``pipelined``) each source piece, once
compared, is handed to a hashing thread while the next pieces are read and
compared (tensorstore, hashlib and numpy's comparison release the GIL); a
small pool of piece buffers bounds how far the two may drift apart. When the
other side must decode (nearly) its whole leaf before the first piece can be
compared, a ``raw`` side is instead hashed by a thread that reads it on its
own, during that decode (a migrated leaf of at most :data:`KEPT_PIECES`
pieces stays in the buffers that thread filled, and is compared from there
instead of being read again). Single-piece leaves are hashed inline. The
comparison stops at the first differing piece; a second pass then computes
both hashes and the difference statistics. Either way the reported hashes
equal ``sha256(leaf.tobytes())`` of each side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import tempfile
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from parity_jax import arraydiff
from parity_jax.checkpoint import geometry
from parity_jax.checkpoint.layout import Checkpoint, LeafMeta
from parity_jax.checkpoint.reader import LeafReader
from parity_jax.checkpoint.tstore import memmap_reads
from parity_jax.dtypes import c_contiguous
from parity_jax.errors import UsageError
from parity_jax.progress import human_bytes

__all__ = ["Buffers", "PairPlan", "PairStreamer", "SidePlan", "SmallPairs", "plan_pair"]

_MIB = 1 << 20
_COMPARE_PIECE = 8 * _MIB
SPILL_PREFIX = "parity_jax_verify_spill_"
# Source pieces in flight between the comparison and the hashing thread.
PIPELINE_DEPTH = 3
# A background-hashed migrated leaf of at most this many pieces is kept in buffers for the comparison (see run()).
KEPT_PIECES = 2
# Below this modelled peak a pair is always streamed: the disk round trip of a spill costs more than it saves.
SPILL_ABOVE_BYTES = 256 * _MIB


# ---------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass(frozen=True)
class SidePlan:
  """How one side of a pair is read (see the module docstring for the modes)."""

  mode: str  # "raw" | "direct" | "rows"
  row_elems: int = 0  # elements per storage chunk row ("rows" and "direct")
  rows_cached: int = 0  # rows the private cache holds ("rows")
  reopen: bool = False  # drop the cache before decoding the next row ("rows" with rows > a piece)
  readahead: int = 0  # rows decoded ahead by readers of their own ("rows" with reopen)
  itemsize: int = 1

  @property
  def cache_bytes(self) -> int:
    if self.mode != "rows":
      return 0
    c = self.rows_cached * self.row_elems * self.itemsize
    return int(c * 1.05) + 4 * _MIB  # tensorstore's per-entry bookkeeping

  def describe(self) -> str:
    if self.mode == "raw":
      return "raw (memory-mapped boxes)"
    if self.mode == "direct":
      return f"whole chunk rows of {human_bytes(self.row_elems * self.itemsize)} per piece"
    return (
        f"chunk rows of {human_bytes(self.row_elems * self.itemsize)} cached ({self.rows_cached} at a time"
        f"{f', {self.readahead} row(s) read ahead' if self.readahead else ''})"
    )


@dataclasses.dataclass(frozen=True)
class PairPlan:
  slabs: geometry.SlabPlan
  src: SidePlan
  mig: SidePlan
  hash_mode: str  # "inline" | "pipelined" (source pieces after comparing) | "source"/"migrated" (own reads)
  spill: bool
  itemsize: int
  estimate_bytes: int  # modelled peak above the process baseline

  def describe(self) -> str:
    mode = "spill" if self.spill else "stream"
    how = {"inline": "inline", "pipelined": "of compared source pieces in a pipelined thread"}.get(
        self.hash_mode, f"of the {self.hash_mode} leaf read by a background thread"
    )
    if self.hash_mode == "migrated" and self.slabs.n_slabs <= KEPT_PIECES:
      how += ", which keeps its pieces for the comparison"
    return (
        f"{mode}: {self.slabs.n_slabs} slab(s) of <= {human_bytes(self.slabs.slab_elems * self.itemsize)};"
        f" source {self.src.describe()}; migrated {self.mig.describe()}; sha256 {how}"
    )


def _slab_candidates(r: tuple[int, ...], budget: int, rows: Sequence[int]) -> list[geometry.SlabPlan]:
  """Slab plans of at most ``budget`` elements: the plain one, and ones cut to line up with ``rows``."""
  targets = {budget}
  for e in rows:
    if e <= 0:
      continue
    if e <= budget:
      targets.add((budget // e) * e)
    else:
      k0 = math.ceil(e / budget)
      targets.update(e // k for k in range(k0, k0 + 16) if e // k > 0)
  out = []
  for t in sorted(targets, reverse=True):
    s = geometry.SlabPlan.for_target(r, t)
    if s not in out:
      out.append(s)
  return out


def plan_pair(
    src: LeafMeta,
    mig: LeafMeta,
    r: tuple[int, ...],
    piece_bytes: int,
    *,
    readahead: int = 0,
    memmap: bool | None = None,
) -> PairPlan:
  """Chooses pieces, per-side read modes, the hashed side and spilling for one pair.

  Memory model, in elements, for pieces of L elements (the estimate is what
  the verifier's peak above baseline should be, give or take ~10 MiB of
  tensorstore contexts and thread stacks):

  * buffers (allocated once at ``piece_bytes``, so counted at that size):
    one for the migrated piece and PIPELINE_DEPTH for source pieces
    (compared, then hashed by the pipelined thread; one when inline); a
    background hash of one side instead needs one buffer of its own plus the
    L pages its reads map;
  * a ``raw`` read maps the pages it copies: L per concurrent read;
  * a ``direct`` read holds compressed + decoded chunks of one piece: 2 L;
  * a ``rows`` side holds rows_cached rows, minus the one dropped before the
    next is decoded (compressed + decoded: 2 rows); with ``readahead`` = N it
    holds the current row plus up to N decodes (and their warm-up pieces);
  * spilling holds one side at a time (the spill file is read with pread,
    which maps nothing).

  Pieces are cut to line up with the chunk rows of compressed sides where
  that keeps them at least a quarter of ``piece_bytes``. Spilling (disk
  traffic) is considered only when streaming would exceed
  :data:`SPILL_ABOVE_BYTES`, and must save at least 10%.
  """
  if memmap is None:
    memmap = memmap_reads()
  item = src.dtype.itemsize
  n = int(np.prod(r)) if r else 1
  budget = max(1, int(piece_bytes) // item)

  def kind(meta: LeafMeta) -> tuple[str, int]:
    e = geometry.chunk_row_elems(meta.shape, meta.chunk_shape)
    return ("raw" if (meta.raw_chunks and memmap) else "decode"), e

  (ks, es), (km, em) = kind(src), kind(mig)
  decode_rows = [e for k, e in ((ks, es), (km, em)) if k == "decode"]

  def aligned(s: geometry.SlabPlan) -> bool:
    return all(s.boundaries_include_multiples_of(e) for e in decode_rows)

  candidates = _slab_candidates(r, budget, decode_rows)
  floor = max(1, min(budget, n) // 4)
  slabs = next((s for s in candidates if aligned(s) and min(s.slab_elems, n) >= floor), None)
  if slabs is None:
    slabs = geometry.SlabPlan.for_target(r, budget)
  l = min(slabs.slab_elems, n)

  def side(k: str, e: int) -> tuple[SidePlan, int]:  # (plan, modelled transient/cached elements)
    if k == "raw":
      return SidePlan("raw", itemsize=item), l
    if e <= l and slabs.boundaries_are_multiples_of(e):
      return SidePlan("direct", row_elems=e, itemsize=item), 2 * l
    e = min(e, n)
    straddle = not slabs.boundaries_include_multiples_of(e)
    rows_cached = max(1, math.ceil(l / e)) + int(straddle)
    reopen = e > l
    ahead = int(readahead) if (readahead and reopen and e < n) else 0
    # held rows + one decode transient (compressed + decoded row); read ahead: up to N decodes and their
    # warm-up pieces at once
    cost = rows_cached * e + ahead * (2 * e + l) if ahead else (rows_cached + 1) * e
    return SidePlan("rows", e, rows_cached, reopen, ahead, item), cost

  (sp, cs), (mp, cm) = side(ks, es), side(km, em)
  hash_mode = "inline" if slabs.n_slabs <= 1 else "pipelined"  # one piece: a thread costs more than it saves
  for one, other, name in ((mp, sp, "migrated"), (sp, mp, "source")):
    if hash_mode == "pipelined" and one.mode == "raw" and other.mode == "rows" and 2 * other.row_elems >= n:
      # The other side decodes (nearly) the whole leaf before its first piece: hash this side meanwhile.
      hash_mode = name
      break
  # The buffers are allocated once at the full piece size and stay resident after the first big leaf.
  bufs = {"inline": 2, "pipelined": PIPELINE_DEPTH + 1}.get(hash_mode, 3) * budget
  if hash_mode in ("source", "migrated"):
    bufs += l  # the background reads map the pages they copy
  stream_est = bufs + cs + cm
  spill = False
  if sp.mode == "rows" and mp.mode == "rows" and stream_est * item > SPILL_ABOVE_BYTES:
    spill_est = bufs + max(cs, cm)
    if spill_est / 0.9 < stream_est:
      spill, stream_est = True, spill_est
  return PairPlan(slabs, sp, mp, hash_mode, spill, item, int(stream_est * item))


# ---------------------------------------------------------------------------------------------
# Buffers and pieces


class Buffers:
  """Reusable byte buffers of ``nbytes`` each, allocated on first use and kept for the whole run.

  ``pool[i]`` (PIPELINE_DEPTH of them) hold source pieces on their way from
  the comparison to the hashing thread; ``b`` holds the migrated piece; ``h``
  is the background hash thread's.
  """

  def __init__(self, nbytes: int):
    self.nbytes = int(nbytes)
    self._pool: list[np.ndarray | None] = [None] * PIPELINE_DEPTH
    self._b: np.ndarray | None = None
    self._h: np.ndarray | None = None

  def pool(self, i: int) -> np.ndarray:
    if self._pool[i] is None:
      self._pool[i] = np.empty(self.nbytes, np.uint8)
    return self._pool[i]

  @property
  def b(self) -> np.ndarray:
    if self._b is None:
      self._b = np.empty(self.nbytes, np.uint8)
    return self._b

  @property
  def h(self) -> np.ndarray:
    """The background hash thread's own piece buffer."""
    if self._h is None:
      self._h = np.empty(self.nbytes, np.uint8)
    return self._h


def _view(buf: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  count = int(np.prod(shape)) if shape else 1
  return buf[: count * dtype.itemsize].view(dtype).reshape(shape)


def _bytes(a: np.ndarray) -> memoryview:
  """The raw bytes of a C-contiguous piece (a view into a buffer), for hashing and spilling."""
  return memoryview(a.reshape(-1).view(np.uint8))


def bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
  """Raw-byte equality of two same-size pieces (shapes may differ by the transform), 8 MiB at a time."""
  if a.dtype != b.dtype or a.size != b.size:
    return False
  fa = c_contiguous(a).reshape(-1).view(np.uint8)
  fb = c_contiguous(b).reshape(-1).view(np.uint8)
  for i in range(0, fa.size, _COMPARE_PIECE):
    pa, pb = fa[i : i + _COMPARE_PIECE], fb[i : i + _COMPARE_PIECE]
    if pa.size % 8 == 0:
      pa, pb = pa.view(np.uint64), pb.view(np.uint64)
    if not np.array_equal(pa, pb):
      return False
  return True


@dataclasses.dataclass(frozen=True)
class Piece:
  flat_lo: int  # C-order element range [flat_lo, flat_hi) of the leaf
  flat_hi: int
  src_box: tuple[slice, ...]
  mig_box: tuple[slice, ...]

  def shape(self, box: tuple[slice, ...]) -> tuple[int, ...]:
    return geometry.box_shape(box)


def pieces_of(src: LeafMeta, mig: LeafMeta, r: tuple[int, ...], slabs: geometry.SlabPlan) -> list[Piece]:
  g_src, g_mig = geometry.axis_groups(src.shape, r), geometry.axis_groups(mig.shape, r)
  out = []
  for lo, hi in slabs:
    bs = geometry.box_in(src.shape, g_src, r, lo, hi)
    bm = geometry.box_in(mig.shape, g_mig, r, lo, hi)
    flo = geometry.flat_offset(lo, r) if r else 0
    count = int(np.prod(geometry.box_shape(bm))) if bm else 1
    out.append(Piece(flo, flo + count, bs, bm))
  return out


# ---------------------------------------------------------------------------------------------
# Readers


def _settle(fut) -> None:
  """Waits for a warm-up read; its errors are reported by the real read of the same piece."""
  if fut is not None:
    try:
      fut.result()
    except Exception:  # noqa: BLE001 -- see above
      pass


class _SideReader:
  """Reads pieces of one side into caller buffers following a :class:`SidePlan`.

  In ``rows`` mode with ``reopen``, a *switch* is a piece that starts beyond
  every row read so far: there the reader is reopened (dropping the rows
  already compared) before the new row is decoded. With ``readahead`` = N,
  the next N switch rows are being decoded by readers of their own (each
  warmed up by reading its first piece), and at most N decodes run at once.
  """

  def __init__(
      self, ckpt: Checkpoint, meta: LeafMeta, plan: SidePlan, pieces: list[Piece], box_of: Callable[[Piece], tuple]
  ):
    self.ckpt, self.meta, self.plan, self.pieces, self.box_of = ckpt, meta, plan, pieces, box_of
    self._reader: LeafReader | None = None
    self._last_row = -1
    self._prefetched: Any = None  # the warm-up read of the current reader, if it came from read-ahead
    self._ahead: list[list] = []  # [switch piece index, reader, warm-up future or None], in order
    self._switches: list[int] = []
    if plan.mode == "rows" and plan.readahead:
      top = -1
      for j, p in enumerate(pieces):
        first, last = self._rows(p)
        if first > top:
          self._switches.append(j)
        top = max(top, last)
    self._switch_pos = {j: k for k, j in enumerate(self._switches)}

  def _open(self) -> LeafReader:
    return LeafReader(self.ckpt, self.meta, self.plan.cache_bytes).open()

  def _rows(self, p: Piece) -> tuple[int, int]:
    e = max(1, self.plan.row_elems)
    return p.flat_lo // e, max(p.flat_lo, p.flat_hi - 1) // e

  def start(self, i: int, out: np.ndarray):
    """Starts reading piece ``i`` into ``out``; returns what :meth:`wait` takes."""
    p = self.pieces[i]
    if self.plan.mode == "rows":
      first, last = self._rows(p)
      if self._reader is None or (self.plan.reopen and first > self._last_row):
        self._release_current()  # drop the rows already compared before the next one is decoded
        if self._ahead and self._ahead[0][0] == i:
          _, self._reader, self._prefetched = self._ahead.pop(0)
        else:
          self._drop_ahead()
          self._reader = self._open()
        self._last_row = last
        if self.plan.readahead and i in self._switch_pos:
          self._fill_ahead(self._switch_pos[i])
      self._last_row = max(self._last_row, last)
    elif self._reader is None:
      self._reader = self._open()
    return self._reader, self._reader.read_into_async(self.box_of(p), out)

  def _fill_ahead(self, k: int) -> None:
    """Keeps the rows of the next ``readahead`` switches decoding, at most ``readahead`` decodes at once."""
    n = self.plan.readahead
    for j in self._switches[k + 1 : k + 1 + n]:
      if any(a[0] == j for a in self._ahead):
        continue
      while sum(f is not None for f in [self._prefetched] + [a[2] for a in self._ahead]) >= n:
        if self._prefetched is not None:  # oldest first: the current row, then the queue
          _settle(self._prefetched)
          self._prefetched = None
        else:
          a = next(a for a in self._ahead if a[2] is not None)
          _settle(a[2])
          a[2] = None
      reader = self._open()
      self._ahead.append([j, reader, reader.read_async(self.box_of(self.pieces[j]))])

  def _drop_ahead(self) -> None:
    while self._ahead:
      _, reader, fut = self._ahead.pop(0)
      _settle(fut)  # never close a reader under a running read
      reader.close()

  @staticmethod
  def wait(token) -> None:
    reader, fut = token
    reader.wait(fut)

  def _release_current(self) -> None:
    _settle(self._prefetched)  # never close a reader under a running read
    self._prefetched = None
    if self._reader is not None:
      self._reader.close()
      self._reader = None

  def close(self) -> None:
    self._drop_ahead()
    self._release_current()


class _SpillReader:
  """Reads source pieces back from the spill file (pread: nothing is mapped)."""

  def __init__(self, f, itemsize: int):
    self.f, self.itemsize = f, itemsize

  def start(self, i: int, out: np.ndarray, piece: Piece):
    mv = _bytes(out)
    off = piece.flat_lo * self.itemsize
    got = 0
    try:
      while got < len(mv):
        k = os.preadv(self.f.fileno(), [mv[got:]], off + got)
        if k <= 0:
          raise OSError(f"it ended early at byte {off + got}")
        got += k
    except OSError as e:
      raise UsageError(f"cannot read back the verifier's spill file: {e}") from None
    return None


class HashPipeline:
  """sha256 of source pieces in order, in a thread of its own, overlapped with the next reads and comparisons.

  The comparison takes a free pool buffer (:meth:`acquire`), reads a source
  piece into it, and :meth:`submit`s it once compared; the thread hashes it
  and frees the buffer. hashlib releases the GIL on large buffers, as do
  tensorstore's reads and numpy's comparison, so the two run on two cores.
  """

  def __init__(self, buffers: Buffers, name: str, new_hash: Callable[[], Any] = hashlib.sha256):
    import queue

    self.buffers = buffers
    self.h = new_hash()
    self._free: "queue.Queue[int]" = queue.Queue()
    self._todo: "queue.Queue[tuple[int, int] | None]" = queue.Queue()
    for i in range(PIPELINE_DEPTH):
      self._free.put(i)
    self._thread = threading.Thread(target=self._run, name=f"parity_jax-sha256:{name}", daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while True:
      item = self._todo.get()
      if item is None:
        return
      i, n = item
      self.h.update(memoryview(self.buffers.pool(i)[:n]))
      self._free.put(i)

  def acquire(self) -> int:
    return self._free.get()

  def release(self, i: int) -> None:
    """Returns a buffer that was not submitted (its piece differed or failed to read)."""
    self._free.put(i)

  def submit(self, i: int, nbytes: int) -> None:
    self._todo.put((i, nbytes))

  def finish(self) -> str:
    self.stop()
    return self.h.hexdigest()

  def stop(self) -> None:
    if self._thread.is_alive():
      self._todo.put(None)
      self._thread.join()


class _BackgroundHash:
  """sha256 of one ``raw`` side's C-order bytes, read piece by piece by a thread of its own.

  Used when the other side must decode (nearly) its whole leaf before the
  first piece can be compared: the hash is done by the time the comparison
  starts. With ``keep`` (one buffer per piece), the pieces stay in those
  buffers and the comparison takes them from there (:meth:`piece`) instead of
  reading this side a second time; otherwise they pass through ``buf``.
  """

  def __init__(
      self,
      ckpt: Checkpoint,
      meta: LeafMeta,
      boxes: list[tuple],
      buf: np.ndarray,
      new_hash: Callable[[], Any] = hashlib.sha256,
      keep: Sequence[np.ndarray] | None = None,
  ):
    self.ckpt, self.meta, self.boxes, self.buf = ckpt, meta, boxes, buf
    self.keep = list(keep) if keep is not None and len(keep) >= len(boxes) else None
    self.h = new_hash()
    self.error: BaseException | None = None
    self._stop = threading.Event()
    self._ready = [threading.Event() for _ in boxes]
    self._thread = threading.Thread(target=self._run, name=f"parity_jax-sha256:{meta.path}", daemon=True)
    self._thread.start()

  def _run(self) -> None:
    try:
      with LeafReader(self.ckpt, self.meta, 0) as reader:
        for k, box in enumerate(self.boxes):
          if self._stop.is_set():
            return
          buf = self.keep[k] if self.keep is not None else self.buf
          v = _view(buf, geometry.box_shape(box) if box else (), self.meta.dtype)
          reader.wait(reader.read_into_async(box, v))
          self.h.update(_bytes(v))
          self._ready[k].set()
    except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread by finish() / piece()
      self.error = e
    finally:
      for r in self._ready:  # wake a waiting piece(): it finds the error (or the stop)
        r.set()

  def piece(self, k: int) -> np.ndarray:
    """Piece ``k`` as read into its kept buffer (waits for it); re-raises the thread's read error."""
    self._ready[k].wait()
    if self.error is not None:
      raise self.error
    box = self.boxes[k]
    return _view(self.keep[k], geometry.box_shape(box) if box else (), self.meta.dtype)

  def finish(self) -> str:
    self._thread.join()
    if self.error is not None:
      raise self.error
    return self.h.hexdigest()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


# ---------------------------------------------------------------------------------------------
# Many small pairs


SMALL_LEAF_BYTES = 1 << 20  # a pair whose leaves are both at most this big is read whole, in batches
SMALL_BATCH_BYTES = 512 << 10  # bytes of one batch (both sides; at least one pair); two batches are in flight at most


class SmallPairs:
  """Small leaf pairs read whole, a batch at a time and one batch ahead, then compared and hashed in order.

  Thousands of small leaves (per-layer parameters x optimizer moments) cost
  next to nothing to read each; what costs is everything per read. Here the
  leaves of a batch (up to :data:`SMALL_BATCH_BYTES` of both sides) are read
  concurrently through each checkpoint's already-open handles in its one
  shared context, while the previous batch is compared, so tensorstore
  decodes on every core. Memory: two batches, plus the decode transients of
  the leaves being read.

  :meth:`take` returns the :class:`PairOutcome` of a bit-identical pair (one
  sha256 serves both sides). A pair that differs or fails to read gives
  ``None``: the caller streams it the ordinary way, which computes both
  hashes, the difference statistics, or the read error.
  """

  def __init__(
      self,
      src_ckpt: Checkpoint,
      mig_ckpt: Checkpoint,
      pairs: Sequence[tuple[LeafMeta, LeafMeta]],
      *,
      leaf_bytes: int = SMALL_LEAF_BYTES,
      batch_bytes: int = SMALL_BATCH_BYTES,
  ):
    self.src_ckpt, self.mig_ckpt = src_ckpt, mig_ckpt
    self._batches: list[list[tuple[LeafMeta, LeafMeta]]] = []
    self._where: dict[tuple[str, str], tuple[int, int]] = {}
    batch: list[tuple[LeafMeta, LeafMeta]] = []
    acc = 0
    for s, m in pairs:
      if not (s.streamable and m.streamable and s.dtype == m.dtype and s.nbytes == m.nbytes and s.nbytes <= leaf_bytes):
        continue
      if batch and acc + 2 * s.nbytes > batch_bytes:
        self._batches.append(batch)
        batch, acc = [], 0
      self._where[(s.path, m.path)] = (len(self._batches), len(batch))
      batch.append((s, m))
      acc += 2 * s.nbytes
    if batch:
      self._batches.append(batch)
    self._reads: dict[int, list[tuple[Any, Any]]] = {}

  def __contains__(self, pair: tuple[str, str]) -> bool:
    return pair in self._where

  def __len__(self) -> int:
    return len(self._where)

  def describe(self, source: str, dest: str) -> str:
    b, _ = self._where[(source, dest)]
    return f"small: whole leaves read in a batch of {len(self._batches[b])} pairs; sha256 inline"

  def _issue(self, b: int) -> None:
    if b >= len(self._batches) or b in self._reads:
      return
    reads = []
    for s, m in self._batches[b]:
      futs = []
      for ck, meta in ((self.src_ckpt, s), (self.mig_ckpt, m)):
        try:
          futs.append(ck.handle(meta).read())
        except Exception as e:  # noqa: BLE001 -- reported by the ordinary path, which reads it again
          futs.append(e)
      reads.append((futs[0], futs[1]))
    self._reads[b] = reads

  def take(self, source: LeafMeta, dest: LeafMeta) -> PairOutcome | None:
    where = self._where.get((source.path, dest.path))
    if where is None:
      return None
    b, i = where
    for old in [k for k in self._reads if k < b]:  # batches behind us: drop them (and wait for any stray read)
      for fa, fb in self._reads.pop(old):
        for f in (fa, fb):
          _settle(None if isinstance(f, Exception) else f)
    self._issue(b)
    self._issue(b + 1)
    fa, fb = self._reads[b][i]
    self._reads[b][i] = (None, None)
    try:
      if isinstance(fa, Exception) or isinstance(fb, Exception) or fa is None or fb is None:
        return None
      a, c = np.asarray(fa.result()), np.asarray(fb.result())
    except Exception:  # noqa: BLE001 -- see the class docstring
      return None
    if not bytes_equal(a, c):
      return None
    digest = hashlib.sha256(_bytes(c_contiguous(a))).hexdigest()
    return PairOutcome(True, digest, digest)

  def close(self) -> None:
    for reads in self._reads.values():
      for fa, fb in reads:
        for f in (fa, fb):
          if f is not None and not isinstance(f, Exception):
            _settle(f)
    self._reads.clear()


# ---------------------------------------------------------------------------------------------
# Streaming a pair


@dataclasses.dataclass
class PairOutcome:
  equal: bool
  source_sha256: str
  sha256: str  # the migrated leaf's
  diff: arraydiff.DiffStats | None = None
  diff_error: str | None = None


class PairStreamer:
  """Streams one pair according to a :class:`PairPlan`; :meth:`run` gives the :class:`PairOutcome`.

  ``piece_range`` = (i, j) streams only pieces i..j-1 (a C-order byte range
  of the leaf, for a job that splits the leaf across processes): the hashes
  then cover that range only, continuing whatever state ``new_hash`` returns
  (the first-pass hashers are made by ``new_hash``; default ``hashlib.sha256``).
  """

  def __init__(
      self,
      src_ckpt: Checkpoint,
      mig_ckpt: Checkpoint,
      src: LeafMeta,
      mig: LeafMeta,
      r: tuple[int, ...],
      plan: PairPlan,
      buffers: Buffers,
      *,
      spill_dir: str,
      on_bytes: Callable[[int], None] = lambda n: None,
      piece_range: tuple[int, int] | None = None,
      new_hash: Callable[[], Any] = hashlib.sha256,
  ):
    self.src_ckpt, self.mig_ckpt, self.src, self.mig, self.r = src_ckpt, mig_ckpt, src, mig, r
    self.plan, self.buffers, self.spill_dir, self.on_bytes = plan, buffers, spill_dir, on_bytes
    self.dtype = mig.dtype
    self.pieces = pieces_of(src, mig, r, plan.slabs)
    if piece_range is not None:
      self.pieces = self.pieces[piece_range[0] : piece_range[1]]
    self.new_hash = new_hash
    # bytes reported through on_bytes (the second pass reports only what the first did not), counted from the
    # first streamed piece
    self._counted = 0
    self._skip = self.pieces[0].flat_lo * self.dtype.itemsize if self.pieces else 0

  # -- building blocks --

  def _through(self, p: Piece) -> int:
    """Bytes of one side from the first streamed piece through ``p``."""
    return p.flat_hi * self.dtype.itemsize - self._skip

  def _count(self, upto: int) -> None:
    if upto > self._counted:
      self.on_bytes(upto - self._counted)
      self._counted = upto

  def _pairs(
      self, spill_file=None, hasher: HashPipeline | None = None, kept: _BackgroundHash | None = None
  ) -> Iterator[tuple[int, np.ndarray, np.ndarray, Piece]]:
    """(pool index, source piece, migrated piece, piece) in C order; both reads of a piece run concurrently.

    With a ``hasher``, each source piece goes into a pool buffer taken from
    it; the caller must ``submit`` or ``release`` that buffer. With ``kept``
    (a background hash of the migrated side keeping its pieces), migrated
    pieces come from there instead of a second read.
    """
    if kept is not None:
      yield from self._pairs_kept(kept)
      return
    mig_reader = _SideReader(self.mig_ckpt, self.mig, self.plan.mig, self.pieces, lambda p: p.mig_box)
    src_reader = (
        None
        if spill_file is not None
        else _SideReader(self.src_ckpt, self.src, self.plan.src, self.pieces, lambda p: p.src_box)
    )
    spill = _SpillReader(spill_file, self.dtype.itemsize) if spill_file is not None else None
    try:
      for i, p in enumerate(self.pieces):
        slot = hasher.acquire() if hasher is not None else 0
        va = _view(self.buffers.pool(slot), p.shape(p.src_box), self.dtype)
        vb = _view(self.buffers.b, p.shape(p.mig_box), self.dtype)
        errors = []
        tokens = []
        try:
          tokens.append((mig_reader, mig_reader.start(i, vb)))
          if spill is not None:
            spill.start(i, va, p)
          else:
            tokens.append((src_reader, src_reader.start(i, va)))
        except Exception as e:  # noqa: BLE001 -- wait for the reads already started before raising
          errors.append(e)
        for reader, token in tokens:
          try:
            reader.wait(token)
          except Exception as e:  # noqa: BLE001 -- every started read is waited for before any error is raised
            errors.append(e)
        if errors:
          if hasher is not None:
            hasher.release(slot)
          raise errors[0]
        yield slot, va, vb, p
    finally:
      mig_reader.close()
      if src_reader is not None:
        src_reader.close()

  def _pairs_kept(self, kept: _BackgroundHash) -> Iterator[tuple[int, np.ndarray, np.ndarray, Piece]]:
    src_reader = _SideReader(self.src_ckpt, self.src, self.plan.src, self.pieces, lambda p: p.src_box)
    try:
      for i, p in enumerate(self.pieces):
        va = _view(self.buffers.pool(0), p.shape(p.src_box), self.dtype)
        src_reader.wait(src_reader.start(i, va))
        yield 0, va, kept.piece(i), p
    finally:
      src_reader.close()

  def _spill(self, hasher: HashPipeline | None) -> tuple[Any, str]:
    """Streams the source leaf into a temporary file; returns (file, sha256 of the source)."""
    try:
      f = tempfile.TemporaryFile(dir=self.spill_dir, prefix=SPILL_PREFIX)
    except OSError as e:
      raise UsageError(f"cannot create a spill file in {self.spill_dir}: {e}") from None
    h = self.new_hash() if hasher is None else None
    try:
      f.seek(self._skip)  # a byte range of the leaf sits at its own offsets (pieces are read back by them)
      reader = _SideReader(self.src_ckpt, self.src, self.plan.src, self.pieces, lambda p: p.src_box)
      try:
        for i, p in enumerate(self.pieces):
          slot = hasher.acquire() if hasher is not None else 0
          va = _view(self.buffers.pool(slot), p.shape(p.src_box), self.dtype)
          try:
            reader.wait(reader.start(i, va))
            try:
              f.write(_bytes(va))
            except OSError as e:  # e.g. no space left
              raise UsageError(f"cannot write the spill file in {self.spill_dir}: {e}") from None
          except BaseException:
            if hasher is not None:
              hasher.release(slot)
            raise
          if hasher is not None:
            hasher.submit(slot, va.nbytes)
          else:
            h.update(_bytes(va))
          self._count(self._through(p))
      finally:
        reader.close()
      f.flush()
      return f, (hasher.finish() if hasher is not None else h.hexdigest())
    except BaseException:
      f.close()
      raise

  # -- the passes --

  def run(self, top_k: int = 10, second_pass: bool = True) -> PairOutcome:
    """First pass: compare (stop at the first difference) and hash one side; a differing pair gets a second pass.

    Without ``second_pass`` a differing pair returns at once (no hashes, no statistics).
    """
    spill_file = None
    hasher = background = None
    name = self.mig.path
    try:
      base, digest = 0, None
      if self.plan.spill:
        hasher = HashPipeline(self.buffers, name, self.new_hash) if self.plan.hash_mode == "pipelined" else None
        spill_file, digest = self._spill(hasher)
        hasher = None
        base = self._through(self.pieces[-1])  # the spill pass reported the source bytes
      h_inline = background = kept = None
      if digest is None:
        if self.plan.hash_mode == "pipelined":
          hasher = HashPipeline(self.buffers, name, self.new_hash)
        elif self.plan.hash_mode in ("source", "migrated"):
          meta, ckpt, box_of = (
              (self.mig, self.mig_ckpt, lambda p: p.mig_box)
              if self.plan.hash_mode == "migrated"
              else (self.src, self.src_ckpt, lambda p: p.src_box)
          )
          # A migrated leaf of at most two pieces stays in the two buffers the thread and the migrated pieces
          # would use anyway, and the comparison takes it from there: one read of it instead of two.
          keep = [self.buffers.b, self.buffers.h][:KEPT_PIECES] if self.plan.hash_mode == "migrated" else None
          background = _BackgroundHash(
              ckpt, meta, [box_of(p) for p in self.pieces], self.buffers.h, self.new_hash, keep=keep
          )
          if background.keep is not None:
            kept = background
        else:
          h_inline = self.new_hash()
      sides = 1 if spill_file is not None else 2
      equal = True
      pairs = contextlib.closing(self._pairs(spill_file, hasher, kept))
      with pairs as it:
        for slot, a, b, p in it:
          if not bytes_equal(a, b):
            equal = False
            if hasher is not None:
              hasher.release(slot)
            break
          if hasher is not None:
            hasher.submit(slot, a.nbytes)  # equal bytes: the source's hash is the migrated leaf's too
          elif h_inline is not None:
            h_inline.update(_bytes(a))
          self._count(base + sides * self._through(p))
      if equal:
        if hasher is not None:
          digest = hasher.finish()
          hasher = None
        elif background is not None:
          digest = background.finish()
          background = None
        elif h_inline is not None:
          digest = h_inline.hexdigest()
        return PairOutcome(True, digest, digest)
      for t in (hasher, background):
        if t is not None:
          t.stop()
      hasher = background = None
      if not second_pass:
        return PairOutcome(False, "", "", None, "second pass not run")
      return self._second_pass(spill_file, base, sides, top_k)
    finally:
      for t in (hasher, background):
        if t is not None:
          t.stop()
      if spill_file is not None:
        spill_file.close()

  def _second_pass(self, spill_file, base: int, sides: int, top_k: int) -> PairOutcome:
    """Both hashes and the difference statistics, piece by piece, in the migrated leaf's coordinates."""
    h_src, h_mig = hashlib.sha256(), hashlib.sha256()
    acc: arraydiff.DiffAccumulator | None = None
    err = None
    try:
      acc = arraydiff.DiffAccumulator(self.mig.shape, self.dtype, top_k=top_k)
    except arraydiff.ComparisonError as e:
      err = str(e)
    for _, a, b, p in self._pairs(spill_file):
      h_src.update(_bytes(a))
      h_mig.update(_bytes(b))
      if acc is not None:
        try:
          acc.update(a.reshape(b.shape), b, origin=tuple(s.start for s in p.mig_box))
        except arraydiff.ComparisonError as e:
          acc, err = None, str(e)
      self._count(base + sides * self._through(p))
    diff = acc.result() if acc is not None else None
    return PairOutcome(False, h_src.hexdigest(), h_mig.hexdigest(), diff, err)
