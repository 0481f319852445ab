"""The destination plan: every target array's shape, dtype, storage chunks and the pieces it may be cut into.

Every process plans every leaf the same way: its destination shape and dtype,
its storage chunk shape (orbax's own ``ArrayWriteSpec`` with the migrator's
row-major chunks: :func:`parity_jax.checkpoint.formats.orbax_writer.row_major_chunks`),
and its *pieces*: runs of whole destination chunks, each a contiguous C-order
element range, where a job may cut the leaf between processes (only if the
source can be read in parts without decoding it whole). Strings are planned
apart (process 0 writes them).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from parity_jax.checkpoint import geometry, keypath
from parity_jax.checkpoint.formats.base import Checkpoint, LeafMeta
from parity_jax.checkpoint.formats import orbax_writer
from parity_jax.checkpoint.formats.tstore import quiet_orbax
from parity_jax.checkpoint.spec import LeafPlan, Transform
from parity_jax.checkpoint.transforms import ElementPlan

__all__ = ["TargetArray", "chunk_ends", "element_chunk_shape", "groups", "plan_arrays", "read_cache_bytes"]

_MIB = 1 << 20
_MAX_PIECES = 4096  # per leaf: finer runs of chunks are merged (the split needs only a few cut points)


@dataclasses.dataclass(frozen=True)
class TargetArray:
  """One destination array: where it comes from, how it is stored and where it may be cut."""

  plan: LeafPlan
  src: LeafMeta
  keys: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype
  chunk: tuple[int, ...]
  ends: tuple[int, ...]  # element offsets where each piece (a run of whole chunks, C order) ends
  splittable: bool
  element: ElementPlan | None = None  # an element rule's target: its values are computed from the source

  @property
  def dest(self) -> str:
    return self.plan.dest

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


def chunk_ends(shape: tuple[int, ...], chunk: tuple[int, ...]) -> tuple[int, ...] | None:
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
  if meta.box_reads:
    return True
  n = int(np.prod(meta.shape)) if meta.shape else 1
  return geometry.chunk_row_elems(meta.shape, meta.chunk_shape) < n


def element_chunk_shape(e: ElementPlan, chunk_bytes: int) -> tuple[int, ...]:
  """The storage chunks of an element target: row-major chunks of one stack member (at most ``chunk_bytes``),
  1 along every stack axis, so that a stacked leaf is never one chunk and a reader of one member (a layer, an
  expert) decodes only that member's chunks. Stack axes leading (tunix's experts, MaxText's MoE) keep every
  chunk a C-order range; a stack axis after an unstacked one (MaxText's scanned layers on axis 1) does not."""
  member = [d for a, d in enumerate(e.dst_shape) if a not in e.stack_axes]
  inner = list(geometry.row_major_chunk_shape(tuple(member), e.dst_dtype.itemsize, chunk_bytes))
  return tuple(1 if a in e.stack_axes else max(1, inner.pop(0)) for a in range(len(e.dst_shape)))


def _element_array(e: ElementPlan, src: Checkpoint, item_dir: str, chunk_bytes: int, compression: str) -> TargetArray:
  keys = tuple(keypath.split(e.dest))
  chunk = element_chunk_shape(e, chunk_bytes) if e.stack_axes else None
  spec = orbax_writer.write_spec(
      ".".join(keys),
      e.dst_shape,
      e.dst_dtype,
      item_dir,
      None,
      chunk_bytes=chunk_bytes,
      compression=compression,
      chunk_shape=chunk,
  )
  chunk = tuple(int(c) for c in spec.metadata.chunk_shape)
  n = math.prod(e.dst_shape)
  ends = chunk_ends(e.dst_shape, chunk)
  if ends is None:
    ends = (n,) if n else ()
  plan = LeafPlan(e.sources[0], e.dest, e.rule, Transform("identity", e.dst_shape, e.dst_shape), e.group)
  return TargetArray(plan, src.leaves[e.sources[0]], keys, e.dst_shape, e.dst_dtype, chunk, ends, len(ends) > 1, e)


def plan_arrays(
    src: Checkpoint,
    leaves: tuple[LeafPlan, ...],
    item_dir: str,
    *,
    chunk_bytes: int,
    compression: str,
    elements: tuple[ElementPlan, ...] = (),
) -> tuple[list[TargetArray], list[LeafPlan], bool]:
  """The arrays (with their chunking and pieces; element targets last), the string leaves, and whether
  row-major chunks apply."""
  arrays, strings = [], []
  with orbax_writer.row_major_chunks() as hooked, quiet_orbax():
    for p in leaves:
      s = src.leaves[p.source]
      if s.kind == "string":
        strings.append(p)
        continue
      shape = tuple(int(d) for d in p.transform.dst_shape)
      spec = orbax_writer.write_spec(
          ".".join(keypath.split(p.dest)),
          shape,
          s.dtype,
          item_dir,
          None,
          chunk_bytes=chunk_bytes,
          compression=compression,
      )
      chunk = tuple(int(c) for c in spec.metadata.chunk_shape)
      ends = chunk_ends(shape, chunk)
      n = int(np.prod(shape)) if shape else 1
      if ends is None:
        ends = (n,) if n else ()
      arrays.append(
          TargetArray(
              p, s, tuple(keypath.split(p.dest)), shape, s.dtype, chunk, ends, len(ends) > 1 and _readable_in_parts(s)
          )
      )
    for e in elements:
      arrays.append(_element_array(e, src, item_dir, chunk_bytes, compression))
  return arrays, strings, hooked


def groups(ends: tuple[int, ...], lo: int, hi: int, group_elems: int) -> list[tuple[int, int]]:
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


def read_cache_bytes(meta: LeafMeta, groups: list[tuple[int, int]]) -> int:
  """A private chunk cache for the source reads of one range: none when every group decodes whole chunk rows."""
  if len(groups) <= 1 or meta.box_reads:
    return 0
  n = int(np.prod(meta.shape)) if meta.shape else 1
  row = geometry.chunk_row_elems(meta.shape, meta.chunk_shape)
  if row < n and all(a % row == 0 and (b % row == 0 or b == n) for a, b in groups):
    return 0
  longest = max(b - a for a, b in groups)
  rows = min(math.ceil(longest / row) + 1, math.ceil(n / row))
  return int(rows * row * meta.dtype.itemsize * 1.05) + 4 * _MIB
