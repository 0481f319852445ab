"""Progress on stderr, the one convention: a ``progress: bool`` argument and a bar that is a no-op when off.

:func:`progress` returns an object with ``update(n)``, ``set_postfix_str(s)``
and ``close()`` (also a context manager), whatever happens to it:

* off (``enabled=False``): does nothing;
* stderr is a terminal: a tqdm bar with rate and ETA;
* stderr is a file or a pipe (CI logs, batch jobs): one plain line every
  :data:`LOG_INTERVAL_S` seconds (``verify: 41% 1.3 GiB/3.2 GiB 212 MiB/s ETA 9s 12/40 leaves``)
  and a last one on close, never carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["LOG_INTERVAL_S", "Progress", "human_bytes", "progress"]

LOG_INTERVAL_S = 5.0


class Progress:
  """The no-op bar (``enabled=False``); the base of the other two."""

  def update(self, n: int = 1) -> None:
    pass

  def set_postfix_str(self, s: str) -> None:
    pass

  def close(self) -> None:
    pass

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class _Bar(Progress):
  """tqdm on a terminal."""

  def __init__(self, total: int, desc: str, unit: str):
    from tqdm.auto import tqdm

    scale = unit == "B"
    self._bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )

  def update(self, n: int = 1) -> None:
    self._bar.update(n)

  def set_postfix_str(self, s: str) -> None:
    self._bar.set_postfix_str(s, refresh=False)

  def close(self) -> None:
    self._bar.close()


def human_bytes(n: float) -> str:
  """``512 B``, ``1.5 KiB``, ``3.2 GiB``, ``1.1 TiB``."""
  for suffix in ("B", "KiB", "MiB", "GiB"):
    if n < 1024:
      return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
    n /= 1024
  return f"{n:.1f} TiB"


def _amount(n: float, unit: str) -> str:
  return human_bytes(n) if unit == "B" else f"{n:.0f}"


class _Lines(Progress):
  """A plain line every few seconds when stderr is not a terminal."""

  def __init__(self, total: int, desc: str, unit: str, interval: float):
    self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
    self.done = 0
    self.postfix = ""
    self._start = self._last = time.monotonic()
    self._closed = False

  def update(self, n: int = 1) -> None:
    self.done += n
    now = time.monotonic()
    if now - self._last >= self.interval:
      self._last = now
      self._emit(now)

  def set_postfix_str(self, s: str) -> None:
    self.postfix = s

  def _emit(self, now: float) -> None:
    elapsed = max(now - self._start, 1e-9)
    rate = self.done / elapsed
    parts = [f"{self.desc}:"]
    if self.total:
      parts.append(f"{100.0 * self.done / self.total:.0f}%")
    parts.append(f"{_amount(self.done, self.unit)}/{_amount(self.total, self.unit)}")
    parts.append(f"{_amount(rate, self.unit)}/s")
    if self.total and rate > 0 and self.done < self.total:
      parts.append(f"ETA {(self.total - self.done) / rate:.0f}s")
    if self.postfix:
      parts.append(self.postfix)
    print(" ".join(parts), file=sys.stderr, flush=True)

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._emit(time.monotonic())  # the last line: what was done, at what rate


def progress(
    total: int, desc: str, enabled: bool = True, unit: str = "B", interval: float = LOG_INTERVAL_S
) -> Progress:
  """The progress object for ``total`` units (bytes by default); see the module docstring."""
  if not enabled:
    return Progress()
  if sys.stderr.isatty():
    return _Bar(total, desc, unit)
  return _Lines(total, desc, unit, interval)
