"""The verifier for element rules (transposes, reshape chains, stacks, casts): one target leaf, slab by slab.

For each C-order slab of the target leaf (at most ``slab_elems`` elements),
:meth:`~parity_jax.checkpoint.transforms.ElementPlan.source_indices` gives,
for every element, the member (source leaf) and the source index it comes
from. For each member the slab needs, the bounding box of those source
indices is read (one box read; a slab whose box would exceed four slabs is
cut in halves first, so memory stays near a few slabs however the elements
are permuted), the elements are gathered, cast where the rule casts, and
compared with the migrated slab byte for byte (a cast: bit for bit with
round-to-nearest-even, NaN for NaN of the same sign). The first differing
element is named with its target index and the source leaf and index it
came from; the count of differing elements and the sha256 of both leaves'
C-order bytes are reported. Nothing is ever held whole.
"""

from __future__ import annotations

import dataclasses
import concurrent.futures
import ctypes
import hashlib
import itertools
import math
from typing import Iterator

import numpy as np

from parity_jax.checkpoint import geometry
from parity_jax.checkpoint.formats.base import Checkpoint, LeafMeta, LeafReadError
from parity_jax.checkpoint.transforms import ElementPlan, expected_cast, same_cast
from parity_jax.checkpoint.verify.report import (
    DTYPE_MISMATCH,
    MISSING,
    PASS,
    SHAPE_MISMATCH,
    UNREADABLE,
    VALUE_MISMATCH,
    LeafResult,
)

__all__ = ["Slab", "TargetValues", "compare_element_leaf", "element_result", "slab_elems"]


def _inside(b, outer) -> bool:
  return all(lo >= olo and hi <= ohi for (lo, hi), (olo, ohi) in zip(b, outer))


