"""JSON with non-finite floats: the one encoding every parity_jax report uses.

Strict JSON has no NaN or Infinity. Reports need them (a rel-L2 is ``inf``
when a NaN appears on one side only), so they are written as the strings
``"nan"``, ``"inf"`` and ``"-inf"``, and read back with :func:`from_jsonable`
(``float("inf")`` parses them). Everything else is plain JSON.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from parity_jax.files import write_text_atomic

__all__ = ["dumps", "from_jsonable", "jsonable", "num", "write_json"]

_NONFINITE = {"nan", "inf", "-inf"}


def num(x: Any) -> Any:
  """One number as JSON: non-finite floats as ``"nan"``/``"inf"``/``"-inf"``; other values unchanged."""
  if isinstance(x, (float, np.floating)):
    x = float(x)
    if math.isnan(x):
      return "nan"
    if math.isinf(x):
      return "inf" if x > 0 else "-inf"
    return x
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def jsonable(obj: Any) -> Any:
  """``obj`` with every float made JSON-safe (:func:`num`), recursively through dicts, lists and tuples."""
  if isinstance(obj, dict):
    return {k: jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  return num(obj)


def from_jsonable(x: Any) -> Any:
  """The inverse of :func:`num` for one value: ``"nan"``/``"inf"``/``"-inf"`` back to floats."""
  return float(x) if isinstance(x, str) and x in _NONFINITE else x


def dumps(obj: Any, indent: int | None = 1, sort_keys: bool = False) -> str:
  """Strict JSON text of ``obj`` (non-finite floats encoded, never NaN/Infinity literals)."""
  return json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1, sort_keys: bool = False) -> str:
  """Writes :func:`dumps` of ``obj`` plus a newline atomically; returns the absolute path."""
  return write_text_atomic(path, dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
