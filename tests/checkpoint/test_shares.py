"""parity_jax.checkpoint.shares: where a job's byte line is cut into shares, and which leaves are split."""

from __future__ import annotations

import dataclasses

import pytest

from parity_jax.checkpoint.shares import Work, assign


def test_assign_cuts_on_share_boundaries():
  # a leaf ending exactly on a share boundary stays whole
  work = assign([100, 100], [[50, 100], [50, 100]], 2)
  assert [[(w.pair, w.rank) for w in ws] for ws in work] == [[(0, None)], [(1, None)]]
  # a leaf between half a share and a share that crosses a boundary is split at the nearest piece boundary
  work = assign([100, 120, 80], [[100], [30, 60, 90, 120], [80]], 2)  # share 150: x1 spans 100..220
  assert [[(w.pair, w.lo, w.hi, w.rank) for w in ws] for ws in work] == [
      [(0, 0, 1, None), (1, 0, 2, 0)],
      [(2, 0, 1, None), (1, 2, 4, 1)],
  ]
  assert [sum(w.nbytes for w in ws) for ws in work] == [160, 140]


def test_one_process_or_no_bytes_takes_every_leaf_whole_in_order():
  assert Work(3, 0, 2) == Work(3, 0, 2, None, 1, 0) and not Work(3, 0, 2).split and Work(3, 0, 2, 0).split
  want = [Work(0, 0, 2, None, 1, 10), Work(1, 0, 1, None, 1, 0), Work(2, 0, 3, None, 1, 30)]
  assert assign([10, 0, 30], [[4, 10], [0], [10, 20, 30]], 1) == [want]
  nothing = [Work(0, 0, 2, None, 1, 0), Work(1, 0, 1, None, 1, 0)]
  assert assign([0, 0], [[0, 0], [0]], 3) == [nothing, [], []]  # no bytes: nothing to share


def test_a_leaf_over_three_shares_is_cut_in_three_ranges_and_ranges_come_last():
  # share 110: the cuts fall on the piece ends nearest 110 and 220 (100 and 200); the second leaf is process 2's
  ends = [50, 100, 150, 200, 250, 300]
  assert assign([300, 30], [ends, [30]], 3) == [
      [Work(0, 0, 2, 0, 3, 100)],
      [Work(0, 2, 4, 1, 3, 100)],
      [Work(1, 0, 1, None, 1, 30), Work(0, 4, 6, 2, 3, 100)],  # a whole leaf before a later range
  ]


def test_a_leaf_too_small_or_in_one_piece_goes_whole_to_the_process_holding_most_of_it():
  # share 100: the middle leaf (40 bytes, under half a share) crosses the boundary at 100
  assert [[w.pair for w in ws] for ws in assign([70, 40, 90], [[70], [20, 40], [90]], 2)] == [[0, 1], [2]]  # 30 | 10
  assert [[w.pair for w in ws] for ws in assign([90, 40, 70], [[90], [20, 40], [70]], 2)] == [[0], [1, 2]]  # 10 | 30
  # a big leaf of one piece cannot be cut: 60..160 holds 40 bytes of share 0 and 60 of share 1
  work = assign([60, 100, 40], [[60], [100], [40]], 2)
  assert work == [[Work(0, 0, 1, None, 1, 60)], [Work(1, 0, 1, None, 1, 100), Work(2, 0, 1, None, 1, 40)]]


def test_cuts_fall_on_piece_ends_and_an_empty_range_is_no_work():
  # share 100: one byte of the first leaf lies in share 1, and piece end 101 is nearest the boundary (cut after 50)
  assert assign([101, 99], [[50, 101], [99]], 2) == [
      [Work(0, 0, 1, 0, 2, 50)],
      [Work(1, 0, 1, None, 1, 99), Work(0, 1, 2, 1, 2, 51)],
  ]
  # share 80: the end nearest 80 is the leaf's own end (100), so the cut goes after the first piece (10)
  assert assign([100, 60], [[10, 100], [60]], 2) == [
      [Work(0, 0, 1, 0, 2, 10)],
      [Work(1, 0, 1, None, 1, 60), Work(0, 1, 2, 1, 2, 90)],
  ]
  # a leaf of two pieces over three shares: both cuts fall after the first piece; share 1 gets nothing of it
  assert assign([300], [[150, 300]], 3) == [[Work(0, 0, 1, 0, 2, 150)], [], [Work(0, 1, 2, 1, 2, 150)]]
  # a leaf of two pieces over a boundary, half a share or more: split; an empty leaf at the very end: the last one's
  assert assign([50, 100, 50, 0], [[50], [50, 100], [50], [0]], 2) == [
      [Work(0, 0, 1, None, 1, 50), Work(1, 0, 1, 0, 2, 50)],
      [Work(2, 0, 1, None, 1, 50), Work(3, 0, 1, None, 1, 0), Work(1, 1, 2, 1, 2, 50)],
  ]


def test_a_leaf_of_exactly_half_a_share_over_a_boundary_is_split_and_work_is_immutable():
  # share 100: the middle leaf (50 bytes = half a share) spans 75..125, cut after its first piece (25)
  assert assign([75, 50, 75], [[75], [25, 50], [75]], 2) == [
      [Work(0, 0, 1, None, 1, 75), Work(1, 0, 1, 0, 2, 25)],
      [Work(2, 0, 1, None, 1, 75), Work(1, 1, 2, 1, 2, 25)],
  ]
  with pytest.raises(dataclasses.FrozenInstanceError):  # every process holds the same lists: none may change one
    Work(0, 0, 1).lo = 1
