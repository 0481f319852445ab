"""Shared entry point for the absl tools.

Exit codes, the same for every tool:
  0  success / PASS
  1  the check ran and found a difference (FAIL)
  2  bad input or usage: a one-line ``error:`` message on stderr, no traceback
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import app, flags

from parity_jax.errors import UsageError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def fail_usage(message: str) -> "NoReturn":  # noqa: F821
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "parity_jax"
  first = str(message).strip().splitlines()[0] if str(message).strip() else "bad input"
  print(f"{prog}: error: {first}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail_usage(str(e))
  if len(rest) > 1:
    fail_usage(f"unexpected positional arguments: {' '.join(rest[1:])}")
  return rest


def run(main: Callable[[Sequence[str]], int | None]) -> None:
  """``app.run`` with flag errors and :class:`UsageError` mapped to exit 2."""

  def wrapped(argv: Sequence[str]) -> None:
    try:
      rc = main(argv)
    except UsageError as e:
      fail_usage(str(e))
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)
    sys.exit(EXIT_OK if rc is None else int(rc))

  app.run(wrapped, flags_parser=_parse_flags)
