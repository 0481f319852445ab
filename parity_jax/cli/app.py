"""What every parity_jax tool shares: flag parsing, help, exit codes, one-line errors, quiet start-up.

Exit codes, the same for every tool:
  0  success / PASS
  1  the check ran and found a difference (FAIL)
  2  bad input or usage: a one-line ``error:`` message on stderr, no traceback, nothing written

A tool is a module in :mod:`parity_jax.cli` that defines its absl flags, a
``main(argv)`` returning the exit code, and ``run = app.entry(main, __doc__, __name__)``:
``run()`` is its console script (``parity-<tool>``) and ``python -m
tools.<tool>`` calls the same ``run()`` from the repository root.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable, NoReturn, Sequence

from absl import app, flags
from absl import logging as absl_logging

from parity_jax.errors import UsageError, first_line, named_as_flags

__all__ = [
    "EXIT_FAIL",
    "EXIT_OK",
    "EXIT_USAGE",
    "distributed_flags",
    "entry",
    "fail_usage",
    "parse_int_rows",
    "print_written",
    "require",
    "storage_flags",
]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
_HELP_ARGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")


def _prog() -> str:
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "parity_jax"


def fail_usage(message: object) -> NoReturn:
  """Prints ``<prog>: error: <first line>`` on stderr and exits 2."""
  text = first_line(str(message)) if str(message).strip() else "bad input"
  print(f"{_prog()}: error: {text}", file=sys.stderr)
  if _left_job():  # the job's other processes are gone: no JAX shutdown barrier to wait at (it would abort)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_USAGE)
  sys.exit(EXIT_USAGE)


def _left_job() -> bool:
  mod = sys.modules.get("parity_jax.runtime.job")
  return bool(mod is not None and mod.left_job())


def require(*holders: flags.FlagHolder) -> None:
  """Refuses missing required flags, with the same message on every tool."""
  missing = [f"--{h.name}" for h in holders if h.value in (None, "")]
  if missing:
    raise UsageError(f"missing required flag{'s' if len(missing) > 1 else ''} {', '.join(missing)} (see --help)")


def print_written(outputs: Iterable[tuple[str, str | None]], json_mode: bool = False) -> None:
  """``<what>: <absolute path>`` for every file a tool wrote; on stderr when stdout carries JSON."""
  for what, path in outputs:
    if path:
      print(f"{what}: {os.path.abspath(path)}", file=sys.stderr if json_mode else sys.stdout)


def _print_help(doc: str | None, module: str) -> NoReturn:
  """The tool's docstring and its own flags (``--helpfull``: every flag, absl's included); exit 0."""
  print((doc or "").strip() + "\n")
  if "--helpfull" in sys.argv:
    print(flags.FLAGS.main_module_help() if module == "__main__" else flags.FLAGS.get_help())
  else:
    name = sys.argv[0] if module == "__main__" else module
    own = flags.FLAGS.module_help(name)
    print(own if own.strip() else "(this tool has no flags of its own)")
    print("\nabsl's own flags (logging, flag files): --helpfull")
  sys.exit(EXIT_OK)


def _check_numbers() -> None:
  """Refuses a float flag that is not a finite number: absl's bounds let NaN through (every comparison is False).

  The range of every numeric flag is its definition's ``lower_bound`` / ``upper_bound``, which absl checks
  while parsing; a value outside it is a flag error like any other (one line, exit 2).
  """
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if isinstance(flag.parser, flags.FloatParser) and flag.value is not None and not math.isfinite(flag.value):
      raise flags.IllegalFlagValueError(f"flag --{flag.name}={flag.value}: not a finite number")


def _quiet_startup() -> None:
  """No absl/JAX start-up chatter (backend probing, orbax INFO lines) unless --verbosity asks for it."""
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.ERROR)
    for name in ("jax._src.xla_bridge", "absl", "orbax"):
      logging.getLogger(name).setLevel(logging.ERROR)


def entry(main: Callable[[Sequence[str]], int | None], doc: str | None, module: str) -> Callable[[], None]:
  """The ``run()`` of a tool: parse flags (errors -> exit 2), ``-h``/``--help`` -> its own flags and exit 0."""

  def parse(argv: Sequence[str]) -> list[str]:
    if any(a in _HELP_ARGS for a in argv[1:]):
      _print_help(doc, module)
    try:
      rest = flags.FLAGS(argv)
      _check_numbers()
    except flags.Error as e:
      fail_usage(str(e))
    if len(rest) > 1:
      fail_usage(f"unexpected positional arguments: {' '.join(rest[1:])}")
    return rest

  def wrapped(argv: Sequence[str]) -> None:
    _quiet_startup()
    try:
      rc = _supervise_job(module)
      if rc is None:
        with named_as_flags(flags.FLAGS):  # the library's messages name this tool's flags as flags
          rc = main(argv)
    except UsageError as e:
      fail_usage(str(e))
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM turned into an exception by the library (``signum``)
      signum = getattr(e, "signum", signal.SIGINT)
      print(f"{os.path.basename(sys.argv[0])}: {str(e) or 'interrupted'}", file=sys.stderr)
      sys.exit(128 + int(signum))
    except BrokenPipeError:  # stdout closed early (``| head``): stop quietly, as shell tools do
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      sys.exit(128 + 13)
    sys.exit(EXIT_OK if rc is None else int(rc))

  def run() -> None:
    app.run(wrapped, flags_parser=parse)

  return run


def _supervise_job(module: str) -> int | None:
  """For a tool given distributed launch flags: run it in a supervised child and return its exit code (else None).

  Inside the child (and for every run without distributed flags) this
  returns None and the tool works in this process. See "Distributed runs"
  at the end of this module.
  """
  if _is_child():
    _enter_child()
    return None
  if not all(name in flags.FLAGS for name in _DIST_FLAGS):
    return None  # not a tool with distributed_flags (a tool may define launch flags of its own)
  f = flags.FLAGS
  opts = _launch_options()
  if not opts.requested:
    return None
  opts.check()  # a bad launch is one line here, before any child starts
  if module == "__main__":
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name if spec is not None else None
  if not module:
    return None  # not started as a module: cannot start it again; work in this process
  return _supervise(module, None if opts.auto else opts.process_id, verbose=f["verbosity"].present)


def parse_int_rows(text: str, flag: str) -> Any:
  """``"1,2,3"`` -> ``[[1, 2, 3]]``; ``"1,2;3,4"`` -> ``[[1, 2], [3, 4]]`` (rows separated by ``;``).

  Empty fields, non-integers and ragged rows are one-line errors naming ``--flag``.
  """
  import re

  import numpy as np

  text = text.strip()
  if not text:
    raise UsageError(f"--{flag} is empty")
  rows = []
  for r, row in enumerate(text.split(";")):
    fields = [f.strip() for f in row.split(",")]
    bad = [f for f in fields if not re.fullmatch(r"[+-]?\d+", f)]
    if bad:
      raise UsageError(f"--{flag}: row {r} has non-integer entries {bad[:3]} (expected e.g. 1,2,3 or 1,2;3,4)")
    rows.append([int(f) for f in fields])
  lengths = sorted({len(r) for r in rows})
  if len(lengths) > 1:
    raise UsageError(f"--{flag}: rows have different lengths {lengths}; pad them and pass --attention_mask")
  return np.asarray(rows, dtype=np.int64)


_DIST_FLAGS = ("coordinator_address", "num_processes", "process_id", "distributed", "peer_timeout")


def distributed_flags(module: str) -> Callable[[], Any]:
  """The launch flags of a job on the JAX runtime, for the tool ``module`` (its ``__name__``).

  ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (the
  arguments of ``jax.distributed.initialize``), ``--distributed`` (initialize
  with no arguments: JAX's cluster detection) and ``--peer_timeout``. Defined
  once, shown in the tool's ``--help``. Returns a function that reads them
  as :class:`parity_jax.runtime.Options` (``requested`` False when none
  is given: one process).
  """
  from parity_jax.runtime import DEFAULT_TIMEOUT_S

  if "coordinator_address" not in flags.FLAGS:
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Run as one process of a job: the coordinator's HOST:PORT "
        "(jax.distributed.initialize); with --num_processes and --process_id.",
    )
    flags.DEFINE_integer("num_processes", None, "Processes in the job (jax.distributed.initialize).", lower_bound=1)
    flags.DEFINE_integer(
        "process_id", None, "This process's index in [0, num_processes) " "(jax.distributed.initialize).", lower_bound=0
    )
    flags.DEFINE_boolean(
        "distributed",
        False,
        "Run as one process of a job whose parameters JAX detects itself "
        "(SLURM, Cloud TPU, GKE/Kubernetes, MPI): jax.distributed.initialize() with no arguments.",
    )
    flags.DEFINE_float(
        "peer_timeout",
        DEFAULT_TIMEOUT_S,
        "In a job: seconds without a heartbeat or without progress "
        "after which a process counts as lost; the others then exit 2 naming it.",
        lower_bound=0.1,
        upper_bound=86400.0,
    )
  for name in _DIST_FLAGS:
    flags.FLAGS.register_key_flag_for_module(module, flags.FLAGS[name])
  return _launch_options


def _launch_options() -> Any:
  """The launch flags as :class:`parity_jax.runtime.Options` (read by the supervisor and by the tool)."""
  from parity_jax.runtime import Options

  f = flags.FLAGS
  return Options(
      coordinator_address=f.coordinator_address,
      num_processes=f.num_processes,
      process_id=f.process_id,
      auto=bool(f.distributed),
      timeout_s=float(f.peer_timeout),
  )


_STORAGE_FLAGS = ("storage_retries", "storage_backoff_s")


def storage_flags(module: str) -> Callable[[], None]:
  """``--storage_retries`` and ``--storage_backoff_s``, the bounds on waiting for gs:// and s3:// (see
  :class:`parity_jax.stores.Limits`), for the tool ``module``. Returns a function that puts them in force."""
  if "storage_retries" not in flags.FLAGS:
    flags.DEFINE_integer(
        "storage_retries",
        5,
        "gs:// and s3:// only: attempts per request on throttling, 5xx and dropped connections (with exponential"
        " backoff) before the request fails; a leaf whose reads fail is UNREADABLE.",
        lower_bound=1,
    )
    flags.DEFINE_float(
        "storage_backoff_s",
        1.0,
        "gs:// and s3:// only: the first retry's delay in seconds (doubling up to 8x, or this value if larger).",
        lower_bound=0.0,
    )
  for name in _STORAGE_FLAGS:
    flags.FLAGS.register_key_flag_for_module(module, flags.FLAGS[name])

  def apply() -> None:
    from parity_jax.stores import set_limits

    backoff = flags.FLAGS["storage_backoff_s"].value
    set_limits(
        max_retries=flags.FLAGS["storage_retries"].value, initial_delay_s=backoff, max_delay_s=max(8 * backoff, 0.001)
    )

  return apply


# ---------------------------------------------------------------------------------------------
# Distributed runs: the work in a supervised child
#
# A tool run as one process of a job works in a child process, so that losing the coordinator is one line,
# exit 2.
#
# When process 0 of a ``jax.distributed`` job (the host of the coordination
# service) dies, JAX terminates every other process from inside its C++
# runtime: an abort (SIGABRT, shell exit 134) with a glog fatal message, a C++
# stack trace and Python's thread dump on stderr, before any Python code can
# run (in jax 0.10 its ``missed_heartbeat_callback`` even crashes with
# ``std::bad_cast``). Nothing in the Python API lets a process outlive that.
#
# So a tool given distributed launch flags supervises instead of working
# (:func:`_supervise`): it starts the same tool again in a child process (same
# interpreter, same arguments, marked by the environment variable
# ``PARITY_JAX_SUPERVISED``) and waits for it.
#
# * The child's stdout and stderr *are* the tool's (inherited: progress bars
#   still see a terminal). Only output written below Python -- the C++
#   runtime's log lines, abort messages, stack traces, faulthandler dumps,
#   which all write to file descriptor 2 -- goes to a pipe the supervisor reads
#   (:func:`_enter_child` moves fd 2 there and gives ``sys.stderr`` a copy of
#   the real one). The supervisor shows it after the child ends normally with
#   0 or 1, or always with ``--verbosity``; an exit 2 has already printed its
#   one line.
# * A child that ends normally passes its exit code through.
# * A child that dies by a signal (the runtime's abort, a crash, the OOM
#   killer) becomes one line on stderr and exit 2: ``error: lost process 0 (the
#   coordinator): ...`` when this is another process and the runtime aborted
#   it (or the abort message says the coordination service is gone), otherwise
#   what killed which process.
# * The child dies with the supervisor (``PR_SET_PDEATHSIG`` on Linux, a
#   watcher thread elsewhere): a SIGKILL of the tool's process kills the work.
#   SIGTERM and SIGHUP are passed on, and the supervisor then ends by the same
#   signal; SIGINT from a terminal reaches both processes (one process group),
#   so the supervisor ignores it and the child handles it.

_SUPERVISED_ENV = "PARITY_JAX_SUPERVISED"  # "<supervisor pid>:<fd of the pipe for what is written below Python>"
_KEEP = 1 << 16  # bytes of the runtime's output kept from its start and from its end
_PR_SET_PDEATHSIG = 1
_COORDINATOR_GONE = re.compile(
    r"coordination service|JAX distributed service|leader task|Terminating process because", re.IGNORECASE
)
_STATUS = re.compile(r"absl::Status: ([A-Z_]+: [^.\n]*)")


def _is_child() -> bool:
  return _SUPERVISED_ENV in os.environ


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


def _enter_child() -> None:
  """In the child: die with the supervisor; file descriptor 2 to the supervisor's pipe, ``sys.stderr`` unchanged."""
  value = os.environ.pop(_SUPERVISED_ENV)
  parent, _, fd = value.partition(":")
  _die_with(int(parent))
  sys.stdout.flush()
  sys.stderr.flush()
  old = sys.stderr
  real = os.dup(2)
  os.dup2(int(fd), 2)
  os.close(int(fd))
  new = os.fdopen(
      real,
      "w",
      buffering=1,
      encoding=getattr(old, "encoding", None) or "utf-8",
      errors=getattr(old, "errors", None) or "backslashreplace",
  )
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
        del self.tail[: len(self.tail) - _KEEP]
    os.close(self.fd)

  def text(self, timeout: float = 5.0) -> str:
    self.thread.join(timeout)
    cut = f"\n[... {self.dropped} bytes ...]\n" if self.dropped else ""
    return bytes(self.head).decode(errors="replace") + cut + bytes(self.tail).decode(errors="replace")


