"""Many small pairs, read whole in batches (:class:`SmallPairs`)."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from parity_jax.checkpoint.formats.base import Checkpoint, LeafMeta
from parity_jax.checkpoint.stream.buffers import as_bytes, bytes_equal
from parity_jax.checkpoint.stream.pair import PairOutcome
from parity_jax.checkpoint.stream.readers import settle
from parity_jax.dtypes import c_contiguous

__all__ = ["SMALL_BATCH_BYTES", "SMALL_LEAF_BYTES", "SmallPairs"]


SMALL_LEAF_BYTES = 1 << 20  # a pair whose leaves are both at most this big is read whole, in batches
SMALL_BATCH_BYTES = 512 << 10  # bytes of one batch (both sides; at least one pair); two batches are in flight at most


class SmallPairs:
  """Small leaf pairs read whole, a batch at a time and one batch ahead, then compared and hashed in order.

  Thousands of small leaves (per-layer parameters x optimizer moments) cost
  next to nothing to read each; what costs is everything per read. Here the
  leaves of a batch (up to :data:`SMALL_BATCH_BYTES` of both sides) are read
  concurrently through each checkpoint's already-open handles in its one
  shared context, while the previous batch is compared, so tensorstore
  decodes on every core. Memory: two batches, plus the decode transients of
  the leaves being read.

  :meth:`take` returns the :class:`PairOutcome` of a bit-identical pair (one
  sha256 serves both sides). A pair that differs or fails to read gives
  ``None``: the caller streams it the ordinary way, which computes both
  hashes, the difference statistics, or the read error.
  """

  def __init__(
      self,
      src_ckpt: Checkpoint,
      mig_ckpt: Checkpoint,
      pairs: Sequence[tuple[LeafMeta, LeafMeta]],
      *,
      leaf_bytes: int = SMALL_LEAF_BYTES,
      batch_bytes: int = SMALL_BATCH_BYTES,
  ):
    self.src_ckpt, self.mig_ckpt = src_ckpt, mig_ckpt
    self._batches: list[list[tuple[LeafMeta, LeafMeta]]] = []
    self._where: dict[tuple[str, str], tuple[int, int]] = {}
    batch: list[tuple[LeafMeta, LeafMeta]] = []
    acc = 0
    for s, m in pairs:
      if not (s.streamable and m.streamable and s.dtype == m.dtype and s.nbytes == m.nbytes and s.nbytes <= leaf_bytes):
        continue
      if batch and acc + 2 * s.nbytes > batch_bytes:
        self._batches.append(batch)
        batch, acc = [], 0
      self._where[(s.path, m.path)] = (len(self._batches), len(batch))
      batch.append((s, m))
      acc += 2 * s.nbytes
    if batch:
      self._batches.append(batch)
    self._reads: dict[int, list[tuple[Any, Any]]] = {}

  def __contains__(self, pair: tuple[str, str]) -> bool:
    return pair in self._where

  def __len__(self) -> int:
    return len(self._where)

  def describe(self, source: str, dest: str) -> str:
    b, _ = self._where[(source, dest)]
    return f"small: whole leaves read in a batch of {len(self._batches[b])} pairs; sha256 inline"

  def _issue(self, b: int) -> None:
    if b >= len(self._batches) or b in self._reads:
      return
    reads = []
    for s, m in self._batches[b]:
      futs = []
      for ck, meta in ((self.src_ckpt, s), (self.mig_ckpt, m)):
        try:
          futs.append(ck.read_whole_async(meta))
        except Exception as e:  # noqa: BLE001 -- reported by the ordinary path, which reads it again
          futs.append(e)
      reads.append((futs[0], futs[1]))
    self._reads[b] = reads

  def take(self, source: LeafMeta, dest: LeafMeta) -> PairOutcome | None:
    where = self._where.get((source.path, dest.path))
    if where is None:
      return None
    b, i = where
    for old in [k for k in self._reads if k < b]:  # batches behind us: drop them (and wait for any stray read)
      for fa, fb in self._reads.pop(old):
        for f in (fa, fb):
          settle(None if isinstance(f, Exception) else f)
    self._issue(b)
    self._issue(b + 1)
    fa, fb = self._reads[b][i]
    self._reads[b][i] = (None, None)
    try:
      if isinstance(fa, Exception) or isinstance(fb, Exception) or fa is None or fb is None:
        return None
      a, c = np.asarray(fa.result()), np.asarray(fb.result())
    except Exception:  # noqa: BLE001 -- see the class docstring
      return None
    if not bytes_equal(a, c):
      return None
    digest = hashlib.sha256(as_bytes(c_contiguous(a))).hexdigest()
    return PairOutcome(True, digest, digest)

  def close(self) -> None:
    for reads in self._reads.values():
      for fa, fb in reads:
        for f in (fa, fb):
          if f is not None and not isinstance(f, Exception):
            settle(f)
    self._reads.clear()
