"""The value-exact verifier: is every migrated leaf bit-identical to its transformed source?

:func:`verify_migration` works in two phases and never holds a whole tree:

1. **Structure, metadata only.** The spec is bound to the source leaves (the
   same validation the migrator runs); its inverse map must cover the
   migrated checkpoint 1:1. Every pair's shape and dtype is checked against
   the transform. Missing, extra, reshaped or retyped leaves FAIL by name
   before any array data is read.
2. **Values, one leaf pair at a time.** Both leaves are read in C-order
   pieces of the common refinement of their shapes (:mod:`.geometry`): a
   piece is a box in the source leaf AND in the migrated leaf, so a squeeze or
   reshape is applied by index arithmetic, never by copying. Each piece pair
   is compared byte for byte (:func:`parity_jax.arraydiff.bit_equal` semantics:
   NaN payloads and -0.0 count). How each side is read (memory-mapped boxes of
   uncompressed chunks, whole chunk rows per piece, or one cached chunk row at
   a time), how sha256 is computed (one hash serves both sides of a
   bit-identical pair; it runs in a thread beside the comparison) and when a
   source leaf is spilled to a temporary file are planned per pair by
   :mod:`.stream` from a memory model: about one storage chunk row per side
   plus a few piece buffers, never a whole tree and never both copies of a big
   leaf. A pair that differs gets a second pass that hashes both sides and
   accumulates :class:`parity_jax.arraydiff.DiffAccumulator` statistics piece by
   piece. Reported hashes always equal ``sha256(leaf.tobytes())``.

Both checkpoints are opened read-only; nothing is ever written into them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import os
import tempfile
import time
from typing import Any, Callable

from parity_jax import arraydiff
from parity_jax.checkpoint import geometry, stream
from parity_jax.checkpoint.reader import LeafReadError, read_string_leaf
from parity_jax.checkpoint.layout import Checkpoint, LeafMeta, open_checkpoint
from parity_jax.checkpoint.spec import LeafPlan, MigrationPlan, RemapSpec
from parity_jax.errors import UsageError
from parity_jax.files import is_inside
from parity_jax.progress import Progress, progress as progress_bar
from parity_jax.report import Report

__all__ = ["GroupResult", "LeafResult", "VerifyReport", "verify_migration", "REPORT_FORMAT"]

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
    return f"VERDICT: FAIL — {self.n_failed} of {len(self.leaves)} leaves differ"

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

  def storage_lines(self) -> list[str]:
    """One line per side: how its storage was read (OCDBT, zarr version, compression, missing chunks, orbax)."""
    return [
        f"{side + ' storage:':<18}{self.storage[side]['summary']}"
        for side in ("source", "migrated")
        if self.storage and side in self.storage and "summary" in self.storage[side]
    ]

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
    for r in self.failures[:_SHOWN_FAILURES]:
      fails.append(
          f"<tr><td style='white-space:nowrap'>{e(r.status)}</td><td><code>{e(r.migrated_path or '')}</code></td>"
          f"<td><code>{e(r.source_path or '')}</code></td><td>{e(r.reason)}</td></tr>"
      )
    fail_table = ""
    if fails:
      more = self.n_failed - len(fails)
      fail_table = (
          f"<details open><summary>Failing leaves ({self.n_failed})</summary><table><tr><th>status</th><th>migrated</th>"
          "<th>source</th><th>reason</th></tr>"
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


# ---------------------------------------------------------------------------------------------
# Comparing one pair


class _Progress:
  """Counts the bytes read and moves the bar."""

  def __init__(self, bar: Progress):
    self.bar = bar
    self.bytes = 0

  def add(self, n: int) -> None:
    self.bytes += n
    self.bar.update(n)


def _compare_strings(src_ckpt, mig_ckpt, p: LeafPlan, res: LeafResult) -> None:
  a = read_string_leaf(src_ckpt, src_ckpt.leaves[p.source])
  b = read_string_leaf(mig_ckpt, mig_ckpt.leaves[p.dest])
  res.source_sha256 = hashlib.sha256(a.encode()).hexdigest()
  res.sha256 = hashlib.sha256(b.encode()).hexdigest()
  res.read_mode = "_strings.json"
  if a == b:
    res.status = PASS
  else:
    res.status, res.reason = VALUE_MISMATCH, f"strings differ ({len(a)} vs {len(b)} characters)"


def _compare_arrays(
    src_ckpt: Checkpoint,
    mig_ckpt: Checkpoint,
    p: LeafPlan,
    res: LeafResult,
    *,
    buffers: stream.Buffers,
    top_k: int,
    spill_dir: str,
    progress: _Progress,
    readahead: int = 0,
    small: stream.SmallPairs | None = None,
) -> None:
  s_meta, m_meta = src_ckpt.leaves[p.source], mig_ckpt.leaves[p.dest]
  if small is not None:  # a small pair read whole in a batch with others; None: differs or unreadable, stream it
    out = small.take(s_meta, m_meta)
    if out is not None:
      res.read_mode = small.describe(p.source, p.dest)
      res.status, res.source_sha256, res.sha256 = PASS, out.source_sha256, out.sha256
      progress.add(2 * s_meta.nbytes)
      return
  r = geometry.refinement(s_meta.shape, m_meta.shape)
  if r is None:  # unreachable after the structure phase; keep the check honest
    raise UsageError(
        f"{p.source} -> {p.dest}: shapes {s_meta.shape} and {m_meta.shape} are not related by the transform"
    )
  plan = stream.plan_pair(s_meta, m_meta, r, buffers.nbytes, readahead=int(readahead))
  res.read_mode = plan.describe()
  out = stream.PairStreamer(
      src_ckpt, mig_ckpt, s_meta, m_meta, r, plan, buffers, spill_dir=spill_dir, on_bytes=progress.add
  ).run(top_k=top_k)
  res.source_sha256, res.sha256 = out.source_sha256, out.sha256
  if out.equal:
    res.status = PASS
    return
  res.status = VALUE_MISMATCH
  if out.diff is not None:
    res.diff = out.diff
    res.reason = out.diff.summary()
  else:
    res.reason = (
        f"bytes differ (sha256 {res.source_sha256[:12]} vs {res.sha256[:12]});" f" no statistics: {out.diff_error}"
    )


# ---------------------------------------------------------------------------------------------
# The public entry point


def _load_spec(spec: RemapSpec | str | os.PathLike) -> RemapSpec:
  if isinstance(spec, RemapSpec):
    return spec
  return RemapSpec.from_json(spec)


def verify_migration(
    source: str | os.PathLike,
    migrated: str | os.PathLike,
    spec: RemapSpec | str | os.PathLike,
    *,
    top_k: int = 10,
    slab_mb: float = 8.0,
    spill_dir: str | os.PathLike | None = None,
    readahead: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    distributed: bool = False,
    peer_timeout_s: float | None = None,
) -> VerifyReport:
  """Proves (or refutes) that ``migrated`` is ``source`` remapped by ``spec``, bit for bit.

  Raises :class:`~parity_jax.errors.UsageError` for setup problems (a path
  that is not a checkpoint, a spec that is malformed or does not fit the
  source). Every difference in the checkpoints themselves -- missing/extra
  leaves, shape/dtype changes, differing or unreadable values -- is reported
  per leaf in the returned :class:`VerifyReport` (``passed`` False).

  ``slab_mb`` is the size of one compared piece (a few such buffers are
  allocated once); ``readahead`` = N decodes the next N storage chunk rows of
  a compressed leaf while the current one is compared -- faster with free
  cores, about N more chunk rows plus their compressed bytes in memory (so
  above the chunked-storage memory target; 0, the default, meets it).

  ``distributed=True`` runs the comparison as one job of every process of
  the JAX runtime (:func:`jax.distributed.initialize` must have been called
  in each, and each calls this with the same arguments): the bytes are
  split across processes (see :mod:`parity_jax.checkpoint.distributed`), and
  every process returns the same report, identical to one process's apart
  from ``elapsed_s``, ``provenance`` and the added ``distributed`` figures. A
  process that dies, or shows no progress for ``peer_timeout_s`` seconds,
  makes every other process print one line naming it and exit with code 2
  (see :mod:`parity_jax.runtime`).
  """
  args = dict(top_k=top_k, slab_mb=slab_mb, spill_dir=spill_dir, readahead=readahead, progress=progress, log=log)
  if not distributed:
    return _verify(source, migrated, spec, job=None, **args)
  from parity_jax import runtime

  job = runtime.attach(peer_timeout_s or runtime.DEFAULT_TIMEOUT_S, "verify")
  with job:
    try:
      return _verify(source, migrated, spec, job=job, **args)
    except UsageError as e:
      job.fail(str(e))
      raise


def _verify(source, migrated, spec, *, top_k, slab_mb, spill_dir, readahead, progress, log, job) -> VerifyReport:
  t0 = time.perf_counter()
  spec = _load_spec(spec)
  src_ckpt = open_checkpoint(source, "source checkpoint")
  mig_ckpt = open_checkpoint(migrated, "migrated checkpoint")
  spill_dir = _check_spill_dir(spill_dir, (src_ckpt, mig_ckpt))
  bad = src_ckpt.unreadable()
  if bad:
    p0 = next(iter(bad))
    raise UsageError(
        f"source checkpoint {src_ckpt.path}: cannot read leaf {p0!r}"
        f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: {bad[p0]}"
    )
  plan = spec.bind(src_ckpt.leaves, what="source checkpoint")
  results, to_compare = _structure(plan, spec, src_ckpt, mig_ckpt)
  job_figures = None
  if job is not None and job.distributed:
    bytes_read, job_figures = _values_distributed(
        job,
        to_compare,
        src_ckpt,
        mig_ckpt,
        top_k=top_k,
        slab_mb=slab_mb,
        spill_dir=spill_dir,
        readahead=readahead,
        show_progress=progress,
        log=log,
    )
  else:
    bytes_read = _values(
        to_compare,
        src_ckpt,
        mig_ckpt,
        top_k=top_k,
        slab_mb=slab_mb,
        spill_dir=spill_dir,
        readahead=readahead,
        show_progress=progress,
        log=log,
    )
  return VerifyReport(
      source=src_ckpt.path,
      migrated=mig_ckpt.path,
      spec_source=spec.source,
      source_layout=src_ckpt.layout,
      migrated_layout=mig_ckpt.layout,
      leaves=results,
      ignored_empty_nodes={"source": src_ckpt.empty_nodes, "migrated": mig_ckpt.empty_nodes},
      elapsed_s=time.perf_counter() - t0,
      bytes_read=bytes_read,
      spec=spec.to_dict(),
      distributed=job_figures,
      storage={
          "source": {**src_ckpt.storage_facts(), "summary": src_ckpt.storage_summary()},
          "migrated": {**mig_ckpt.storage_facts(), "summary": mig_ckpt.storage_summary()},
      },
  )


def _check_spill_dir(spill_dir: str | os.PathLike | None, checkpoints: tuple[Checkpoint, ...]) -> str:
  spill_dir = os.fspath(spill_dir) if spill_dir is not None else tempfile.gettempdir()
  for ck in checkpoints:
    if is_inside(spill_dir, ck.path):
      raise UsageError(f"spill directory {spill_dir} lies inside a checkpoint ({ck.path}); choose another")
  if not os.path.isdir(spill_dir):
    raise UsageError(f"spill directory does not exist: {spill_dir}")
  return spill_dir


def _structure(
    plan: MigrationPlan, spec: RemapSpec, src_ckpt: Checkpoint, mig_ckpt: Checkpoint
) -> tuple[list[LeafResult], list[tuple[LeafPlan, LeafResult]]]:
  """Phase 1, metadata only: one result per leaf; the pairs whose kind, shape and dtype fit go on to phase 2."""
  results: list[LeafResult] = []
  to_compare: list[tuple[LeafPlan, LeafResult]] = []
  for p in plan.leaves:
    res = _pair_result(p, src_ckpt.leaves[p.source], mig_ckpt.leaves.get(p.dest))
    results.append(res)
    if res.status == _PENDING:
      to_compare.append((p, res))
  inverse = plan.inverse
  for path, m in mig_ckpt.leaves.items():
    if path not in inverse:
      results.append(
          LeafResult(
              source_path=None,
              migrated_path=path,
              group=spec.group_of(path),
              status=EXTRA,
              reason="no source leaf maps here",
              shape=m.shape,
              dtype=None if m.dtype is None else str(m.dtype),
              nbytes=m.nbytes,
          )
      )
  return results, to_compare


_PENDING = "PENDING"  # structure fits; the values phase decides


def _pair_result(p: LeafPlan, s: LeafMeta, m: LeafMeta | None) -> LeafResult:
  """The structure verdict for one planned pair (status ``_PENDING`` when only the values can tell)."""
  res = LeafResult(
      source_path=p.source,
      migrated_path=p.dest,
      group=p.group,
      status=MISSING,
      shape=p.transform.dst_shape,
      source_shape=s.shape,
      dtype=None if s.dtype is None else str(s.dtype),
      nbytes=s.nbytes,
      transform=p.transform.describe(),
  )
  if m is None:
    res.reason = "no such leaf in the migrated checkpoint"
    return res
  if m.error:
    res.status, res.reason = UNREADABLE, f"cannot read the migrated leaf's array metadata: {m.error}"
    return res
  res.shape = m.shape
  if (s.kind == "string") != (m.kind == "string"):
    res.status, res.reason = KIND_MISMATCH, f"source is a {s.kind}, migrated is a {m.kind}"
    return res
  problems = []
  if s.dtype != m.dtype:
    problems.append(f"dtype {m.dtype} != source dtype {s.dtype}")
  if m.shape != p.transform.dst_shape:
    how = "" if p.transform.kind == "identity" else f" ({p.transform.describe()} of {s.shape})"
    problems.append(f"shape {m.shape} != expected {p.transform.dst_shape}{how}")
  if problems:
    res.status = SHAPE_MISMATCH if m.shape != p.transform.dst_shape else DTYPE_MISMATCH
    res.reason = "; ".join(problems)
    res.dtype = str(m.dtype) if m.dtype is not None else None
    return res
  res.status = _PENDING
  return res


def _values(
    to_compare: list[tuple[LeafPlan, LeafResult]],
    src_ckpt: Checkpoint,
    mig_ckpt: Checkpoint,
    *,
    top_k: int,
    slab_mb: float,
    spill_dir: str,
    readahead: int,
    show_progress: bool,
    log: Callable[[str], None] | None,
) -> int:
  """Phase 2, one pair at a time in reused buffers; fills each result's status. Returns the bytes read."""
  total = sum(2 * src_ckpt.leaves[p.source].nbytes for p, _ in to_compare)
  buffers = stream.Buffers(max(4096, int(slab_mb * _MIB)))
  small = _small_pairs([p for p, _ in to_compare], src_ckpt, mig_ckpt, buffers)
  with progress_bar(total, "verify", enabled=show_progress) as bar, contextlib.closing(small):
    prog = _Progress(bar)
    for i, (p, res) in enumerate(to_compare):
      bar.set_postfix_str(f"{i}/{len(to_compare)} leaves")
      _compare_one(
          src_ckpt,
          mig_ckpt,
          p,
          res,
          buffers=buffers,
          top_k=top_k,
          spill_dir=spill_dir,
          progress=prog,
          readahead=readahead,
          log=log,
          small=small,
      )
    bar.set_postfix_str(f"{len(to_compare)}/{len(to_compare)} leaves")
  return prog.bytes


