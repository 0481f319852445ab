"""parity_jax.runtime.job: the watchdog's verdict on a process that never joined, stopped beating, or hung.

Each case runs process 0 of a 2-process Job in a child Python process (the watchdog ends a process with
``os._exit(2)``), over an in-memory key-value store that stands in for the coordination service; "process 1" is
a thread of the child that writes heartbeats the way a Job does (``hb/<p>`` = ``beats:progress``), or none.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ckpt as H

_CHILD = textwrap.dedent("""
    import sys, threading, time
    from parity_jax.runtime import Job

    class Store:  # the coordination service's key-value calls a Job makes
      def __init__(self):
        self.d, self.lock = {}, threading.Lock()
      def key_value_set(self, k, v, allow_overwrite=False):
        with self.lock:
          self.d[k] = v
      def key_value_try_get(self, k):
        with self.lock:
          if k not in self.d:
            raise KeyError(k)
          return self.d[k]
      def key_value_dir_get(self, prefix):
        with self.lock:
          return [(k, v) for k, v in self.d.items() if k.startswith(prefix)]

    how = sys.argv[1]
    store = Store()
    job = Job(store, 0, 2, timeout_s=0.6, op="watchdog-test")
    hb = job.ns + "/hb/1"

    def process_1():
      n = 0
      while True:
        n += 1
        if how == "stops" and n > 5:
          return  # killed: no more heartbeats
        progress = n if how == "stops" else 0  # "hangs": beats arrive, progress stays
        store.key_value_set(hb, f"{n}:{progress}", allow_overwrite=True)
        time.sleep(0.05)

    if how != "never":
      threading.Thread(target=process_1, daemon=True).start()
    with job:
      time.sleep(30)
    print("the watchdog did not end the job")
    """)


@pytest.mark.parametrize(
    "how, reason",
    [
        ("never", "process 1 of 2 lost: never joined for 0.6 s"),
        ("stops", "process 1 of 2 lost: stopped sending heartbeats (crashed, killed or unreachable) for 0.6 s"),
        ("hangs", "process 1 of 2 lost: no progress for 0.6 s (hung)"),
    ],
)
def test_the_watchdog_names_why_a_process_is_lost(how, reason):
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", _CHILD, how], cwd=H.REPO, capture_output=True, text=True, timeout=60)
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  assert len(lines) == 1 and f"error: {reason} (this is process 0; exiting 2)" in lines[0], proc.stderr
  assert time.monotonic() - t0 < 20
