"""Path checks shared by the tools: outputs never land on or inside an input.

Tools never modify their inputs, and bad output paths are bad input: each
check raises a one-line :class:`~parity_jax.errors.UsageError` before any work
is done.
"""

from __future__ import annotations

import os
from typing import Iterable

from parity_jax.errors import UsageError

__all__ = ["check_output_path", "is_inside"]


def is_inside(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
  """True when ``child`` is ``parent`` or lies below it (symlinks resolved)."""
  child, parent = os.path.realpath(child), os.path.realpath(parent)
  return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), flag: str = "--out",
                      suffix: str | None = None) -> str:
  """Validates an output file path: the suffix, not a directory, parent exists, not on or inside an input."""
  path = os.fspath(path)
  if suffix is not None and not path.endswith(suffix):
    raise UsageError(f"{flag} must name a {suffix} file, got {path!r}")
  for src in inputs:
    if src is not None and os.path.exists(src) and is_inside(path, src):
      raise UsageError(f"{flag}={path} would overwrite or lie inside an input ({os.fspath(src)}); tools never modify their inputs")
  if os.path.isdir(path):
    raise UsageError(f"{flag} is a directory: {path}")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise UsageError(f"{flag}: directory {parent} does not exist")
  return path
