"""A job of many processes on the JAX runtime's key-value store, with bounded waits.

:class:`Job` is this process's handle on a job (:func:`~parity_jax.runtime.launch.attach`
or :func:`~parity_jax.runtime.launch.single_process` make one). Its exchanges go through
the runtime's key-value store (no device collectives, so nothing here initialises an XLA
backend):

* :meth:`Job.gather` (to process 0), :meth:`Job.broadcast` (from process 0),
  :meth:`Job.allgather` (everyone's to everyone), :meth:`Job.barrier`,
  :meth:`Job.publish` / :meth:`Job.wait_for`, :meth:`Job.first_disagreeing`;
* every wait is bounded by *liveness*, not by a fixed deadline: each process
  posts a heartbeat (with a progress counter that only its main thread
  advances, through :meth:`Job.tick` or any wait) about once a second, and a
  watchdog thread in every process watches the others. A peer whose heartbeat
  stops (crash, SIGKILL, lost host) or whose progress stops (a hung main
  thread) for ``timeout_s`` seconds is *lost*: every survivor runs its cleanup
  hooks, prints one line naming the lost process on stderr and exits with
  code 2. A process that fails on its own (bad input on one host) calls
  :meth:`Job.fail`, and the others exit 2 at once, naming it.

One case stays JAX's: when process 0, which hosts the coordination service,
dies, the runtime aborts the survivors at once (SIGABRT, a C++ stack trace);
nothing in the Python API lets a process outlive its coordinator. The tools
therefore run a job's work in a supervised child process
(:mod:`parity_jax.cli.app`, "Distributed runs"), which turns that abort into one
line, ``error: lost process 0 (the coordinator): ...``, and exit 2.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import zlib
from typing import Callable, NoReturn

from parity_jax.errors import UsageError, first_line

__all__ = ["DEFAULT_TIMEOUT_S", "EXIT_LOST", "Job", "JobAborted", "exit_lost", "left_job"]

DEFAULT_TIMEOUT_S = 120.0
EXIT_LOST = 2
_CHUNK = 1 << 20  # bytes per key-value entry (gRPC messages stay far below their limits)
_FAIL_GRACE_S = 3.0  # how long a failing process 0 keeps the store up for the others to read why


def exit_lost(message: str, process_id: int) -> NoReturn:
  """One ``error:`` line on stderr, then exit 2 at once: a process of the job is gone, and Python's normal exit
  would wait in JAX's shutdown barrier for it."""
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "parity_jax"
  try:
    sys.stdout.flush()
  except Exception:  # noqa: BLE001
    pass
  line = f"{prog}: error: {message} (this is process {process_id}; exiting 2)\n".encode()
  try:
    fd = sys.stderr.fileno()  # under a supervisor, fd 2 is the runtime's pipe and sys.stderr the real stderr
  except Exception:  # noqa: BLE001 -- no usable sys.stderr
    fd = 2
  try:
    os.write(fd, line)
  except OSError:
    pass
  os._exit(EXIT_LOST)


class JobAborted(UsageError):
  """Another process of the job failed or was lost (raised only where the watchdog does not exit itself)."""


_LEFT = threading.Event()  # set once this process has told a job it fails (see left_job)


def left_job() -> bool:
  """True once this process has failed a job (:meth:`Job.fail`).

  The others have then left without JAX's shutdown barrier, so this process
  must end with ``os._exit`` as well: a normal exit would wait at that
  barrier for processes that are gone, and the runtime would abort it.
  """
  return _LEFT.is_set()


_SESSIONS: dict[str, int] = {}
_SESSIONS_LOCK = threading.Lock()


