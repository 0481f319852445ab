"""tools.svf_parity and tools.convert_svd_weights as subprocesses: verdicts, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys


from parity_jax import bundles as stages
from parity_jax.svf import STAGES, tensor_key

from tests.helpers import svf as svf_testlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "goldens" / "svf"


def _run(tool, *args, env=None):
  return subprocess.run([sys.executable, "-m", f"tools.{tool}", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def _one_line_error(p, contains):
  assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "error:" in lines[0] and contains in lines[0], p.stderr
  assert "Traceback" not in p.stderr


def test_pass_writes_report_and_stage_bundle(tmp_path):
  out, stage_dir = tmp_path / "r" / "report.json", tmp_path / "stages"
  out.parent.mkdir()
  p = _run(
      "svf_parity", f"--golden_dir={GOLDENS}", "--all_selected_tensors", "--selected_source_filter=model.layers.1.",
      f"--out={out}", f"--stage_dir={stage_dir}", "--chunk_mb=0.05", "--row_block=32", "--progress=false",
  )
  assert p.returncode == 0, p.stdout + p.stderr
  lines = p.stdout.strip().splitlines()
  assert lines[0].split()[:3] == ["tensor", "shape", "orient"] and len([x for x in lines if x.startswith("model.layers.1.")]) == 7
  assert lines[-1].startswith("SVF parity PASS (mode=stage_tolerances, all_selected): 7/7 tensors pass")
  rep = json.loads(out.read_text())
  assert rep["verdict"] == "PASS" and rep["backend"]["framework"] == "jax" and rep["versions"]["jax"]
  t = rep["tensors"][0]
  assert {"name", "shape", "layout", "orientation", "stages", "final_bf16_sha256", "explained"} <= set(t)
  assert list(t["stages"]) == list(STAGES)
  assert len(rep["combined_sha256"]) == 64 and rep["summary"]["torch_self_flips"] == 0
  bundle = stages.load_bundle(stage_dir / "svf_all_selected_stage_debug.safetensors")
  assert len(bundle) == 70 and tensor_key("model.layers.1.mlp.up_proj.weight", "final_bf16") in bundle


def test_bytes_mode_fails_with_exit_1_on_real_ties(tmp_path):
  # Goldens with legitimate ties on every machine (another float32 summation order; see svf_testlib).
  golden_dir, n_ties = svf_testlib.alternative_order_goldens(tmp_path / "svf")
  assert n_ties > 0
  p = _run("svf_parity", f"--golden_dir={golden_dir}", "--all_selected_tensors", "--mode=bytes", "--progress=false")
  assert p.returncode == 1, p.stdout + p.stderr
  assert "SVF parity FAIL (mode=bytes, all_selected)" in p.stdout and "unexplained 0" in p.stdout
  p = _run("svf_parity", f"--golden_dir={golden_dir}", "--all_selected_tensors", "--progress=false")
  assert p.returncode == 0, p.stdout + p.stderr
  assert "SVF parity PASS (mode=stage_tolerances, all_selected)" in p.stdout


def test_bad_inputs_exit_2_with_one_line(tmp_path):
  _one_line_error(_run("svf_parity", f"--golden_dir={tmp_path / 'nope'}"), "no such directory")
  _one_line_error(_run("svf_parity", f"--golden_dir={GOLDENS}", f"--python_report={GOLDENS / 'svf_report.json'}"), "exactly one of")
  _one_line_error(_run("svf_parity", f"--golden_dir={GOLDENS}", "--all_selected_tensors", "--selected_source_filter=layers.9."), "selects no tensor")
  _one_line_error(_run("svf_parity", f"--golden_dir={GOLDENS}", "--layout=vh"), "component shapes disagree")
  _one_line_error(_run("svf_parity", f"--golden_dir={GOLDENS}", f"--components_dir={tmp_path}"), "no components file")
  _one_line_error(_run("svf_parity", f"--golden_dir={GOLDENS}", "--mode=fast"), "mode")
  _one_line_error(_run("svf_parity", f"--golden_dir={GOLDENS}", "stray"), "unexpected positional")
  # never overwrite an input: our bundle and report names are the golden's own
  before = {p.name: p.read_bytes() for p in GOLDENS.iterdir()}
  _one_line_error(_run("svf_parity", f"--golden_dir={GOLDENS}", f"--stage_dir={GOLDENS}"), "would overwrite or lie inside an input")
  _one_line_error(_run("svf_parity", f"--golden_dir={GOLDENS}", f"--out={GOLDENS / 'svf_report.json'}"), "would overwrite or lie inside an input")
  assert {p.name: p.read_bytes() for p in GOLDENS.iterdir()} == before


def _damaged_goldens(tmp_path, edit):
  g = tmp_path / "g"
  shutil.copytree(GOLDENS, g)
  path = g / "svf_all_selected_stage_debug.safetensors"
  b = stages.load_bundle(path)
  data = dict(b)
  edit(data)
  path.unlink()
  stages.save_bundle(path, data, b.provenance)
  return g


def test_missing_stage_and_mismatched_shapes_exit_2_and_write_nothing(tmp_path):
  out, report = tmp_path / "out", tmp_path / "r.json"
  args = ["--all_selected_tensors", f"--stage_dir={out}", f"--out={report}"]
  g = _damaged_goldens(tmp_path / "missing", lambda d: d.pop(tensor_key("lm_head.weight", "matmul_pre_norm")))
  _one_line_error(_run("svf_parity", f"--golden_dir={g}", *args), "setup error: golden bundle")

  def narrow(d):
    key = tensor_key("lm_head.weight", "u_scaled")
    d[key] = d[key][:, :-1]

  g = _damaged_goldens(tmp_path / "shape", narrow)
  _one_line_error(_run("svf_parity", f"--golden_dir={g}", *args), "has shape [320, 79], expected [320, 80]")
  assert not out.exists() and not report.exists()


def test_convert_svd_weights_needs_the_oracle_extra(tmp_path):
  fake = tmp_path / "fake"
  (fake / "torch").mkdir(parents=True)
  (fake / "torch" / "__init__.py").write_text("raise ImportError('No module named torch (simulated)')\n")
  env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{ROOT}")
  p = _run("convert_svd_weights", f"--svd_weights={tmp_path / 'x.pt'}", f"--out_dir={tmp_path}", env=env)
  _one_line_error(p, "[oracle]")
  _one_line_error(_run("convert_svd_weights", f"--out_dir={tmp_path}", env=env), "required")
