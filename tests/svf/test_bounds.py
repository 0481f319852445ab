"""Explained mismatches: legitimate rounding ties pass, everything else does not."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from parity_jax.svf import reconstruct
from parity_jax.svf.bounds import FormulaConstants, MismatchAccounting, gamma, unit_roundoff

BF16 = ml_dtypes.bfloat16


def _bits(x):
  return np.asarray(x, np.float32).astype(BF16).view(np.uint16)


def _one_element(u_value, golden_bits, ours_bits):
  """k = 1, S = 1, offsets 0, V = 1: the float64 reference is exactly u_value."""
  fc = FormulaConstants.from_components(np.ones(1, np.float32), np.zeros(1, np.float32))
  acc = MismatchAccounting(fc)
  acc.update(
      np.array([[golden_bits]], np.uint16),
      np.array([[ours_bits]], np.uint16),
      np.array([[u_value]], np.float32),
      np.ones((1, 1), np.float32),
  )
  return acc


def test_unit_roundoff_and_gamma():
  assert unit_roundoff(np.float32) == 2.0**-24 and unit_roundoff(BF16) == 2.0**-8
  assert gamma(3, 2.0**-24) == pytest.approx(3 * 2.0**-24, rel=1e-6)
  assert gamma(2**24, 2.0**-24) == float("inf")


def test_a_tie_at_the_midpoint_is_explained_and_anything_else_is_not():
  mid = 1.0 + 2.0**-8  # halfway between bf16 1.0 (0x3f80) and 1.0078125 (0x3f81)
  acc = _one_element(mid, 0x3F80, 0x3F81)
  assert (acc.n_mismatch, acc.n_explained, acc.n_unexplained) == (1, 1, 0)
  acc = _one_element(mid + 1e-4, 0x3F80, 0x3F81)  # a 1-ULP difference, but the truth is not near the midpoint
  assert (acc.n_explained, acc.n_unexplained, acc.n_outside_bound) == (0, 1, 1)
  acc = _one_element(mid, 0x3F80, 0x3F82)  # 2 ULP apart and the bound is ~1e-7 wide: no
  assert (acc.n_unexplained, acc.n_outside_bound, acc.n_explained_multi_ulp) == (1, 1, 0)
  acc = _one_element(mid, 0x3F80, 0xFFFF)  # NaN on one side
  assert (acc.n_unexplained, acc.n_nonfinite) == (1, 1)
  acc = _one_element(0.0, 0x0000, 0x8000)  # +0 / -0 of a true zero
  assert (acc.n_explained, acc.n_unexplained) == (1, 0)
  acc = _one_element(0.5, 0x3F00, 0x3F00)  # equal: nothing to explain
  assert acc.n_mismatch == 0
  d = acc.to_dict()
  assert d["unit_roundoff"] == 2.0**-24 and d["n_mismatch"] == 0


def test_an_independent_correct_float32_evaluation_is_fully_explained():
  # numpy's BLAS sums in another order than XLA: a legitimate second opinion.
  rng = np.random.default_rng(11)
  m, n = 600, 1000
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((m, k)))[0].astype(np.float32)
  v = np.linalg.qr(rng.standard_normal((n, k)))[0].astype(np.float32)
  s = np.sort(rng.uniform(0.1, 20, k))[::-1].astype(np.float32)
  o = (rng.standard_normal(k) * 0.1).astype(np.float32)
  ours = np.asarray(reconstruct(u, s, v, o))
  ss = s * (np.float32(1) + o)
  nrm = np.float32(np.sum(s, dtype=np.float32) / np.sum(ss, dtype=np.float32))
  other = ((u * ss[None, :]) @ v.T * nrm).astype(BF16)
  acc = MismatchAccounting(FormulaConstants.from_components(s, o))
  acc.update(other.view(np.uint16), ours.view(np.uint16), u, v)
  assert acc.n_explained_tie > 0, "expected some real bf16 ties between numpy and XLA"
  assert acc.n_unexplained == 0, acc.to_dict()["unexplained_examples"]
  assert 0 < acc.max_explained_ratio <= 1
  # Near-zero elements after heavy cancellation legitimately land 2+ bf16 ULPs apart;
  # the strict one-ULP rule refuses exactly those.
  assert acc.n_explained_multi_ulp > 0 and acc.max_ulp_explained >= 2
  strict = MismatchAccounting(FormulaConstants.from_components(s, o), rule="one_ulp")
  strict.update(other.view(np.uint16), ours.view(np.uint16), u, v)
  assert strict.n_unexplained == strict.n_multi_ulp_refused == acc.n_explained_multi_ulp
  assert strict.n_explained == acc.n_explained_tie
  # A 0.5% normalization bug on our side (about one bf16 ULP) fails: most of its
  # elements are unexplained. (Some land within the worst-case gamma(k) bound of a
  # midpoint: at k = 600 with this much cancellation that bound is ~0.35 half-ULPs.)
  rows = slice(0, 96)  # enough elements to judge; the accounting costs O(k) per mismatch
  bad = (np.asarray(reconstruct(u[rows], s, v, o, capture=True)["matmul_pre_norm"]) * (nrm * np.float32(1.005))).astype(
      BF16
  )
  acc = MismatchAccounting(FormulaConstants.from_components(s, o))
  acc.update(other[rows].view(np.uint16), bad.view(np.uint16), u[rows], v)
  assert acc.n_unexplained > 0.6 * acc.n_mismatch > 0


def test_cancellation_in_the_normalization_sum_gives_no_bound():
  # S (1 + o) = [1, -(1 - 2^-24)]: the float32 sum B = 2^-24 is all cancellation. Its relative error bound,
  # gamma(k + 1, u) * sum|S(1 + o)| / |B| = ~3u * 2 / u = ~6, is past 1: B's sign is not even known, so the
  # normalization A / B has no relative bound at all (inf), never a finite (here negative) number.
  below_one = float(np.nextafter(np.float32(1), np.float32(0)))
  assert below_one == 1 - 2.0**-24
  fc = FormulaConstants.from_components(np.array([1.0, -below_one], np.float32), np.zeros(2, np.float32))
  assert fc.nu == float("inf")
  # the float64 reference (u = 2^-53) sums the same two numbers with a bound of ~3 * 2^-53 * 2 / 2^-24 << 1: finite
  assert 0 < fc.nu64 < 1e-6


def test_batch_size_changes_no_count_and_must_be_positive():
  rng = np.random.default_rng(5)
  k, rows, cols = 6, 5, 7
  u = rng.standard_normal((rows, k)).astype(np.float32)
  v = rng.standard_normal((cols, k)).astype(np.float32)
  s, o = np.ones(k, np.float32), np.zeros(k, np.float32)
  # the float64 truth rounded to bf16, and a copy with every other element one bf16 ULP up: some are ties, most not
  golden = (u.astype(np.float64) @ v.T.astype(np.float64)).astype(np.float32).astype(BF16).view(np.uint16)
  ours = golden.copy()
  ours.reshape(-1)[::2] += 1
  counts = []
  for batch in (None, 1, k, 10 * k):
    acc = MismatchAccounting(
        FormulaConstants.from_components(s, o), **({} if batch is None else {"batch_elems": batch})
    )
    acc.update(golden, ours, u, v)
    counts.append((acc.n_mismatch, acc.n_explained, acc.n_unexplained, acc.max_explained_ratio))
  assert counts[0][0] == (rows * cols + 1) // 2 and all(c == counts[0] for c in counts), counts
  # the examples of unexplained elements stop at ``keep``, however many batches and updates bring more
  for keep in (0, 2):
    acc = MismatchAccounting(FormulaConstants.from_components(s, o), keep=keep, batch_elems=3)
    acc.update(golden, ours, u, v)
    acc.update(golden, ours, u, v)
    assert acc.n_unexplained > keep + 2 and len(acc.unexplained_examples) == keep, (keep, acc.n_unexplained)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="batch_elems must be a positive int"):
      MismatchAccounting(FormulaConstants.from_components(s, o), batch_elems=bad)


def test_normalization_bound_by_hand():
  """s = [3, -1, 2], offsets [0.5, 0, -0.5]: A = 4 (sum |s| = 6), B = sum s(1+o) = 4.5 (sum |.| = 6.5), k = 3.

  |N^/N - 1| <= (1 + g(k-1) 6/4)(1 + u) / (1 - g(k+1) 6.5/4.5) - 1 with g(n) = nu / (1 - nu).
  """

  def expected(u):
    g = lambda n: n * u / (1 - n * u)  # noqa: E731
    return (1 + g(2) * 6 / 4) * (1 + u) / (1 - g(4) * 6.5 / 4.5) - 1

  fc = FormulaConstants.from_components(np.float32([3, -1, 2]), np.float32([0.5, 0, -0.5]))
  assert (fc.k, fc.u, fc.n64) == (3, 2.0**-24, 4 / 4.5)
  assert fc.nu == pytest.approx(expected(2.0**-24), rel=1e-12)
  assert fc.nu64 == pytest.approx(expected(2.0**-53), rel=1e-9)


def test_examples_name_the_element_in_the_whole_tensor():
  """A chunk of rows fed with row_offset=5: its one far-off element [1, 2] is named [6, 2] in the source tensor."""
  rng = np.random.default_rng(0)
  u, v = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
  golden = (u.astype(np.float64) @ v.T.astype(np.float64)).astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
  ours = golden.copy()
  ours[1, 2] ^= 0x0100  # flips an exponent bit: far outside any bound
  acc = MismatchAccounting(FormulaConstants.from_components(np.ones(4, np.float32), np.zeros(4, np.float32)))
  acc.update(golden, ours, u, v, row_offset=5)
  assert acc.n_unexplained == 1 and [e["index_source"] for e in acc.unexplained_examples] == [[6, 2]]
  assert acc.unexplained_examples[0]["ours_bits"] == f"0x{int(ours[1, 2]):04x}"


def test_an_example_carries_the_float64_reference_its_bound_and_their_ratio():
  """One element one bf16 ULP up: the example's reference is the float64 dot (s = 1, offsets 0: N = 1), and its ratio
  is the reference's distance to our value's rounding interval (half a ULP, 2**-10 at 0.35, around it) over the bound.
  """
  rng = np.random.default_rng(0)
  u, v = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
  golden = (u.astype(np.float64) @ v.T.astype(np.float64)).astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
  ours = golden.copy()
  ours[0, 1] += 1
  acc = MismatchAccounting(FormulaConstants.from_components(np.ones(4, np.float32), np.zeros(4, np.float32)))
  acc.update(golden, ours, u, v)
  (e,) = acc.unexplained_examples
  ref = float(u[0].astype(np.float64) @ v[1].astype(np.float64))
  assert e["index_source"] == [0, 1] and e["ulp"] == 1 and e["reference_f64"] == pytest.approx(ref, rel=1e-12)
  assert 0 < e["bound"] < 1e-5 and e["ours"] == 0.34765625
  assert e["ratio"] == pytest.approx((e["ours"] - 2.0**-10 - ref) / e["bound"], rel=1e-9)


def test_check_bound_is_inclusive_and_nan_aware():
  """Hand-picked pairs: equal values and a difference exactly at the bound pass; NaN passes only on both sides."""
  from parity_jax.svf.bounds import check_bound

  golden = np.array([1.0, 2.0, 3.0, np.nan, 5.0, np.nan], np.float32)
  ours = np.array([1.0, 2.5, 3.75, np.nan, 5.0, 1.0], np.float32)
  tol = np.array([0.0, 0.5, 0.5, 0.0, 1.0, 1.0])
  assert check_bound(golden[:5], ours[:5], tol[:5]) == (1, 1.5)  # 3.75 is 0.75 off a 0.5 bound; 2.5 sits on it
  assert check_bound(golden[:3], ours[:3], 1.0) == (0, 0.75)  # a scalar bound
  assert check_bound(golden, ours, tol) == (2, np.inf)  # a NaN on one side: out, and the worst ratio is infinite
  assert check_bound(np.zeros(0, np.float32), np.zeros(0, np.float32), 1.0) == (0, 0.0)


def test_the_stage_tolerances_are_the_documented_formulas():
  """The bounds written out by hand from their docstrings, with the module's stated constants: the smallest normal
  float32 (2**-126) for the subnormal floor and a 1 + 2**-30 safety factor for their own float64 evaluation."""
  from parity_jax.svf.bounds import adapted_tolerance, matmul_tolerance, normalization_tolerance

  tiny, safety = 2.0**-126, 1.0 + 2.0**-30
  s = np.array([3.0, 2.0, 0.5], np.float32)
  fc = FormulaConstants.from_components(s, np.array([0.1, -0.2, 0.05], np.float32))
  assert fc.k == 3 and fc.u == 2.0**-24
  ra, rv = np.array([1.0, 4.0]), np.array([2.0, 0.5, 3.0])
  outer = ra[:, None] * rv[None, :]
  np.testing.assert_allclose(
      matmul_tolerance(ra, rv, 3, fc.u), (2 * gamma(3, fc.u) * outer + 2 * 11 * tiny) * safety, rtol=1e-15, atol=0
  )
  assert normalization_tolerance(fc) == pytest.approx(2.0 * fc.nu * abs(fc.n64) * safety, rel=1e-15, abs=0)
  n, nu, u = abs(fc.n64), fc.nu, fc.u
  one_side = outer * n * (nu + u + nu * u) + gamma(3, u) * outer * n * (1 + nu) * (1 + u) + 11 * tiny * max(1.0, n)
  np.testing.assert_allclose(adapted_tolerance(ra, rv, fc), 2 * one_side * safety, rtol=1e-15, atol=0)
  # zero rows: only the subnormal floor is left, (k + 8) smallest normals per side
  zero = np.zeros(2)
  np.testing.assert_allclose(matmul_tolerance(zero, rv, 3, fc.u), 2 * 11 * tiny * safety, rtol=1e-15, atol=0)
  np.testing.assert_allclose(adapted_tolerance(zero, rv, fc), 2 * 11 * tiny * max(1.0, n) * safety, rtol=1e-15, atol=0)
