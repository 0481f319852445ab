"""The comparison core: bit-exact equality, diff statistics, chunked accumulation."""

import math

import ml_dtypes
import numpy as np
import pytest

from parity_jax import arraydiff
from parity_jax.errors import ComparisonError, UsageError


def test_bit_equal_sees_what_array_equal_hides():
  a = np.array([0.0, 1.0, np.nan], np.float32)
  neg_zero = a.copy()
  neg_zero[0] = -0.0
  assert np.array_equal(a, neg_zero, equal_nan=True)  # numpy calls these equal...
  assert not arraydiff.bit_equal(a, neg_zero)  # ...we do not.

  payload = a.copy()
  payload.view(np.uint32)[2] = 0x7FC00001  # another quiet NaN
  assert np.isnan(payload[2])
  assert np.array_equal(a, payload, equal_nan=True)
  assert not arraydiff.bit_equal(a, payload)
  assert arraydiff.bit_equal(a, a.copy())
  # anything array-like is taken as numpy takes it: Python floats are float64, -0.0 kept
  assert arraydiff.bit_equal([1.5, -0.0], np.array([1.5, -0.0]))
  assert not arraydiff.bit_equal([1.5, 0.0], np.array([1.5, -0.0]))


def test_bit_equal_checks_dtype_shape_and_byte_order():
  a = np.arange(6, dtype=np.float32)
  assert not arraydiff.bit_equal(a, a.reshape(2, 3))
  assert not arraydiff.bit_equal(a, a.astype(np.float64))
  assert not arraydiff.bit_equal(a, a.astype(">f4"))
  assert not arraydiff.bit_equal(a.view(np.int32), a)  # same bytes, other dtype
  assert arraydiff.bit_equal(np.asarray(3, np.int32), np.asarray(3, np.int32))
  assert arraydiff.bit_equal(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32))
  # non-contiguous views compare by value layout, not memory layout
  m = np.arange(12, dtype=np.float32).reshape(3, 4)
  assert arraydiff.bit_equal(m.T, np.ascontiguousarray(m.T))


def test_check_comparable_is_one_line_usage_error():
  with pytest.raises(ComparisonError, match=r"^q_proj: shape mismatch \(2, 3\) vs \(3, 2\)$"):
    arraydiff.check_comparable(np.zeros((2, 3)), np.zeros((3, 2)), "q_proj")
  with pytest.raises(UsageError, match="dtype mismatch float32 vs float64"):
    arraydiff.diff_stats(np.zeros(3, np.float32), np.zeros(3, np.float64))


def test_diff_stats_against_independent_formulas():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((7, 11)).astype(np.float32)
  b = a.copy()
  b[3, 5] += 0.5
  b[6, 1] -= 0.25
  b[0, 0] = -b[0, 0]
  s = arraydiff.diff_stats(a, b, top_k=2)
  fa, fb = a.astype(np.float64), b.astype(np.float64)
  d = np.abs(fa - fb)
  assert s.n_diff == 3
  assert s.frac_diff == pytest.approx(3 / 77)
  assert s.max_abs_diff == pytest.approx(d.max())
  assert s.max_abs_index == tuple(int(i) for i in np.unravel_index(np.argmax(d), d.shape))
  assert s.rms_diff == pytest.approx(math.sqrt((d**2).mean()))
  assert s.cosine == pytest.approx(np.dot(fa.ravel(), fb.ravel()) / np.linalg.norm(fa) / np.linalg.norm(fb), rel=1e-12)
  assert s.rel_l2 == pytest.approx(np.linalg.norm(fa - fb) / np.linalg.norm(fa))
  order = np.argsort(-d, axis=None)[:2]
  assert [t.index for t in s.top_k] == [tuple(int(i) for i in np.unravel_index(o, d.shape)) for o in order]
  assert s.top_k[0].a == pytest.approx(float(a[s.top_k[0].index]))
  assert s.top_k[0].b == pytest.approx(float(b[s.top_k[0].index]))
  assert not s.bit_equal
  assert arraydiff.diff_stats(a, a).bit_equal


def test_ulp_distance_matches_nextafter():
  x = np.array([1.0, -1.0, 0.0, 3.5e-45, np.inf], np.float32)
  up = np.nextafter(x, np.float32(np.inf))
  up2 = np.nextafter(up, np.float32(np.inf))
  np.testing.assert_array_equal(arraydiff.ulp_distance(x, up), [1, 1, 1, 1, 0])
  np.testing.assert_array_equal(arraydiff.ulp_distance(x[:4], up2[:4]), [2, 2, 2, 2])
  # across zero: smallest negative subnormal to smallest positive subnormal is 2 ULP
  tiny = np.array([np.float32(1.4e-45)])
  assert int(arraydiff.ulp_distance(-tiny, tiny)[0]) == 2
  assert int(arraydiff.ulp_distance(np.float32([-0.0]), np.float32([0.0]))[0]) == 0


