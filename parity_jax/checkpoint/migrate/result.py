"""What the migrator wrote: :class:`MigrateResult`."""

from __future__ import annotations

import dataclasses
from typing import Any

from parity_jax.progress import human_bytes
from parity_jax.report import Report

__all__ = ["MigrateResult"]


@dataclasses.dataclass(frozen=True)
class MigrateResult(Report):
  """What :func:`migrate` wrote. A result exists only for a completed migration, so ``passed`` is True."""

  source: str
  dest: str
  n_leaves: int
  nbytes: int
  n_batches: int
  chunk_bytes: int
  compression: str
  elapsed_s: float
  dropped_empty_nodes: tuple[str, ...]
  row_major_chunks: bool
  distributed: dict[str, Any] | None = None  # the job's figures when written by several processes

  @property
  def passed(self) -> bool:
    return True

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["dropped_empty_nodes"] = list(self.dropped_empty_nodes)
    d["elapsed_s"] = round(self.elapsed_s, 3)
    if d["distributed"] is None:
      del d["distributed"]
    return {"format": "parity_jax.migrate_result/1", **d}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MigrateResult":
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    kw["dropped_empty_nodes"] = tuple(kw.get("dropped_empty_nodes", ()))
    return cls(**kw)

  def text(self) -> str:
    rate = f"{human_bytes(self.nbytes / self.elapsed_s)}/s" if self.elapsed_s > 0 else "-"
    return (
        f"migrated {self.n_leaves} leaves ({human_bytes(self.nbytes)}) in {self.elapsed_s:.2f} s"
        f" ({rate}): {self.source} -> {self.dest}"
    )
