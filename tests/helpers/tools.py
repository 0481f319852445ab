"""Running the command-line tools from tests: one process per call, or many calls of one tool in one process.

:func:`run` starts ``python -m tools.<tool>`` like a user would. :func:`run_many`
runs a list of argument lists through the same tool in ONE child process
(:mod:`tests.helpers.tool_batch`), resetting every flag between calls: a battery
of bad-input cases then costs one interpreter and one import of jax instead of
one per case. Each call still goes through the tool's real entry point
(``parity_jax.cli.<tool>.run``: flag parsing, ``UsageError`` -> one line and
exit 2, exit codes), so exit codes, stdout and stderr are what a user sees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from typing import Sequence

ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str
  stderr: str


def run(
    tool: str, *args: str, env: dict[str, str] | None = None, cwd: str | os.PathLike = ROOT, timeout: float = 300
) -> subprocess.CompletedProcess:
  """``python -m tools.<tool> args`` in its own process."""
  return subprocess.run(
      [sys.executable, "-m", f"tools.{tool}", *map(str, args)],
      cwd=cwd,
      capture_output=True,
      text=True,
      env=env,
      timeout=timeout,
  )


def run_many(
    tool: str, argvs: Sequence[Sequence[str]], env: dict[str, str] | None = None, timeout: float = 300
) -> list[Result]:
  """Every argument list through ``tool`` in one child process; one :class:`Result` per list."""
  payload = json.dumps([[str(a) for a in argv] for argv in argvs])
  p = subprocess.run(
      [sys.executable, "-m", "tests.helpers.tool_batch", tool],
      input=payload,
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=env,
      timeout=timeout,
  )
  if p.returncode != 0:
    raise AssertionError(f"tool_batch failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
  return [Result(**r) for r in json.loads(p.stdout.splitlines()[-1])]


def one_line_error(r: Result | subprocess.CompletedProcess, contains: str) -> str:
  """Asserts exit 2 with exactly one non-empty stderr line holding ``error:`` and ``contains``; returns the line."""
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
  assert len(lines) == 1 and "error:" in lines[0] and contains in lines[0], r.stderr
  assert "Traceback" not in r.stderr
  return lines[0]
