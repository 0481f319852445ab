"""The README's commands and CI stay in step."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


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


def test_output_paths_never_touch_inputs(tmp_path):
  import pytest

  from parity_jax.errors import UsageError
  from parity_jax.files import check_output_path, is_inside

  src = tmp_path / "ckpt"
  (src / "sub").mkdir(parents=True)
  assert is_inside(src / "sub" / "x", src) and is_inside(src, src) and not is_inside(tmp_path / "ckpt2", src)
  for bad in (src / "sub" / "r.json", src):
    with pytest.raises(UsageError, match="would overwrite or lie inside an input"):
      check_output_path(bad, [src], "--report")
  with pytest.raises(UsageError, match="directory .* does not exist"):
    check_output_path(tmp_path / "no" / "r.json", [src])
  with pytest.raises(UsageError, match="must name a .png file"):
    check_output_path(tmp_path / "p.jpg", [], "--plot", suffix=".png")
  assert check_output_path(tmp_path / "r.json", [src]) == str(tmp_path / "r.json")


def test_every_submodule_is_reachable_from_the_package():
  import pkgutil

  import parity_jax

  names = [m.name for m in pkgutil.iter_modules(parity_jax.__path__) if m.name != "oracle"]
  assert {
      "bundles",
      "checkpoint",
      "cli",
      "arraydiff",
      "dtypes",
      "errors",
      "files",
      "jsonio",
      "progress",
      "provenance",
      "qwen2",
      "report",
      "svf",
  } <= set(names)
  for name in names:
    assert getattr(parity_jax, name).__name__ == f"parity_jax.{name}"
  import pytest

  with pytest.raises(AttributeError):
    parity_jax.no_such_module
