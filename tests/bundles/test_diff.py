"""parity_jax.bundles.diff: how a breach reads, and the dtype both sides of a stage are compared in."""

from __future__ import annotations

import numpy as np
import pytest

from parity_jax.arraydiff import diff_stats
from parity_jax.bundles.diff import Breach, check_rule
from parity_jax.bundles.logits import logits_stats
from parity_jax.bundles.tolerance import ToleranceRule


def test_breach_text_writes_each_kind_of_number_its_own_way():
  assert Breach("rel_l2", 0.000123456, 1e-5).text() == "rel_l2 0.000123 > 1e-05"
  assert Breach("bit_diff", 7, 0).text() == "bit_diff 7 > 0"
  assert Breach("cosine", 0.5, 0.999999).text() == "cosine 0.5 < 1"
  assert Breach("argmax_agreement", 0.25, 1.0).text() == "argmax_agreement 0.25 < 1"
  assert Breach("nan_mismatch", True, False).text() == "nan_mismatch true > false"


def test_breach_to_json_and_back():
  b = Breach("max_abs", float("nan"), 2.5)
  d = b.to_dict()
  assert d == {"metric": "max_abs", "value": "nan", "limit": 2.5}
  back = Breach.from_dict(d)
  assert back.metric == "max_abs" and np.isnan(back.value) and back.limit == 2.5


def test_check_rule_lists_every_threshold_broken_in_order():
  """golden [1, 2, 3, 4] vs candidate [1, 2, 3, 5]: one element off by 1.0 (2**21 float32 ULPs at 4..8)."""
  g, c = np.float32([1, 2, 3, 4]), np.float32([1, 2, 3, 5])
  st = diff_stats(g, c)
  rel_l2 = 1 / np.sqrt(30)
  tight = ToleranceRule(
      ".*", max_rel_l2=0.1, min_cosine=0.9999, max_abs_diff=0.5, max_ulp=10, max_frac_diff=0.2, bit_exact=True
  )
  got = check_rule(tight, st, None)
  assert [b.metric for b in got] == ["bit_diff", "rel_l2", "cosine", "max_abs_diff", "max_ulp", "frac_diff"]
  assert (got[0].value, got[0].limit) == (1, 0)
  assert got[1].value == pytest.approx(rel_l2, rel=1e-6) and got[1].limit == 0.1
  cosine = (1 + 4 + 9 + 20) / np.sqrt(30 * 39)
  assert got[2].value == pytest.approx(cosine, rel=1e-9) and got[2].limit == 0.9999
  assert (got[3].value, got[3].limit) == (1.0, 0.5)
  assert (got[4].value, got[4].limit) == (2**21, 10)
  assert (got[5].value, got[5].limit) == (0.25, 0.2)
  assert check_rule(tight, st, None, max_ulp=30)[4].value == 30  # a widened comparison's ULPs count instead
  loose = ToleranceRule(".*", max_rel_l2=0.2, min_cosine=0.99, max_abs_diff=1.0, max_ulp=2**21, max_frac_diff=0.25)
  assert check_rule(loose, st, None) == ()  # each limit is inclusive
  assert check_rule(ToleranceRule(".*"), diff_stats(g, np.float32([1, 2, 3, np.nan])), None) == (
      Breach("nan_mismatch", 1, 0),
  )


def test_check_rule_on_logits():
  """Golden logits rank the vocabulary 0 < 1 < 2 < 3; the candidate reverses them: argmax and top-2 all differ."""
  g, c = np.float32([[0, 1, 2, 3]]), np.float32([[3, 2, 1, 0]])
  lg = logits_stats(g, c, topk=2)
  p, q = np.exp(g[0]) / np.exp(g[0]).sum(), np.exp(c[0]) / np.exp(c[0]).sum()
  kl = float(np.sum(p * np.log(p / q)))
  rule = ToleranceRule(".*", max_kl=0.1, max_mean_kl=0.1, min_argmax_agreement=1.0, min_topk_overlap=0.5, topk=2)
  got = check_rule(rule, diff_stats(g, c), lg)
  assert [b.metric for b in got] == ["kl_max", "kl_mean", "argmax_agreement", "topk_overlap"]
  assert got[0].value == pytest.approx(kl, rel=1e-6) and got[1].value == pytest.approx(kl, rel=1e-6)
  assert (got[2].value, got[2].limit, got[3].value, got[3].limit) == (0.0, 1.0, 0.0, 0.5)
  assert check_rule(rule, diff_stats(g, g), logits_stats(g, g, topk=2)) == ()
  assert check_rule(rule, diff_stats(g, c), None) == ()  # no logits statistics: the logits rules are not judged


def test_boxes_tile_the_shape_in_c_order_within_the_budget():
  """(origin, slices) boxes, written out by hand: one box when everything fits, else runs along the first axis that
  does not fit whole (at least one element of it), everything after it whole."""
  from parity_jax.bundles.diff import boxes

  whole = (slice(None), slice(None))
  assert list(boxes((2, 3), 6)) == [((0, 0), whole)]
  assert list(boxes((4, 5), 10)) == [((0, 0), (slice(0, 2), slice(None))), ((2, 0), (slice(2, 4), slice(None)))]
  assert list(boxes((2, 2, 5), 7)) == [
      ((0, 0, 0), (slice(0, 1), slice(0, 1), slice(None))),
      ((0, 1, 0), (slice(0, 1), slice(1, 2), slice(None))),
      ((1, 0, 0), (slice(1, 2), slice(0, 1), slice(None))),
      ((1, 1, 0), (slice(1, 2), slice(1, 2), slice(None))),
  ]
  assert list(boxes((7,), 3)) == [((0,), (slice(0, 3),)), ((3,), (slice(3, 6),)), ((6,), (slice(6, 7),))]
  assert list(boxes((2, 9), 4)) == [  # a row longer than the budget: pieces of the row
      ((r, s), (slice(r, r + 1), slice(s, min(s + 4, 9)))) for r in range(2) for s in (0, 4, 8)
  ]
