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
import hashlib
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

READ_AHEAD_BYTES = 8 << 20  # a member's box is read widened to about this, ahead along the axis slabs advance on


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
  """Elements per slab of an element target: ``slab_bytes`` of values, at most :data:`MAX_INDEX_SLAB`."""
  return max(1, min(MAX_INDEX_SLAB, int(slab_bytes) // max(e.src_dtype.itemsize, e.dst_dtype.itemsize)))


def element_result(e: ElementPlan, mig: LeafMeta | None) -> LeafResult:
  """The structure verdict of one element target (``PENDING`` when only the values can tell)."""
  from parity_jax.checkpoint.verify.structure import PENDING

  res = LeafResult(
      source_path=e.sources[0] if len(e.members) == 1 else f"{e.sources[0]} (+{len(e.members) - 1} stacked)",
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
  """One evaluated C-order slab ``[lo, hi)`` of a target leaf: its values and where each came from."""

  lo: int
  hi: int
  values: np.ndarray  # flat, in the target dtype (cast and padding applied)
  idx: tuple  # target multi-indices, one array per axis
  member: np.ndarray  # member number per element (indexes ``ElementPlan.member_keys()``)
  sidx: list  # source multi-indices, one array per axis of the member
  valid: np.ndarray  # False where the element is padding


class TargetValues:
  """A target leaf's values computed from the source, slab by slab: what the verifier expects and the migrator
  writes (one evaluation for both). For each slab, each member's bounding box of the needed source indices is
  read (widened ahead and cached while later slabs need it); a slab whose boxes would exceed four slabs is cut
  in halves first. Use as a context manager (it closes its source readers)."""

  def __init__(self, e: ElementPlan, src: Checkpoint, slab_elems: int):
    self.e, self.src, self.slab_elems = e, src, max(1, slab_elems)
    self.keys = e.member_keys()
    self.readers: dict = {}
    self.cache: dict = {}
    self.nbytes = 0  # source bytes read so far

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
    e, slab_elems = self.e, self.slab_elems
    shape = e.dst_shape if box is None else tuple(b - a for a, b in box)
    stack = [(a, min(hi, a + slab_elems)) for a in range(lo, hi, slab_elems)]
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
      if total > 4 * max(slab_elems, hi - lo) and hi - lo > 1:
        mid = (lo + hi) // 2
        stack += [(mid, hi), (lo, mid)]
        continue
      values = np.empty(hi - lo, e.src_dtype)
      kept = {}
      for k, (sel, b) in boxes.items():
        path = e.members[self.keys[k]]
        meta = self.src.leaves[path]
        if path not in self.readers:
          self.readers[path] = self.src.reader(meta).open()
        got_box = self.cache.get(path)
        if got_box is None or not _inside(b, got_box[0]):
          wide = _widen(b, meta.shape, max(slab_elems, READ_AHEAD_BYTES // meta.dtype.itemsize))
          block = self.readers[path].read(tuple(slice(l, h) for l, h in wide)) if wide else self.readers[path].read(())
          self.nbytes += block.nbytes
          got_box = (wide, block)
        kept[path] = got_box
        wide, block = got_box
        local = tuple(s[sel] - l for s, (l, _) in zip(sidx, wide))
        values[sel] = block[local] if local else block.reshape(-1)[: int(sel.sum())]
      self.cache = kept  # only the members this slab used stay cached: memory near one block per member
      if e.dst_dtype != e.src_dtype:
        with np.errstate(invalid="ignore", over="ignore"):  # overflow to inf and NaN are the rule's business
          values = expected_cast(values, e.dst_dtype)
      pad = ~valid
      if pad.any():  # padding holds exactly the fill, in the target dtype
        values[pad] = e.fill_bytes
      yield Slab(lo, hi, values, idx, member, sidx, valid)


def compare_element_leaf(e: ElementPlan, res: LeafResult, src: Checkpoint, mig: Checkpoint, slab_elems: int) -> int:
  """Fills ``res`` (status, reason, sha256s) for one element target; returns the bytes read."""
  n = math.prod(e.dst_shape)
  keys = e.member_keys()
  mig_meta = mig.leaves[e.dest]
  h_mig, h_exp = hashlib.sha256(), hashlib.sha256()
  first, n_bad, nbytes = None, 0, 0
  values = TargetValues(e, src, slab_elems)
  try:
    mig_reader = mig.reader(mig_meta).open()
    with values:
      for s in values.slabs(0, n):
        lo, hi, expected, idx, member, sidx, valid = s.lo, s.hi, s.values, s.idx, s.member, s.sidx, s.valid
        got = np.empty(hi - lo, e.dst_dtype)
        for box, off in geometry.flat_range_boxes(e.dst_shape, lo, hi):
          part = mig_reader.read(box)
          got[off : off + part.size] = part.reshape(-1)
        nbytes += got.nbytes
        if e.dst_dtype != e.src_dtype:
          eq = same_cast(expected, got)
        else:
          eq = expected.view(np.uint8).reshape(hi - lo, -1) == got.view(np.uint8).reshape(hi - lo, -1)
          eq = eq.all(axis=1)
        h_mig.update(got.tobytes())
        h_exp.update(expected.tobytes())
        bad = np.flatnonzero(~eq)
        if bad.size:
          n_bad += int(bad.size)
          if first is None:
            j = int(bad[0])
            t_index = tuple(int(i[j]) for i in idx)
            s_path, s_index = e.members[keys[int(member[j])]], tuple(int(x[j]) for x in sidx)
            if not valid[j]:
              s_path, s_index = "padding", None
            first = (t_index, s_path, s_index, expected[j], got[j])
  except LeafReadError as err:
    res.status, res.reason = UNREADABLE, str(err)
    return nbytes + values.nbytes
  nbytes += values.nbytes
  res.sha256 = h_mig.hexdigest()
  res.source_sha256 = h_exp.hexdigest()
  if first is None:
    res.status = PASS
    return nbytes
  t_index, s_path, s_index, want, have = first
  u = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[e.dst_dtype.itemsize]
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
