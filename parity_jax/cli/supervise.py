"""A tool run as one process of a job works in a child process, so that losing the coordinator is one line, exit 2.

When process 0 of a ``jax.distributed`` job (the host of the coordination
service) dies, JAX terminates every other process from inside its C++
runtime: an abort (SIGABRT, shell exit 134) with a glog fatal message, a C++
stack trace and Python's thread dump on stderr, before any Python code can
run (in jax 0.10 its ``missed_heartbeat_callback`` even crashes with
``std::bad_cast``). Nothing in the Python API lets a process outlive that.

So a tool given distributed launch flags supervises instead of working
(:func:`supervise`): it starts the same tool again in a child process (same
interpreter, same arguments, marked by the environment variable
``PARITY_JAX_SUPERVISED``) and waits for it.

* The child's stdout and stderr *are* the tool's (inherited: progress bars
  still see a terminal). Only output written below Python -- the C++
  runtime's log lines, abort messages, stack traces, faulthandler dumps,
  which all write to file descriptor 2 -- goes to a pipe the supervisor reads
  (:func:`enter_child` moves fd 2 there and gives ``sys.stderr`` a copy of
  the real one). The supervisor shows it after the child ends normally with
  0 or 1, or always with ``--verbosity``; an exit 2 has already printed its
  one line.
* A child that ends normally passes its exit code through.
* A child that dies by a signal (the runtime's abort, a crash, the OOM
  killer) becomes one line on stderr and exit 2: ``error: lost process 0 (the
  coordinator): ...`` when this is another process and the runtime aborted
  it (or the abort message says the coordination service is gone), otherwise
  what killed which process.
* The child dies with the supervisor (``PR_SET_PDEATHSIG`` on Linux, a
  watcher thread elsewhere): a SIGKILL of the tool's process kills the work.
  SIGTERM and SIGHUP are passed on, and the supervisor then ends by the same
  signal; SIGINT from a terminal reaches both processes (one process group),
  so the supervisor ignores it and the child handles it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

__all__ = ["ENV", "enter_child", "is_child", "supervise"]

ENV = "PARITY_JAX_SUPERVISED"  # "<supervisor pid>:<fd of the pipe for what is written below Python>"
_KEEP = 1 << 16  # bytes of the runtime's output kept from its start and from its end
_PR_SET_PDEATHSIG = 1
_COORDINATOR_GONE = re.compile(r"coordination service|JAX distributed service|leader task|Terminating process because",
                               re.IGNORECASE)
_STATUS = re.compile(r"absl::Status: ([A-Z_]+: [^.\n]*)")


def is_child() -> bool:
  return ENV in os.environ


def _prog() -> str:
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "parity_jax"


# ---------------------------------------------------------------------------------------------
# The child


def _die_with(parent: int) -> None:
  """This process gets SIGKILL when ``parent`` (the supervisor) goes, however it goes."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
      if os.getppid() != parent:  # it went before the request took effect
        os._exit(2)
      return
  except (OSError, AttributeError):
    pass

  def watch() -> None:  # no prctl (not Linux): poll
    while os.getppid() == parent:
      time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)

  threading.Thread(target=watch, name="parity_jax-supervisor-watch", daemon=True).start()


