"""Progress on stderr with rate and ETA, shared by the long-running tools."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def byte_progress(total_bytes: int, desc: str, enabled: bool = True, **kwargs: Any) -> tqdm:
  """A tqdm bar over bytes (rate and ETA in B/s) that also shows items done.

  Call ``bar.update(nbytes)`` per item and ``bar.set_postfix_str(f"{i}/{n} leaves")``.
  Writes to stderr; ``enabled=False`` silences it (tests, notebooks that opt out).
  When stderr is not a terminal (CI logs, redirected runs) the bar refreshes
  every 10 s instead of twice a second, so logs stay readable.
  """
  interactive = sys.stderr.isatty()
  return tqdm(
      total=total_bytes,
      desc=desc,
      unit="B",
      unit_scale=True,
      unit_divisor=1024,
      file=sys.stderr,
      disable=not enabled,
      dynamic_ncols=True,
      mininterval=0.5 if interactive else 10.0,
      **kwargs,
  )
