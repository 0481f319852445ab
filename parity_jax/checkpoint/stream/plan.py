"""The plan of one pair: pieces (slabs of the common refinement), how each side is read, hashing, spilling.

See :mod:`parity_jax.checkpoint.stream` for the read modes and the memory model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from parity_jax.checkpoint import geometry
from parity_jax.checkpoint.formats.base import LeafMeta
from parity_jax.progress import human_bytes

__all__ = [
    "KEPT_PIECES",
    "PIPELINE_DEPTH",
    "PairPlan",
    "Piece",
    "SidePlan",
    "REMOTE_READAHEAD",
    "REMOTE_READAHEAD_BYTES",
    "REMOTE_RANGED_READAHEAD",
    "REMOTE_SPILL_ABOVE_BYTES",
    "SPILL_ABOVE_BYTES",
    "pieces_of",
    "plan_pair",
]

_MIB = 1 << 20
# Source pieces in flight between the comparison and the hashing thread.
PIPELINE_DEPTH = 3
# A background-hashed migrated leaf of at most this many pieces is kept in buffers for the comparison (see run()).
KEPT_PIECES = 2
# Below this modelled peak a pair is always streamed: the disk round trip of a spill costs more than it saves.
SPILL_ABOVE_BYTES = 256 * _MIB
# The same with a side in a bucket: a spill reads one side at a time (half the requests in flight) and needs local
# disk, which a bucket verify should not; streaming is chosen up to this modelled peak.
REMOTE_SPILL_ABOVE_BYTES = 2 << 30
# In a bucket, tensorstore reads each stored chunk with one request, so a leaf is read about one chunk row at a
# time unless rows are decoded ahead: ``readahead=None`` (auto) reads up to this many rows ahead on each side, as
# many as fit in half of REMOTE_READAHEAD_BYTES (each row ahead holds its compressed bytes and the decoded row).
REMOTE_READAHEAD = 4
REMOTE_READAHEAD_BYTES = 1 << 30
# The same for a side whose stored chunks are each fetched as many range requests (LeafMeta.ranged).
REMOTE_RANGED_READAHEAD = 1


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
    readahead: int | None = 0,
    memmap: bool | None = None,
    remote: bool = False,
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

  ``remote``: a side lies in a bucket. There, a spill would put the leaf on
  local disk (a bucket verify should need none) and reads one side at a time,
  so a pair is streamed up to :data:`REMOTE_SPILL_ABOVE_BYTES`; and ``readahead=None`` (auto) reads up to
  :data:`REMOTE_READAHEAD` chunk rows ahead per side, as many as fit in
  half of :data:`REMOTE_READAHEAD_BYTES` each (one request per stored chunk: the rows in
  flight set the throughput). On local disk ``None`` means 0.
  """
  item = src.dtype.itemsize
  n = int(np.prod(r)) if r else 1
  budget = max(1, int(piece_bytes) // item)

  def kind(meta: LeafMeta) -> tuple[str, int]:
    e = geometry.chunk_row_elems(meta.shape, meta.chunk_shape)
    cheap_boxes = meta.box_reads if memmap is None else (meta.raw_chunks and memmap)
    return ("raw" if cheap_boxes else "decode"), e

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

  def side(k: str, e: int, meta: LeafMeta) -> tuple[SidePlan, int]:  # (plan, modelled transient/cached elements)
    if k == "raw":
      return SidePlan("raw", itemsize=item), l
    if e <= l and slabs.boundaries_are_multiples_of(e):
      return SidePlan("direct", row_elems=e, itemsize=item), 2 * l
    e = min(e, n)
    straddle = not slabs.boundaries_include_multiples_of(e)
    rows_cached = max(1, math.ceil(l / e)) + int(straddle)
    reopen = e > l
    want = int(readahead) if readahead is not None else (_remote_rows_ahead(e * item, meta.ranged) if remote else 0)
    ahead = want if (want and reopen and e < n) else 0
    # held rows + one decode transient (compressed + decoded row); read ahead: up to N decodes and their
    # warm-up pieces at once
    cost = rows_cached * e + ahead * (2 * e + l) if ahead else (rows_cached + 1) * e
    return SidePlan("rows", e, rows_cached, reopen, ahead, item), cost

  (sp, cs), (mp, cm) = side(ks, es, src), side(km, em, mig)
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
  spill_above = REMOTE_SPILL_ABOVE_BYTES if remote else SPILL_ABOVE_BYTES
  if sp.mode == "rows" and mp.mode == "rows" and stream_est * item > spill_above:
    spill_est = bufs + max(cs, cm)
    if spill_est / 0.9 < stream_est:
      spill, stream_est = True, spill_est
  return PairPlan(slabs, sp, mp, hash_mode, spill, item, int(stream_est * item))


def _remote_rows_ahead(row_bytes: int, ranged: bool = False) -> int:
  """Rows read ahead on a bucket side with ``readahead=None``: up to REMOTE_READAHEAD, each costing ~2 rows, within
  half of REMOTE_READAHEAD_BYTES (the other half is the other side's). A ``ranged`` side (each stored chunk fetched
  as many range requests) has its requests in flight within a row: one row ahead overlaps the next row's fetch with
  the comparison of this one (bench/buckets.py: 5.2x one stream at 1.4 GiB, against 5.8x at 2.3 GiB with 2-4)."""
  n = min(REMOTE_READAHEAD, REMOTE_READAHEAD_BYTES // 2 // max(1, 2 * row_bytes))
  return min(n, REMOTE_RANGED_READAHEAD) if ranged else n


@dataclasses.dataclass(frozen=True)
class Piece:
  flat_lo: int  # C-order element range [flat_lo, flat_hi) of the leaf
  flat_hi: int
  src_box: tuple[slice, ...]
  mig_box: tuple[slice, ...]

  def shape(self, box: tuple[slice, ...]) -> tuple[int, ...]:
    return geometry.box_shape(box)


def pieces_of(src: LeafMeta, mig: LeafMeta, r: tuple[int, ...], slabs: geometry.SlabPlan) -> list[Piece]:
  if 0 in r:  # no elements, no pieces (and no axis groups: a size-0 axis merges with anything)
    return []
  g_src, g_mig = geometry.axis_groups(src.shape, r), geometry.axis_groups(mig.shape, r)
  out = []
  for lo, hi in slabs:
    bs = geometry.box_in(src.shape, g_src, r, lo, hi)
    bm = geometry.box_in(mig.shape, g_mig, r, lo, hi)
    flo = geometry.flat_offset(lo, r) if r else 0
    count = int(np.prod(geometry.box_shape(bm))) if bm else 1
    out.append(Piece(flo, flo + count, bs, bm))
  return out
