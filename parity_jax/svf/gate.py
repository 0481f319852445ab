"""Replays a Python SVF run in JAX and judges it: stage tolerances, bytes, explained mismatches.

:func:`replay` is what ``python -m tools.svf_parity`` runs:

* **sample** scope: the report's sample tensor, in its target orientation,
  against the sample stage bundle (``stage.<stage>``);
* **all-selected** scope: every tensor of the components file (or those whose
  source or safe name contains ``selected_source_filter``), source-oriented,
  against the all-selected bundle (``tensor.<safe_source_name>.<stage>``).
  A selected tensor without all ten stages in the golden bundle is a setup
  error (:class:`UsageError`), never a skip.

Every tensor is rebuilt in row chunks of ``U`` sized from ``chunk_mb`` (a
multiple of ``row_block``; ``chunk_mb=0`` rebuilds it whole). Each chunk's
stages are compared with the golden rows as they are read
(:class:`parity_jax.arraydiff.DiffAccumulator`), hashed incrementally, checked
against their tolerance, and written to our stage bundle if asked, so a
151936 x 1024 embedding never needs two full float32 copies in memory. The
golden's ``source_f32`` is our input ``W`` (like the Python process's
``--source-from-python-stage``).

Verdicts (:data:`MODES`):

* ``stage_tolerances`` -- every stage within its stated tolerance
  (:data:`STAGE_TOLERANCES`, derived in :mod:`parity_jax.svf.bounds`) and no
  unexplained final bf16 element. A differing final hash is reported, not failed.
* ``bytes`` -- all of that, and the final bf16 bytes identical.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from parity_jax import bundles, runtime
from parity_jax.arraydiff import DiffAccumulator
from parity_jax.dtypes import BF16 as _BF16, bf16_bits
from parity_jax.errors import UsageError, arg
from parity_jax.files import check_output_dir
from parity_jax.progress import Progress, progress as progress_bar
from parity_jax.provenance import default_provenance, package_versions
from parity_jax.report import Report
from parity_jax.svf import core, io
from parity_jax.svf.bounds import (
    EXPLAIN_RULES,
    FormulaConstants,
    MismatchAccounting,
    adapted_tolerance,
    check_bound,
    matmul_tolerance,
    normalization_tolerance,
    row_norms,
)
from parity_jax.svf.hashing import ArrayHasher, combined_sha256, safe_source_name

__all__ = ["DEFAULT_CHUNK_MB", "MODES", "STAGE_TOLERANCES", "ReplayResult", "chunk_rows", "replay"]

MODES = ("stage_tolerances", "bytes")
DEFAULT_CHUNK_MB = 512  # one 8192-row block of a k = n = 1024 tensor (384 MiB) fits
_F32 = np.dtype(np.float32)

#: stage -> (rule, why). ``exact``: bit-identical. ``bound``: every element
#: within twice the rigorous one-sided float error bound of a correct
#: evaluation (see :mod:`parity_jax.svf.bounds`). ``explained``: every
#: differing element is a legitimate bf16 rounding tie.
STAGE_TOLERANCES: dict[str, tuple[str, str]] = {
    "source_f32": ("exact", "the input W, taken from the golden bundle"),
    "offsets_f32": ("exact", "an input: the offsets as float32"),
    "scaled_s": ("exact", "S * (1 + offsets): IEEE-754 add and multiply of identical inputs are deterministic"),
    "normalization": ("bound", "2 nu |N|: two correct float32 sums (any order) of S and scaled_s, then one division"),
    "u_scaled": ("exact", "U * scaled_s: one IEEE-754 multiply of identical inputs"),
    "matmul_pre_norm": (
        "bound",
        "2 gamma(k) ||u_scaled_j|| ||V_l||: two correct float32 dots (any order, FMA or not) of identical inputs",
    ),
    "zero_source_f32": (
        "bound",
        "2 gamma(k) ||(U S)_j|| ||V_l||: the same dot with zero offsets; the normalization is exactly 1",
    ),
    "adapted_source_f32": (
        "bound",
        "2 (|M'| |N| (nu + u + nu u) + gamma(k) C |N| (1 + nu)(1 + u)), C = ||u_scaled_j|| ||V_l||: dot, normalization and the final multiply",
    ),
    "final_f32": ("bound", "as adapted_source_f32, in the target orientation"),
    "final_bf16": (
        "explained",
        "each differing element a legitimate rounding: 1 bf16 ULP apart with the float64 reference within the float32 error bound of the rounding midpoint (rule=bound also admits 2+ ULPs where that bound spans them)",
    ),
}

# Bytes per row of U that one chunk holds at peak, per element of k (U and
# u_scaled rows, XLA's block temporaries) and of n (matmul_pre_norm,
# zero_source, adapted, final bf16 and its torch-NaN copy, XLA temporaries).
# The comparisons run in sub-blocks of COMPARE_ELEMS elements on top of that.
_ROW_BYTES_PER_K = 16
_ROW_BYTES_PER_N = 32
COMPARE_ELEMS = 1 << 20  # no mutate: a memory bound only; test_gate_goldens runs it at 1000 across sub-block edges


def chunk_rows(m: int, n: int, k: int, chunk_mb: float, row_block: int = core.DEFAULT_ROW_BLOCK) -> int:
  """Rows of ``U`` per chunk under a budget of ``chunk_mb`` MiB (0: all rows).

  Always a multiple of ``row_block`` (so chunks cut between the reconstruction's
  own row blocks) and at least one block: a budget smaller than one block of
  rows still gets one block.
  """
  if chunk_mb <= 0 or m <= row_block:
    return m
  row_bytes = _ROW_BYTES_PER_K * k + _ROW_BYTES_PER_N * n
  rows = int(chunk_mb * 2**20) // row_bytes
  rows = max(row_block, rows // row_block * row_block)
  return min(m, rows)


class _Stats:
  """Streaming summary of one stage: NaN/inf counts, min/max, mean and RMS over finite values."""

  def __init__(self):
    self.n = self.n_nan = self.n_inf = 0
    self.min = math.inf
    self.max = -math.inf
    self.sum = self.sumsq = 0.0

  def update(self, x: np.ndarray) -> None:
    x = np.asarray(x).astype(np.float64).reshape(-1)
    self.n += x.size
    nan = np.isnan(x)
    inf = np.isinf(x)
    self.n_nan += int(nan.sum())
    self.n_inf += int(inf.sum())
    f = x[~(nan | inf)] if (nan.any() or inf.any()) else x
    if f.size:
      self.min = min(self.min, float(f.min()))
      self.max = max(self.max, float(f.max()))
      self.sum += float(f.sum())
      self.sumsq += float(np.dot(f, f))

  def to_dict(self) -> dict[str, Any]:
    finite = self.n - self.n_nan - self.n_inf
    return {
        "count": self.n,
        "n_nan": self.n_nan,
        "n_inf": self.n_inf,
        "min": self.min if finite else None,
        "max": self.max if finite else None,
        "mean": self.sum / finite if finite else None,
        "rms": math.sqrt(self.sumsq / finite) if finite else None,
    }


class _StageCheck:
  """Comparison, tolerance, hashes and stats of one stage, fed chunk by chunk."""

  def __init__(self, stage: str, shape: Sequence[int], dtype: np.dtype):
    self.stage = stage
    self.rule, self.why = STAGE_TOLERANCES[stage]
    self.acc = DiffAccumulator(shape, dtype, top_k=5)
    bf16 = stage == "final_bf16"
    self.ours_hash = ArrayHasher(bf16=bf16, nan_policy="torch")
    self.golden_hash = ArrayHasher(bf16=bf16, nan_policy="torch")
    self.stats = _Stats()
    self.n_out_of_tolerance = 0
    self.max_tolerance_ratio = 0.0

  def update(
      self,
      golden: np.ndarray,
      ours: np.ndarray,
      origin: Sequence[int],
      tol: np.ndarray | float | None = None,
      hash_rows: bool = True,
  ) -> None:
    self.acc.update(golden, ours, origin=origin)
    if hash_rows:
      self.ours_hash.update(ours)
      self.golden_hash.update(golden)
    self.stats.update(ours)
    if self.rule == "bound" and tol is not None:
      n_out, worst = check_bound(golden, ours, tol)
      self.n_out_of_tolerance += n_out
      self.max_tolerance_ratio = max(self.max_tolerance_ratio, worst)

  def result(self, ours_sha: str | None = None, golden_sha: str | None = None) -> dict[str, Any]:
    diff = self.acc.result()
    if self.rule == "exact":
      self.n_out_of_tolerance = diff.n_diff
    passed = None if self.rule == "explained" else self.n_out_of_tolerance == 0  # explained: set by the caller
    return {
        "sha256": ours_sha or self.ours_hash.hexdigest(),
        "golden_sha256": golden_sha or self.golden_hash.hexdigest(),
        "dtype": diff.dtype,
        "shape": list(diff.shape),
        "stats": self.stats.to_dict(),
        "bit_equal": diff.bit_equal,
        "diff": diff.to_dict(),
        "summary": diff.summary(),
        "tolerance": {
            "rule": self.rule,
            "why": self.why,
            "n_out_of_tolerance": None if self.rule == "explained" else self.n_out_of_tolerance,
            "max_ratio": self.max_tolerance_ratio if self.rule == "bound" else None,
        },
        "pass": passed,
    }


@dataclasses.dataclass(frozen=True)
class _TensorWork:
  name: str
  m: int
  n: int
  k: int
  orientation: str
  key: Callable[[str], str]

  @property
  def target_shape(self) -> tuple[int, int]:
    return (self.m, self.n) if self.orientation == "identity" else (self.n, self.m)

  def stage_shape(self, stage: str) -> tuple[int, ...]:
    m, n, k = self.m, self.n, self.k
    return {
        "source_f32": (m, n),
        "offsets_f32": (k,),
        "scaled_s": (k,),
        "normalization": (),
        "u_scaled": (m, k),
        "matmul_pre_norm": (m, n),
        "zero_source_f32": (m, n),
        "adapted_source_f32": (m, n),
        "final_f32": self.target_shape,
        "final_bf16": self.target_shape,
    }[stage]


def _stage_dtype(stage: str) -> np.dtype:
  return _BF16 if stage == "final_bf16" else _F32


def _check_golden(job: _TensorWork, reader: bundles.BundleReader) -> None:
  """Every stage present with the expected shape and dtype: else a setup error."""
  for stage in core.STAGES:
    key = job.key(stage)
    if key not in reader:
      raise UsageError(f"setup error: golden bundle {reader.path} has no {key!r} for selected tensor {job.name}")
    shape, want = reader.shape(key), job.stage_shape(stage)
    if shape != want and not (stage == "normalization" and shape in ((), (1,))):
      raise UsageError(f"golden {key} has shape {list(shape)}, expected {list(want)} for {job.name}")
    if reader.dtype(key) != _stage_dtype(stage):
      raise UsageError(f"golden {key} has dtype {reader.dtype(key)}, expected {_stage_dtype(stage)}")


def _select(
    store: io.ComponentStore, golden: io.GoldenRun, all_selected: bool, selected_filter: str | None
) -> list[_TensorWork]:
  if all_selected:
    names = list(store.names)
    orient = {n: "identity" for n in names}  # all-selected stages are source-oriented
    key_fn = lambda name: (lambda stage: io.tensor_key(name, stage))  # noqa: E731
  else:
    sample = golden.sample or {}
    name = sample.get("source_name")
    if not name:
      raise UsageError(f"{golden.report_path}: the report names no sample tensor (sample.source_name)")
    if name not in store.names:
      raise UsageError(f"sample tensor {name!r} has no components in {store.components_path}")
    names = [name]
    m, n, _ = store.dims(name)
    orient = {name: core.resolve_orientation((m, n), sample.get("target_shape"), sample.get("orientation"))}
    key_fn = lambda name: io.sample_key  # noqa: E731
  if selected_filter:
    names = [n for n in names if selected_filter in n or selected_filter in safe_source_name(n)]
    if not names:
      raise UsageError(f"{arg('selected_source_filter')}={selected_filter!r} selects no tensor")
  jobs = []
  for name in names:
    m, n, k = store.dims(name)
    jobs.append(_TensorWork(name, m, n, k, orient[name], key_fn(name)))
  return jobs


def _to_np(x: Any, dtype: np.dtype) -> np.ndarray:
  a = np.asarray(x)
  return a if a.dtype == dtype else a.astype(dtype)


def _replay_tensor(
    job: _TensorWork,
    store: io.ComponentStore,
    greader: bundles.BundleReader,
    writer: bundles.BundleWriter | None,
    *,
    mode: str,
    chunk_mb: float,
    row_block: int,
    compute_dtype: Any,
    explain_rule: str,
    progress: Progress,
) -> dict[str, Any]:
  """One tensor: every stage against its golden, chunk by chunk of rows; the tensor's report entry."""
  t = _TensorReplay(
      job,
      store,
      greader,
      writer,
      chunk_mb=chunk_mb,
      row_block=row_block,
      compute_dtype=compute_dtype,
      explain_rule=explain_rule,
  )
  t.vector_stages()
  for r0 in range(0, job.m, t.rows_per_chunk):
    r1 = min(job.m, r0 + t.rows_per_chunk)
    t.row_chunk(r0, r1)
    progress.update((r1 - r0) * (4 * job.k))
  return t.result(mode, t.target_orientation_hashes())


