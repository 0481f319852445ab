"""parity_jax.checkpoint.shares: where a job's byte line is cut into shares, and which leaves are split."""

from __future__ import annotations

from parity_jax.checkpoint.shares import assign


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
