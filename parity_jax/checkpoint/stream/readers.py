"""Reading the pieces of one side into caller buffers, following its :class:`~.plan.SidePlan`; the spill file."""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from parity_jax.checkpoint.formats.base import Checkpoint, LeafMeta, LeafReader
from parity_jax.checkpoint.stream.buffers import as_bytes
from parity_jax.checkpoint.stream.plan import Piece, SidePlan
from parity_jax.errors import UsageError

__all__ = ["SPILL_PREFIX", "SideReader", "SpillReader", "settle"]

SPILL_PREFIX = "parity_jax_verify_spill_"


def settle(fut) -> None:
  """Waits for a warm-up read; its errors are reported by the real read of the same piece."""
  if fut is not None:
    try:
      fut.result()
    except Exception:  # noqa: BLE001 -- see above
      pass


class SideReader:
  """Reads pieces of one side into caller buffers following a :class:`SidePlan`.

  In ``rows`` mode with ``reopen``, a *switch* is a piece that starts beyond
  every row read so far: there the reader is reopened (dropping the rows
  already compared) before the new row is decoded. With ``readahead`` = N,
  the next N switch rows are being decoded by readers of their own (each
  warmed up by reading its first piece), and at most N decodes run at once.
  """

  def __init__(
      self, ckpt: Checkpoint, meta: LeafMeta, plan: SidePlan, pieces: list[Piece], box_of: Callable[[Piece], tuple]
  ):
    self.ckpt, self.meta, self.plan, self.pieces, self.box_of = ckpt, meta, plan, pieces, box_of
    self._reader: LeafReader | None = None
    self._last_row = -1
    self._prefetched: Any = None  # the warm-up read of the current reader, if it came from read-ahead
    self._ahead: list[list] = []  # [switch piece index, reader, warm-up future or None], in order
    self._switches: list[int] = []
    if plan.mode == "rows" and plan.readahead:
      top = -1
      for j, p in enumerate(pieces):
        first, last = self._rows(p)
        if first > top:
          self._switches.append(j)
        top = max(top, last)
    self._switch_pos = {j: k for k, j in enumerate(self._switches)}

  def _open(self) -> LeafReader:
    return self.ckpt.reader(self.meta, self.plan.cache_bytes).open()

  def _rows(self, p: Piece) -> tuple[int, int]:
    e = max(1, self.plan.row_elems)
    return p.flat_lo // e, max(p.flat_lo, p.flat_hi - 1) // e

  def start(self, i: int, out: np.ndarray):
    """Starts reading piece ``i`` into ``out``; returns what :meth:`wait` takes."""
    p = self.pieces[i]
    if self.plan.mode == "rows":
      first, last = self._rows(p)
      if self._reader is None or (self.plan.reopen and first > self._last_row):
        self._release_current()  # drop the rows already compared before the next one is decoded
        if self._ahead and self._ahead[0][0] == i:
          _, self._reader, self._prefetched = self._ahead.pop(0)
        else:
          self._drop_ahead()
          self._reader = self._open()
        self._last_row = last
        if self.plan.readahead and i in self._switch_pos:
          self._fill_ahead(self._switch_pos[i])
      self._last_row = max(self._last_row, last)
    elif self._reader is None:
      self._reader = self._open()
    return self._reader, self._reader.read_into_async(self.box_of(p), out)

  def _fill_ahead(self, k: int) -> None:
    """Keeps the rows of the next ``readahead`` switches decoding, at most ``readahead`` decodes at once."""
    n = self.plan.readahead
    for j in self._switches[k + 1 : k + 1 + n]:
      if any(a[0] == j for a in self._ahead):
        continue
      while sum(f is not None for f in [self._prefetched] + [a[2] for a in self._ahead]) >= n:
        if self._prefetched is not None:  # oldest first: the current row, then the queue
          settle(self._prefetched)
          self._prefetched = None
        else:
          a = next(a for a in self._ahead if a[2] is not None)
          settle(a[2])  # no mutate: memory only (bounds the decodes in flight); each piece is read by its own read
          a[2] = None
      reader = self._open()
      self._ahead.append([j, reader, reader.read_async(self.box_of(self.pieces[j]))])

  def _drop_ahead(self) -> None:
    while self._ahead:
      _, reader, fut = self._ahead.pop(0)
      settle(fut)  # never close a reader under a running read
      reader.close()

  @staticmethod
  def wait(token) -> None:
    reader, fut = token
    reader.wait(fut)

  def _release_current(self) -> None:
    settle(self._prefetched)  # never close a reader under a running read
    self._prefetched = None
    if self._reader is not None:
      self._reader.close()
      self._reader = None

  def close(self) -> None:
    self._drop_ahead()
    self._release_current()


class SpillReader:
  """Reads source pieces back from the spill file (pread: nothing is mapped)."""

  def __init__(self, f, itemsize: int):
    self.f, self.itemsize = f, itemsize

  def start(self, i: int, out: np.ndarray, piece: Piece):
    mv = as_bytes(out)
    off = piece.flat_lo * self.itemsize
    got = 0
    try:
      while got < len(mv):
        k = os.preadv(self.f.fileno(), [mv[got:]], off + got)
        if k <= 0:
          raise OSError(f"it ended early at byte {off + got}")
        got += k
    except OSError as e:
      raise UsageError(f"cannot read back the verifier's spill file: {e}") from None
    return None
