"""A plain ``pip install .`` carries what the tools need: every console script and the shipped example."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile

from tests.helpers.tools import ROOT


def test_the_wheel_holds_every_console_script_and_the_whole_shipped_example(tmp_path):
  p = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert p.returncode == 0, p.stderr
  (wheel,) = tmp_path.glob("parity_jax-*.whl")
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = configparser.ConfigParser()
    scripts.read_string(z.read(entry_points).decode())
  example = ROOT / "parity_jax" / "checkpoint" / "example_data"
  shipped = {str(f.relative_to(ROOT)) for f in example.rglob("*") if f.is_file()}
  assert shipped and shipped <= names, sorted(shipped - names)
  tools = sorted(f.stem for f in (ROOT / "parity_jax" / "cli").glob("*.py") if f.stem not in ("__init__", "app"))
  assert dict(scripts["console_scripts"]) == {f"parity-{t.replace('_', '-')}": f"parity_jax.cli.{t}:run" for t in tools}
  assert not any(n.startswith(("tests/", "tools/", "goldens/", "bench/")) for n in names)
