"""Streaming one pair in pieces: the first pass (compare and hash), and the second pass of a differing pair."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

from parity_jax import arraydiff
from parity_jax.checkpoint.formats.base import Checkpoint, LeafMeta
from parity_jax.checkpoint.stream.buffers import Buffers, as_bytes, bytes_equal, view
from parity_jax.checkpoint.stream.hashing import BackgroundHash, HashPipeline
from parity_jax.checkpoint.stream.plan import KEPT_PIECES, PairPlan, Piece, pieces_of
from parity_jax.checkpoint.stream.readers import SPILL_PREFIX, SideReader, SpillReader
from parity_jax.errors import UsageError

__all__ = ["PairOutcome", "PairStreamer"]


@dataclasses.dataclass
class PairOutcome:
  equal: bool
  source_sha256: str
  sha256: str  # the migrated leaf's
  diff: arraydiff.DiffStats | None = None
  diff_error: str | None = None


class PairStreamer:
  """Streams one pair according to a :class:`PairPlan`; :meth:`run` gives the :class:`PairOutcome`.

  ``piece_range`` = (i, j) streams only pieces i..j-1 (a C-order byte range
  of the leaf, for a job that splits the leaf across processes): the hashes
  then cover that range only, continuing whatever state ``new_hash`` returns
  (the first-pass hashers are made by ``new_hash``; default ``hashlib.sha256``).
  """

  def __init__(
      self,
      src_ckpt: Checkpoint,
      mig_ckpt: Checkpoint,
      src: LeafMeta,
      mig: LeafMeta,
      r: tuple[int, ...],
      plan: PairPlan,
      buffers: Buffers,
      *,
      spill_dir: str,
      on_bytes: Callable[[int], None] = lambda n: None,
      on_compared: Callable[[int], None] = lambda n: None,
      piece_range: tuple[int, int] | None = None,
      new_hash: Callable[[], Any] = hashlib.sha256,
  ):
    self.src_ckpt, self.mig_ckpt, self.src, self.mig, self.r = src_ckpt, mig_ckpt, src, mig, r
    self.plan, self.buffers, self.spill_dir, self.on_bytes = plan, buffers, spill_dir, on_bytes
    self.on_compared = on_compared  # bytes of one side found equal in the first pass (progress)
    self.dtype = mig.dtype
    self.pieces = pieces_of(src, mig, r, plan.slabs)
    if piece_range is not None:
      self.pieces = self.pieces[piece_range[0] : piece_range[1]]
    self.new_hash = new_hash
    # bytes reported through on_bytes (the second pass reports only what the first did not), counted from the
    # first streamed piece
    self._counted = 0
    self._skip = self.pieces[0].flat_lo * self.dtype.itemsize if self.pieces else 0

  # -- building blocks --

  def _through(self, p: Piece) -> int:
    """Bytes of one side from the first streamed piece through ``p``."""
    return p.flat_hi * self.dtype.itemsize - self._skip

  def _count(self, upto: int) -> None:
    if upto > self._counted:
      self.on_bytes(upto - self._counted)
      self._counted = upto

  def _pairs(
      self, spill_file=None, hasher: HashPipeline | None = None, kept: BackgroundHash | None = None
  ) -> Iterator[tuple[int, np.ndarray, np.ndarray, Piece]]:
    """(pool index, source piece, migrated piece, piece) in C order; both reads of a piece run concurrently.

    With a ``hasher``, each source piece goes into a pool buffer taken from
    it; the caller must ``submit`` or ``release`` that buffer. With ``kept``
    (a background hash of the migrated side keeping its pieces), migrated
    pieces come from there instead of a second read.
    """
    if kept is not None:
      yield from self._pairs_kept(kept)
      return
    mig_reader = SideReader(self.mig_ckpt, self.mig, self.plan.mig, self.pieces, lambda p: p.mig_box)
    src_reader = (
        None
        if spill_file is not None
        else SideReader(self.src_ckpt, self.src, self.plan.src, self.pieces, lambda p: p.src_box)
    )
    spill = SpillReader(spill_file, self.dtype.itemsize) if spill_file is not None else None
    try:
      for i, p in enumerate(self.pieces):
        slot = hasher.acquire() if hasher is not None else 0
        va = view(self.buffers.pool(slot), p.shape(p.src_box), self.dtype)
        vb = view(self.buffers.b, p.shape(p.mig_box), self.dtype)
        errors = []
        tokens = []
        try:
          tokens.append((mig_reader, mig_reader.start(i, vb)))
          if spill is not None:
            spill.start(i, va, p)
          else:
            tokens.append((src_reader, src_reader.start(i, va)))
        except Exception as e:  # noqa: BLE001 -- wait for the reads already started before raising
          errors.append(e)
        for reader, token in tokens:
          try:
            reader.wait(token)
          except Exception as e:  # noqa: BLE001 -- every started read is waited for before any error is raised
            errors.append(e)
        if errors:
          if hasher is not None:
            hasher.release(slot)
          raise errors[0]
        yield slot, va, vb, p
    finally:
      mig_reader.close()
      if src_reader is not None:
        src_reader.close()

  def _pairs_kept(self, kept: BackgroundHash) -> Iterator[tuple[int, np.ndarray, np.ndarray, Piece]]:
    src_reader = SideReader(self.src_ckpt, self.src, self.plan.src, self.pieces, lambda p: p.src_box)
    try:
      for i, p in enumerate(self.pieces):
        va = view(self.buffers.pool(0), p.shape(p.src_box), self.dtype)
        src_reader.wait(src_reader.start(i, va))
        yield 0, va, kept.piece(i), p
    finally:
      src_reader.close()

  def _spill(self, hasher: HashPipeline | None) -> tuple[Any, str]:
    """Streams the source leaf into a temporary file; returns (file, sha256 of the source)."""
    try:
      f = tempfile.TemporaryFile(dir=self.spill_dir, prefix=SPILL_PREFIX)
    except OSError as e:
      raise UsageError(f"cannot create a spill file in {self.spill_dir}: {e}") from None
    h = self.new_hash() if hasher is None else None
    try:
      f.seek(self._skip)  # a byte range of the leaf sits at its own offsets (pieces are read back by them)
      reader = SideReader(self.src_ckpt, self.src, self.plan.src, self.pieces, lambda p: p.src_box)
      try:
        for i, p in enumerate(self.pieces):
          slot = hasher.acquire() if hasher is not None else 0
          va = view(self.buffers.pool(slot), p.shape(p.src_box), self.dtype)
          try:
            reader.wait(reader.start(i, va))
            try:
              f.write(as_bytes(va))
            except OSError as e:  # e.g. no space left
              raise UsageError(f"cannot write the spill file in {self.spill_dir}: {e}") from None
          except BaseException:
            if hasher is not None:
              hasher.release(slot)
            raise
          if hasher is not None:
            hasher.submit(slot, va.nbytes)
          else:
            h.update(as_bytes(va))
          self._count(self._through(p))
      finally:
        reader.close()
      f.flush()
      return f, (hasher.finish() if hasher is not None else h.hexdigest())
    except BaseException:
      f.close()
      raise

  # -- the passes --

  def run(self, top_k: int = 10, second_pass: bool = True) -> PairOutcome:
    """First pass: compare (stop at the first difference) and hash one side; a differing pair gets a second pass.

    Without ``second_pass`` a differing pair returns at once (no hashes, no statistics).
    """
    spill_file = None
    hasher = background = None
    name = self.mig.path
    try:
      base, digest = 0, None
      if self.plan.spill:
        hasher = HashPipeline(self.buffers, name, self.new_hash) if self.plan.hash_mode == "pipelined" else None
        spill_file, digest = self._spill(hasher)
        hasher = None
        base = self._through(self.pieces[-1])  # the spill pass reported the source bytes
      h_inline = background = kept = None
      if digest is None:
        if self.plan.hash_mode == "pipelined":
          hasher = HashPipeline(self.buffers, name, self.new_hash)
        elif self.plan.hash_mode in ("source", "migrated"):
          meta, ckpt, box_of = (
              (self.mig, self.mig_ckpt, lambda p: p.mig_box)
              if self.plan.hash_mode == "migrated"
              else (self.src, self.src_ckpt, lambda p: p.src_box)
          )
          # A migrated leaf of at most two pieces stays in the two buffers the thread and the migrated pieces
          # would use anyway, and the comparison takes it from there: one read of it instead of two.
          keep = [self.buffers.b, self.buffers.h][:KEPT_PIECES] if self.plan.hash_mode == "migrated" else None
          background = BackgroundHash(
              ckpt, meta, [box_of(p) for p in self.pieces], self.buffers.h, self.new_hash, keep=keep
          )
          if background.keep is not None:
            kept = background
        else:
          h_inline = self.new_hash()
      sides = 1 if spill_file is not None else 2
      equal = True
      pairs = contextlib.closing(self._pairs(spill_file, hasher, kept))
      with pairs as it:
        for slot, a, b, p in it:
          if not bytes_equal(a, b):
            equal = False
            if hasher is not None:
              hasher.release(slot)
            break
          if hasher is not None:
            hasher.submit(slot, a.nbytes)  # equal bytes: the source's hash is the migrated leaf's too
          elif h_inline is not None:
            h_inline.update(as_bytes(a))
          self._count(base + sides * self._through(p))
          self.on_compared(a.nbytes)
      if equal:
        if hasher is not None:
          digest = hasher.finish()
          hasher = None
        elif background is not None:
          digest = background.finish()
          background = None
        elif h_inline is not None:
          digest = h_inline.hexdigest()
        return PairOutcome(True, digest, digest)
      for t in (hasher, background):
        if t is not None:
          t.stop()
      hasher = background = None
      if not second_pass:
        return PairOutcome(False, "", "", None, "second pass not run")
      return self._second_pass(spill_file, base, sides, top_k)
    finally:
      for t in (hasher, background):
        if t is not None:
          t.stop()
      if spill_file is not None:
        spill_file.close()

  def _second_pass(self, spill_file, base: int, sides: int, top_k: int) -> PairOutcome:
    """Both hashes and the difference statistics, piece by piece, in the migrated leaf's coordinates."""
    h_src, h_mig = hashlib.sha256(), hashlib.sha256()
    acc: arraydiff.DiffAccumulator | None = None
    err = None
    try:
      acc = arraydiff.DiffAccumulator(self.mig.shape, self.dtype, top_k=top_k)
    except arraydiff.ComparisonError as e:
      err = str(e)
    for _, a, b, p in self._pairs(spill_file):
      h_src.update(as_bytes(a))
      h_mig.update(as_bytes(b))
      if acc is not None:
        try:
          acc.update(a.reshape(b.shape), b, origin=tuple(s.start for s in p.mig_box))
        except arraydiff.ComparisonError as e:
          acc, err = None, str(e)
      self._count(base + sides * self._through(p))
    diff = acc.result() if acc is not None else None
    return PairOutcome(False, h_src.hexdigest(), h_mig.hexdigest(), diff, err)
