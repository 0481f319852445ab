"""Error types shared by the library and the tools, and the one rule for one-line messages.

Every tool maps :class:`UsageError` (and its subclasses) to a one-line message
on stderr and exit code 2: bad input is the caller's to fix, so it never gets
a traceback. The library raises them with messages that speak of arguments
(``tokens``, ``out``) through :func:`arg`; inside a tool, whose flags carry the
same names, the same message names the flag (``--tokens``, ``--out``): each
reader sees the name they typed (:func:`named_as_flags`, entered by every tool).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Iterable, Iterator

__all__ = ["ComparisonError", "UsageError", "arg", "first_line", "named_as_flags"]

_FLAGS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("parity_jax_tool_flags", default=frozenset())

_MAX_LINE = 300
# tensorstore appends the whole JSON spec in brackets: noise in a one-line error
_TS_SPEC = re.compile(r"\s*\[tensorstore_spec=.*$")


class UsageError(Exception):
  """Bad input: a missing path, a malformed spec, a wrong shape, an unsupported config."""


class ComparisonError(UsageError):
  """Two arrays cannot be compared element by element (shape or dtype differ)."""


def first_line(e: BaseException | str) -> str:
  """The first non-empty line of an exception's message (or its type name), at most 300 characters."""
  text = str(e).strip()
  lines = [line for line in text.splitlines() if line.strip()]
  msg = lines[0].strip() if lines else (type(e).__name__ if isinstance(e, BaseException) else "")
  msg = _TS_SPEC.sub("", msg)
  return msg if len(msg) <= _MAX_LINE else msg[:_MAX_LINE] + "..."


def arg(name: str) -> str:
  """How a message names the argument ``name``: ``--name`` inside a tool with a flag of that name, else ``name``."""
  return f"--{name}" if name in _FLAGS.get() else name


@contextlib.contextmanager
def named_as_flags(flag_names: Iterable[str]) -> Iterator[None]:
  """Within this block (a tool's run), :func:`arg` names the arguments that are also flags as those flags."""
  token = _FLAGS.set(frozenset(flag_names))
  try:
    yield
  finally:
    _FLAGS.reset(token)
