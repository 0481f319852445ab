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

import hashlib
import math

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

__all__ = ["compare_element_leaf", "element_result", "slab_elems"]

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


def compare_element_leaf(e: ElementPlan, res: LeafResult, src: Checkpoint, mig: Checkpoint, slab_elems: int) -> int:
  """Fills ``res`` (status, reason, sha256s) for one element target; returns the bytes read."""
  n = math.prod(e.dst_shape)
  keys = e.member_keys()
  readers = {}
  mig_meta = mig.leaves[e.dest]
  h_mig, h_exp = hashlib.sha256(), hashlib.sha256()
  first, n_bad, nbytes = None, 0, 0
  cache: dict = {}
  try:
    mig_reader = mig.reader(mig_meta).open()
    stack = [(lo, min(n, lo + slab_elems)) for lo in range(0, n, max(1, slab_elems))]
    stack.reverse()
    while stack:
      lo, hi = stack.pop()
      idx = np.unravel_index(np.arange(lo, hi, dtype=np.int64), e.dst_shape) if e.dst_shape else ()
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
      expected = np.empty(hi - lo, e.src_dtype)
      pad = ~valid
      kept = {}
      for k, (sel, b) in boxes.items():
        path = e.members[keys[k]]
        meta = src.leaves[path]
        if path not in readers:
          readers[path] = src.reader(meta).open()
        got_box = cache.get(path)
        if got_box is None or not _inside(b, got_box[0]):
          wide = _widen(b, meta.shape, max(slab_elems, READ_AHEAD_BYTES // meta.dtype.itemsize))
          block = readers[path].read(tuple(slice(l, h) for l, h in wide)) if wide else readers[path].read(())
          nbytes += block.nbytes
          got_box = (wide, block)
        kept[path] = got_box
        wide, block = got_box
        local = tuple(s[sel] - l for s, (l, _) in zip(sidx, wide))
        expected[sel] = block[local] if local else block.reshape(-1)[: int(sel.sum())]
      cache = kept  # only the members this slab used stay cached: memory near one block per member of a slab
      got = np.empty(hi - lo, e.dst_dtype)
      for box, off in geometry.flat_range_boxes(e.dst_shape, lo, hi):
        part = mig_reader.read(box)
        got[off : off + part.size] = part.reshape(-1)
      nbytes += got.nbytes
      if e.dst_dtype != e.src_dtype:
        with np.errstate(invalid="ignore", over="ignore"):  # overflow to inf and NaN are the rule's business
          expected = expected_cast(expected, e.dst_dtype)
      if pad.any():  # padding holds exactly the fill, in the target dtype
        expected[pad] = e.fill_bytes
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
          s_path, s_index = e.members[keys[int(member[j])]], tuple(int(s[j]) for s in sidx)
          if not valid[j]:
            s_path, s_index = "padding", None
          first = (t_index, s_path, s_index, expected[j], got[j])
  except LeafReadError as err:
    res.status, res.reason = UNREADABLE, str(err)
    return nbytes
  finally:
    for r in readers.values():
      r.close()
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