class _TensorReplay:
  """The state of one tensor's replay: the stage checks, the bf16 accounting, and (transposed) the held final."""

  def __init__(
      self,
      job: _TensorWork,
      store: io.ComponentStore,
      greader: bundles.BundleReader,
      writer: bundles.BundleWriter | None,
      *,
      chunk_mb: float,
      row_block: int,
      compute_dtype: Any,
      explain_rule: str,
  ):
    self.job, self.store, self.greader, self.writer = job, store, greader, writer
    self.row_block, self.compute_dtype = row_block, compute_dtype
    m, n, k = job.m, job.n, job.k
    self.s, self.offsets = store.s(job.name), store.offsets(job.name)
    self.v_nk = store.v_nk(job.name)
    self.fc = FormulaConstants.from_components(self.s, self.offsets, compute_dtype)
    # the golden's own shapes: Python may store the normalization as [] or [1]
    self.checks = {st: _StageCheck(st, greader.shape(job.key(st)), _stage_dtype(st)) for st in core.STAGES}
    self.accounting = MismatchAccounting(self.fc, rule=explain_rule)
    self.zero_vs_source = DiffAccumulator((m, n), _F32, top_k=1)
    self.transpose = job.orientation == "transpose"
    self.rows_per_chunk = chunk_rows(m, n, k, chunk_mb, row_block)
    self.n_chunks = -(-m // self.rows_per_chunk) if m else 0
    self.v_norms = row_norms(self.v_nk.astype(compute_dtype))
    self.full_final_f32 = self.full_final_bits = None
    if self.transpose:  # target-orientation bytes need every source row: held until the end
      self.full_final_f32 = np.empty((n, m), _F32)
      self.full_final_bits = np.empty((n, m), np.uint16)
    self.s_cd = np.asarray(self.s).astype(compute_dtype).astype(np.float64)
    self.sub_rows = max(1, COMPARE_ELEMS // max(n, k, 1))

  def vector_stages(self) -> None:
    """The whole-vector stages: small, compared at once."""
    job = self.job
    vec = {
        k_: np.asarray(v_)
        for k_, v_ in core.vector_stages(self.s, self.offsets, compute_dtype=self.compute_dtype).items()
    }
    vec["scaled_s"] = _to_np(vec["scaled_s"], _F32)
    vec["normalization"] = _to_np(vec["normalization"], _F32)
    for stage in ("offsets_f32", "scaled_s", "normalization"):
      golden = self.greader.get(job.key(stage))
      ours = vec[stage].reshape(golden.shape)
      tol = normalization_tolerance(self.fc) if stage == "normalization" else None
      self.checks[stage].update(golden, ours, origin=(0,) * golden.ndim, tol=tol)
      if self.writer is not None:
        self.writer.write(job.key(stage), vec[stage].reshape(job.stage_shape(stage)))

  def row_chunk(self, r0: int, r1: int) -> None:
    """Rows ``[r0, r1)``: computed at once, compared in sub-blocks (the float64 temporaries stay small even
    when the chunk is the whole tensor, chunk_mb=0)."""
    u_chunk = self.store.u_rows(self.job.name, r0, r1)
    # A fresh reader per chunk: safetensors maps the file, and every page read
    # through a long-lived mapping stays in our RSS.
    with bundles.BundleReader(self.greader.path) as chunk_reader:
      res = core.row_stages(
          u_chunk,
          self.s,
          self.v_nk,
          self.offsets,
          compute_dtype=jnp.dtype(self.compute_dtype),
          row_block=self.row_block,
          capture=True,
      )
      res = jax.device_get(res)
      ours_chunk = {st: _to_np(res[st], _F32) for st in core.ROW_STAGES}
      bits_chunk = bf16_bits(res["final_bf16"], "torch")  # torch's NaN encoding, comparable with Python
      del res
      for b0 in range(r0, r1, self.sub_rows):
        b1 = min(r1, b0 + self.sub_rows)
        sl = slice(b0 - r0, b1 - r0)
        self._block(chunk_reader, b0, b1, {st: a[sl] for st, a in ours_chunk.items()}, bits_chunk[sl], u_chunk[sl])

  def _block(
      self,
      chunk_reader: bundles.BundleReader,
      b0: int,
      b1: int,
      ours: dict[str, np.ndarray],
      ours_bits: np.ndarray,
      u_rows: np.ndarray,
  ) -> None:
    job, checks, fc = self.job, self.checks, self.fc

    def golden_row(stage: str) -> np.ndarray:
      return chunk_reader.get_rows(job.key(stage), b0, b1)

    src = golden_row("source_f32")
    checks["source_f32"].update(src, src, origin=(b0, 0))
    us_norms = row_norms(ours["u_scaled"])
    checks["u_scaled"].update(golden_row("u_scaled"), ours["u_scaled"], origin=(b0, 0))
    checks["matmul_pre_norm"].update(
        golden_row("matmul_pre_norm"),
        ours["matmul_pre_norm"],
        origin=(b0, 0),
        tol=matmul_tolerance(us_norms, self.v_norms, job.k, fc.u),
    )
    us0_norms = row_norms(np.asarray(u_rows).astype(self.compute_dtype).astype(np.float64) * self.s_cd[None, :])
    checks["zero_source_f32"].update(
        golden_row("zero_source_f32"),
        ours["zero_source_f32"],
        origin=(b0, 0),
        tol=matmul_tolerance(us0_norms * (1 + fc.u), self.v_norms, job.k, fc.u),
    )
    self.zero_vs_source.update(src, ours["zero_source_f32"], origin=(b0, 0))
    tol_adapted = adapted_tolerance(us_norms, self.v_norms, fc)
    checks["adapted_source_f32"].update(
        golden_row("adapted_source_f32"), ours["adapted_source_f32"], origin=(b0, 0), tol=tol_adapted
    )
    if self.transpose:
      g_f32 = io.read_columns(self.greader.path, job.key("final_f32"), b0, b1)  # [n, rows]
      g_bf16 = io.read_columns(self.greader.path, job.key("final_bf16"), b0, b1)
      checks["final_f32"].update(
          g_f32, ours["adapted_source_f32"].T, origin=(0, b0), tol=tol_adapted.T, hash_rows=False
      )
      checks["final_bf16"].update(g_bf16, ours_bits.view(_BF16).T, origin=(0, b0), hash_rows=False)
      golden_bits_src = np.ascontiguousarray(g_bf16.view(np.uint16).T)
      self.full_final_f32[:, b0:b1] = ours["adapted_source_f32"].T
      self.full_final_bits[:, b0:b1] = ours_bits.T
    else:
      g_bf16 = golden_row("final_bf16")
      checks["final_f32"].update(golden_row("final_f32"), ours["adapted_source_f32"], origin=(b0, 0), tol=tol_adapted)
      checks["final_bf16"].update(g_bf16, ours_bits.view(_BF16), origin=(b0, 0))
      golden_bits_src = g_bf16.view(np.uint16)
    self.accounting.update(golden_bits_src, ours_bits, u_rows, self.v_nk, row_offset=b0)
    if self.writer is not None:
      self.writer.write_rows(job.key("source_f32"), src)
      for stage in core.ROW_STAGES:
        self.writer.write_rows(job.key(stage), ours[stage])
      if not self.transpose:
        self.writer.write_rows(job.key("final_f32"), ours["adapted_source_f32"])
        self.writer.write_rows(job.key("final_bf16"), ours_bits.view(_BF16))

  def target_orientation_hashes(self) -> dict[str, tuple[str, str]]:
    """Transposed tensors: hash and write the held final, and hash the golden's target rows in a streaming
    pass of their own. ``{stage: (ours, golden)}``; empty otherwise."""
    if not self.transpose:
      return {}
    job, n = self.job, self.job.n
    out: dict[str, tuple[str, str]] = {}
    for stage, full, bf16 in (
        ("final_f32", self.full_final_f32, False),
        ("final_bf16", self.full_final_bits.view(_BF16), True),
    ):
      gh = ArrayHasher(bf16=bf16, nan_policy="torch")
      step = max(1, self.rows_per_chunk)
      for c0 in range(0, n, step):
        with bundles.BundleReader(self.greader.path) as r:
          gh.update(r.get_rows(job.key(stage), c0, min(n, c0 + step)))
      out[stage] = (ArrayHasher(bf16=bf16, nan_policy="torch").update(full).hexdigest(), gh.hexdigest())
      if self.writer is not None:
        self.writer.write_rows(job.key(stage), full)
    self.full_final_f32 = self.full_final_bits = None
    return out

  def result(self, mode: str, sha_override: dict[str, tuple[str, str]]) -> dict[str, Any]:
    job = self.job
    stage_results = {st: self.checks[st].result(*sha_override.get(st, (None, None))) for st in core.STAGES}
    expl = self.accounting.to_dict()
    stage_results["final_bf16"]["pass"] = expl["n_unexplained"] == 0
    final_equal = stage_results["final_bf16"]["bit_equal"]
    stages_pass = all(r["pass"] for r in stage_results.values())
    zs = self.zero_vs_source.result()
    return {
        "name": job.name,
        "safe_name": safe_source_name(job.name),
        "shape": [job.m, job.n],
        "rank": job.k,
        "target_shape": list(job.target_shape),
        "layout": self.store.layout,
        "orientation": job.orientation,
        "chunking": {
            "rows_per_chunk": self.rows_per_chunk,
            "n_chunks": self.n_chunks,
            "chunked": self.n_chunks > 1,
            "row_block": self.row_block,
        },
        "stages": stage_results,
        "final_bf16_sha256": stage_results["final_bf16"]["sha256"],
        "golden_final_bf16_sha256": stage_results["final_bf16"]["golden_sha256"],
        "final_bytes_equal": final_equal,
        "explained": expl,
        "components_reproduce_source": {"rel_l2": zs.rel_l2, "max_abs_diff": zs.max_abs_diff, "cosine": zs.cosine},
        "stages_pass": stages_pass,
        "pass": stages_pass and (final_equal or mode == "stage_tolerances"),
    }


@dataclasses.dataclass
class ReplayResult(Report):
  """The report of one replay (``report``, the JSON document) and its renderings."""

  report: dict[str, Any]

  @property
  def passed(self) -> bool:
    return self.report["verdict"] == "PASS"

  def to_dict(self) -> dict[str, Any]:
    return self.report

  def table(self) -> str:
    """One row per tensor: shape, orientation, failing stages, final bytes, mismatches, verdict."""
    rows = [("tensor", "shape", "orient", "stages", "final bytes", "mismatch (expl/unexpl)", "verdict")]
    for t in self.report["tensors"]:
      failing = [s for s, r in t["stages"].items() if r["pass"] is False]
      e = t["explained"]
      rows.append(
          (
              t["name"],
              "x".join(str(d) for d in t["shape"]),
              "T" if t["orientation"] == "transpose" else "I",
              "ok" if not failing else "FAIL:" + ",".join(failing),
              "identical" if t["final_bytes_equal"] else "differ",
              f"{e['n_mismatch']} ({e['n_explained']}/{e['n_unexplained']})",
              "PASS" if t["pass"] else "FAIL",
          )
      )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

  def verdict_line(self) -> str:
    s = self.report["summary"]
    torch_ref = s.get("torch_self_flips")
    ref = "" if torch_ref is None else f"; torch 1-thread vs default flips {torch_ref}"
    return (
        f"SVF parity {self.report['verdict']} (mode={self.report['mode']}, {self.report['scope']}): "
        f"{s['passed']}/{s['tensors']} tensors pass; final bf16 identical {s['final_bytes_equal']}/{s['tensors']}; "
        f"mismatched elements {s['n_mismatch']} (explained {s['n_explained']}: {s['n_explained_tie']} 1-ULP ties,"
        f" {s['n_explained_multi_ulp']} multi-ULP within bound; unexplained {s['n_unexplained']}){ref}; "
        f"combined sha256 {'equal' if s['combined_equal'] else 'differs'}"
    )

  def text(self) -> str:
    return self.table() + "\n" + self.verdict_line()


def _check_report_hashes(golden: io.GoldenRun, results: list[dict[str, Any]], all_selected: bool) -> None:
  """The golden report's recorded final hashes must match the golden bundle's bytes."""
  records = {r.get("name"): r for r in (golden.report.get("tensors") or [])}
  if not all_selected and golden.sample:
    records = {golden.sample.get("source_name"): golden.sample}
  for r in results:
    recorded = (records.get(r["name"]) or {}).get("final_bf16_sha256")
    r["golden_report_final_bf16_sha256"] = recorded
    if recorded is not None and recorded != r["golden_final_bf16_sha256"]:
      raise UsageError(
          f"setup error: {golden.report_path} records final_bf16 sha256 {recorded[:12]}... for {r['name']},"
          f" but the golden bundle hashes to {r['golden_final_bf16_sha256'][:12]}..."
      )


def _backend() -> dict[str, Any]:
  devs = jax.devices()
  return {
      "framework": "jax",
      "backend": jax.default_backend(),
      "devices": [str(d) for d in devs],
      "device_kind": devs[0].device_kind if devs else None,
  }


def replay(
    *,
    components_dir: str | None = None,
    python_report: str | None = None,
    golden_dir: str | None = None,
    stage_dir: str | None = None,
    all_selected: bool = False,
    selected_source_filter: str | None = None,
    layout: str | None = None,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    mode: str = "stage_tolerances",
    row_block: int = core.DEFAULT_ROW_BLOCK,
    compute_dtype: Any = np.float32,
    explain_rule: str = "bound",
    progress: bool = False,
    overwrite: bool = False,
    devices: int = 0,
    peer_timeout_s: float | None = None,
) -> ReplayResult:
  """Replays the golden run in JAX and compares every stage. See the module docstring.

  ``devices``: the all-selected tensors are spread over this many devices
  (0: all of them; :func:`_placement`), balanced by FLOPs, each tensor
  rebuilt and compared on its own device, in a thread per device; under
  ``jax.distributed`` over every process's devices, the results gathered to
  every process through the job runtime (:meth:`parity_jax.runtime.Job.allgather`;
  a process lost for ``peer_timeout_s`` seconds makes the others exit 2 with one
  line). The report is the single-device one: same per-stage hashes,
  same explained-mismatch accounting, same tensor order; only
  ``backend.placement`` says where each tensor ran. ``chunk_mb`` is per
  device (up to ``devices`` chunks are in memory at once).

  Bad input (missing files, mismatched shapes, a filter selecting nothing, a
  missing golden stage, a ``stage_dir`` on or inside an input or holding our
  bundle already without ``overwrite``) raises :class:`UsageError` before
  anything is written.
  """
  compute_dtype = _check_args(mode, explain_rule, row_block, chunk_mb, compute_dtype)
  if devices < 0 or devices > jax.device_count():
    raise UsageError(f"devices must lie in [0, {jax.device_count()}] (0: all), got {devices}")
  if stage_dir and jax.process_count() > 1:
    raise UsageError("stage_dir: our stage bundle is written by a single process; drop it under jax.distributed")
  golden = io.load_golden(python_report, golden_dir)
  layout = layout or golden.layout or "torch_v"
  comp_path, off_path = io.find_component_files(components_dir or golden.components_dir or golden.base_dir)
  bundle_path = _golden_bundle(golden, all_selected)
  inputs = [golden.report_path, bundle_path, comp_path, off_path, golden.sample_bundle, golden.all_selected_bundle]
  out_bundle = _check_stage_dir(stage_dir, inputs, all_selected, overwrite)

  with io.ComponentStore(comp_path, off_path, layout) as store, bundles.BundleReader(bundle_path) as greader:
    jobs = _select(store, golden, all_selected, selected_source_filter)
    for job in jobs:
      _check_golden(job, greader)
    writer = None
    if out_bundle is not None:
      os.makedirs(stage_dir, exist_ok=True)
      specs = [(job.key(st), job.stage_shape(st), _stage_dtype(st)) for job in jobs for st in core.STAGES]
      prov = default_provenance(
          "parity_jax.svf.replay", golden_report=os.path.abspath(golden.report_path), layout=layout
      )
      writer = bundles.BundleWriter(out_bundle, specs, prov, interleave=True)
    placement, assignment = _placement(jobs, devices if all_selected else 1)
    try:
      with progress_bar(sum(job.m * job.k * 4 for job in jobs), "svf replay", enabled=progress) as bar:
        lock = threading.Lock()
        shared_bar, shared_writer = _Locked(bar, lock), (None if writer is None else _Locked(writer, lock))

        def one(i: int, device: Any) -> dict[str, Any]:
          shared_bar.set_postfix_str(jobs[i].name)
          return _replay_tensor(
              jobs[i],
              store,
              greader,
              shared_writer,
              mode=mode,
              chunk_mb=chunk_mb,
              row_block=row_block,
              compute_dtype=compute_dtype,
              explain_rule=explain_rule,
              progress=shared_bar,
          )

        done: dict[int, dict[str, Any]] = {}
        mine = runtime.run_on_devices(one, assignment)
        for part in _everyones(mine, peer_timeout_s):
          done.update(part)
        results = [done[i] for i in range(len(jobs))]
      _check_report_hashes(golden, results, all_selected)
      if writer is not None:
        writer.close()
    except BaseException:
      if writer is not None:
        writer.abort()
      raise

  settings = {
      "scope": "all_selected" if all_selected else "sample",
      "mode": mode,
      "layout": layout,
      "selected_source_filter": selected_source_filter,
      "chunk_mb": chunk_mb,
      "row_block": row_block,
      "compute_dtype": str(compute_dtype),
      "explain_rule": explain_rule,
  }
  files = {"bundle": bundle_path, "components": comp_path, "offsets": off_path, "ours": out_bundle}
  return ReplayResult(_report(results, golden, settings, files, all_selected, placement))


def _everyones(mine: dict[int, dict[str, Any]], peer_timeout_s: float | None) -> list[dict[int, dict[str, Any]]]:
  """Every process's results on every process (``[mine]`` in one process), through the job runtime."""
  if jax.process_count() == 1:
    return [mine]
  with runtime.attach(peer_timeout_s or runtime.DEFAULT_TIMEOUT_S, "svf") as job:
    runtime.stall_point("svf.gather", job.process_id)
    parts = job.allgather("results", pickle.dumps(mine, protocol=pickle.HIGHEST_PROTOCOL))
  return [pickle.loads(p) for p in parts]


class _Locked:
  """Calls to an object's methods under one lock (the progress bar and the bundle writer, shared by device threads)."""

  def __init__(self, obj: Any, lock: threading.Lock):
    self._obj, self._lock = obj, lock

  def __getattr__(self, name: str) -> Any:
    attr = getattr(self._obj, name)
    if not callable(attr):
      return attr

    def call(*args, **kwargs):
      with self._lock:
        return attr(*args, **kwargs)

    return call


def _placement(jobs: list[_TensorWork], devices: int) -> tuple[dict[str, Any], list[tuple[Any, list[int]]]]:
  """Which device rebuilds which tensor: LPT over the first ``devices`` global devices (0: all) by FLOPs.

  Returns the placement recorded in the report and this process's ``(device,
  job indices)`` pairs. Every process computes the same placement.
  """
  pool = jax.devices()[:devices] if devices else jax.devices()
  costs = [2.0 * job.m * job.n * job.k for job in jobs]
  bins = runtime.balance(costs, len(pool))
  me = jax.process_index()
  assignment = [(d, bins[b]) for b, d in enumerate(pool) if d.process_index == me]
  placement = {
      "devices": len(pool),
      "processes": len({d.process_index for d in pool}),
      "balanced_by": "matmul FLOPs 2 m n k, greedy longest-first",
      "device_of_tensor": {jobs[i].name: pool[b].id for b in range(len(pool)) for i in bins[b]},
      "gflop_per_device": {str(pool[b].id): sum(costs[i] for i in bins[b]) / 1e9 for b in range(len(pool))},
  }
  return placement, assignment


def _check_args(mode: str, explain_rule: str, row_block: int, chunk_mb: float, compute_dtype: Any) -> np.dtype:
  if mode not in MODES:
    raise UsageError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
  if explain_rule not in EXPLAIN_RULES:
    raise UsageError(f"unknown explain rule {explain_rule!r}; expected one of {', '.join(EXPLAIN_RULES)}")
  if row_block < 1:
    raise UsageError(f"row_block must be >= 1, got {row_block}")
  if chunk_mb < 0:
    raise UsageError(f"chunk_mb must be >= 0, got {chunk_mb}")
  compute_dtype = np.dtype(compute_dtype)
  if compute_dtype not in (_F32, _BF16):
    raise UsageError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype}")
  return compute_dtype


def _golden_bundle(golden: io.GoldenRun, all_selected: bool) -> str:
  bundle_path = golden.all_selected_bundle if all_selected else golden.sample_bundle
  if not bundle_path:
    what = "stage_debug.all_selected_stage_tensor_file" if all_selected else "stage_debug.stage_tensor_file"
    raise UsageError(
        f"setup error: {golden.report_path} names no {what}"
        + (" (all-selected replay needs an all-selected report)" if all_selected else "")
    )
  if not os.path.isfile(bundle_path):
    raise UsageError(f"setup error: golden stage bundle {bundle_path} does not exist")
  return bundle_path


def _check_stage_dir(
    stage_dir: str | None, inputs: list[str | None], all_selected: bool, overwrite: bool
) -> str | None:
  """Our bundle's path under ``stage_dir`` (None without one); never on or inside an input, never over an old one."""
  if not stage_dir:
    return None
  name = io.ALL_SELECTED_BUNDLE if all_selected else io.SAMPLE_BUNDLE
  input_dirs = {os.path.dirname(os.path.abspath(p)) for p in inputs if p}
  check_output_dir(
      stage_dir, [p for p in inputs if p] + sorted(input_dirs), "stage_dir", overwrite=overwrite, will_write=[name]
  )
  return os.path.join(stage_dir, name)


def _report(
    results: list[dict[str, Any]],
    golden: io.GoldenRun,
    settings: dict[str, Any],
    files: dict[str, str | None],
    all_selected: bool,
    placement: dict[str, Any],
) -> dict[str, Any]:
  """The replay's JSON document: settings, backend, inputs, per-tensor results, summary and verdict."""
  ours_combined = combined_sha256((r["name"], r["final_bf16_sha256"]) for r in results)
  golden_combined = combined_sha256((r["name"], r["golden_final_bf16_sha256"]) for r in results)
  self_check = golden.report.get("torch_self_consistency") or {}
  total = lambda key: sum(r["explained"][key] for r in results)  # noqa: E731
  summary = {
      "tensors": len(results),
      "passed": sum(r["pass"] for r in results),
      "final_bytes_equal": sum(r["final_bytes_equal"] for r in results),
      "n_elements": sum(r["shape"][0] * r["shape"][1] for r in results),
      "n_mismatch": total("n_mismatch"),
      "n_explained": total("n_explained"),
      "n_explained_tie": total("n_explained_tie"),
      "n_explained_multi_ulp": total("n_explained_multi_ulp"),
      "n_unexplained": total("n_unexplained"),
      "combined_equal": ours_combined == golden_combined,
      "torch_self_flips": self_check.get("bf16_elements_differing"),
      "torch_self_flips_elements": self_check.get("n_elements"),
  }
  return {
      "format": io.REPORT_FORMAT,
      "producer": "parity_jax.svf.replay",
      **{
          k: settings[k]
          for k in ("scope", "mode", "layout", "selected_source_filter", "chunk_mb", "row_block", "compute_dtype")
      },
      "matmul_precision": "HIGHEST",
      "sum_order": "torch_cpu_cascade",
      "nan_policy": "torch",
      "explain_rule": settings["explain_rule"],
      "backend": dict(_backend(), placement=placement),
      "versions": package_versions(),
      "golden": {
          "report": os.path.abspath(golden.report_path),
          "bundle": os.path.abspath(files["bundle"]),
          "producer": golden.report.get("producer"),
          "backend": golden.report.get("backend"),
          "torch_self_consistency": self_check or None,
      },
      "components": {
          "components_file": os.path.abspath(files["components"]),
          "offsets_file": os.path.abspath(files["offsets"]),
      },
      "stage_debug": {
          ("all_selected_stage_tensor_file" if all_selected else "stage_tensor_file"): os.path.abspath(files["ours"])
          if files["ours"]
          else None
      },
      "stage_tolerances": {s: {"rule": r, "why": w} for s, (r, w) in STAGE_TOLERANCES.items()},
      "tensors": results,
      "combined_sha256": ours_combined,
      "golden_combined_sha256": golden_combined,
      "golden_report_combined_sha256": golden.report.get("combined_sha256"),
      "summary": summary,
      "verdict": "PASS" if results and all(r["pass"] for r in results) else "FAIL",
  }
