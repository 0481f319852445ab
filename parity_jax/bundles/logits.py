"""Distribution-level comparison of logits: per-token KL, argmax agreement, top-k overlap.

Element-wise statistics say how far the logits moved; these say whether the
model still *predicts* the same thing. Every token (all leading axes; the last
axis is the vocabulary) is compared on its own, in float64, with a
log-sum-exp-stable log-softmax, chunk by chunk so that a ``[B, T, 151936]``
logits tensor never needs more than a bounded float64 working set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from parity_jax import jsonio
from parity_jax.arraydiff import as_numpy, check_comparable

__all__ = ["LogitsStats", "log_softmax64", "logits_stats"]

# float64 working set per chunk: 8 MiB per array. Any value gives the same figures (test_logits: 1- and 3-row chunks).
CHUNK_ELEMENTS = 1 << 20  # no mutate: a memory bound only


def log_softmax64(x: np.ndarray) -> np.ndarray:
  """log-softmax over the last axis in float64, stable for large logits and -inf entries."""
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)  # all -inf (or inf/nan) rows: keep the nan/inf visible below
  z = x - m
  with np.errstate(divide="ignore"):
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class LogitsStats:
  """Per-token comparison of golden (p) against candidate (q) distributions."""

  n_tokens: int
  vocab: int
  kl_max: float  # max over tokens of KL(p || q), nats
  kl_mean: float
  kl_argmax_index: tuple[int, ...]  # token (leading-axes index) with the largest KL
  argmax_agree: int  # tokens whose argmax is the same
  topk: int
  topk_overlap_mean: float  # mean over tokens of |top-k(p) & top-k(q)| / k
  topk_overlap_min: float
  disagree_index: tuple[int, ...] | None  # first token whose argmax differs

  @property
  def argmax_agreement(self) -> float:
    return self.argmax_agree / self.n_tokens if self.n_tokens else 1.0

  def to_dict(self) -> dict[str, Any]:
    return {
        "n_tokens": self.n_tokens,
        "vocab": self.vocab,
        "kl_max": jsonio.num(float(self.kl_max)),
        "kl_mean": jsonio.num(float(self.kl_mean)),
        "kl_argmax_index": list(self.kl_argmax_index),
        "argmax_agree": self.argmax_agree,
        "argmax_agreement": self.argmax_agreement,
        "topk": self.topk,
        "topk_overlap_mean": self.topk_overlap_mean,
        "topk_overlap_min": self.topk_overlap_min,
        "disagree_index": None if self.disagree_index is None else list(self.disagree_index),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LogitsStats":
    return cls(
        n_tokens=int(d["n_tokens"]),
        vocab=int(d["vocab"]),
        kl_max=float(jsonio.from_jsonable(d["kl_max"])),
        kl_mean=float(jsonio.from_jsonable(d["kl_mean"])),
        kl_argmax_index=tuple(d["kl_argmax_index"]),
        argmax_agree=int(d["argmax_agree"]),
        topk=int(d["topk"]),
        topk_overlap_mean=float(d["topk_overlap_mean"]),
        topk_overlap_min=float(d["topk_overlap_min"]),
        disagree_index=None if d.get("disagree_index") is None else tuple(d["disagree_index"]),
    )

  def summary(self) -> str:
    return (
        f"KL max {self.kl_max:.3g} (token {list(self.kl_argmax_index)}) mean {self.kl_mean:.3g};"
        f" argmax agree {self.argmax_agree}/{self.n_tokens} ({100 * self.argmax_agreement:.1f}%);"
        f" top-{self.topk} overlap mean {self.topk_overlap_mean:.3f} min {self.topk_overlap_min:.3f}"
    )


def _kl_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """KL(softmax(a) || softmax(b)) per row, float64. Terms with p == 0 contribute 0."""
  la, lb = log_softmax64(a), log_softmax64(b)
  p = np.exp(la)
  with np.errstate(invalid="ignore"):
    terms = np.where(p > 0, p * (la - lb), 0.0)
  kl = terms.sum(axis=-1)
  # A NaN or +inf logit makes the distribution undefined: report NaN, never a harmless-looking 0.
  undefined = (np.isnan(a) | np.isnan(b) | np.isposinf(a) | np.isposinf(b)).any(axis=-1)
  undefined |= ~np.isfinite(np.max(a, axis=-1))  # all -inf row
  kl[undefined] = np.nan
  return kl


def _topk_sets(x: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest entries per row (as a set: order inside the k is irrelevant)."""
  if k >= x.shape[-1]:
    return np.broadcast_to(np.arange(x.shape[-1]), x.shape[:-1] + (x.shape[-1],))
  return np.argpartition(-x.astype(np.float64), k - 1, axis=-1)[..., :k]


def logits_stats(golden: Any, candidate: Any, topk: int = 5) -> LogitsStats:
  """Per-token KL(golden||candidate) max/mean, argmax agreement and top-k overlap.

  The last axis is the vocabulary; every other axis indexes tokens. Works for
  any float dtype (computed in float64); shapes must match.
  """
  a, b = as_numpy(golden), as_numpy(candidate)
  check_comparable(a, b, "logits")
  if a.ndim < 1 or a.shape[-1] == 0:
    raise ValueError("logits need a non-empty vocabulary axis")
  vocab = a.shape[-1]
  lead = a.shape[:-1]
  n = int(np.prod(lead)) if lead else 1
  a2, b2 = a.reshape(n, vocab), b.reshape(n, vocab)
  k = min(int(topk), vocab)
  rows = max(1, CHUNK_ELEMENTS // vocab)
  kl = np.empty(n, np.float64)
  agree = np.empty(n, bool)
  overlap = np.empty(n, np.float64)
  for s in range(0, n, rows):
    ca, cb = a2[s : s + rows].astype(np.float64), b2[s : s + rows].astype(np.float64)
    kl[s : s + rows] = _kl_rows(ca, cb)
    agree[s : s + rows] = np.argmax(ca, axis=-1) == np.argmax(cb, axis=-1)
    ta, tb = _topk_sets(ca, k), _topk_sets(cb, k)
    overlap[s : s + rows] = (ta[:, :, None] == tb[:, None, :]).any(axis=-1).sum(axis=-1) / k
  # NaN KL (a NaN logit on either side) must not hide behind nanmax: it is the worst case.
  kl_for_max = np.where(np.isnan(kl), np.inf, kl)
  worst = int(np.argmax(kl_for_max)) if n else 0
  disagree = np.flatnonzero(~agree)
  unravel = (lambda i: tuple(int(v) for v in np.unravel_index(i, lead))) if lead else (lambda i: ())
  return LogitsStats(
      n_tokens=n,
      vocab=vocab,
      kl_max=float(kl_for_max[worst]) if n else 0.0,
      kl_mean=float(np.mean(kl)) if n else 0.0,
      kl_argmax_index=unravel(worst) if n else (),
      argmax_agree=int(agree.sum()),
      topk=k,
      topk_overlap_mean=float(overlap.mean()) if n else 1.0,
      topk_overlap_min=float(overlap.min()) if n else 1.0,
      disagree_index=unravel(int(disagree[0])) if disagree.size else None,
  )