def _widen(b, shape, elems: int):
  """``b`` extended forward along its last partial axis to about ``elems`` elements (later slabs need it next)."""
  b = list(b)
  for a in range(len(b) - 1, -1, -1):
    lo, hi = b[a]
    if (lo, hi) != (0, shape[a]):
      other = math.prod(h - l for i, (l, h) in enumerate(b) if i != a)
      b[a] = (lo, min(shape[a], max(hi, lo + elems // max(1, other))))
      break
  return tuple(b)


# Index arithmetic holds about ten int64 arrays of a slab's length (target and source indices, member,
# masks): slabs of element rules are capped so that these stay near 20 MiB whatever --slab_mb says.
MAX_INDEX_SLAB = 1 << 18


def slab_elems(slab_bytes: float, e: ElementPlan) -> int:
  """Elements per slab of an element target: ``slab_bytes`` of values (the index path cuts its slabs further,
  to :data:`MAX_INDEX_SLAB`)."""
  return max(1, int(slab_bytes) // max(e.src_dtype.itemsize, e.dst_dtype.itemsize))


def _joined(e: ElementPlan) -> str:
  """How a multi-member target joins its members: stacked, concatenated, or both."""
  how = (["stacked"] if e.stack_axes else []) + (["concatenated"] if e.concat_axis is not None else [])
  return " and ".join(how)


def element_result(e: ElementPlan, mig: LeafMeta | None) -> LeafResult:
  """The structure verdict of one element target (``PENDING`` when only the values can tell)."""
  from parity_jax.checkpoint.verify.structure import PENDING

  res = LeafResult(
      source_path=e.sources[0] if len(e.members) == 1 else f"{e.sources[0]} (+{len(e.members) - 1} {_joined(e)})",
      migrated_path=e.dest,
      group=e.group,
      status=MISSING,
      shape=e.dst_shape,
      source_shape=e.src_shape,
      dtype=str(e.dst_dtype),
      nbytes=math.prod(e.dst_shape) * e.dst_dtype.itemsize,
      transform=e.describe(),
  )
  if mig is None:
    res.reason = "no such leaf in the migrated checkpoint"
    return res
  if mig.error:
    res.status, res.reason = UNREADABLE, f"cannot read the migrated leaf's metadata: {mig.error}"
    return res
  problems = []
  if mig.dtype != e.dst_dtype:
    problems.append(f"dtype {mig.dtype} != expected {e.dst_dtype}")
  if tuple(mig.shape) != e.dst_shape:
    problems.append(f"shape {tuple(mig.shape)} != expected {e.dst_shape} ({e.describe()} of {e.src_shape})")
  if problems:
    res.status = SHAPE_MISMATCH if tuple(mig.shape) != e.dst_shape else DTYPE_MISMATCH
    res.reason = "; ".join(problems)
    res.shape, res.dtype = tuple(mig.shape), None if mig.dtype is None else str(mig.dtype)
    return res
  res.status = PENDING
  return res


@dataclasses.dataclass
class Slab:
  """One evaluated C-order slab ``[lo, hi)`` of a target leaf (of ``box`` when given): its values."""

  lo: int
  hi: int
  values: np.ndarray  # flat, in the target dtype (cast and padding applied)
  plan: ElementPlan
  box: tuple | None = None

  def origin(self, j: int) -> tuple[tuple[int, ...], str | None, tuple[int, ...] | None]:
    """Where element ``j`` of the slab comes from, through :meth:`ElementPlan.source_indices`: (target index,
    source leaf, source index), the last two None for padding."""
    e = self.plan
    shape = e.dst_shape if self.box is None else tuple(b - a for a, b in self.box)
    t = [int(i) for i in np.unravel_index(self.lo + j, shape)] if shape else []
    if self.box is not None:
      t = [i + a for i, (a, _) in zip(t, self.box)]
    if not e.dst_shape:
      return (), e.members[e.member_keys()[0]], ()
    member, sidx, valid = e.source_indices([np.asarray([i]) for i in t])
    if not valid[0]:
      return tuple(t), None, None
    return tuple(t), e.members[e.member_keys()[int(member[0])]], tuple(int(x[0]) for x in sidx)


# whole rows read at a time to cut a strip from (no mutate: a read size, performance only; same slabs for any value)
BAND_BYTES = 2 << 20  # no mutate
CACHE_BYTES = 32 << 20  # source blocks kept between slabs, all members together (read ahead along the slabs)


class TargetValues:
  """A target leaf's values computed from the source, slab by slab: what the verifier expects and the migrator
  writes (one evaluation for both). Use as a context manager (it closes its source readers).

  Each slab is cut into the few boxes of its C-order range; a box whose source is one box of each member
  (:meth:`ElementPlan.box_source`: transposes, pads, slices, stacks, reshapes that keep the box whole) is
  filled from views of the source blocks read for it (``np.transpose``/``reshape``, no index arrays). A slab
  with any other box goes through the index path: :meth:`ElementPlan.source_indices` for every element, then
  a gather from each member's bounding box (a slab of at most :data:`MAX_INDEX_SLAB` elements, cut in halves
  while its boxes would exceed four slabs). Either way a member's source block is read widened ahead (about
  ``cache_bytes``, default :data:`CACHE_BYTES`, shared by the members) and kept while the following slabs use
  it.
  """

  def __init__(self, e: ElementPlan, src: Checkpoint, slab_elems: int, cache_bytes: int | None = None):
    self.e, self.src, self.slab_elems = e, src, max(1, slab_elems)
    self.keys = e.member_keys()
    self.readers: dict = {}
    self.cache: dict = {}
    self.used: set = set()
    self.nbytes = 0  # source bytes read so far
    self.cache_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes
    self.ahead = max(1, self.cache_bytes // max(1, len(e.members)) // e.src_dtype.itemsize)

  def __enter__(self) -> "TargetValues":
    return self

  def __exit__(self, *exc) -> None:
    for r in self.readers.values():
      r.close()
    self.readers.clear()
    self.cache = {}

  def slabs(self, lo: int, hi: int, box=None) -> Iterator[Slab]:
    """The slabs tiling elements ``[lo, hi)`` in C order, each at most ``slab_elems`` elements: of the whole
    leaf, or of ``box`` (``((start, stop), ...)`` per axis; ``lo``/``hi`` then count within the box)."""
    shape = self.e.dst_shape if box is None else tuple(b - a for a, b in box)
    for a in range(lo, hi, self.slab_elems):
      b = min(hi, a + self.slab_elems)
      s = self._box_slab(a, b, shape, box) if self.e.dst_shape else None
      if s is None:
        yield from self._index_slabs(a, b, shape, box)
      else:
        yield s

  def _block(self, k: int, b) -> np.ndarray:
    """Member ``k``'s values in box ``b``: a view of its cached block, read (widened ahead) when not cached."""
    path = self.e.members[self.keys[k]]
    meta = self.src.leaves[path]
    if path not in self.readers:
      self.readers[path] = self.src.reader(meta).open()
    got = self.cache.get(path)
    if got is None or not _inside(b, got[0]):
      got = self.cache.pop(path, None) and None  # not held while its successor is read
      wide = _widen(b, meta.shape, max(math.prod(h - l for l, h in b), self.ahead))
      block, read = _read_box(self.readers[path], meta, wide)
      got = (wide, block)
      self.nbytes += read
      self.cache[path] = got
    self.used.add(path)
    wide, block = got
    return block[tuple(slice(l - w, h - w) for (l, h), (w, _) in zip(b, wide))] if b else block

  def _keep_used(self) -> None:
    """Only the members this slab used stay cached: memory near one block per member."""
    self.cache = {p: v for p, v in self.cache.items() if p in self.used}
    self.used = set()

  def _finish(self, values: np.ndarray, pad: np.ndarray | None) -> np.ndarray:
    e = self.e
    if e.dst_dtype != e.src_dtype:
      with np.errstate(invalid="ignore", over="ignore"):  # overflow to inf and NaN are the rule's business
        values = expected_cast(values, e.dst_dtype)
    if pad is not None and pad.any():  # padding holds exactly the fill, in the target dtype
      values[pad] = e.fill_bytes
    return values

  def _box_slab(self, lo: int, hi: int, shape, box) -> Slab | None:
    """Slab ``[lo, hi)`` from whole source boxes, or None when one of its boxes has no such source."""
    e = self.e
    parts = []
    for tb, off in geometry.flat_range_boxes(shape, lo, hi):
      rng = [(s.start, s.stop) for s in tb]
      if box is not None:
        rng = [(x + a, y + a) for (x, y), (a, _) in zip(rng, box)]
      src = e.box_source(rng)
      if src is None:
        return None
      parts.append((off, tuple(y - x for x, y in rng), src))
    values = np.empty(hi - lo, e.src_dtype)
    pad = None
    for off, tshape, src in parts:
      n = math.prod(tshape)
      out = values[off : off + n].reshape(tshape)
      for k, where in src.members():
        part, ok = src.apply(None if src.box is None else self._block(k, src.box))
        out[where] = part
        if ok is not None:
          if pad is None:
            pad = np.zeros(hi - lo, bool)
          pad[off : off + n].reshape(tshape)[where] = ~ok
    self._keep_used()
    return Slab(lo, hi, self._finish(values, pad), e, box)

  def _index_slabs(self, lo: int, hi: int, shape, box) -> Iterator[Slab]:
    """The index path: slabs of at most MAX_INDEX_SLAB elements, each element's source from its index."""
    e = self.e
    step = min(self.slab_elems, MAX_INDEX_SLAB)
    stack = [(a, min(hi, a + step)) for a in range(lo, hi, step)]
    stack.reverse()
    while stack:
      lo, hi = stack.pop()
      idx = np.unravel_index(np.arange(lo, hi, dtype=np.int64), shape) if e.dst_shape else ()
      if box is not None and e.dst_shape:
        idx = tuple(i + a for i, (a, _) in zip(idx, box))
      if e.dst_shape:
        member, sidx, valid = e.source_indices(list(idx))
      else:
        member, sidx, valid = np.zeros(1, np.int64), [], np.ones(1, bool)
      member = np.broadcast_to(member, (hi - lo,))
      # the bounding box of each member's elements; cut the slab when a box would be too big
      boxes = {}
      total = 0
      for k in np.unique(member[valid]):
        sel = (member == k) & valid
        b = tuple((int(s[sel].min()), int(s[sel].max()) + 1) for s in sidx)
        boxes[int(k)] = (sel, b)
        total += math.prod(h - l for l, h in b)
      if total > 4 * max(step, hi - lo) and hi - lo > 1:
        mid = (lo + hi) // 2
        stack += [(mid, hi), (lo, mid)]
        continue
      values = np.empty(hi - lo, e.src_dtype)
      for k, (sel, b) in boxes.items():
        block = self._block(k, b)
        local = tuple(s[sel] - l for s, (l, _) in zip(sidx, b))
        values[sel] = block[local] if local else block.reshape(-1)[: int(sel.sum())]
      self._keep_used()
      yield Slab(lo, hi, self._finish(values, ~valid), e, box)


def _read_box(reader, meta: LeafMeta, b) -> tuple[np.ndarray, int]:
  """``b`` of a source leaf. A box that is not one C-order range (a column strip of a transposed kernel) is read
  as bands of whole rows, at most BAND_BYTES (and CACHE_BYTES / 4) each, and cut here: a few long reads instead of one short read
  per row, and the band buffers allocated by this thread (a reader's own pool would allocate them in its
  threads' malloc arenas, which keep what they once held). Returns the box's values and the bytes read."""
  shape = tuple(meta.shape)
  a = len(b) - 1  # the last axis the box does not cover whole
  while a > 0 and b[a] == (0, shape[a]):
    a -= 1
  if a <= 0:  # one contiguous byte range
    out = reader.read(tuple(slice(l, h) for l, h in b)) if b else reader.read(())
    return out, out.nbytes
  out = np.empty(tuple(h - l for l, h in b), meta.dtype)
  row = math.prod(shape[a:]) * meta.dtype.itemsize  # bytes of one index of axis a - 1, whole
  outer = [range(l, h) for l, h in b[: a - 1]]
  lo, hi = b[a - 1]
  band = max(1, min(CACHE_BYTES // 4, BAND_BYTES) // row)
  read = 0
  for pre in itertools.product(*outer):
    for r in range(lo, hi, band):
      r1 = min(hi, r + band)
      whole = reader.read(tuple(slice(i, i + 1) for i in pre) + (slice(r, r1),) + tuple(slice(0, d) for d in shape[a:]))
      cut = (0,) * len(pre) + (slice(None),) + tuple(slice(l, h) for l, h in b[a:])
      out[tuple(i - l for i, (l, _) in zip(pre, b)) + (slice(r - lo, r1 - lo),)] = whole[cut]
      read += whole.nbytes
  return out, read


def release_freed_memory() -> None:
  """Hands the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere): the buffers of
  one leaf, freed, would otherwise stay resident beside the next leaf's, and peaks add up across leaves."""
  global _TRIM
  if _TRIM is None:
    try:
      _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
      _TRIM = False
  if _TRIM:  # no mutate: memory only (freed pages back to the OS); on glibc _TRIM is always the function
    _TRIM(0)


_TRIM = None


def compare_element_leaf(e: ElementPlan, res: LeafResult, src: Checkpoint, mig: Checkpoint, slab_elems: int) -> int:
  """Fills ``res`` (status, reason, sha256s) for one element target; returns the bytes read.

  Each slab's expected and migrated bytes are compared as unsigned integers (one ``np.array_equal``; the
  per-element comparison only for a slab that differs). While the two streams are identical one sha256 serves
  both; from the first slab that differs in any byte (a cast's NaN of another payload included) each side has its
  own, copied from the common one. Hashing runs on a thread (hashlib releases the GIL), overlapped with the next
  slab's reads and evaluation. The first differing element's source is found through the index path.
  """
  release_freed_memory()
  n = math.prod(e.dst_shape)
  mig_meta = mig.leaves[e.dest]
  u = _UINT[e.dst_dtype.itemsize]
  h_mig, h_exp = hashlib.sha256(), None  # h_exp None: the expected bytes so far are the migrated ones
  first, n_bad, nbytes = None, 0, 0
  values = TargetValues(e, src, slab_elems)
  hashing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="parity_jax-sha256")
  pending = None
  try:
    mig_reader = mig.reader(mig_meta).open()
    with values:
      for s in values.slabs(0, n):
        lo, hi, expected = s.lo, s.hi, s.values
        got = np.empty(hi - lo, e.dst_dtype)
        futs = [
            mig_reader.read_into_async(box, got[off : off + _count(box)].reshape(geometry.box_shape(box)))
            for box, off in geometry.flat_range_boxes(e.dst_shape, lo, hi)
        ]
        for f in futs:
          mig_reader.wait(f)
        nbytes += got.nbytes
        gu, eu = got.view(u), expected.view(u)
        same_bytes = np.array_equal(gu, eu)
        if pending is not None:
          pending.result()
        if not same_bytes and h_exp is None:
          h_exp = h_mig.copy()
        pending = hashing.submit(_hash, h_mig, h_exp, gu, None if same_bytes and h_exp is None else eu)
        if same_bytes:
          continue
        eq = same_cast(expected, got) if e.dst_dtype != e.src_dtype else eu == gu
        bad = np.flatnonzero(~eq)
        if bad.size:
          n_bad += int(bad.size)
          if first is None:
            j = int(bad[0])
            first = (*s.origin(j), expected[j], got[j])
      if pending is not None:
        pending.result()  # no mutate: the shutdown(wait=True) below waits for it too, before any digest is read
  except LeafReadError as err:
    res.status, res.reason = UNREADABLE, str(err)
    return nbytes + values.nbytes
  finally:
    hashing.shutdown(wait=True)
  nbytes += values.nbytes
  res.sha256 = h_mig.hexdigest()
  res.source_sha256 = (h_exp or h_mig).hexdigest()
  if first is None:
    res.status = PASS
    return nbytes
  t_index, s_path, s_index, want, have = first
  res.status = VALUE_MISMATCH
  res.reason = (
      f"{n_bad} of {n} elements differ; first: {e.dest}{list(t_index)} = {have!r}"
      f" (0x{int(np.asarray(have).view(u)):0{2 * e.dst_dtype.itemsize}x}), expected {want!r}"
      f" (0x{int(np.asarray(want).view(u)):0{2 * e.dst_dtype.itemsize}x})"
      + (
          f" = the fill {e.fill!r} (padding)"
          if s_index is None
          else f"{' = ' + e.dst_dtype.name + '(' if e.dst_dtype != e.src_dtype else ' from '}{s_path}{list(s_index)}"
          f"{')' if e.dst_dtype != e.src_dtype else ''}"
      )
  )
  return nbytes


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _hash(h_mig, h_exp, got: np.ndarray, expected: np.ndarray | None) -> None:
  h_mig.update(got)
  if h_exp is not None:
    h_exp.update(got if expected is None else expected)


def _count(box) -> int:
  return math.prod(geometry.box_shape(box)) if box else 1
