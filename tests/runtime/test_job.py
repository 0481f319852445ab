"""parity_jax.runtime.job: the watchdog's verdict on a process that never joined, stopped beating, or hung.

Each case runs process 0 of a 2-process Job in a child Python process (the watchdog ends a process with
``os._exit(2)``), over an in-memory key-value store that stands in for the coordination service; "process 1" is
a thread of the child that writes heartbeats the way a Job does (``hb/<p>`` = ``beats:progress``), or none.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from parity_jax.runtime import Job
from parity_jax.runtime.job import left_job

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


_CHILD_3 = _CHILD.split("how = sys.argv[1]")[0] + textwrap.dedent("""
    store = Store()
    job = Job(store, 0, 3, timeout_s=0.6, op="ack-test")

    def process_1():  # alive and making progress; acknowledges an abort 0.3 s after reading it
      n = 0
      while True:
        n += 1
        store.key_value_set(job.ns + "/hb/1", f"{n}:{n}", allow_overwrite=True)
        try:
          store.key_value_try_get(job.ns + "/abort")
        except KeyError:
          time.sleep(0.05)
          continue
        time.sleep(0.3)
        store.key_value_set(job.ns + "/abort_seen/1", "1", allow_overwrite=True)
        return

    def cleanup():
      try:
        store.key_value_try_get(job.ns + "/abort_seen/1")
        print("cleanup after process 1 read the reason", flush=True)
      except KeyError:
        print("cleanup before process 1 read the reason", flush=True)

    job.on_abort(cleanup)
    threading.Thread(target=process_1, daemon=True).start()
    with job:  # process 2 never joins
      while True:
        job.tick()
        time.sleep(0.05)
    """)


def test_process_0_ends_a_job_only_after_the_living_processes_read_why():
  proc = subprocess.run([sys.executable, "-c", _CHILD_3], cwd=H.REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  assert "process 2 of 3 lost: never joined for 0.6 s" in proc.stderr, proc.stderr
  # process 0 hosts the store: it keeps it up (and runs its cleanups) once process 1 has acknowledged the abort
  assert proc.stdout.splitlines() == ["cleanup after process 1 read the reason"], proc.stdout


_CHILD_BEATS = _CHILD.split("how = sys.argv[1]")[0] + textwrap.dedent("""
    store = Store()
    job = Job(store, 0, 2, timeout_s=0.6, op="beat-test")  # a beat every 0.06 s

    def process_1():  # alive and making progress: the watchdog of process 0 stays calm
      n = 0
      while True:
        n += 1
        store.key_value_set(job.ns + "/hb/1", f"{n}:{n}", allow_overwrite=True)
        time.sleep(0.05)

    threading.Thread(target=process_1, daemon=True).start()
    with job:
      for _ in range(3):
        job.tick()
      time.sleep(0.7)  # longer than the timeout: only the heartbeats keep process 0 alive in process 1's eyes
      print(store.key_value_try_get(job.ns + "/hb/0"))
    time.sleep(0.2)
    stopped = store.key_value_try_get(job.ns + "/hb/0")
    with job:  # entered again: the heartbeat starts again
      time.sleep(0.3)
    print(stopped, store.key_value_try_get(job.ns + "/hb/0"))
    """)


def test_a_living_process_keeps_beating_with_its_progress():
  proc = subprocess.run([sys.executable, "-c", _CHILD_BEATS], cwd=H.REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
  first, again = proc.stdout.splitlines()
  beats, progress = map(int, first.split(":"))
  assert progress == 3 and beats >= 4, proc.stdout  # one at the start, then one per period of 0.06 s
  stopped, resumed = (int(x.split(":")[0]) for x in again.split())
  assert beats <= stopped <= beats + 1 and resumed >= stopped + 3, proc.stdout  # none while left, then again


class _Store:
  """An in-memory stand-in for the coordination service's key-value calls, shared by threads."""

  def __init__(self):
    self.d, self.cond = {}, threading.Condition()

  def key_value_set(self, k, v, allow_overwrite=False):
    with self.cond:
      assert allow_overwrite or k not in self.d, k
      self.d[k] = v
      self.cond.notify_all()

  key_value_set_bytes = key_value_set

  def key_value_try_get(self, k):
    with self.cond:
      if k not in self.d:
        raise KeyError(k)
      return self.d[k]

  def blocking_key_value_get(self, k, timeout_ms):
    with self.cond:
      if not self.cond.wait_for(lambda: k in self.d, timeout_ms / 1000):
        raise RuntimeError(f"DEADLINE_EXCEEDED: {k}")
      return self.d[k]

  blocking_key_value_get_bytes = blocking_key_value_get


