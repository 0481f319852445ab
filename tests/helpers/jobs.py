"""Running a tool as a real N-process jax.distributed job on 127.0.0.1 (a port that was free a moment before)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.helpers.ckpt import REPO


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(
    module: str, args: list[str], n: int = 2, env: dict | None = None, extra: dict | None = None
) -> list[subprocess.Popen]:
  """``python -m tools.<module> args`` as processes 0..n-1 of one job; ``extra[i]``: more arguments for process i."""
  port = free_port()
  procs = []
  for i in range(n):
    more = (extra or {}).get(i, [])
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"tools.{module}",
                *args,
                *more,
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={n}",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=dict(os.environ, **(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
  return procs


def finish(procs: list[subprocess.Popen], timeout: float = 90) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of every process; all are killed if one overruns ``timeout``."""
  out = []
  for p in procs:
    try:
      o, e = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append((p.returncode, o, e))
  return out


def wait_for_line(proc: subprocess.Popen, text: str) -> str:
  """Reads ``proc``'s stderr up to the first line holding ``text`` (fails if the process ends first)."""
  seen = []
  while True:
    line = proc.stderr.readline()
    if not line:
      raise AssertionError(f"process ended without printing {text!r}: {''.join(seen)}")
    seen.append(line)
    if text in line:
      return line