def _signame(sig: int) -> str:
  try:
    return signal.Signals(sig).name
  except ValueError:
    return f"signal {sig}"


def _describe_death(sig: int, process_id: int | None, runtime_output: str) -> str:
  """The one line for a child that died by signal ``sig`` (without the ``error:`` prefix)."""
  me = "this process" if process_id is None else f"process {process_id}"
  status = _STATUS.search(runtime_output)
  why = f" ({status.group(1).strip()})" if status else ""
  gone = bool(_COORDINATOR_GONE.search(runtime_output))
  if process_id != 0 and (gone or sig == signal.SIGABRT):
    return (
        f"lost process 0 (the coordinator): it crashed, was killed or cannot be reached, and the JAX runtime"
        f" aborted this process{why} (this is {me}; exiting 2)"
    )
  if sig == signal.SIGABRT:
    return f"{me} was aborted by the JAX runtime{why} (exiting 2)"
  return f"{me} died: {_signame(sig)} (exiting 2)"


def _supervise(module: str, process_id: int | None, verbose: bool) -> int:
  """Runs tool ``module`` with this process's arguments in a child (see the module docstring); its exit code."""
  r, w = os.pipe()
  env = dict(os.environ)
  env[_SUPERVISED_ENV] = f"{os.getpid()}:{w}"
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
  print(f"{_prog()}: error: {_describe_death(sig, process_id, runtime)}", file=sys.stderr, flush=True)
  return 2


