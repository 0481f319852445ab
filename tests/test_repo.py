"""The README's commands and CI stay in step."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
  text = (ROOT / "README.md").read_text()
  block = re.search(r"```bash\n(.*?)```", text, re.S)
  assert block, "README must open with a bash block"
  return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands():
  cmds = _readme_commands()
  assert len(cmds) == 2
  assert cmds[0].startswith("python3 -m venv .venv") and "tools.verify_migration" in cmds[0]
  assert cmds[1].startswith("python3 -m venv .venv") and "pytest" in cmds[1]


def test_ci_runs_exactly_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert _readme_commands()[1] in [line.strip() for line in ci]
