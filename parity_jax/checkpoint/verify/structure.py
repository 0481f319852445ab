"""Phase 1 of the verifier, metadata only: 1:1 coverage through the spec's inverse, kind, shape and dtype per pair."""

from __future__ import annotations

from parity_jax.checkpoint.formats.base import Checkpoint, LeafMeta
from parity_jax.checkpoint.spec import LeafPlan, MigrationPlan, RemapSpec
from parity_jax.checkpoint.verify.report import (
    DTYPE_MISMATCH,
    EXTRA,
    KIND_MISMATCH,
    MISSING,
    SHAPE_MISMATCH,
    UNREADABLE,
    LeafResult,
)

__all__ = ["PENDING", "check_structure"]


def check_structure(
    plan: MigrationPlan, spec: RemapSpec, src_ckpt: Checkpoint, mig_ckpt: Checkpoint
) -> tuple[list[LeafResult], list[tuple[LeafPlan, LeafResult]]]:
  """Phase 1, metadata only: one result per leaf; the pairs whose kind, shape and dtype fit go on to phase 2."""
  results: list[LeafResult] = []
  to_compare: list[tuple[LeafPlan, LeafResult]] = []
  for p in plan.leaves:
    res = _pair_result(p, src_ckpt.leaves[p.source], mig_ckpt.leaves.get(p.dest))
    results.append(res)
    if res.status == PENDING:
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


PENDING = "PENDING"  # structure fits; the values phase decides


def _pair_result(p: LeafPlan, s: LeafMeta, m: LeafMeta | None) -> LeafResult:
  """The structure verdict for one planned pair (status ``PENDING`` when only the values can tell)."""
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
  res.status = PENDING
  return res
