"""The one fault-injection seam: a process stalls at a named point, so that a test can kill or delay it there.

Set ``PARITY_JAX_STALL`` to a comma-separated list of ``<point>[@<process>][=<seconds>]``
(default 3600 s; without ``@<process>`` every process stalls there). A process
that reaches a listed point prints one line on stderr, ``parity_jax: process
<p> stalling at <point> for <s> s``, and sleeps. The points:

* ``verify.share`` -- a process of a verify job, before it compares its share;
* ``migrate.group.<n>`` -- the migrator, after writing its ``n``-th group of chunks;
* ``migrate.commit`` -- after its share is committed, before it reports it;
* ``migrate.merge`` / ``migrate.install`` -- process 0, before merging the
  per-process databases / before installing the result at the destination;
* ``svf.gather`` -- a process of an SVF job, before the results are gathered.

Nothing else in the library reads the environment for tests.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["ENV", "stall_point"]

ENV = "PARITY_JAX_STALL"
_DEFAULT_S = 3600.0


def stall_point(point: str, process: int = 0) -> None:
  """Stalls here if ``PARITY_JAX_STALL`` names ``point`` (for this ``process``); see the module docstring."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  for item in spec.split(","):
    target, _, seconds = item.partition("=")
    name, _, who = target.partition("@")
    if name.strip() != point or (who.strip() and who.strip() != str(process)):
      continue
    s = float(seconds) if seconds.strip() else _DEFAULT_S
    print(f"parity_jax: process {process} stalling at {point} for {s:g} s ({ENV})", file=sys.stderr, flush=True)
    time.sleep(s)
    return
