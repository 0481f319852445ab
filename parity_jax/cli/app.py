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

import logging
import os
import sys
from typing import Any, Callable, Iterable, NoReturn, Sequence

from absl import app, flags
from absl import logging as absl_logging

from parity_jax.errors import UsageError, first_line

__all__ = ["EXIT_FAIL", "EXIT_OK", "EXIT_USAGE", "distributed_flags", "entry", "fail_usage", "parse_int_rows",
           "print_written", "require"]

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
  mod = sys.modules.get("parity_jax.distributed")
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
        rc = main(argv)
    except UsageError as e:
      fail_usage(str(e))
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)
    except BrokenPipeError:  # stdout closed early (``| head``): stop quietly, as shell tools do
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      sys.exit(128 + 13)
    sys.exit(EXIT_OK if rc is None else int(rc))

  def run() -> None:
    app.run(wrapped, flags_parser=parse)

  return run


def _supervise_job(module: str) -> int | None:
  """For a tool given distributed launch flags: run it in a supervised child and return its exit code (else None).

  See :mod:`parity_jax.cli.supervise`: losing the job's coordinator is then
  one ``error:`` line and exit 2 instead of the JAX runtime's abort. Inside
  the child (and for every other run) this returns None and the tool works.
  """
  from parity_jax.cli import supervise

  if supervise.is_child():
    supervise.enter_child()
    return None
  if "coordinator_address" not in flags.FLAGS:
    return None
  from parity_jax.distributed import Options

  f = flags.FLAGS
  opts = Options(coordinator_address=f.coordinator_address, num_processes=f.num_processes, process_id=f.process_id,
                 auto=bool(f.distributed), timeout_s=float(f.peer_timeout))
  if not opts.requested:
    return None
  opts.check()  # a bad launch is one line here, before any child starts
  if module == "__main__":
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name if spec is not None else None
  if not module:
    return None  # not started as a module: cannot start it again; work in this process
  return supervise.supervise(module, None if opts.auto else opts.process_id, verbose=f["verbosity"].present)


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
  as :class:`parity_jax.distributed.Options` (``requested`` False when none
  is given: one process).
  """
  from parity_jax.distributed import DEFAULT_TIMEOUT_S, Options

  if "coordinator_address" not in flags.FLAGS:
    flags.DEFINE_string("coordinator_address", None, "Run as one process of a job: the coordinator's HOST:PORT "
                        "(jax.distributed.initialize); with --num_processes and --process_id.")
    flags.DEFINE_integer("num_processes", None, "Processes in the job (jax.distributed.initialize).", lower_bound=1)
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) "
                         "(jax.distributed.initialize).", lower_bound=0)
    flags.DEFINE_boolean("distributed", False, "Run as one process of a job whose parameters JAX detects itself "
                         "(SLURM, Cloud TPU, GKE/Kubernetes, MPI): jax.distributed.initialize() with no arguments.")
    flags.DEFINE_float("peer_timeout", DEFAULT_TIMEOUT_S, "In a job: seconds without a heartbeat or without progress "
                       "after which a process counts as lost; the others then exit 2 naming it.", lower_bound=0.1)
  for name in _DIST_FLAGS:
    flags.FLAGS.register_key_flag_for_module(module, flags.FLAGS[name])

  def read() -> Options:
    f = flags.FLAGS
    return Options(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                   process_id=f.process_id, auto=bool(f.distributed), timeout_s=float(f.peer_timeout))

  return read
