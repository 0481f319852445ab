"""tools.svf_parity and tools.convert_svd_weights as subprocesses: verdicts, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import shutil

from parity_jax import bundles as stages
from parity_jax.svf import STAGES, tensor_key
from tests.helpers.tools import ROOT, run_many
from tests.helpers.tools import one_line_error as _one_line_error

GOLDENS = ROOT / "goldens" / "svf"


def _run(tool, *args, env=None):
  (r,) = run_many(tool, [list(args)], env=env)
  return r


def test_pass_writes_report_and_stage_bundle(tmp_path):
  out, stage_dir = tmp_path / "r" / "report.json", tmp_path / "stages"
  out.parent.mkdir()
  p = _run(
      "svf_parity",
      f"--golden_dir={GOLDENS}",
      "--all_selected_tensors",
      "--selected_source_filter=model.layers.1.",
      f"--out={out}",
      f"--stage_dir={stage_dir}",
      "--chunk_mb=0.05",
      "--row_block=32",
      "--progress=false",
  )
  assert p.returncode == 0, p.stdout + p.stderr
  lines = p.stdout.strip().splitlines()
  assert (
      lines[0].split()[:3] == ["tensor", "shape", "orient"]
      and len([x for x in lines if x.startswith("model.layers.1.")]) == 7
  )
  assert lines[-1].startswith("SVF parity PASS (mode=stage_tolerances, all_selected): 7/7 tensors pass")
  rep = json.loads(out.read_text())
  assert rep["verdict"] == "PASS" and rep["backend"]["framework"] == "jax" and rep["versions"]["jax"]
  t = rep["tensors"][0]
  assert {"name", "shape", "layout", "orientation", "stages", "final_bf16_sha256", "explained"} <= set(t)
  assert list(t["stages"]) == list(STAGES)
  assert len(rep["combined_sha256"]) == 64 and rep["summary"]["torch_self_flips"] == 0
  bundle = stages.load_bundle(stage_dir / "svf_all_selected_stage_debug.safetensors")
  assert len(bundle) == 70 and tensor_key("model.layers.1.mlp.up_proj.weight", "final_bf16") in bundle


def test_bytes_mode_fails_with_exit_1_on_real_ties(alt_svf_goldens):
  # Goldens with legitimate ties on every machine (another float32 summation order; see tests/helpers/svf.py);
  # the default mode's PASS on them: test_svf_goldens.test_replay_against_another_summation_order_explains_every_tie.
  golden_dir, n_ties = alt_svf_goldens
  assert n_ties > 0
  p = _run("svf_parity", f"--golden_dir={golden_dir}", "--all_selected_tensors", "--mode=bytes", "--progress=false")
  assert p.returncode == 1, p.stdout + p.stderr
  assert "SVF parity FAIL (mode=bytes, all_selected)" in p.stdout and "unexplained 0" in p.stdout


def test_bad_inputs_exit_2_with_one_line(tmp_path):
  cases = [
      ([f"--golden_dir={tmp_path / 'nope'}"], "no such directory"),
      ([f"--golden_dir={GOLDENS}", f"--python_report={GOLDENS / 'svf_report.json'}"], "exactly one of"),
      (
          [f"--golden_dir={GOLDENS}", "--all_selected_tensors", "--selected_source_filter=layers.9."],
          "error: --selected_source_filter='layers.9.' selects no tensor",  # the library's message, in flags
      ),
      ([f"--golden_dir={GOLDENS}", "--layout=vh"], "component shapes disagree"),
      ([f"--golden_dir={GOLDENS}", f"--components_dir={tmp_path}"], "no components file"),
      ([f"--golden_dir={GOLDENS}", "--mode=fast"], "mode"),
      ([f"--golden_dir={GOLDENS}", "stray"], "unexpected positional"),
      # never overwrite an input: our bundle and report names are the golden's own
      ([f"--golden_dir={GOLDENS}", f"--stage_dir={GOLDENS}"], "would overwrite or lie inside an input"),
      ([f"--golden_dir={GOLDENS}", f"--out={GOLDENS / 'svf_report.json'}"], "would overwrite or lie inside an input"),
      # an existing report is replaced only with --overwrite
      ([f"--golden_dir={GOLDENS}", f"--out={tmp_path / 'old.json'}"], "exists"),
  ]
  (tmp_path / "old.json").write_text("old")
  before = {p.name: p.read_bytes() for p in GOLDENS.iterdir()}
  for result, (_, contains) in zip(run_many("svf_parity", [a for a, _ in cases]), cases):
    _one_line_error(result, contains)
  assert {p.name: p.read_bytes() for p in GOLDENS.iterdir()} == before
  assert (tmp_path / "old.json").read_text() == "old"


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
  missing = _damaged_goldens(tmp_path / "missing", lambda d: d.pop(tensor_key("lm_head.weight", "matmul_pre_norm")))

  def narrow(d):
    key = tensor_key("lm_head.weight", "u_scaled")
    d[key] = d[key][:, :-1]

  shape = _damaged_goldens(tmp_path / "shape", narrow)
  r1, r2 = run_many("svf_parity", [[f"--golden_dir={missing}", *args], [f"--golden_dir={shape}", *args]])
  _one_line_error(r1, "setup error: golden bundle")
  _one_line_error(r2, "has shape [320, 79], expected [320, 80]")
  assert not out.exists() and not report.exists()


def test_convert_svd_weights_needs_the_oracle_extra(tmp_path):
  fake = tmp_path / "fake"
  (fake / "torch").mkdir(parents=True)
  (fake / "torch" / "__init__.py").write_text("raise ImportError('No module named torch (simulated)')\n")
  env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{ROOT}")
  r1, r2 = run_many(
      "convert_svd_weights",
      [[f"--svd_weights={tmp_path / 'x.pt'}", f"--out_dir={tmp_path}"], [f"--out_dir={tmp_path}"]],
      env=env,
  )
  _one_line_error(r1, "[oracle]")
  _one_line_error(r2, "required")