def test_ulp_bfloat16_and_float64():
  one = np.array([1.0], ml_dtypes.bfloat16)
  nxt = np.array([1.0 + 2**-7], ml_dtypes.bfloat16)  # bf16 has 7 explicit mantissa bits
  assert int(arraydiff.ulp_distance(one, nxt)[0]) == 1
  big = np.array([-np.finfo(np.float64).max], np.float64)
  # exact over the whole float64 range, no int64 overflow
  assert int(arraydiff.ulp_distance(big, -big)[0]) == 2 * 0x7FEFFFFFFFFFFFFF
  s = arraydiff.diff_stats(one, nxt)
  assert s.max_ulp == 1 and s.max_abs_diff == 2**-7


def test_nan_and_signed_zero_are_counted_and_shown():
  a = np.array([0.0, np.nan, 1.0, 2.0], np.float32)
  b = a.copy()
  b[0] = -0.0
  b.view(np.uint32)[1] = 0xFFC00000  # negative quiet NaN
  b[3] = np.nan
  s = arraydiff.diff_stats(a, b, top_k=5)
  assert s.n_diff == 3
  assert s.n_nan_mismatch == 1
  assert s.max_abs_diff == math.inf and s.max_abs_index == (3,)
  bits = {t.index: (t.a_bits, t.b_bits) for t in s.top_k}
  assert bits[(0,)] == ("0x00000000", "0x80000000")
  assert bits[(1,)] == ("0x7fc00000", "0xffc00000")
  d = s.to_dict()
  assert d["max_abs_diff"] == "inf" and d["rel_l2"] == "inf"
  assert s.max_ulp == 0  # only ±0 and NaNs differ: no finite value moved


def test_integer_and_bool_leaves():
  a = np.array([[1, 2], [3, 4]], np.int64)
  b = a.copy()
  b[1, 0] = 10
  s = arraydiff.diff_stats(a, b)
  assert (s.n_diff, s.max_abs_diff, s.max_abs_index, s.max_ulp) == (1, 7.0, (1, 0), None)
  t = arraydiff.diff_stats(np.array([True, False]), np.array([True, True]))
  assert t.n_diff == 1 and t.max_abs_index == (1,)
  assert arraydiff.diff_stats(np.asarray(5, np.int32), np.asarray(6, np.int32)).max_abs_index == ()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int32])
def test_chunked_accumulation_equals_whole(dtype):
  rng = np.random.default_rng(1)
  a = (rng.standard_normal((9, 4, 5)) * 100).astype(dtype)
  b = a.copy()
  flat = b.reshape(-1)
  for i in rng.choice(a.size, 12, replace=False):
    flat[i] = flat[i] + np.asarray(rng.integers(1, 50), dtype)
  whole = arraydiff.diff_stats(a, b, top_k=4)
  acc = arraydiff.DiffAccumulator(a.shape, a.dtype, top_k=4)
  # uneven box chunks in a scrambled order
  boxes = [(r, c) for r in range(0, 9, 4) for c in range(0, 4, 3)]
  for r, c in reversed(boxes):
    acc.update(a[r : r + 4, c : c + 3], b[r : r + 4, c : c + 3], origin=(r, c, 0))
  chunked = acc.result()
  assert chunked.n_diff == whole.n_diff
  assert chunked.max_abs_index == whole.max_abs_index
  assert chunked.max_abs_diff == whole.max_abs_diff
  assert chunked.max_ulp == whole.max_ulp
  assert [t.index for t in chunked.top_k] == [t.index for t in whole.top_k]
  assert chunked.rms_diff == pytest.approx(whole.rms_diff, rel=1e-12)
  assert chunked.cosine == pytest.approx(whole.cosine, rel=1e-12)


def test_accumulator_refuses_incomplete_or_outside_chunks():
  acc = arraydiff.DiffAccumulator((4, 4), np.float32)
  acc.update(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32))
  with pytest.raises(ComparisonError, match="accumulated 8 elements, expected 16"):
    acc.result()
  with pytest.raises(ComparisonError, match="outside"):
    acc.update(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32), origin=(3, 0))
  with pytest.raises(ComparisonError, match="outside"):  # a negative origin, even where the chunk's end fits
    acc.update(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32), origin=(-1, 0))


def test_accumulator_refuses_a_chunk_of_another_dtype():
  acc = arraydiff.DiffAccumulator((2, 4), np.float32)
  with pytest.raises(ComparisonError, match="chunk dtype float64 does not match float32"):
    acc.update(np.zeros((2, 4), np.float64), np.zeros((2, 4), np.float64))
  with pytest.raises(ComparisonError, match=r"^shape mismatch \(2, 4\) vs \(2, 3\)$"):  # the two sides of a chunk
    acc.update(np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float32))
  with pytest.raises(ComparisonError, match="^dtype mismatch float32 vs float64$"):
    acc.update(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float64))


