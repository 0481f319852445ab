"""The migrator's destination plan: where a leaf's pieces end, how pieces group, the private read cache.

Expected values are brute force (numpy enumerating every storage chunk of a small array of element indices) or
worked by hand in the comments; no other code of the library is used to compute them.
"""

from __future__ import annotations

import dataclasses
import itertools
import types

import numpy as np
import pytest

from parity_jax.checkpoint.formats.base import LeafMeta
from parity_jax.checkpoint.migrate.plan import TargetArray, chunk_ends, groups, read_cache_bytes

_MIB = 1 << 20


def _brute_chunk_ends(shape: tuple[int, ...], chunk: tuple[int, ...]) -> tuple[int, ...] | None:
  """The end of every storage chunk in C order of the chunk grid, or None when some chunk is not one C-order
  range or the chunks do not follow each other in C order."""
  idx = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
  grid = [range(0, d, max(1, c)) for d, c in zip(shape, chunk)]
  ends, prev = [], 0
  for starts in itertools.product(*grid):
    box = tuple(slice(s, s + c) for s, c in zip(starts, chunk))
    flat = np.sort(idx[box].ravel())
    if flat.size == 0:
      continue
    if flat[0] != prev or not np.array_equal(flat, np.arange(flat[0], flat[-1] + 1)):
      return None
    prev = int(flat[-1]) + 1
    ends.append(prev)
  return tuple(ends)


@pytest.mark.parametrize(
    "shape, chunk",
    [
        ((4, 6), (1, 3)),  # runs of half a row
        ((4, 6), (1, 6)),  # whole rows
        ((4, 6), (3, 6)),  # three rows then the one left (a partial last chunk)
        ((4, 6), (8, 6)),  # one chunk larger than the leaf
        ((4, 6), (2, 3)),  # column blocks: not C-order ranges
        ((4, 6), (4, 3)),  # column blocks spanning every row
        ((1, 4, 6), (1, 2, 6)),  # a leading axis of size 1
        ((3, 1, 5), (1, 1, 2)),  # a middle axis of size 1, a partial last chunk per row
        ((2, 3, 4), (1, 3, 4)),
        ((2, 3, 4), (1, 2, 4)),
        ((2, 3, 4), (2, 1, 4)),  # split on axis 1 while axis 0 is spanned: not C order
        ((7,), (3,)),
        ((1, 1), (1, 1)),  # every axis of size 1: one element
        ((1, 4), (2, 2)),  # a chunk wider than an axis of size 1
    ],
)
def test_chunk_ends_are_the_ends_of_the_storage_chunks_in_c_order(shape, chunk):
  assert chunk_ends(shape, chunk) == _brute_chunk_ends(shape, chunk)


def test_chunk_ends_of_a_scalar_and_of_an_empty_leaf():
  assert chunk_ends((), ()) == (1,)  # a scalar is one element, one piece
  assert chunk_ends((0, 4), (1, 4)) == ()  # no elements, no pieces
  assert chunk_ends((3, 0), (1, 1)) == ()


def test_at_most_4096_pieces_and_up_to_that_every_chunk_is_one():
  every = chunk_ends((4096,), (1,))
  assert every == tuple(range(1, 4097))  # 4096 chunks: each its own piece
  merged = chunk_ends((4097,), (1,))  # one more chunk: runs of two chunks, the last run what is left
  assert merged == (*range(2, 4097, 2), 4097)
  wide = chunk_ends((3, 4097), (1, 1))  # 12291 chunks: runs of ceil(12291 / 4096) = 4 chunks
  assert len(wide) <= 4096 and wide[-1] == 3 * 4097
  assert wide[:3] == (4, 8, 12) and all(b - a <= 4 for a, b in zip((0, *wide), wide))


