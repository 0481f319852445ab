"""Dividing the bytes of a job among its processes: whole leaves, and big leaves cut into piece ranges.

The verifier and the migrator divide their work the same way. The leaves are
laid end to end (``pair_bytes``) and process ``k`` of ``P`` owns the bytes
``[k B/P, (k+1) B/P)`` of that line. A leaf that lies in one share goes whole
to its owner. A leaf crossing a share boundary is *split* at the piece
boundaries nearest the share boundaries into contiguous C-order ranges, one
per process, unless it is smaller than half a share (or cannot be cut: one
piece), in which case it goes whole to the process that holds most of it.
Every process computes the same assignment; one process gets everything.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Work", "assign"]


@dataclasses.dataclass(frozen=True)
class Work:
  """One process's unit: pair ``pair`` whole (``rank`` None) or its pieces [lo, hi) as range ``rank`` of ``n``."""

  pair: int
  lo: int
  hi: int
  rank: int | None = None
  n: int = 1
  nbytes: int = 0

  @property
  def split(self) -> bool:
    return self.rank is not None


def assign(pair_bytes: list[int], piece_ends: list[list[int]], num_processes: int) -> list[list[Work]]:
  """The work of each process: ``pair_bytes[i]`` bytes per pair, ``piece_ends[i]`` the byte offset where each piece ends.

  See the module docstring. Deterministic: every process computes the same lists.
  """
  P = int(num_processes)
  total = sum(pair_bytes)
  out: list[list[Work]] = [[] for _ in range(P)]
  if P == 1 or total == 0:
    for i, b in enumerate(pair_bytes):
      out[0].append(Work(i, 0, len(piece_ends[i]), None, 1, b))
    return out
  share = total / P
  owner_at = lambda x: min(P - 1, int(x // share))  # noqa: E731
  start = 0
  for i, b in enumerate(pair_bytes):
    end = start + b
    ends = piece_ends[i]
    first, last = owner_at(start), owner_at(max(start, end - 1))
    if first == last or b < share / 2 or len(ends) < 2:
      if first == last:
        who = first
      else:  # the process holding most of the leaf
        overlap = [(min(end, (k + 1) * share) - max(start, k * share), -k) for k in range(first, last + 1)]
        who = -max(overlap)[1]
      out[who].append(Work(i, 0, len(ends), None, 1, b))
    else:
      # cut at the piece boundary nearest each share boundary inside the leaf
      cuts = [0]
      for k in range(first + 1, last + 1):
        t = k * share - start
        j = min(range(1, len(ends)), key=lambda j: (abs(ends[j - 1] - t), j))  # cut after piece j-1
        cuts.append(max(j, cuts[-1]))
      cuts.append(len(ends))
      ranges = [(k, cuts[m], cuts[m + 1]) for m, k in enumerate(range(first, last + 1)) if cuts[m + 1] > cuts[m]]
      for rank, (k, lo, hi) in enumerate(ranges):
        lo_b = ends[lo - 1] if lo else 0
        out[k].append(Work(i, lo, hi, rank, len(ranges), ends[hi - 1] - lo_b))
    start = end
  for k in range(P):  # first ranges and whole leaves first, later ranges last (by rank): the relay order
    out[k].sort(key=lambda w: (w.rank or 0, w.pair))
  return out


# ---------------------------------------------------------------------------------------------
# The values phase
