"""End-to-end forward parity: our JAX Qwen forward against the HF oracle, stage by stage.

``forward_parity(model_dir, golden=PATH)`` loads the HF checkpoint with
:mod:`parity_jax.qwen2`, runs the tokens (and padding mask) recorded in the
golden's provenance with stage capture on, and compares every stage against
the golden with :func:`parity_jax.bundles.compare_bundles`. With
``oracle=True`` the golden is produced on the spot by HF transformers
(:func:`parity_jax.oracle.hf_forward.hf_stages`, float32, CPU) instead of
being read from a file. This is what a researcher runs to bisect a drift: the
report names the first divergent stage.

``dtype="bfloat16"`` runs our forward with bf16 weights and activations and
compares against the float32 golden under the ``bf16`` profile (unless a
profile is given).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from parity_jax.bundles import BundleReader, BundleReport, StageBundle, compare_bundles
from parity_jax.dtypes import compute_dtype
from parity_jax.errors import UsageError
from parity_jax.provenance import default_provenance
from parity_jax.qwen2.capture import capture_stages
from parity_jax.report import Report

__all__ = ["ForwardParity", "forward_parity", "golden_inputs"]

DEFAULT_PROFILE = {"float32": "f32", "bfloat16": "bf16"}


@dataclasses.dataclass
class ForwardParity(Report):
  """The comparison report plus both sides, so a notebook can dig into any stage."""

  report: BundleReport
  golden: StageBundle | str  # the live oracle's bundle, or the golden file's path
  candidate: StageBundle
  tokens: np.ndarray
  attention_mask: np.ndarray | None

  @property
  def passed(self) -> bool:
    return self.report.passed

  def to_dict(self) -> dict[str, Any]:
    return self.report.to_dict()

  def text(self, failing_only: bool = False) -> str:
    return self.report.text(failing_only=failing_only)

  def _repr_html_(self) -> str:
    return self.report._repr_html_()


def golden_inputs(golden: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
  """The ``tokens`` and ``attention_mask`` recorded in a golden bundle's provenance (``inputs``)."""
  with BundleReader(golden) as r:
    prov = r.provenance
  inputs = prov.get("inputs")
  if not isinstance(inputs, dict) or "tokens" not in inputs:
    raise UsageError(
        f"{golden}: the golden's provenance records no inputs.tokens; give tokens and use the live oracle instead"
    )
  try:
    tokens = np.asarray(inputs["tokens"], dtype=np.int64)
    mask = inputs.get("attention_mask")
    mask = None if mask is None else np.asarray(mask, dtype=np.int64)
  except (TypeError, ValueError):
    raise UsageError(f"{golden}: inputs in the provenance are not rectangular integer arrays") from None
  return tokens, mask, prov


def forward_parity(
    model_dir: str | os.PathLike,
    golden: str | os.PathLike | None = None,
    *,
    oracle: bool = False,
    tokens: Any = None,
    attention_mask: Any = None,
    dtype: str = "float32",
    profile: Any = None,
    top_k: int = 5,
    strict: bool = True,
    progress: bool = False,
    mesh: Any = None,
    rules: Any = None,
) -> ForwardParity:
  """Runs our forward on ``model_dir`` and compares it with the golden (file) or the live HF oracle.

  Inputs come from ``tokens``/``attention_mask`` when given, else from the
  golden's provenance. ``profile`` defaults to ``f32`` for float32 and
  ``bf16`` for bfloat16. Bad input raises a one-line :class:`UsageError`
  before the model runs. ``mesh``/``rules`` load our side sharded onto a
  device mesh (:mod:`parity_jax.qwen2.sharding`); the comparison is the same.
  """
  dtype = compute_dtype(dtype).name
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise UsageError(f"no such model directory: {model_dir}")
  if golden is None and not oracle:
    raise UsageError("give a golden bundle (golden) or ask for the live oracle (oracle=True)")
  if tokens is None:
    if golden is None:
      raise UsageError("the live oracle needs tokens (or a golden whose provenance records the inputs)")
    tokens, recorded_mask, _ = golden_inputs(golden)
    if attention_mask is None:
      attention_mask = recorded_mask
  tokens = np.asarray(tokens)
  if oracle:
    from parity_jax.oracle import require_oracle

    require_oracle()
  candidate = capture_stages(
      model_dir, tokens, dtype=dtype, attention_mask=attention_mask, strict=strict, mesh=mesh, rules=rules
  )
  if oracle:
    from parity_jax.oracle.hf_forward import hf_stages

    prov = default_provenance(
        "parity_jax.oracle.hf_forward (live oracle of parity_jax.qwen2.parity)",
        model=os.path.basename(os.path.normpath(model_dir)),
        model_dir=os.path.abspath(model_dir),
        dtype="float32",
        inputs=candidate.provenance["inputs"],
    )
    golden_bundle = StageBundle(hf_stages(model_dir, tokens, attention_mask), prov)
  else:
    golden_bundle = os.fspath(golden)  # compared stage by stage straight from the file
  report = compare_bundles(
      golden_bundle, candidate, profile=profile or DEFAULT_PROFILE[dtype], top_k=top_k, progress=progress
  )
  mask = None if attention_mask is None else np.asarray(attention_mask)
  return ForwardParity(report, golden_bundle, candidate, tokens, mask)