def test_groups_take_whole_pieces_up_to_the_limit_or_one_piece():
  ends = (2, 5, 9, 10, 16)
  # from 0: 2, 5 fit in 5 elements; 9 does not -> (0, 5); then 9, 10 (5 elements: fits); 16 does not -> (5, 10);
  # the last piece alone is 6 elements, over the limit but one piece
  assert groups(ends, 0, 5, 5) == [(0, 5), (5, 10), (10, 16)]
  assert groups(ends, 2, 4, 5) == [(5, 10)]  # from the end of piece 1: pieces 2 and 3, 5 elements exactly
  assert groups(ends, 1, 3, 3) == [(2, 5), (5, 9)]  # each piece alone: two pieces would be 7 > 3
  assert groups(ends, 0, 5, 100) == [(0, 16)]
  assert groups(ends, 3, 3, 5) == []  # no pieces
  assert groups(ends, 0, 1, 1) == [(0, 2)]  # one piece over the limit is still a group


def _meta(shape, chunk, *, box_reads=False):
  return LeafMeta(
      path="w",
      keys=("w",),
      kind="array",
      shape=shape,
      dtype=np.dtype(np.float32),
      chunk_shape=chunk,
      storage_name="w",
      value_type="jax.Array",
      box_reads=box_reads,
  )


def test_read_cache_only_when_a_group_cuts_a_row_of_chunks():
  meta = _meta((64, 4), (2, 4))  # a row of chunks: 2 x 4 = 8 elements; 256 elements in all
  assert read_cache_bytes(meta, [(0, 256)]) == 0  # one group: no cache
  assert read_cache_bytes(meta, [(0, 16), (16, 256)]) == 0  # every cut on a row boundary
  assert read_cache_bytes(_meta((64, 4), (2, 4), box_reads=True), [(0, 12), (12, 256)]) == 0
  # cut at 12: the longest group (244 elements) is held as ceil(244 / 8) + 1 = 32 rows, capped at the 32 rows of
  # the leaf: 32 * 8 * 4 bytes * 1.05 = 1075.2 -> 1075, plus 4 MiB
  assert read_cache_bytes(meta, [(0, 12), (12, 256)]) == 1075 + 4 * _MIB
  # cuts at 12 and 30: the longest group is 226 elements: ceil(226 / 8) + 1 = 30 rows: 30 * 32 * 1.05 = 1008
  assert read_cache_bytes(meta, [(0, 12), (12, 30), (30, 256)]) == 1008 + 4 * _MIB
  # groups of 18 elements at most: ceil(18 / 8) + 1 = 4 rows: 4 * 32 * 1.05 = 134.4 -> 134
  assert read_cache_bytes(meta, [(0, 12), (12, 30), (30, 48), (48, 64)]) == 134 + 4 * _MIB
  # the last group ends at the leaf's end, inside no row: still aligned
  odd = _meta((9, 4), (2, 4))  # rows of 8 elements, 36 in all, the last row partial
  assert read_cache_bytes(odd, [(0, 16), (16, 36)]) == 0
  whole = _meta((8, 4), (8, 4))  # one chunk: a row is the whole leaf; any cut decodes it, held once
  assert read_cache_bytes(whole, [(0, 12), (12, 32)]) == 134 + 4 * _MIB  # 1 row: 32 * 4 * 1.05 = 134.4


def test_a_target_array_counts_its_elements_bytes_and_storage_chunks():
  def target(shape, chunk, dtype=np.float32):
    plan = types.SimpleNamespace(dest="layers/0/w")
    return TargetArray(plan, _meta(shape, chunk), ("layers", "0", "w"), shape, np.dtype(dtype), chunk, (), False)

  t = target((5, 6), (2, 4), np.int16)
  assert (t.dest, t.name) == ("layers/0/w", "layers.0.w")
  assert (t.size, t.nbytes) == (30, 60)
  assert t.n_chunks == 3 * 2  # ceil(5 / 2) rows of chunks, ceil(6 / 4) columns
  scalar = target((), ())
  assert (scalar.size, scalar.nbytes, scalar.n_chunks) == (1, 4, 1)
  empty = target((0, 4), (1, 4))
  assert (empty.size, empty.nbytes, empty.n_chunks) == (0, 0, 0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    t.ends = (30,)  # a plan every process shares is never changed in place