def _each_process(jobs, fn):
  """``fn(job)`` in one thread per process (as each process of a job would call it); the results by process."""
  out, errors = {}, []

  def body(job):
    try:
      out[job.process_id] = fn(job)
    except BaseException as e:  # noqa: BLE001 -- reported below
      errors.append(e)

  threads = [threading.Thread(target=body, args=(j,), daemon=True) for j in jobs]
  for t in threads:
    t.start()
  deadline = time.monotonic() + 10
  for t in threads:
    t.join(timeout=max(0.0, deadline - time.monotonic()))
  assert not errors and not any(t.is_alive() for t in threads), errors
  return [out[p] for p in range(len(jobs))]


def test_the_exchanges_of_three_processes_and_of_one():
  store = _Store()
  jobs = [Job(store, p, 3, timeout_s=5, op="exchange-test") for p in range(3)]
  for j in jobs[1:]:
    j.ns = jobs[0].ns  # three processes' handles on one job (each process numbers its own jobs)
  big = np.random.default_rng(0).integers(0, 256, 3 << 19, dtype=np.uint8).tobytes()  # 1.5 MiB: 2 entries

  def exchanges(job):
    p = job.process_id
    if p == 1:
      job.publish("note", b"from 1")
    got = (
        job.gather("g", f"p{p}".encode()),
        job.allgather("a", bytes([p]) * (p + 1)),
        job.broadcast("big", big if p == 0 else None),
        job.broadcast("none"),
        job.first_disagreeing("plan", "y" if p == 2 else "x"),
        job.first_disagreeing("same", "x"),
    )
    if p == 2:  # the last to reach the barrier, with something published just before it
      time.sleep(0.2)
      job.publish("late", b"from 2")
    return (*got, job.barrier("end"), job.try_get("late"), job.try_get("note"), job.try_get("never"))

  got = _each_process(jobs, exchanges)
  everyone = [[b"\x00", b"\x01\x01", b"\x02\x02\x02"], big, b""]
  assert got[0] == ([b"p0", b"p1", b"p2"], *everyone, 2, None, None, b"from 2", b"from 1", None)
  assert got[1] == got[2] == (None, *everyone, None, None, None, b"from 2", b"from 1", None)
  assert [j.describe() for j in jobs] == ["process 0 of 3", "process 1 of 3", "process 2 of 3"]
  assert [(j.distributed, j.is_coordinator) for j in jobs] == [(True, True), (True, False), (True, False)]
  # every value went through the store, split into parts of at most 1 MiB and compressed
  assert max(len(v) for k, v in store.d.items() if "/part" in k) <= 1 << 20
  assert store.d[f"{jobs[0].ns}/bcast/big/n"] == "2"

  one = Job(None, 0, 1, timeout_s=5, op="exchange-test")  # a single process: no store at all
  assert (one.distributed, one.is_coordinator, one.describe()) == (False, True, "process 0 of 1")
  assert one.gather("g", b"x") == [b"x"] and one.allgather("a", b"y") == [b"y"]
  assert one.broadcast("b", b"z") == b"z" and one.broadcast("none") == b""
  assert one.first_disagreeing("plan", "x") is None and one.barrier("end") is None
  one.publish("k", bytearray(b"v"))
  assert one.wait_for("k") == b"v" and one.try_get("k") == b"v" and one.try_get("never") is None
  with pytest.raises(KeyError):
    one.wait_for("never")
  one.fail("nothing to tell")  # no other process: returns, and this process has not left a job
  assert not left_job()


_CHILD_FAIL = _CHILD.split("how = sys.argv[1]")[0] + textwrap.dedent("""
    from parity_jax.runtime import left_job
    store = Store()
    job = Job(store, 1, 2, timeout_s=5, op="fail-test")
    print(left_job())
    job.fail("boom\\nsecond line")
    print(left_job())
    print(sorted(store.d.items()))
    """)


def test_a_process_that_fails_a_job_tells_the_others_and_has_left_it():
  """fail() in a job of two: the abort key names this process and the first line; left_job() turns true."""
  proc = subprocess.run([sys.executable, "-c", _CHILD_FAIL], cwd=H.REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      "False",
      "True",
      "[('parity_jax/fail-test/0/abort', 'process 1 failed: boom')]",
  ], proc.stdout