def test_top_k_ties_do_not_depend_on_chunking():
  a = np.zeros((40, 50), np.float32)
  b = np.ones_like(a)  # every element differs by exactly 1: all tied...
  b.reshape(-1)[::7] = 0.5  # ...except a sprinkle of smaller differences
  expected = [(0, 1), (0, 2), (0, 3)]  # lowest flat indices among the largest |diff|
  assert [t.index for t in arraydiff.diff_stats(a, b, top_k=3).top_k] == expected
  acc = arraydiff.DiffAccumulator(a.shape, a.dtype, top_k=3)
  for r in (30, 20, 10, 0):  # row chunks arriving last-first
    acc.update(a[r : r + 10], b[r : r + 10], origin=(r, 0))
  assert [t.index for t in acc.result().top_k] == expected


# ------------------------------------------------------------------------------------------------------------------
# Gaps a mutation audit found (tests/mutation_audit.py): inputs that are not numpy arrays, all-zero arrays, no top-K,
# the JSON of the top divergences and the one-line summary.
# ------------------------------------------------------------------------------------------------------------------


def test_check_comparable_takes_lists_and_names_the_leaf():
  arraydiff.check_comparable([1.0, 2.0], [3.0, 4.0])  # same shape and dtype: nothing to say
  with pytest.raises(ComparisonError, match=r"^w: .*\(2,\).*\(3,\)"):
    arraydiff.check_comparable([1.0, 2.0], [1.0, 2.0, 3.0], "w")


def test_cosine_of_zero_arrays():
  z = np.zeros(4, np.float32)
  assert arraydiff.diff_stats(z, z.copy()).cosine == 1.0  # both zero: the same direction, by convention
  assert arraydiff.diff_stats(z, np.ones(4, np.float32)).cosine == 0.0
  assert arraydiff.diff_stats(np.ones(4, np.float32), z).cosine == 0.0


def test_top_k_zero_keeps_no_divergence():
  a = np.arange(6, dtype=np.float32)
  s = arraydiff.diff_stats(a, a + 1, top_k=0)
  assert s.top_k == () and s.n_diff == 6 and s.max_abs_index == (0,)


def test_top_divergences_in_json_and_the_summary_line():
  a = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  b = a.copy()
  b[2] = 3.5
  s = arraydiff.diff_stats(a, b, top_k=3)
  (top,) = s.to_dict()["top_k"]
  assert top == {"index": [2], "a": 3.0, "b": 3.5, "abs_diff": 0.5, "a_bits": "0x40400000", "b_bits": "0x40600000"}
  assert arraydiff.DiffStats.from_dict(s.to_dict()) == s
  line = s.summary()
  assert "\n" not in line and line.startswith("1/4 differ (0.25); max|diff|=0.5 at [2];") and "max_ulp=" in line
  assert arraydiff.diff_stats(a, a.copy()).summary() == "bit-identical"


def test_a_width_without_an_integer_view_is_refused_in_one_line():
  """x87 long double (12 or 16 bytes where it exists; float64 elsewhere) has no integer view for bits and ULPs."""
  a = np.zeros(3, dtype=np.longdouble)
  if a.dtype.itemsize == 8:
    pytest.skip("long double is binary64 on this platform")
  with pytest.raises(ComparisonError, match=r"x: unsupported dtype .* for element-wise statistics") as e:
    arraydiff.diff_stats(a, a.copy(), name="x")
  assert "\n" not in str(e.value)


def test_ulp_distance_refuses_mismatched_arrays_in_one_line():
  a = np.zeros(3, np.float32)
  with pytest.raises(ComparisonError, match="shape mismatch"):
    arraydiff.ulp_distance(a, np.zeros(4, np.float32))
  with pytest.raises(ComparisonError, match="dtype mismatch"):
    arraydiff.ulp_distance(a, np.zeros(3, np.float64))
  with pytest.raises(ComparisonError, match="floating dtypes"):
    arraydiff.ulp_distance(np.zeros(3, np.int32), np.zeros(3, np.int32))


def test_top_k_defaults_to_the_ten_largest_differences():
  """Without ``top_k``, a comparison keeps the 10 largest divergences (the reports show these), largest first."""
  a = np.zeros(12, np.float32)
  b = np.arange(1, 13, dtype=np.float32)  # every element differs, by 1..12
  want = [(i,) for i in range(11, 1, -1)]  # the ten largest: indices 11 down to 2
  assert [t.index for t in arraydiff.diff_stats(a, b).top_k] == want
  acc = arraydiff.DiffAccumulator(a.shape, a.dtype)
  acc.update(a, b)
  assert [t.index for t in acc.result().top_k] == want
