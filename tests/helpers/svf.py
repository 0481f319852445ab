"""SVF test helpers: a second, legitimate float32 evaluation order of the formula.

Whether JAX's float32 dot and torch's MKL sgemm round a product the same way
depends on the machine (on an AVX-512 EPYC the shipped goldens hold 25 bf16
ties between them; on an AVX2 EPYC none). Tests that need *real* ties to prove
that every legitimate one is explained therefore make their own, the same on
every machine: the matmul of the Python formula evaluated as a plain
sequential float32 sum over ``k`` in numpy (one rounded product and one
rounded add per term, IEEE, no FMA, no blocking), which is as legitimate an
evaluation of ``(U * scaled_s) @ V.T`` as any BLAS's and differs from torch's
blocked one in the last bits.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import ml_dtypes
import numpy as np

from parity_jax import bundles as stages
from parity_jax.svf import ComponentStore, tensor_key
from parity_jax.svf.io import find_component_files

ROOT = pathlib.Path(__file__).resolve().parents[2]
SVF_GOLDENS = ROOT / "goldens" / "svf"
_F32 = np.float32


def sequential_order(
    u: np.ndarray, s: np.ndarray, v_nk: np.ndarray, offsets: np.ndarray, normalization: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """``(matmul_pre_norm, adapted)`` in float32 with the matmul summed term by term over ``k``.

  ``normalization`` is the golden's own scalar, so only the matmul's order differs.
  """
  us = u.astype(_F32) * (s.astype(_F32) * (_F32(1) + offsets.astype(_F32)))[None, :]
  acc = np.zeros((u.shape[0], v_nk.shape[0]), _F32)
  for j in range(u.shape[1]):
    acc += np.outer(us[:, j], v_nk[:, j].astype(_F32))
  return acc, acc * _F32(np.asarray(normalization).reshape(()))


def _bf16_sha(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).view("<u2").tobytes()).hexdigest()


def _combined(pairs) -> str:
  h = hashlib.sha256()
  for name, digest in sorted(pairs):
    h.update(f"{name}\t{digest}\n".encode())
  return h.hexdigest()


def alternative_order_goldens(dst: pathlib.Path, src: pathlib.Path = SVF_GOLDENS) -> tuple[pathlib.Path, int]:
  """A copy of the SVF goldens whose matmul-derived stages come from :func:`sequential_order`.

  ``matmul_pre_norm``, ``adapted_source_f32``, ``final_f32`` and ``final_bf16``
  of every tensor (and of the sample, in its target orientation) are replaced,
  and the report's final hashes follow. Returns the directory and the number
  of final bf16 elements that now differ from torch's (the legitimate ties).
  """
  shutil.copytree(src, dst)
  report = json.loads((dst / "svf_report.json").read_text())
  sample_name = report["sample"]["source_name"]
  all_path = dst / report["stage_debug"]["all_selected_stage_tensor_file"]
  sample_path = dst / report["stage_debug"]["stage_tensor_file"]
  all_b, sample_b = stages.load_bundle(all_path), stages.load_bundle(sample_path)
  all_new, sample_new = dict(all_b), dict(sample_b)
  n_ties = 0
  with ComponentStore(*find_component_files(str(src))) as st:
    for name in st.names:
      norm = all_b[tensor_key(name, "normalization")]
      pre, adapted = sequential_order(st.u(name), st.s(name), st.v_nk(name), st.offsets(name), norm)
      final = adapted.astype(ml_dtypes.bfloat16)
      n_ties += int((final.view(np.uint16) != all_b[tensor_key(name, "final_bf16")].view(np.uint16)).sum())
      for stage, value in (
          ("matmul_pre_norm", pre),
          ("adapted_source_f32", adapted),
          ("final_f32", adapted),
          ("final_bf16", final),
      ):
        all_new[tensor_key(name, stage)] = value
      if name == sample_name:  # the sample is stored in its target orientation ([in, out]: a transpose)
        for stage, value in (("matmul_pre_norm", pre), ("adapted_source_f32", adapted)):
          sample_new[f"stage.{stage}"] = value
        sample_new["stage.final_f32"] = np.ascontiguousarray(adapted.T)
        sample_new["stage.final_bf16"] = np.ascontiguousarray(final.T)
        report["sample"]["final_bf16_sha256"] = _bf16_sha(final.T)
      for record in report["tensors"]:
        if record["name"] == name:
          record["final_bf16_sha256"] = _bf16_sha(final)
  report["combined_sha256"] = _combined((r["name"], r["final_bf16_sha256"]) for r in report["tensors"])
  for path, data, old in ((all_path, all_new, all_b), (sample_path, sample_new, sample_b)):
    path.unlink()
    stages.save_bundle(path, data, old.provenance)
  (dst / "svf_report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
  (dst / "MANIFEST.json").unlink()  # describes the torch files, not these
  return dst, n_ties
