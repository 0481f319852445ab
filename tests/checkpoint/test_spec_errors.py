"""A spec with many problems: the one-line error shows the first few, a JSON file gets every one of them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity_jax.checkpoint import RemapSpec, SpecError
from tests.helpers import ckpt as H

N_LEAVES = 60  # more problems than the one-line message spells out (25)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
  root = tmp_path_factory.mktemp("spec_errors")
  src = H.save_v0(root / "src", {f"layer_{i:02d}": {"w": np.full((2,), i, np.float32)} for i in range(N_LEAVES)})
  # one rule that fits one leaf; every other leaf matches no rule, and a second rule matches nothing
  spec = H.write_spec(
      root / "spec.json", {"rules": [{"match": "^layer_00/w$", "to": "w0"}, {"match": "^ghost$", "to": "g"}]}
  )
  return root, src, spec


def _expected_problems() -> set[str]:
  return {f"source leaf 'layer_{i:02d}/w' matches no rule" for i in range(1, N_LEAVES)} | {
      "rule #2 ('^ghost$') matches no source leaf"
  }


def test_spec_error_lists_every_problem_in_its_json():
  spec = RemapSpec.from_rules([{"match": "^layer_00/w$", "to": "w0"}, {"match": "^ghost$", "to": "g"}])
  leaves = {f"layer_{i:02d}/w": type("M", (), {"shape": (2,), "kind": "array"})() for i in range(N_LEAVES)}
  with pytest.raises(SpecError) as e:
    spec.bind(leaves)
  d = e.value.to_dict()
  assert d["format"] == "parity_jax.spec_errors/1" and d["n_problems"] == N_LEAVES
  assert set(d["problems"]) == _expected_problems()
  assert "and 35 more" in str(e.value)  # the message itself still cuts the list


@pytest.mark.parametrize("tool", ["verify_migration", "migrate_checkpoint"])
def test_tools_write_all_spec_problems_as_json_and_exit_2(many, tmp_path, tool):
  root, src, spec = many
  out = tmp_path / "problems.json"
  if tool == "verify_migration":
    args = [f"--migrated={src}", f"--report={out}"]
  else:
    args = [f"--dest={tmp_path / 'dest'}", f"--spec_errors={out}"]
  proc = H.run_tool(tool, f"--source={src}", f"--spec={spec}", "--noprogress", *args)
  lines = H.stderr_lines(proc)
  assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", proc.stdout + proc.stderr
  assert f"{N_LEAVES} problems (all {N_LEAVES} in {out})" in lines[0], lines[0]
  d = json.loads(out.read_text())
  assert d["n_problems"] == N_LEAVES and set(d["problems"]) == _expected_problems()
  assert not (tmp_path / "dest").exists()
  if tool == "verify_migration":  # without a file, the line says how to get them all (same code in both tools)
    proc = H.run_tool(tool, f"--source={src}", f"--spec={spec}", "--noprogress", f"--migrated={src}")
    (line,) = H.stderr_lines(proc)
    assert proc.returncode == 2 and "(--spec_errors=FILE writes them all as JSON)" in line, line
