"""``python -m tests.helpers.tool_batch TOOL`` < JSON list of argv lists: runs each through the tool in this process.

Prints one JSON list of ``{"returncode", "stdout", "stderr"}`` as the last
stdout line. Between calls every absl flag goes back to its default, so no
call sees another's flags. Used by :func:`tests.helpers.tools.run_many`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import traceback


def main() -> None:
  tool = sys.argv[1]
  argvs = json.loads(sys.stdin.read())
  module = importlib.import_module(f"parity_jax.cli.{tool}")
  from absl import flags

  real_stdout = sys.stdout
  results = []
  for argv in argvs:
    flags.FLAGS.unparse_flags()
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [f"{tool}.py", *argv]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        module.run()
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:  # an escaped exception is what a user would see as a traceback
        traceback.print_exc()
        code = 1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
  print(json.dumps(results), file=real_stdout)


if __name__ == "__main__":
  main()
