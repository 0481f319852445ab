"""C-order ranges of a leaf as boxes, checked element by element against numpy's own C-order flattening.

The expectation is brute force: ``np.arange(n).reshape(shape)[box]`` must be exactly the flat indices the box is
said to hold, and the boxes together exactly ``[lo, hi)``, in order.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from parity_jax.checkpoint.geometry import SlabPlan, box_shape, flat_range_boxes


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3), (2, 2, 2, 3), (0, 3), ()])
def test_every_range_is_its_boxes_in_c_order_at_their_offsets(shape):
  n = int(np.prod(shape)) if shape else 1
  idx = np.arange(n).reshape(shape)
  for lo in range(n + 1):
    for hi in range(lo, n + 1):
      boxes = flat_range_boxes(shape, lo, hi)
      assert len(boxes) <= max(1, 2 * len(shape) - 1)
      covered = []
      for box, off in boxes:
        flat = idx[box].reshape(-1) if box else idx.reshape(-1)[:1]
        assert box_shape(box) == (idx[box].shape if box else ())
        assert flat.tolist() == list(range(lo + off, lo + off + flat.size)), (shape, lo, hi, box, off)
        covered += flat.tolist()
      assert covered == list(range(lo, hi))


def test_a_range_outside_the_leaf_is_refused():
  with pytest.raises(ValueError, match=r"range \[2, 7\) is outside a leaf of shape \(2, 3\)"):
    flat_range_boxes((2, 3), 2, 7)
  with pytest.raises(ValueError):
    flat_range_boxes((2, 3), 4, 3)


def test_a_slab_plan_is_immutable():
  with pytest.raises(dataclasses.FrozenInstanceError):
    SlabPlan.for_target((4, 3), 3).k = 0


def test_a_fractional_or_non_positive_slab_target_counts_whole_elements():
  """A budget of 12.9 elements is 12 (two rows of 6: a step of the int 2, usable as a range step); 0 or less is 1."""
  p = SlabPlan.for_target((4, 6), 12.9)
  assert (p.k, p.step) == (0, 2) and type(p.step) is int
  assert list(range(0, 4, p.step)) == [0, 2]
  assert SlabPlan.for_target((4, 6), 0) == SlabPlan.for_target((4, 6), -3) == SlabPlan((4, 6), 1, 1)


def test_axis_groups_squeeze_axes_and_chunk_rows_by_hand():
  from parity_jax.checkpoint.geometry import axis_groups, chunk_row_elems, normalize_squeeze

  assert normalize_squeeze([0, -2], 2) == "axes [0, -2] repeat an axis"
  assert normalize_squeeze([-1, 0], 3) == (0, 2)
  assert axis_groups((6, 1, 4), (2, 3, 4)) == [(0, 2), (2, 2), (2, 3)]  # 6 = 2 * 3; the size-1 axis is empty
  for shape in ((4, 6), (6,)):  # 4 is no product of leading axes of r; 6 leaves the 4 of r unused
    with pytest.raises(ValueError, match=f"^shape {re.escape(str(shape))} is not an axis-merge of \\(2, 3, 4\\)$"):
      axis_groups(shape, (2, 3, 4))
  assert chunk_row_elems((1, 1, 1), (1, 1, 1)) == 1  # nothing but size-1 axes: the whole (one-element) leaf
  assert chunk_row_elems((1, 4, 6), (1, 2, 6)) == 12  # two rows of 6 per chunk row


def test_slab_plans_of_a_scalar_and_a_period_too_long_to_check():
  p = SlabPlan.for_target((), 5)
  assert (p.slab_elems, p.n_slabs, p.boundaries_are_multiples_of(0), p.boundaries_include_multiples_of(0)) == (
      1,
      1,
      True,
      True,
  )
  # 10_000_001 elements in slabs of 5: every multiple of 5 below the end is a boundary, but its period spans 2e6
  # multiples: not checked, answered conservatively (the caller caches one more row)
  assert not SlabPlan((10_000_001,), 0, 5).boundaries_include_multiples_of(5)
  assert SlabPlan((1_000,), 0, 5).boundaries_include_multiples_of(5)  # the same shape of answer, checked
