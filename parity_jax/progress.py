"""Progress on stderr, the one convention: a ``progress: bool`` argument and a bar that is a no-op when off.

:func:`progress` returns an object with ``update(n)``, ``set_postfix_str(s)``
and ``close()`` (also a context manager), whatever happens to it:

* off (``enabled=False``): does nothing;
* stderr is a terminal: a tqdm bar with rate and ETA;
* stderr is a file or a pipe (CI logs, batch jobs): one plain line every
  :data:`LOG_INTERVAL_S` seconds (``verify: 41% 1.3 GiB/3.2 GiB 212 MiB/s ETA 9s 12/40 leaves``)
  and a last one on close, never carriage returns.

Bytes are counted in 1024s and shown so (KiB, MiB/s, :func:`human_bytes`) on
both. The count never passes the total (an update beyond it is clamped), and
leaving the ``with`` block normally completes it: the last line of a finished
job reads 100%, never 102% or ``98% ... ETA 0s``. Leaving it by an exception
keeps the count where the work stopped.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["LOG_INTERVAL_S", "Progress", "human_bytes", "progress"]

LOG_INTERVAL_S = 5.0
# no mutate: display only (the bar's width follows the terminal, 2 redraws/s)
_BAR_LOOK = dict(dynamic_ncols=True, mininterval=0.5)  # no mutate


class Progress:
  """The no-op bar (``enabled=False``); the base of the other two."""

  def update(self, n: int = 1) -> None:
    pass

  def set_postfix_str(self, s: str) -> None:
    pass

  def close(self) -> None:
    pass

  def _complete(self) -> None:
    """Counts the rest of the total as done (the work finished)."""

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, exc_type: Any, *exc: Any) -> None:
    if exc_type is None:
      self._complete()
    self.close()


def _clamped(done: float, n: float, total: float) -> float:
  """How much of an update of ``n`` fits below ``total`` (all of it when there is no total)."""
  return max(0, min(n, total - done)) if total else n


class _Bar(Progress):
  """tqdm on a terminal."""

  def __init__(self, total: int, desc: str, unit: str):
    from tqdm.auto import tqdm

    self.total = total
    cls = _byte_tqdm(tqdm) if unit == "B" else tqdm
    self._bar = cls(total=total, desc=desc, unit=unit, file=sys.stderr, **_BAR_LOOK)

  def update(self, n: int = 1) -> None:
    n = _clamped(self._bar.n, n, self.total)
    if n:
      self._bar.update(n)

  def set_postfix_str(self, s: str) -> None:
    self._bar.set_postfix_str(s, refresh=False)

  def _complete(self) -> None:
    self.update(self.total - self._bar.n)

  def close(self) -> None:
    self._bar.close()


def _byte_tqdm(tqdm: type) -> type:
  """``tqdm`` showing amounts and rate in 1024-based units (:func:`human_bytes`).

  tqdm's own ``unit_scale`` divides the amounts by ``unit_divisor`` but the
  rate always by 1000, and names both without the ``i``: ``5.00M/10.0M
  [..., 3.1MB/s]``. Here they read ``5.0 MiB/10.0 MiB [..., 3.0 MiB/s]``.
  """

  class ByteTqdm(tqdm):

    @staticmethod
    def format_meter(n, total, elapsed, rate=None, **kwargs):
      if rate is None and elapsed:
        rate = n / elapsed
      amounts = f"{human_bytes(n)}/{human_bytes(total) if total else '?'}"
      speed = f"{human_bytes(rate)}/s" if rate else "?/s"
      kwargs["bar_format"] = "{l_bar}{bar}| " + amounts + " [{elapsed}<{remaining}, " + speed + "{postfix}]"
      return tqdm.format_meter(n, total, elapsed, rate=rate, **kwargs)

  return ByteTqdm


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
    self.done += _clamped(self.done, n, self.total)
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

  def _complete(self) -> None:
    self.done = max(self.done, self.total)

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