def _small_pairs(
    plans: list[LeafPlan], src_ckpt: Checkpoint, mig_ckpt: Checkpoint, buffers: stream.Buffers
) -> stream.SmallPairs:
  """The small pairs among ``plans``, read whole in batches (:class:`.stream.SmallPairs`)."""
  pairs = [(src_ckpt.leaves[p.source], mig_ckpt.leaves[p.dest]) for p in plans]
  return stream.SmallPairs(src_ckpt, mig_ckpt, pairs, leaf_bytes=min(buffers.nbytes, stream.SMALL_LEAF_BYTES))


def _compare_one(
    src_ckpt: Checkpoint,
    mig_ckpt: Checkpoint,
    p: LeafPlan,
    res: LeafResult,
    *,
    buffers: stream.Buffers,
    top_k: int,
    spill_dir: str,
    progress: _Progress,
    readahead: int,
    log: Callable[[str], None] | None,
    small: stream.SmallPairs | None = None,
) -> None:
  """One pair, whole: its result's status, hashes and statistics."""
  try:
    if src_ckpt.leaves[p.source].kind == "string":
      _compare_strings(src_ckpt, mig_ckpt, p, res)
    else:
      _compare_arrays(
          src_ckpt,
          mig_ckpt,
          p,
          res,
          buffers=buffers,
          top_k=top_k,
          spill_dir=spill_dir,
          progress=progress,
          readahead=readahead,
          small=small,
      )
  except LeafReadError as e:
    res.status, res.reason = UNREADABLE, str(e)
    res.sha256 = res.source_sha256 = None
  if log is not None and not res.passed:
    log(f"{res.status} {res.describe()}: {res.reason}")


