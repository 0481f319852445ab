"""I/O accounting for reports: requests and bytes per scheme, this process, tensorstore's own reads included.

Bucket I/O is counted by tensorstore itself (its metrics registry,
``ts.experimental_collect_matching_metrics('/tensorstore/kvstore/<driver>/')``),
so the zarr/OCDBT reads of any tensorstore opened in this process count, not
only this package's. Local I/O is this package's own reads and writes plus
tensorstore's ``file`` driver. The counters run from the start of the process;
:func:`io_stats` with ``since=`` gives the difference to an earlier snapshot.
"""

from __future__ import annotations

import threading

__all__ = ["count_local", "io_stats"]

_DRIVERS = {"file": ("file",), "gs": ("gcs",), "s3": ("s3",)}
_FIELDS = ("requests", "reads", "writes", "lists", "deletes", "retries", "bytes_read", "bytes_written")
_LOCAL = dict.fromkeys(("reads", "writes", "lists", "deletes", "bytes_read", "bytes_written"), 0)
_LOCAL_LOCK = threading.Lock()


def count_local(**deltas: int) -> None:
  """Adds to this package's own counters of local I/O (``reads=1, bytes_read=n``, ...)."""
  with _LOCAL_LOCK:
    for k, v in deltas.items():
      _LOCAL[k] += int(v)


def _metrics() -> dict[str, dict]:
  import tensorstore as ts

  out = {}
  for m in ts.experimental_collect_matching_metrics("/tensorstore/", include_zero_metrics=True):
    values = m.get("values") or [{}]
    out[m["name"]] = values[0]
  return out


def _value(metrics: dict, name: str) -> int:
  return int((metrics.get(name) or {}).get("value", 0) or 0)


def io_stats(since: dict | None = None) -> dict:
  """``{"requests", "bytes_read", "bytes_written", "file": {...}, "gs": {...}, "s3": {...}, "http": {...}}``.

  Per scheme: ``requests`` (reads after coalescing + writes + lists +
  deletes + retries), ``reads``, ``writes``, ``lists``, ``deletes``,
  ``retries``, ``bytes_read``, ``bytes_written``. ``http``: HTTP requests
  started by tensorstore and the most ever in flight at once
  (``peak_in_flight``, not reset by ``since``). A GCS delete of a prefix
  counts as one delete (tensorstore lists and deletes each object inside).
  With ``since`` (an earlier result), every count is the difference.
  """
  m = _metrics()
  out: dict = {}
  for scheme, drivers in _DRIVERS.items():
    row = dict.fromkeys(_FIELDS, 0)
    for d in drivers:
      p = f"/tensorstore/kvstore/{d}/"
      row["reads"] += _value(m, p + "batch_read")
      row["writes"] += _value(m, p + "write")
      row["lists"] += _value(m, p + "list")
      row["deletes"] += _value(m, p + "delete_range")
      row["retries"] += _value(m, p + "retries")
      row["bytes_read"] += _value(m, p + "bytes_read")
      row["bytes_written"] += _value(m, p + "bytes_written")
    if scheme == "file":
      with _LOCAL_LOCK:
        for k, v in _LOCAL.items():
          row[k] += v
    row["requests"] = row["reads"] + row["writes"] + row["lists"] + row["deletes"] + row["retries"]
    out[scheme] = row
  active = m.get("/tensorstore/http/active") or {}
  out["http"] = {
      "requests": _value(m, "/tensorstore/http/request_started"),
      "peak_in_flight": int(active.get("max_value", 0) or 0),
  }
  for k in ("requests", "bytes_read", "bytes_written"):
    out[k] = sum(out[s][k] for s in _DRIVERS)
  if since:
    for s in _DRIVERS:
      for k in _FIELDS:
        out[s][k] -= (since.get(s) or {}).get(k, 0)
    out["http"]["requests"] -= (since.get("http") or {}).get("requests", 0)
    for k in ("requests", "bytes_read", "bytes_written"):
      out[k] -= since.get(k, 0)
  return out
