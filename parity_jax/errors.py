"""Error types shared by the library and the tools.

Every tool under ``tools/`` maps :class:`UsageError` (and its subclasses) to a
one-line message on stderr and exit code 2: bad input is the caller's to fix,
so it never gets a traceback.
"""

from __future__ import annotations


class UsageError(Exception):
  """Bad input: a missing path, a malformed spec, a wrong shape, an unsupported config."""


class ComparisonError(UsageError):
  """Two arrays cannot be compared element by element (shape or dtype differ)."""