class Job:
  """This process's handle on a job of ``num_processes`` processes; see the module docstring.

  Use as a context manager: entering starts the heartbeat and the watchdog,
  leaving stops them. Every process must create its jobs in the same order
  (their keys are namespaced by operation name and sequence number).
  """

  def __init__(self, client, process_id: int, num_processes: int, timeout_s: float, op: str):
    self.client, self.process_id, self.num_processes = client, process_id, num_processes
    self.timeout_s = float(timeout_s)
    with _SESSIONS_LOCK:
      seq = _SESSIONS.get(op, 0)
      _SESSIONS[op] = seq + 1
    self.ns = f"parity_jax/{op}/{seq}"
    self._progress = 0
    self._cleanups: list[Callable[[], None]] = []
    self._stop = threading.Event()
    self._aborting = threading.Lock()
    self._threads: list[threading.Thread] = []
    # no mutate: the heartbeat and watchdog period; timing only (the waits are bounded by timeout_s, not by it)
    self.period_s = max(0.05, min(1.0, self.timeout_s / 10))  # no mutate

  # -- basics --

  @property
  def distributed(self) -> bool:
    return self.num_processes > 1

  @property
  def is_coordinator(self) -> bool:
    return self.process_id == 0

  def describe(self) -> str:
    return f"process {self.process_id} of {self.num_processes}"

  def tick(self) -> None:
    """Marks progress of this process's main thread (the watchdogs of the others see it)."""
    self._progress += 1

  def on_abort(self, fn: Callable[[], None]) -> None:
    """Runs ``fn`` (best effort) before this process exits because the job was lost or failed."""
    self._cleanups.append(fn)

  def __enter__(self) -> "Job":
    if self.distributed and not self._threads:
      self._stop.clear()
      self._beat()
      for target, name in ((self._heartbeat_loop, "heartbeat"), (self._watchdog_loop, "watchdog")):
        t = threading.Thread(target=target, name=f"parity_jax-{name}", daemon=True)
        t.start()
        self._threads.append(t)
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._stop.set()
    for t in self._threads:
      t.join(timeout=5)  # no mutate: a bound on the wait for the stopped threads; timing only
    self._threads = []

  # -- the key-value store --

  def _key(self, key: str) -> str:
    return f"{self.ns}/{key}"

  def publish(self, key: str, value: bytes) -> None:
    """Stores ``value`` under ``key`` for the other processes (any size: split into entries of 1 MiB)."""
    if not self.distributed:
      self._local = getattr(self, "_local", {})
      self._local[key] = bytes(value)
      return
    data = zlib.compress(bytes(value), 1)
    parts = [data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
    try:
      for i, p in enumerate(parts):
        self.client.key_value_set_bytes(self._key(f"{key}/part{i}"), p)
      self.client.key_value_set(self._key(f"{key}/n"), str(len(parts)))
    except Exception as e:  # noqa: BLE001 -- the store (process 0) is gone
      self._lost_store(e)

  def try_get(self, key: str) -> bytes | None:
    """The value under ``key`` if it is there now, else None."""
    if not self.distributed:
      return getattr(self, "_local", {}).get(key)
    try:
      n = int(self.client.key_value_try_get(self._key(f"{key}/n")))
    except Exception:  # noqa: BLE001 -- NOT_FOUND
      return None
    return self._read_parts(key, n)

  def _read_parts(self, key: str, n: int) -> bytes:
    try:  # the parts are stored before their count: they are there unless the store itself went away
      parts = [self.client.blocking_key_value_get_bytes(self._key(f"{key}/part{i}"), 60_000) for i in range(n)]
    except Exception as e:  # noqa: BLE001 -- e.g. process 0 killed between reading the count and the parts
      self._lost_store(e)
    return zlib.decompress(b"".join(parts))

  def wait_for(self, key: str) -> bytes:
    """Waits for ``key`` as long as every process stays alive (the watchdog ends a lost job)."""
    if not self.distributed:
      v = self.try_get(key)
      if v is None:
        raise KeyError(key)
      return v
    poll_ms = int(self.period_s * 1000)  # no mutate: how often a wait ticks; timing only
    while True:
      self.tick()
      try:
        n = int(self.client.blocking_key_value_get(self._key(f"{key}/n"), poll_ms))
      except Exception as e:  # noqa: BLE001 -- DEADLINE_EXCEEDED: not there yet; anything else: store gone
        if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e):
          self._lost_store(e)
        continue
      return self._read_parts(key, n)

  def gather(self, name: str, payload: bytes) -> list[bytes] | None:
    """Every process's ``payload``, in process order, on process 0 (None elsewhere)."""
    self.publish(f"gather/{name}/{self.process_id}", payload)
    if not self.is_coordinator:
      return None
    return [self.wait_for(f"gather/{name}/{p}") for p in range(self.num_processes)]

  def allgather(self, name: str, payload: bytes) -> list[bytes]:
    """Every process's ``payload``, in process order, on every process."""
    import json

    got = self.gather(name, payload)
    packed = b"" if got is None else json.dumps([g.hex() for g in got]).encode()
    return [bytes.fromhex(h) for h in json.loads(self.broadcast(f"allgather/{name}", packed))]

  def first_disagreeing(self, name: str, fingerprint: str) -> int | None:
    """Gathers every process's ``fingerprint`` (of its plan); on process 0 the first process whose differs
    from process 0's, None if all agree (and on every other process)."""
    fps = self.gather(name, fingerprint.encode())
    if fps is None:
      return None
    return next((k for k, f in enumerate(fps) if f.decode() != fingerprint), None)

  def broadcast(self, name: str, payload: bytes | None = None) -> bytes:
    """Process 0's ``payload`` on every process."""
    if self.is_coordinator:
      self.publish(f"bcast/{name}", payload if payload is not None else b"")
      return payload if payload is not None else b""
    return self.wait_for(f"bcast/{name}")

  def barrier(self, name: str) -> None:
    """Returns when every process has reached ``name`` (bounded by liveness, like every wait)."""
    self.publish(f"barrier/{name}/{self.process_id}", b"")
    for p in range(self.num_processes):
      self.wait_for(f"barrier/{name}/{p}")

  # -- failure --

  def fail(self, message: str) -> None:
    """This process cannot go on: tell the others (they exit 2 naming it). Returns; the caller exits."""
    if not self.distributed:
      return
    _LEFT.set()
    try:
      self.client.key_value_set(self._key("abort"), f"process {self.process_id} failed: {first_line(message)}")
    except Exception:  # noqa: BLE001 -- the store is gone already; the others' watchdogs will see us go
      pass
    self._stop.set()
    self._await_acks(None)
    self.close()

  def _await_acks(self, lost: int | None) -> None:
    """On process 0, which hosts the store: keep it up until the others have read why the job ends."""
    if not self.is_coordinator or self.client is None:
      return
    deadline = time.monotonic() + _FAIL_GRACE_S
    others = set(range(1, self.num_processes)) - {lost}
    while others and time.monotonic() < deadline:
      for p in list(others):
        try:
          self.client.key_value_try_get(self._key(f"abort_seen/{p}"))
          others.discard(p)
        except Exception:  # noqa: BLE001 -- not yet
          pass
      time.sleep(0.05)  # no mutate: the poll interval of the acknowledgements; timing only

  def _abort(self, message: str, post: bool = True, lost: int | None = None) -> None:
    """Cleanup hooks, one line on stderr, exit 2; at most once per process, from any thread (never returns)."""
    if not self._aborting.acquire(blocking=False):
      while True:  # another thread is already ending the process: wait for its os._exit, raise nothing here
        time.sleep(1)  # no mutate: any pause until os._exit ends the process; timing only
    if post and self.client is not None:
      try:
        self.client.key_value_set(self._key("abort"), message)
      except Exception:  # noqa: BLE001
        pass
      self._await_acks(lost)
    for fn in reversed(self._cleanups):
      try:
        fn()
      except Exception:  # noqa: BLE001 -- best effort: we are leaving
        pass
    exit_lost(message, self.process_id)

  def _lost_store(self, e: BaseException) -> None:
    if self.is_coordinator:
      self._abort(f"the job's key-value store failed: {first_line(e)}", post=False)
    self._abort(f"lost process 0 (the coordinator) of {self.num_processes}: {first_line(e)}", post=False)

  # -- threads --

  def _beat(self) -> None:
    self._beats = getattr(self, "_beats", 0) + 1
    self.client.key_value_set(
        self._key(f"hb/{self.process_id}"), f"{self._beats}:{self._progress}", allow_overwrite=True
    )

  def _heartbeat_loop(self) -> None:
    while not self._stop.wait(self.period_s):
      try:
        self._beat()
      except Exception as e:  # noqa: BLE001
        if not self._stop.is_set():
          self._lost_store(e)
        return

  def _watchdog_loop(self) -> None:
    start = time.monotonic()
    seen: dict[int, tuple[str, str]] = {}
    alive_at = {p: start for p in range(self.num_processes)}
    progress_at = dict(alive_at)
    prefix = self._key("hb/")
    while not self._stop.wait(self.period_s):
      try:
        entries = self.client.key_value_dir_get(prefix)
        try:
          why = self.client.key_value_try_get(self._key("abort"))
        except Exception:  # noqa: BLE001 -- NOT_FOUND: nobody gave up
          why = None
      except Exception as e:  # noqa: BLE001
        if not self._stop.is_set():
          self._lost_store(e)
        return
      if self._stop.is_set():
        return
      if why:
        try:
          self.client.key_value_set(self._key(f"abort_seen/{self.process_id}"), "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001
          pass
        self._abort(why, post=False)
      now = time.monotonic()
      for key, value in entries:
        try:
          p = int(key.rsplit("/", 1)[1])
          beats, progress = value.split(":")
        except ValueError:
          continue
        old = seen.get(p)
        if old is None or old[0] != beats:
          alive_at[p] = now
        if old is None or old[1] != progress:
          progress_at[p] = now
        seen[p] = (beats, progress)
      for p in range(self.num_processes):
        if p == self.process_id:
          continue
        if now - alive_at[p] > self.timeout_s:
          what = "never joined" if p not in seen else "stopped sending heartbeats (crashed, killed or unreachable)"
          self._abort(f"process {p} of {self.num_processes} lost: {what} for {self.timeout_s:g} s", lost=p)
        if now - progress_at[p] > self.timeout_s and now - alive_at[p] <= 3 * self.period_s:
          self._abort(f"process {p} of {self.num_processes} lost: no progress for {self.timeout_s:g} s (hung)")
