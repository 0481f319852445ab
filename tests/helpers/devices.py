"""Running code on N forced host devices: XLA fixes the CPU device count when the backend starts.

The pytest process already started JAX with one device, so every test that
needs a mesh runs its body in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Sequence

ROOT = pathlib.Path(__file__).resolve().parents[2]


def device_env(n: int = 8, **extra: str) -> dict[str, str]:
  """The environment of a child process with ``n`` CPU devices (and nothing that could pick a GPU)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.update(extra)
  return env


def run_python(
    code: str, args: Sequence[str] = (), n: int = 8, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
  """``python -c code args...`` from the repository root on ``n`` forced host devices."""
  return subprocess.run(
      [sys.executable, "-c", code, *args],
      cwd=ROOT,
      env=device_env(n, **env),
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def run_module(
    module: str, args: Sequence[str] = (), n: int = 8, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
  """``python -m module args...`` from the repository root on ``n`` forced host devices."""
  return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=ROOT,
      env=device_env(n, **env),
      capture_output=True,
      text=True,
      timeout=timeout,
  )