# ---- presets of the checkpoint tools (issue 17): --preset, --preset_cast, --list_presets, --print_spec ----------


class SpecFlags:
  """The preset flags' values for one tool run (see :func:`preset_flags`)."""

  @property
  def preset(self) -> str | None:
    return flags.FLAGS["preset"].value

  def spec_given(self, spec_path: str | None) -> str | None:
    """What stands for the spec in a tool's 'given together' checks: the --spec path, or the preset's name."""
    return spec_path if spec_path is not None else self.preset

  def resolve(self, spec_path: str | None, source: str | None, hf_side: str | None = None):
    """The spec to run: the --spec path as given, or the preset's RemapSpec; one-line UsageError for misuse.

    A ``*-to-hf`` preset reads config.json from --hf_config, else from ``hf_side`` (the HF side's directory).
    """
    cast = flags.FLAGS["preset_cast"].value
    hf_config = flags.FLAGS["hf_config"].value
    if self.preset is None:
      if cast:
        raise UsageError("--preset_cast applies to --preset only")
      return spec_path
    if spec_path is not None:
      raise UsageError("give --spec or --preset, not both")
    if not source:
      raise UsageError("--preset is filled from --source's config.json: give --source")
    from parity_jax.checkpoint.presets import preset_spec

    if hf_config is None and self.preset.endswith("-to-hf"):
      hf_config = hf_side
    return preset_spec(self.preset, source, hf_config=hf_config, cast=cast)

  def handle_early(self, spec_path: str | None, source: str | None, overwrite: bool) -> int | None:
    """Does --list_presets / --print_spec (returns the exit code), else None (the tool runs)."""
    if flags.FLAGS["list_presets"].value:
      from parity_jax.checkpoint.presets import list_presets

      for name, what in list_presets():
        print(f"{name:24s} {what}")
      return 0
    out = flags.FLAGS["print_spec"].value
    if out is None:
      return None
    from parity_jax.checkpoint.spec import RemapSpec
    from parity_jax.files import check_output_path, write_text_atomic

    spec = self.resolve(spec_path, source)
    if spec is None:
      raise UsageError("--print_spec needs --preset (with --source) or --spec")
    out = check_output_path(out, [p for p in (source, spec_path) if p], "--print_spec", overwrite=overwrite)
    spec = spec if isinstance(spec, RemapSpec) else RemapSpec.from_json(spec)
    write_text_atomic(out, spec.to_json() + "\n")
    print(f"spec: {out} ({len(spec.rules)} rules)")
    return 0


_PRESET_FLAGS = ("preset", "preset_cast", "hf_config", "list_presets", "print_spec")


def preset_flags(module: str) -> SpecFlags:
  """``--preset`` (a ready spec filled from --source's config.json; not with --spec), ``--preset_cast``,
  ``--list_presets`` and ``--print_spec=FILE`` (the expanded JSON spec, then exit), for the tool ``module``."""
  if "preset" not in flags.FLAGS:
    flags.DEFINE_string(
        "preset", None, "A ready spec filled from --source's config.json (see --list_presets); not with --spec."
    )
    flags.DEFINE_string("preset_cast", None, "With --preset: cast every leaf to this float dtype (float32, bfloat16).")
    flags.DEFINE_string(
        "hf_config",
        None,
        "The HF config.json (or a directory holding it) a preset is filled from; default: the HF side's own.",
    )
    flags.DEFINE_bool("list_presets", False, "List the presets and exit.")
    flags.DEFINE_string(
        "print_spec", None, "Write the expanded JSON spec (of --preset or --spec) to this file and exit."
    )
  for name in _PRESET_FLAGS:
    flags.FLAGS.register_key_flag_for_module(module, flags.FLAGS[name])
  return SpecFlags()
