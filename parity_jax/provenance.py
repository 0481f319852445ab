"""Provenance helpers shared by every producer of goldens, bundles and reports."""

from __future__ import annotations

import hashlib
import os

from parity_jax.stages import default_provenance

__all__ = ["default_provenance", "file_sha256"]


def file_sha256(path: str | os.PathLike) -> str:
  """sha256 of a file's bytes, read in 1 MiB blocks (bounded memory for any size)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