def enter_child() -> None:
  """In the child: die with the supervisor; file descriptor 2 to the supervisor's pipe, ``sys.stderr`` unchanged."""
  value = os.environ.pop(ENV)
  parent, _, fd = value.partition(":")
  _die_with(int(parent))
  sys.stdout.flush()
  sys.stderr.flush()
  old = sys.stderr
  real = os.dup(2)
  os.dup2(int(fd), 2)
  os.close(int(fd))
  new = os.fdopen(real, "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                  errors=getattr(old, "errors", None) or "backslashreplace")
  sys.stderr = new
  handlers = list(logging.getLogger().handlers)
  try:
    from absl import logging as absl_logging

    handlers.append(absl_logging.get_absl_handler().python_handler)
  except Exception:  # noqa: BLE001 -- no absl handler: nothing to redirect
    pass
  for h in handlers:
    if isinstance(h, logging.StreamHandler) and h.stream is old:
      h.setStream(new)


# ---------------------------------------------------------------------------------------------
# The supervisor


class _Tail:
  """Reads a pipe to its end, keeping its first and last ``_KEEP`` bytes."""

  def __init__(self, fd: int):
    self.fd, self.head, self.tail, self.dropped = fd, bytearray(), bytearray(), 0
    self.thread = threading.Thread(target=self._run, name="parity_jax-runtime-stderr", daemon=True)
    self.thread.start()

  def _run(self) -> None:
    while True:
      try:
        data = os.read(self.fd, 1 << 16)
      except InterruptedError:
        continue
      except OSError:
        break
      if not data:
        break
      room = _KEEP - len(self.head)
      if room > 0:
        self.head += data[:room]
        data = data[room:]
      self.tail += data
      if len(self.tail) > _KEEP:
        self.dropped += len(self.tail) - _KEEP
        del self.tail[:len(self.tail) - _KEEP]
    os.close(self.fd)

  def text(self, timeout: float = 5.0) -> str:
    self.thread.join(timeout)
    cut = f"\n[... {self.dropped} bytes ...]\n" if self.dropped else ""
    return (bytes(self.head).decode(errors="replace") + cut + bytes(self.tail).decode(errors="replace"))


def _signame(sig: int) -> str:
  try:
    return signal.Signals(sig).name
  except ValueError:
    return f"signal {sig}"


def describe_death(sig: int, process_id: int | None, runtime_output: str) -> str:
  """The one line for a child that died by signal ``sig`` (without the ``error:`` prefix)."""
  me = "this process" if process_id is None else f"process {process_id}"
  status = _STATUS.search(runtime_output)
  why = f" ({status.group(1).strip()})" if status else ""
  gone = bool(_COORDINATOR_GONE.search(runtime_output))
  if process_id != 0 and (gone or sig == signal.SIGABRT):
    return (f"lost process 0 (the coordinator): it crashed, was killed or cannot be reached, and the JAX runtime"
            f" aborted this process{why} (this is {me}; exiting 2)")
  if sig == signal.SIGABRT:
    return f"{me} was aborted by the JAX runtime{why} (exiting 2)"
  return f"{me} died: {_signame(sig)} (exiting 2)"


def supervise(module: str, process_id: int | None, verbose: bool) -> int:
  """Runs tool ``module`` with this process's arguments in a child (see the module docstring); its exit code."""
  r, w = os.pipe()
  env = dict(os.environ)
  env[ENV] = f"{os.getpid()}:{w}"
  cmd = [sys.executable, "-m", module, *sys.argv[1:]]
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    child = subprocess.Popen(cmd, env=env, pass_fds=(w,))
  finally:
    os.close(w)
  tail = _Tail(r)
  forwarded: list[int] = []

  def forward(sig, _frame) -> None:
    forwarded.append(sig)
    try:
      child.send_signal(sig)
    except OSError:
      pass

  old = {}
  for sig in (signal.SIGTERM, signal.SIGHUP):
    old[sig] = signal.signal(sig, forward)
  old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    rc = child.wait()
  finally:
    for sig, h in old.items():
      signal.signal(sig, h)
  runtime = tail.text()
  if rc >= 0 and rc != 128 + signal.SIGABRT:
    if runtime.strip() and (verbose or rc in (0, 1)):
      sys.stderr.write(runtime if runtime.endswith("\n") else runtime + "\n")
    return rc
  sig = -rc if rc < 0 else signal.SIGABRT
  if forwarded and sig in forwarded:  # ended as asked: end the same way
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
  if verbose and runtime.strip():
    sys.stderr.write(runtime if runtime.endswith("\n") else runtime + "\n")
  sys.stdout.flush()
  print(f"{_prog()}: error: {describe_death(sig, process_id, runtime)}", file=sys.stderr, flush=True)
  return 2