class _Counter:
  """A :class:`_Progress` lookalike that forwards each count to a callback."""

  def __init__(self, fn: Callable[[int], None]):
    self.fn = fn

  def add(self, n: int) -> None:
    self.fn(n)


def _values_distributed(
    job,
    to_compare: list[tuple[LeafPlan, LeafResult]],
    src_ckpt: Checkpoint,
    mig_ckpt: Checkpoint,
    *,
    top_k: int,
    slab_mb: float,
    spill_dir: str,
    readahead: int,
    show_progress: bool,
    log: Callable[[str], None] | None,
) -> tuple[int, dict[str, Any]]:
  """Phase 2 as one job (:mod:`.distributed`): this process's share; every result filled on every process."""
  from parity_jax.checkpoint import distributed as dv

  buffers = stream.Buffers(max(4096, int(slab_mb * _MIB)))
  share_total = sum(2 * src_ckpt.leaves[p.source].nbytes for p, _ in to_compare) // job.num_processes
  with progress_bar(share_total, f"verify [{job.describe()}]", enabled=show_progress) as bar:
    prog = _Progress(bar)

    small: list[stream.SmallPairs] = []

    def prepare_whole(indices: list[int]) -> None:  # this process's whole pairs: the small ones in batches
      small.append(_small_pairs([to_compare[i][0] for i in indices], src_ckpt, mig_ckpt, buffers))

    def compare_whole(p: LeafPlan, res: LeafResult, on_bytes: Callable[[int], None]) -> None:
      # a pair outside the batches (or one process 0 compares again) gets None from SmallPairs.take: streamed
      batch = small[0] if small else None
      _compare_one(
          src_ckpt,
          mig_ckpt,
          p,
          res,
          buffers=buffers,
          top_k=top_k,
          spill_dir=spill_dir,
          progress=_Counter(on_bytes),
          readahead=readahead,
          log=log,
          small=batch,
      )

    try:
      figures = dv.run_values(
          job,
          to_compare,
          src_ckpt,
          mig_ckpt,
          compare_whole=compare_whole,
          top_k=top_k,
          buffers=buffers,
          readahead=readahead,
          spill_dir=spill_dir,
          on_bytes=prog.add,
          prepare_whole=prepare_whole,
      )
    finally:
      for s in small:
        s.close()
  total = sum(pp["bytes_read"] for pp in figures["per_process"])
  return total, dict(figures, process=job.process_id)
