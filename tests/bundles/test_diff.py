"""parity_jax.bundles.diff: how a breach reads, and the dtype both sides of a stage are compared in."""

from __future__ import annotations

import numpy as np

from parity_jax.bundles.diff import Breach


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
