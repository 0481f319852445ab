"""The verifier's result: one :class:`LeafResult` per leaf, grouped, with the verdict; text, JSON and HTML."""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Any

from parity_jax import arraydiff
from parity_jax.errors import UsageError
from parity_jax.files import is_inside
from parity_jax.report import Report

__all__ = ["GroupResult", "LeafResult", "REPORT_FORMAT", "STATUSES", "VerifyReport"]

REPORT_FORMAT = "parity_jax.verify_report/1"
PASS = "PASS"
VALUE_MISMATCH = "VALUE_MISMATCH"
SHAPE_MISMATCH = "SHAPE_MISMATCH"
DTYPE_MISMATCH = "DTYPE_MISMATCH"
KIND_MISMATCH = "KIND_MISMATCH"
MISSING = "MISSING"
EXTRA = "EXTRA"
UNREADABLE = "UNREADABLE"
STATUSES = (PASS, VALUE_MISMATCH, SHAPE_MISMATCH, DTYPE_MISMATCH, KIND_MISMATCH, MISSING, EXTRA, UNREADABLE)

_MIB = 1 << 20
# how the verdict line counts a failing leaf: its values (or shape, dtype, kind) differ, it could not be read
# (so nothing is known about it), or it has no counterpart
_FAILURE_KIND = {
    VALUE_MISMATCH: "differ",
    SHAPE_MISMATCH: "differ",
    DTYPE_MISMATCH: "differ",
    KIND_MISMATCH: "differ",
    UNREADABLE: "unreadable",
    MISSING: "missing",
    EXTRA: "extra",
}
_KIND_ORDER = ["differ", "unreadable", "missing", "extra"]
_SHOWN_FAILURES = 20  # failing leaves spelled out per group (text) and in the HTML view; the JSON has all


@dataclasses.dataclass
class LeafResult:
  """One row of the report: a source leaf and its migrated counterpart (either may be absent)."""

  source_path: str | None
  migrated_path: str | None
  group: str
  status: str
  reason: str = ""
  shape: tuple[int, ...] | None = None  # the migrated leaf's shape (expected shape if missing)
  source_shape: tuple[int, ...] | None = None
  dtype: str | None = None
  nbytes: int = 0
  transform: str | None = None
  sha256: str | None = None  # sha256 of the migrated leaf's C-order bytes
  source_sha256: str | None = None  # sha256 of the source leaf's C-order bytes
  diff: arraydiff.DiffStats | None = None
  read_mode: str | None = None  # how the values were read (for the curious and for bench)

  @property
  def passed(self) -> bool:
    return self.status == PASS

  def describe(self) -> str:
    if self.source_path and self.migrated_path:
      return f"{self.migrated_path} <- {self.source_path}"
    return self.migrated_path or self.source_path or "?"

  def to_dict(self) -> dict[str, Any]:
    return {
        "source_path": self.source_path,
        "migrated_path": self.migrated_path,
        "group": self.group,
        "status": self.status,
        "reason": self.reason,
        "shape": None if self.shape is None else list(self.shape),
        "source_shape": None if self.source_shape is None else list(self.source_shape),
        "dtype": self.dtype,
        "bytes": self.nbytes,
        "transform": self.transform,
        "sha256": self.sha256,
        "source_sha256": self.source_sha256,
        "diff": None if self.diff is None else self.diff.to_dict(),
        "read_mode": self.read_mode,
    }


@dataclasses.dataclass
class GroupResult:
  name: str
  n_leaves: int = 0
  n_pass: int = 0

  @property
  def passed(self) -> bool:
    return self.n_pass == self.n_leaves

  def line(self, width: int) -> str:
    tag = "PASS" if self.passed else "FAIL"
    return f"[{tag}] {self.name:<{width}}  {self.n_pass}/{self.n_leaves} leaves bit-identical"


