"""Provenance: who produced a file, with what, on which machine.

* :func:`default_provenance` -- producer, python, platform, library versions,
  seed and extras: the record every bundle, golden and report carries.
* :func:`cpu_fingerprint` / :func:`torch_backend` -- what decides whether two
  runs can promise identical bytes (CPU vendor, model and SIMD flags, BLAS
  build, dispatch level, threads, dispatch overrides).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

__all__ = ["DISPATCH_ENV", "cpu_fingerprint", "default_provenance", "package_versions", "torch_backend"]

_VERSIONED = (
    "parity_jax",
    "numpy",
    "jax",
    "jaxlib",
    "safetensors",
    "ml_dtypes",
    "orbax-checkpoint",
    "tensorstore",
    "torch",
    "transformers",
)


def package_versions(packages: tuple[str, ...] = _VERSIONED) -> dict[str, str]:
  """Installed versions from package metadata (nothing is imported, so torch costs nothing)."""
  out = {}
  for pkg in packages:
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def default_provenance(producer: str, seed: int | None = None, **extra: Any) -> dict[str, Any]:
  """Provenance for a bundle, golden or report: producer, python/platform, library versions, seed, extras."""
  prov: dict[str, Any] = {
      "producer": producer,
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "versions": package_versions(),
  }
  if seed is not None:
    prov["seed"] = seed
  prov.update(extra)
  return prov


# Environment variables that change which kernels torch / MKL / XLA dispatch to.
DISPATCH_ENV = (
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "MKL_NUM_THREADS",
    "OMP_NUM_THREADS",
    "XLA_FLAGS",
)
_ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_vnni",
    "amx_tile",
)


def cpu_fingerprint() -> dict[str, object]:
  """The CPU as far as kernels can tell: vendor, model, family/model/stepping and the SIMD flags that matter.

  Two machines with the same torch build can still round differently when any
  of these differ (an Intel and an AMD AVX-512 part run different MKL code
  paths), so byte-equality promises are bound to all of them.
  """
  info: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        if not line.strip():
          break  # the first processor is enough
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  flags = set(info.get("flags", "").split())
  return {
      "machine": platform.machine(),
      "vendor": info.get("vendor_id") or platform.processor() or "unknown",
      "model_name": info.get("model name", "unknown"),
      "family_model_stepping": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
      "isa": sorted(f for f in _ISA_FLAGS if f in flags),
  }


def torch_backend() -> dict[str, object]:
  """torch's CPU backend: version, threads, dispatch level, the BLAS/LAPACK build, the CPU, dispatch overrides."""
  import torch

  build = torch.__config__.show().splitlines()
  blas = [line.strip(" -") for line in build if "Math Kernel Library" in line or "OpenBLAS" in line or "BLIS" in line]
  return {
      "framework": "torch",
      "version": torch.__version__,
      "device": "cpu",
      "num_threads": torch.get_num_threads(),
      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
      "blas": "mkl" if torch.backends.mkl.is_available() else "other",
      "blas_build": blas[0] if blas else "unknown",
      "cpu": cpu_fingerprint(),
      "dispatch_env": {k: os.environ[k] for k in DISPATCH_ENV if k in os.environ},
  }
