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