@dataclasses.dataclass
class VerifyReport(Report):
  """The verdict plus one :class:`LeafResult` per leaf. ``passed`` is the verdict."""

  source: str
  migrated: str
  spec_source: str | None
  source_layout: str
  migrated_layout: str
  leaves: list[LeafResult]
  ignored_empty_nodes: dict[str, list[str]]
  elapsed_s: float = 0.0
  bytes_read: int = 0
  spec: dict[str, Any] | None = None
  distributed: dict[str, Any] | None = None  # the job's figures when run across processes (None: one process)
  # per side: the layout facts the reader used (Checkpoint.storage_facts)
  storage: dict[str, dict[str, Any]] | None = None
  # the storage requests and bytes of this process during the verify, per scheme (parity_jax.stores.io_stats)
  io: dict[str, Any] | None = None

  @property
  def groups(self) -> dict[str, GroupResult]:
    out: dict[str, GroupResult] = {}
    for r in self.leaves:
      g = out.setdefault(r.group, GroupResult(r.group))
      g.n_leaves += 1
      g.n_pass += int(r.passed)
    return out

  @property
  def failures(self) -> list[LeafResult]:
    return [r for r in self.leaves if not r.passed]

  @property
  def n_failed(self) -> int:
    return len(self.failures)

  @property
  def passed(self) -> bool:
    return bool(self.leaves) and self.n_failed == 0

  def leaf(self, path: str) -> LeafResult:
    """The result for a migrated (or, failing that, source) path."""
    for r in self.leaves:
      if r.migrated_path == path:
        return r
    for r in self.leaves:
      if r.source_path == path:
        return r
    raise KeyError(path)

  def verdict_line(self) -> str:
    if self.passed:
      return "VERDICT: PASS"
    if not self.leaves:
      return "VERDICT: FAIL — no leaves to compare"
    kinds: dict[str, int] = {}
    for r in self.failures:
      kind = _FAILURE_KIND.get(r.status, r.status.lower())
      kinds[kind] = kinds.get(kind, 0) + 1
    if set(kinds) == {"differ"}:
      return f"VERDICT: FAIL — {self.n_failed} of {len(self.leaves)} leaves differ"
    parts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: _KIND_ORDER.index(kv[0])))
    return f"VERDICT: FAIL — {self.n_failed} of {len(self.leaves)} leaves fail: {parts}"

  def table_lines(self, max_failures_per_group: int = _SHOWN_FAILURES) -> list[str]:
    groups = self.groups
    width = max((len(g) for g in groups), default=0)
    lines = []
    for name, g in groups.items():
      lines.append(g.line(width))
      bad = [r for r in self.leaves if r.group == name and not r.passed]
      for r in bad[:max_failures_per_group]:
        lines.append(f"       {r.status:<15} {r.describe()}: {r.reason}")
      if len(bad) > max_failures_per_group:
        lines.append(f"       ... and {len(bad) - max_failures_per_group} more (see --report)")
    return lines

  @property
  def bucket_io(self) -> bool:
    """Whether this verify read from a bucket (then the report carries ``io``: this process's requests and bytes,
    a measured figure like ``elapsed_s``)."""
    return any(((self.io or {}).get(s) or {}).get("requests") for s in ("gs", "s3"))

  def storage_lines(self) -> list[str]:
    """One line per side: how its storage was read (OCDBT, zarr version, compression, missing chunks, orbax);
    for a bucket side also where it was read (the endpoint), and one line of requests and bytes per bucket scheme."""
    lines = []
    for side in ("source", "migrated"):
      facts = (self.storage or {}).get(side) or {}
      if "summary" not in facts:
        continue
      where = facts.get("store") or {}
      at = f" at {where.get('endpoint')}" if where.get("endpoint") else ""
      lines.append(f"{side + ' storage:':<18}{facts['summary']}{at}")
    for scheme in ("gs", "s3"):
      row = (self.io or {}).get(scheme) or {}
      if row.get("requests"):
        lines.append(
            f"{scheme + ':// I/O:':<18}{row['requests']} requests ({row['reads']} reads, {row['lists']} lists,"
            f" {row['retries']} retries), {row['bytes_read']} bytes read"
        )
    return lines

  def text(self) -> str:
    return "\n".join(self.storage_lines() + self.table_lines() + [self.verdict_line()])

  def to_dict(self) -> dict[str, Any]:
    from parity_jax.provenance import default_provenance

    return {
        "format": REPORT_FORMAT,
        "verdict": "PASS" if self.passed else "FAIL",
        "passed": self.passed,
        "n_leaves": len(self.leaves),
        "n_failed": self.n_failed,
        "source": {"path": self.source, "layout": self.source_layout, "storage": (self.storage or {}).get("source")},
        "migrated": {
            "path": self.migrated,
            "layout": self.migrated_layout,
            "storage": (self.storage or {}).get("migrated"),
        },
        "spec": {"path": self.spec_source, **(self.spec or {})},
        "groups": [
            {"name": g.name, "passed": g.passed, "n_leaves": g.n_leaves, "n_bit_identical": g.n_pass}
            for g in self.groups.values()
        ],
        "leaves": [r.to_dict() for r in self.leaves],
        "ignored_empty_nodes": self.ignored_empty_nodes,
        "elapsed_s": round(self.elapsed_s, 3),
        "bytes_read": self.bytes_read,
        **({"io": self.io} if self.bucket_io else {}),
        "provenance": default_provenance("parity_jax.checkpoint.verify_migration"),
        **({"distributed": self.distributed} if self.distributed is not None else {}),
    }

  def write_json(self, path: str | os.PathLike) -> str:
    """Writes the JSON report atomically; never inside either checkpoint. Returns the absolute path."""
    for ck in (self.source, self.migrated):
      if is_inside(path, ck):
        raise UsageError(f"report {os.fspath(path)} lies inside the checkpoint {ck}; the verifier never writes there")
    return super().write_json(path)

  def _repr_html_(self) -> str:
    e = html.escape
    color = "#1a7f37" if self.passed else "#cf222e"
    rows = []
    for g in self.groups.values():
      c = "#1a7f37" if g.passed else "#cf222e"
      rows.append(
          f"<tr><td style='color:{c};font-weight:bold'>{'PASS' if g.passed else 'FAIL'}</td>"
          f"<td><code>{e(g.name)}</code></td><td style='white-space:nowrap'>{g.n_pass}/{g.n_leaves} leaves bit-identical</td></tr>"
      )
    fails = []

    def shape(r: LeafResult) -> str:
      to = "" if r.shape is None else str(list(r.shape))
      frm = "" if r.source_shape is None or r.source_shape == r.shape else str(list(r.source_shape)) + " &rarr; "
      return frm + e(to)

    for r in self.failures[:_SHOWN_FAILURES]:
      fails.append(
          f"<tr><td style='white-space:nowrap'>{e(r.status)}</td><td><code>{e(r.migrated_path or '')}</code></td>"
          f"<td><code>{e(r.source_path or '')}</code></td><td><code>{e(r.dtype or '')}</code></td>"
          f"<td style='white-space:nowrap'>{shape(r)}</td>"
          f"<td><code style='font-size:smaller'>{e(r.sha256 or '')}</code></td>"
          f"<td><code style='font-size:smaller'>{e(r.source_sha256 or '')}</code></td>"
          f"<td style='white-space:normal;max-width:40em'>{e(r.reason)}</td></tr>"
      )
    fail_table = ""
    if fails:
      more = self.n_failed - len(fails)
      fail_table = (
          f"<details open><summary>Failing leaves ({self.n_failed})</summary><table><tr><th>status</th><th>migrated</th>"
          "<th>source</th><th>dtype</th><th>shape</th><th>sha256 (migrated)</th><th>sha256 (source)</th><th>reason</th></tr>"
          + "".join(fails)
          + "</table>"
          + (f"<p>... and {more} more (the JSON report lists every leaf)</p>" if more > 0 else "")
          + "</details>"
      )
    return (
        f"<div><p style='color:{color};font-weight:bold'>{e(self.verdict_line())}</p>"
        f"<p><code>{e(self.source)}</code> ({e(self.source_layout)}) &rarr; <code>{e(self.migrated)}</code>"
        f" ({e(self.migrated_layout)})</p>"
        f"<table><tr><th></th><th>group</th><th>leaves</th></tr>{''.join(rows)}</table>{fail_table}</div>"
    )

  def __repr__(self) -> str:
    return f"VerifyReport({self.verdict_line()!r}, {len(self.leaves)} leaves)"
