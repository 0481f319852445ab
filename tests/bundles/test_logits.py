"""Logits: per-token KL, argmax agreement and top-k overlap against plain numpy computations."""

import math

import numpy as np
import pytest

from parity_jax.bundles.logits import log_softmax64, logits_stats


def _kl_naive(a, b):
  """KL(softmax(a) || softmax(b)) per row, straight from the definition (fine for moderate logits)."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
  q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
  return (p * np.log(p / q)).sum(-1)


def _topk_overlap_naive(a, b, k):
  out = []
  for ra, rb in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
    sa = set(np.argsort(-ra, kind="stable")[:k].tolist())
    sb = set(np.argsort(-rb, kind="stable")[:k].tolist())
    out.append(len(sa & sb) / k)
  return np.array(out)


def test_against_numpy_definitions():
  rng = np.random.default_rng(0)
  a = (rng.standard_normal((2, 7, 40)) * 3).astype(np.float32)
  b = (a + rng.standard_normal(a.shape) * 0.8).astype(np.float32)
  st = logits_stats(a, b, topk=5)
  kl = _kl_naive(a, b).reshape(-1)
  assert st.n_tokens == 14 and st.vocab == 40
  assert st.kl_max == pytest.approx(kl.max(), rel=1e-9)
  assert st.kl_mean == pytest.approx(kl.mean(), rel=1e-9)
  assert st.kl_argmax_index == tuple(int(i) for i in np.unravel_index(kl.argmax(), (2, 7)))
  agree = (a.argmax(-1) == b.argmax(-1)).reshape(-1)
  assert st.argmax_agree == agree.sum() and 0 < st.argmax_agree < 14  # the fixture has both cases
  assert st.argmax_agreement == pytest.approx(agree.mean())
  assert st.disagree_index == tuple(int(i) for i in np.unravel_index(np.flatnonzero(~agree)[0], (2, 7)))
  ov = _topk_overlap_naive(a, b, 5)
  assert st.topk_overlap_mean == pytest.approx(ov.mean()) and st.topk_overlap_min == pytest.approx(ov.min())
  assert st.topk_overlap_min < 1.0


@pytest.mark.parametrize("chunk", [40, 41, 120])  # a row per chunk, a row per chunk (floor), three rows per chunk
def test_rows_computed_in_chunks_give_the_numpy_definitions(monkeypatch, chunk):
  from parity_jax.bundles import logits

  monkeypatch.setattr(logits, "CHUNK_ELEMENTS", chunk)  # the chunk size: any value gives the same figures
  rng = np.random.default_rng(1)
  a = (rng.standard_normal((2, 7, 40)) * 3).astype(np.float32)
  b = (a + rng.standard_normal(a.shape) * 0.8).astype(np.float32)
  st = logits_stats(a, b, topk=3)
  kl = _kl_naive(a, b).reshape(-1)
  assert st.kl_max == pytest.approx(kl.max(), rel=1e-9) and st.kl_mean == pytest.approx(kl.mean(), rel=1e-9)
  assert st.argmax_agree == (a.argmax(-1) == b.argmax(-1)).sum()
  assert st.topk_overlap_mean == pytest.approx(_topk_overlap_naive(a, b, 3).mean())


def test_identical_logits():
  a = np.random.default_rng(1).standard_normal((3, 11)).astype(np.float32)
  st = logits_stats(a, a.copy(), topk=4)
  assert st.kl_max == 0.0 and st.kl_mean == 0.0
  assert st.argmax_agree == 3 and st.disagree_index is None
  assert st.topk_overlap_min == 1.0


def test_large_logits_are_stable():
  """exp(1e4) overflows; log-sum-exp must not. KL is shift-invariant per token."""
  rng = np.random.default_rng(2)
  a = rng.standard_normal((4, 30))
  b = a + rng.standard_normal(a.shape) * 0.3
  ref = _kl_naive(a, b)
  big = logits_stats(a + 1e4, b - 2e4)
  assert math.isfinite(big.kl_max)
  assert big.kl_max == pytest.approx(ref.max(), rel=1e-6)
  assert big.kl_mean == pytest.approx(ref.mean(), rel=1e-6)
  ls = log_softmax64(np.array([[1e4, 0.0, -1e4]]))
  assert ls[0, 0] == pytest.approx(0.0, abs=1e-12) and ls[0, 1] == pytest.approx(-1e4)


def test_masked_and_broken_logits():
  a = np.array([[0.0, 1.0, -np.inf], [0.0, 1.0, 2.0]])
  b = np.array([[0.5, 1.0, -np.inf], [0.0, 1.0, 2.0]])
  st = logits_stats(a, b)
  assert st.kl_max == pytest.approx(_kl_naive(a[:1, :2], b[:1, :2])[0])  # the masked token contributes nothing
  # the candidate puts zero mass where the golden has some: infinite KL
  assert math.isinf(logits_stats(a[1:], np.array([[0.0, 1.0, -np.inf]])).kl_max)
  # a NaN logit makes KL undefined: it is reported as the worst case, never as 0
  st = logits_stats(a[1:], np.array([[0.0, np.nan, 2.0]]))
  assert math.isinf(st.kl_max) or math.isnan(st.kl_max)


def test_topk_larger_than_vocab_and_float16():
  a = np.array([[3.0, 1.0, 2.0]], np.float16)
  st = logits_stats(a, a[:, ::-1].copy(), topk=10)
  assert st.topk == 3 and st.topk_overlap_mean == 1.0 and st.argmax_agree == 0


# ------------------------------------------------------------------------------------------------------------------
# +inf logits and NaN in the KL mean (issue 16 section 3): an undefined distribution is never a harmless 0.
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["golden", "candidate"])
def test_a_plus_inf_logit_makes_that_tokens_kl_undefined(side):
  a = np.array([[0.0, 1.0, 2.0], [0.5, 0.0, -1.0], [1.0, 2.0, 3.0]])
  b = a + np.array([[0.0, 0.1, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.2]])
  broken = (a if side == "golden" else b).copy()
  broken[1, 0] = np.inf
  a2, b2 = (broken, b) if side == "golden" else (a, broken)
  st = logits_stats(a2, b2)
  assert st.kl_max == math.inf and st.kl_argmax_index == (1,)  # the undefined token is the worst one
  assert math.isnan(st.kl_mean)
  # the other tokens' KL is unchanged: only token 1 is undefined
  others = _kl_naive(a[[0, 2]], b[[0, 2]])
  assert logits_stats(a2[[0, 2]], b2[[0, 2]]).kl_max == pytest.approx(others.max(), rel=1e-12)


def test_minus_inf_is_a_mask_and_plus_inf_is_not():
  a = np.array([[0.0, 1.0, -np.inf]])
  assert math.isfinite(logits_stats(a, a.copy()).kl_mean)
  assert math.isnan(logits_stats(np.array([[0.0, 1.0, np.inf]]), np.array([[0.0, 1.0, np.inf]])).kl_mean)
  # +inf in the candidate where the golden is masked (or its probability underflows to 0): the candidate's
  # distribution is undefined, so KL is NaN, not the +inf that the other entries' terms would add up to
  for golden_row in ([0.0, 1.0, -np.inf], [0.0, 1.0, -1e4]):
    st = logits_stats(np.array([golden_row]), np.array([[0.0, 1.0, np.inf]]))
    assert math.isnan(st.kl_mean) and st.kl_max == math.inf


def test_nan_in_one_token_makes_the_kl_mean_nan_and_it_survives_json():
  from parity_jax.bundles.logits import LogitsStats

  a = np.random.default_rng(3).standard_normal((4, 9))
  b = a.copy()
  b[2, 5] = np.nan
  st = logits_stats(a, b)
  assert math.isnan(st.kl_mean) and st.kl_max == math.inf and st.kl_argmax_index == (2,)
  d = st.to_dict()
  assert d["kl_mean"] == "nan" and d["kl_max"] == "inf"
  back = LogitsStats.from_dict(d)
  assert math.isnan(back.kl_mean) and back.kl_max == math.inf


def test_a_nan_kl_mean_breaches_the_kl_mean_rule():
  from parity_jax.arraydiff import diff_stats
  from parity_jax.bundles import ToleranceRule
  from parity_jax.bundles.diff import check_rule
  from parity_jax.bundles.logits import LogitsStats

  a = np.zeros((2, 3), np.float32)
  st = diff_stats(a, a.copy())
  rule = ToleranceRule(stages=".*", max_mean_kl=0.01)
  lg = LogitsStats(2, 3, 0.0, math.nan, (0,), 2, 3, 1.0, 1.0, None)  # only the mean is NaN
  assert [(b.metric, math.isnan(b.value), b.limit) for b in check_rule(rule, st, lg)] == [("kl_mean", True, 0.01)]
  ok = LogitsStats(2, 3, 0.0, 0.01, (0,), 2, 3, 1.0, 1.0, None)  # exactly at the limit: inclusive
  assert check_rule(rule, st, ok) == ()


def test_topk_overlap_uses_the_top_5_by_default():
  """Golden logits 0..9 (top 5: ids 5-9); the candidate swaps ids 4 and 5, so one of five leaves the top 5.

  Within the top 6 both sides hold ids 4-9: a default other than 5 would show full overlap.
  """
  golden = np.arange(10, dtype=np.float32)[None]
  candidate = golden.copy()
  candidate[0, [4, 5]] = candidate[0, [5, 4]]
  s = logits_stats(golden, candidate)
  assert s.topk == 5 and s.topk_overlap_mean == s.topk_overlap_min == 4 / 5
  assert logits_stats(golden, candidate, topk=6).topk_overlap_min == 1.0
