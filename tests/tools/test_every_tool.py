"""What every tool promises: its own --help, one reading of a missing flag, one overwrite rule, outputs never on or
inside inputs, messages true to the input, conflicting flags refused, quiet start-up, --noprogress, a closed pipe."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.helpers.qwen import config_dict, random_tensors, write_checkpoint
from tests.helpers.tools import ROOT, one_line_error, run, run_many

GOLDENS = ROOT / "goldens"
TOOLS = (
    "capture_stages",
    "compare_stages",
    "convert_svd_weights",
    "forward_parity",
    "make_example_checkpoint",
    "migrate_checkpoint",
    "regen_goldens",
    "svf_parity",
    "verify_migration",
)
# a flag only that tool has, and the absl flag --help must not list
OWN_FLAG = {
    "capture_stages": "--tokens",
    "compare_stages": "--candidate",
    "convert_svd_weights": "--svd_weights",
    "forward_parity": "--oracle",
    "make_example_checkpoint": "--seed",
    "migrate_checkpoint": "--dest",
    "regen_goldens": "--goldens_dir",
    "svf_parity": "--explain_rule",
    "verify_migration": "--migrated",
}
REQUIRED = {
    "capture_stages": ["--model_dir", "--tokens", "--out"],
    "compare_stages": ["--golden", "--candidate"],
    "convert_svd_weights": ["--svd_weights", "--out_dir"],
    "forward_parity": ["--model_dir"],
    "make_example_checkpoint": ["--out"],
    "migrate_checkpoint": ["--source", "--dest", "--spec"],
    "regen_goldens": ["--goldens_dir"],
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  cfg = config_dict("qwen3")
  return write_checkpoint(tmp_path_factory.mktemp("m") / "qwen3", cfg, random_tensors(cfg, seed=3))


@pytest.mark.parametrize("tool", TOOLS)
def test_help_prints_the_tools_own_flags_and_a_missing_flag_reads_the_same(tool, tmp_path):
  argvs = [["--help"], ["-h"]] + ([[]] if tool in REQUIRED else [])
  results = run_many(tool, argvs)
  for r in results[:2]:
    assert r.returncode == 0 and not r.stderr, (tool, r)
    assert OWN_FLAG[tool] in r.stdout and "--flagfile" not in r.stdout, r.stdout
    assert r.stdout.lstrip().split()[0][0].isupper()  # starts with the tool's own description
  if tool in REQUIRED:
    line = one_line_error(results[2], "missing required flag")
    want = ", ".join(REQUIRED[tool])
    assert line.endswith(f"missing required flag{'s' if len(REQUIRED[tool]) > 1 else ''} {want} (see --help)"), line


def test_an_existing_file_where_a_directory_goes_is_one_line(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a directory\n")
  one_line_error(
      run("convert_svd_weights", f"--svd_weights={tmp_path / 'w.pt'}", f"--out_dir={afile}"), "is not a directory"
  )
  (r,) = run_many("make_example_checkpoint", [[f"--out={afile}"]])
  one_line_error(r, "is not a directory")
  (r,) = run_many("regen_goldens", [[f"--goldens_dir={afile}"]])
  one_line_error(r, "is not a directory")
  assert afile.read_text() == "not a directory\n"


def test_outputs_never_land_on_or_inside_an_input(tmp_path):
  golden = tmp_path / "svf"
  shutil.copytree(GOLDENS / "svf", golden)
  before = sorted(p.relative_to(golden) for p in golden.rglob("*"))
  r1, r2, r3 = run_many(
      "svf_parity",
      [
          [f"--golden_dir={golden}", f"--out={golden / 'report2.json'}"],
          [f"--golden_dir={golden}", f"--stage_dir={golden / 'sub'}"],
          [f"--golden_dir={golden}", f"--out={golden / 'svf_report.json'}", "--overwrite"],
      ],
  )
  for r in (r1, r2, r3):
    one_line_error(r, "would overwrite or lie inside an input")
  assert sorted(p.relative_to(golden) for p in golden.rglob("*")) == before


def test_one_overwrite_rule(tiny_model, tmp_path):
  out = tmp_path / "b.safetensors"
  out.write_bytes(b"old")
  args = [f"--model_dir={tiny_model}", "--tokens=1,2,3", f"--out={out}"]
  first, second = run_many("capture_stages", [args, args + ["--overwrite"]])
  # the check is the library's (its argument ``out``); the tool's user reads the flags they typed
  one_line_error(first, f"--out={out} exists; refusing to overwrite it (pass --overwrite)")
  assert second.returncode == 0 and f"wrote {out}" in second.stdout and not second.stderr, second
  assert out.read_bytes()[:3] != b"old"


def test_conflicting_flags_are_refused(tiny_model):
  golden = GOLDENS / "forward" / "qwen3.safetensors"
  r1, r2 = run_many(
      "forward_parity",
      [
          [f"--model_dir={tiny_model}", f"--golden={golden}", "--oracle"],
          [f"--model_dir={tiny_model}", f"--golden={golden}", "--profile=f32", "--profile_json=p.json"],
      ],
  )
  one_line_error(r1, "give --golden or --oracle, not both")
  one_line_error(r2, "give --profile or --profile_json, not both")


def test_messages_are_true_to_the_input(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("hello\n")
  wrong = tmp_path / "r.json"
  wrong.write_text('{"schema": "parity_jax.bundle_report/1", "stages": []}')
  one_line_error(
      run("convert_svd_weights", f"--svd_weights={text}", f"--out_dir={tmp_path / 'o'}"), "is not a PyTorch file"
  )
  (r,) = run_many("capture_stages", [[f"--model_dir={text}", "--tokens=1", f"--out={tmp_path / 'x.safetensors'}"]])
  one_line_error(r, "is a file; expected an HF checkpoint directory")
  (r,) = run_many("svf_parity", [[f"--python_report={wrong}"]])
  one_line_error(r, "is not an SVF run report")
  assert not (tmp_path / "o").exists() and not (tmp_path / "x.safetensors").exists()


def test_quiet_start_up_and_noprogress():
  p = run("verify_migration", "--noprogress")
  assert p.returncode == 0 and p.stdout.rstrip().endswith("VERDICT: PASS") and p.stderr == "", p.stderr
  golden = GOLDENS / "forward" / "qwen3.safetensors"
  (r,) = run_many("compare_stages", [[f"--golden={golden}", f"--candidate={golden}", "--noprogress"]])
  assert r.returncode == 0 and r.stderr == "", r.stderr
  for tool, args in (
      ("migrate_checkpoint", ["--source=/nope", "--dest=/tmp/x", "--spec=/nope.json"]),
      ("svf_parity", ["--golden_dir=/nope"]),
      ("forward_parity", ["--model_dir=/nope", "--oracle"]),
  ):
    (r,) = run_many(tool, [args + ["--noprogress"]])
    one_line_error(r, "/nope")  # the flag is accepted; the error is about the input


def test_a_closed_pipe_is_not_a_traceback():
  golden = GOLDENS / "forward" / "qwen3.safetensors"
  cmd = f"{sys.executable} -m tools.compare_stages --golden={golden} --candidate={golden} --noprogress | head -c 10 > /dev/null"
  p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_the_tools_module_names_match_the_console_scripts():
  text = (ROOT / "pyproject.toml").read_text()
  for tool in TOOLS:
    assert f'parity-{tool.replace("_", "-")} = "parity_jax.cli.{tool}:run"' in text
    assert (ROOT / "tools" / f"{tool}.py").is_file()
  assert sorted(
      p.stem for p in (ROOT / "parity_jax" / "cli").glob("*.py") if p.stem not in ("__init__", "app")
  ) == sorted(TOOLS)
  assert pathlib.Path(ROOT / "tools" / "__init__.py").is_file()


def test_a_tool_imports_nothing_heavy_before_its_flags_are_parsed():
  """--help and a bad flag cost an interpreter and absl, never jax, numpy or torch (forward_parity: its own test)."""
  heavy = ("jax", "jaxlib", "numpy", "ml_dtypes", "orbax", "tensorstore", "torch", "transformers", "matplotlib")
  check = (
      "import importlib, sys; importlib.import_module(sys.argv[1]); print(sorted(m for m in {} if m in sys.modules))"
  )
  procs = {
      tool: subprocess.Popen(
          [sys.executable, "-c", check.format(heavy), f"parity_jax.cli.{tool}"],
          cwd=ROOT,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for tool in TOOLS
      if tool != "forward_parity"
  }
  imported = {tool: p.communicate(timeout=120) for tool, p in procs.items()}
  assert all(p.returncode == 0 for p in procs.values()), imported
  assert {tool: out.strip() for tool, (out, _) in imported.items()} == {tool: "[]" for tool in procs}
