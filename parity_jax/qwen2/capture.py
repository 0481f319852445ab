"""Stage capture to a bundle file: what ``python -m tools.capture_stages`` runs.

Kept in the library (not the tool) so tests and notebooks call the same code.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parity_jax import stages as stages_lib
from parity_jax.errors import UsageError
from parity_jax.paths import check_output_path
from parity_jax.qwen2.config import load_config
from parity_jax.qwen2.model import Model, forward
from parity_jax.qwen2.params import load_params

__all__ = ["DTYPES", "capture_stages", "capture_to_bundle", "check_inputs", "check_out_path", "parse_int_rows"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_INT = re.compile(r"^[+-]?\d+$")


def parse_int_rows(text: str, what: str) -> np.ndarray:
  """``"1,2,3"`` -> ``[[1, 2, 3]]``; ``"1,2;3,4"`` -> ``[[1, 2], [3, 4]]`` (rows separated by ``;``).

  Empty fields, non-integers and ragged rows are one-line :class:`UsageError` s.
  """
  text = text.strip()
  if not text:
    raise UsageError(f"--{what} is empty")
  rows = []
  for r, row in enumerate(text.split(";")):
    fields = [f.strip() for f in row.split(",")]
    bad = [f for f in fields if not _INT.match(f)]
    if bad:
      raise UsageError(f"--{what}: row {r} has non-integer entries {bad[:3]} (expected e.g. 1,2,3 or 1,2;3,4)")
    rows.append([int(f) for f in fields])
  lengths = sorted({len(r) for r in rows})
  if len(lengths) > 1:
    raise UsageError(f"--{what}: rows have different lengths {lengths}; pad them and pass --attention_mask")
  a = np.asarray(rows, dtype=np.int64)
  return a


def check_out_path(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), flag: str = "--out") -> str:
  """Validates an output ``.safetensors`` path before any work (see :func:`parity_jax.paths.check_output_path`)."""
  return check_output_path(out, inputs, flag, suffix=".safetensors")


def check_inputs(cfg, tokens: Any, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
  """Token range, batch shape and padding mask against ``cfg``: one-line :class:`UsageError` s."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
    raise UsageError(f"tokens must be a non-empty int array [batch, seq], got {tokens.dtype} {list(tokens.shape)}")
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= cfg.vocab_size:
    raise UsageError(f"token ids must lie in [0, {cfg.vocab_size}) for this model, got min {lo} max {hi}")
  if attention_mask is not None:
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape != tokens.shape:
      raise UsageError(f"attention_mask shape {list(attention_mask.shape)} does not match tokens {list(tokens.shape)}")
    if not np.isin(attention_mask, (0, 1)).all():
      raise UsageError("attention_mask must hold only 0 and 1")
  cfg.check_seq_len(tokens.shape[1])
  return tokens, attention_mask


def capture_stages(model_dir: str | os.PathLike, tokens: Any, dtype: str = "float32", attention_mask: Any = None,
                   strict: bool = True) -> stages_lib.StageBundle:
  """Loads ``model_dir``, runs ``forward(capture=True)`` and returns the stages as a bundle with provenance.

  The config and the inputs are checked before any weight is read.
  """
  if dtype not in DTYPES:
    raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  cfg = load_config(model_dir)  # missing dir / unsupported config
  tokens, attention_mask = check_inputs(cfg, tokens, attention_mask)
  params, report = load_params(model_dir, cfg, dtype=DTYPES[dtype], strict=strict)
  model = Model(cfg, params)
  _, stages = forward(model, tokens, attention_mask=attention_mask, capture=True)
  stages = {name: np.asarray(jax.device_get(v)) for name, v in stages.items()}
  prov = stages_lib.default_provenance(
      "parity_jax.qwen2 (tools.capture_stages)",
      model=os.path.basename(os.path.normpath(model_dir)),
      model_dir=os.path.abspath(model_dir),
      model_type=cfg.model_type,
      dtype=dtype,
      inputs={"tokens": tokens.tolist(), "attention_mask": None if attention_mask is None else attention_mask.tolist()},
      positions="default arange(T)",
      weight_files=[os.path.basename(f) for f in report.files],
      stored_dtypes=list(report.stored_dtypes),
      backend=jax.default_backend(),
  )
  return stages_lib.StageBundle(stages, prov)


def capture_to_bundle(model_dir: str, tokens: np.ndarray, out: str, dtype: str = "float32",
                      attention_mask: np.ndarray | None = None, strict: bool = True) -> dict[str, Any]:
  """:func:`capture_stages` written to the stage bundle ``out``; returns the provenance written.

  The output path is checked before anything runs, so bad input fails fast and
  nothing is written.
  """
  out = check_out_path(out, (model_dir,))
  bundle = capture_stages(model_dir, tokens, dtype=dtype, attention_mask=attention_mask, strict=strict)
  bundle.save(out)
  return bundle.provenance
