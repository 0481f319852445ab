"""tools.compare_stages end to end, through subprocess calls of the real tool: exit codes 0/1/2."""

import json
import os
import pathlib
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from parity_jax.provenance import default_provenance
from parity_jax import bundles as stages
from tests.helpers import stages as synth

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args, env=None):
  full_env = dict(os.environ, **(env or {}))
  p = subprocess.run(
      [sys.executable, "-m", "tools.compare_stages", *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=full_env,
      timeout=120,
  )
  return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
  d = tmp_path_factory.mktemp("bundles")
  golden = synth.golden_stages(num_layers=3)
  names = list(golden)
  k = names.index("layers.2.k_proj")
  ok = synth.candidate(golden, lambda i, n: 1e-7)
  bad = synth.candidate(golden, lambda i, n: 1e-3 * 1.05 ** (i - k) if i >= k else 1e-7)
  stages.save_bundle(d / "golden.safetensors", golden, default_provenance("test-golden"))
  stages.save_bundle(d / "ok.safetensors", ok, default_provenance("test-ok"))
  stages.save_bundle(d / "bad.safetensors", bad, default_provenance("test-bad"))
  return d, golden


def _assert_usage_error(rc, out, err, *needles):
  assert rc == 2, (rc, out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("compare_stages.py: error: "), err
  assert "Traceback" not in err and out == ""
  for n in needles:
    assert n in lines[0], lines[0]


def test_pass_exits_0(bundles):
  d, _ = bundles
  rc, out, err = _run(f"--golden={d}/golden.safetensors", f"--candidate={d}/ok.safetensors")
  assert rc == 0, err
  assert out.strip().splitlines()[-1].startswith("PASS")


def test_divergence_exits_1_and_names_the_stage(bundles):
  d, _ = bundles
  rc, out, err = _run(f"--golden={d}/golden.safetensors", f"--candidate={d}/bad.safetensors", "--top_k=3")
  assert rc == 1, err
  last = out.strip().splitlines()[-1]
  assert last.startswith("FAIL: first divergent stage layers.2.k_proj -- jump")
  assert "top 3 divergences in layers.2.k_proj" in out
  assert "logits: KL max" in out


def test_json_format(bundles, tmp_path):
  d, golden = bundles
  rc, out, err = _run(f"--golden={d}/golden.safetensors", f"--candidate={d}/bad.safetensors", "--format=json")
  assert rc == 1, err
  doc = json.loads(out)
  assert doc["schema"] == "parity_jax.bundle_report/1" and doc["passed"] is False
  assert doc["verdict"]["first_divergent"] == "layers.2.k_proj" and doc["verdict"]["status"] == "jump"
  assert [s["name"] for s in doc["stages"]] == list(golden)
  logits = doc["stages"][-1]
  assert logits["name"] == "logits" and set(logits["logits"]) >= {
      "kl_max",
      "kl_mean",
      "argmax_agreement",
      "topk_overlap_mean",
  }
  from parity_jax.bundles import BundleReport

  assert BundleReport.from_dict(doc).first_divergent == "layers.2.k_proj"


def test_plot_is_a_png(bundles, tmp_path):
  pytest.importorskip("matplotlib")
  d, _ = bundles
  out_png = tmp_path / "heat.png"
  rc, out, err = _run(f"--golden={d}/golden.safetensors", f"--candidate={d}/bad.safetensors", f"--plot={out_png}")
  assert rc == 1, err
  data = out_png.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
  w, h = struct.unpack(">II", data[16:24])
  assert w >= 900 and h >= 500


def test_plot_without_matplotlib_is_a_usage_error(bundles, tmp_path):
  d, _ = bundles
  shim = tmp_path / "shim" / "matplotlib"
  shim.mkdir(parents=True)
  (shim / "__init__.py").write_text("raise ImportError('No module named matplotlib (test shim)')\n")
  out_png = tmp_path / "x.png"
  rc, out, err = _run(
      f"--golden={d}/golden.safetensors",
      f"--candidate={d}/bad.safetensors",
      f"--plot={out_png}",
      env={"PYTHONPATH": f"{tmp_path / 'shim'}{os.pathsep}{ROOT}"},
  )
  _assert_usage_error(rc, out, err, "plotting needs matplotlib")
  assert not out_png.exists()


def test_stage_filter_and_failing_only(bundles):
  d, _ = bundles
  rc, out, _ = _run(
      f"--golden={d}/golden.safetensors", f"--candidate={d}/bad.safetensors", "--stages=^layers\\.[01]\\."
  )
  assert rc == 0 and "layers.2." not in out
  rc, out, _ = _run(f"--golden={d}/golden.safetensors", f"--candidate={d}/bad.safetensors", "--failing_only")
  assert rc == 1 and " layers.0.q_proj " not in out and " layers.2.k_proj " in out


def test_profile_json(bundles, tmp_path):
  d, _ = bundles
  loose = tmp_path / "loose.json"
  loose.write_text(
      json.dumps(
          {"schema": "parity_jax.tolerance_profile/1", "name": "loose", "rules": [{"stages": ".*", "max_rel_l2": 0.5}]}
      )
  )
  rc, out, err = _run(f"--golden={d}/golden.safetensors", f"--candidate={d}/bad.safetensors", f"--profile_json={loose}")
  assert rc == 0, err
  assert "profile:   loose" in out
  bad = tmp_path / "bad.json"
  bad.write_text(
      json.dumps({"schema": "parity_jax.tolerance_profile/1", "rules": [{"stages": ".*", "max_rel_l2": -3}]})
  )
  _assert_usage_error(
      *_run(f"--golden={d}/golden.safetensors", f"--candidate={d}/ok.safetensors", f"--profile_json={bad}"),
      "rules[0].max_rel_l2 must lie in",
  )
  _assert_usage_error(
      *_run(
          f"--golden={d}/golden.safetensors",
          f"--candidate={d}/ok.safetensors",
          f"--profile_json={loose}",
          "--profile=bf16",
      ),
      "not both",
  )


def test_bad_inputs_exit_2(bundles, tmp_path):
  """Every case below in one tool process (tests/helpers/tool_batch.py), each a fresh run of the tool."""
  from tests.helpers.tools import run_many

  d, golden = bundles
  g = f"--golden={d}/golden.safetensors"
  shp = dict(golden)
  shp["layers.1.attention"] = np.zeros((1, 4, 8), np.float32)
  stages.save_bundle(tmp_path / "shape.safetensors", shp)
  bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in golden.items()}
  stages.save_bundle(tmp_path / "bf16.safetensors", bf)
  miss = {k: v for k, v in golden.items() if k != "layers.0.ffn_silu"}
  stages.save_bundle(tmp_path / "miss.safetensors", miss)
  safetensors.numpy.save_file({}, str(tmp_path / "empty.safetensors"))
  (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
  whole = (d / "ok.safetensors").read_bytes()
  (tmp_path / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
  (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not a zip")
  stages.save_bundle(tmp_path / "other.safetensors", {"something_else": np.ones(3, np.float32)})
  # (arguments, None for exit 0 or the words of the one error line)
  cases = [
      ([g, f"--candidate={tmp_path}/shape.safetensors"], ["stage 'layers.1.attention': shape mismatch"]),
      (  # dtype mismatch (bf16 candidate under the strict f32 profile)
          [g, f"--candidate={tmp_path}/bf16.safetensors"],
          ["stage 'embedding': dtype mismatch", "golden float32 vs candidate bfloat16"],
      ),
      ([g, f"--candidate={tmp_path}/bf16.safetensors", "--profile=bf16"], None),  # bf16 widens exactly
      ([g, f"--candidate={tmp_path}/miss.safetensors"], ["only in golden: layers.0.ffn_silu", "--allow_missing"]),
      ([g, f"--candidate={tmp_path}/miss.safetensors", "--allow_missing"], None),
      ([g, f"--candidate={tmp_path}/empty.safetensors"], ["has no stages"]),
      ([g, f"--candidate={tmp_path}/garbage.safetensors"], ["cannot read", "garbage.safetensors"]),
      ([g, f"--candidate={tmp_path}/truncated.safetensors"], ["cannot read", "truncated.safetensors"]),
      ([f"--golden={tmp_path}/garbage.npz", f"--candidate={d}/ok.safetensors"], ["cannot read", ".npz"]),
      ([g, f"--candidate={tmp_path}/nope.safetensors"], ["no such file"]),
      ([g, f"--candidate={tmp_path}"], ["directory"]),
      ([g, f"--candidate={tmp_path}/other.safetensors", "--allow_missing"], ["no common stages"]),
      ([g], ["candidate"]),
      ([g, f"--candidate={d}/ok.safetensors", "--stages=("], ["not a valid regular expression"]),
      (
          [g, f"--candidate={d}/ok.safetensors", f"--plot={d}/golden.safetensors"],
          ["would overwrite or lie inside an input"],
      ),
  ]
  results = run_many("compare_stages", [argv for argv, _ in cases])
  for (argv, words), r in zip(cases, results):
    if words is None:
      assert r.returncode == 0, (argv, r.stderr)
    else:
      _assert_usage_error(r.returncode, r.stdout, r.stderr, *words)
  assert "only in golden (1): layers.0.ffn_silu" in results[4].stdout


def test_inputs_are_not_modified(bundles):
  d, _ = bundles
  before = {p.name: p.read_bytes() for p in d.iterdir()}
  _run(f"--golden={d}/golden.safetensors", f"--candidate={d}/bad.safetensors", "--format=json")
  assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_html_report_follows_the_output_rules(bundles, tmp_path):
  """--html writes the notebook view as a page, after the same checks as every output, and prints its path."""
  from tests.helpers.tools import one_line_error, run_many

  d, _ = bundles
  g, c = f"--golden={d}/golden.safetensors", f"--candidate={d}/bad.safetensors"
  page, old = tmp_path / "report.html", tmp_path / "old.html"
  old.write_text("old")
  before = {p.name: p.read_bytes() for p in d.iterdir()}
  first, again, replaced, on_input, same, no_dir, as_json = run_many(
      "compare_stages",
      [
          [g, c, f"--html={page}", "--noprogress"],
          [g, c, f"--html={page}"],
          [g, f"--candidate={d}/ok.safetensors", f"--html={old}", "--overwrite", "--noprogress"],
          [g, c, f"--html={d}/golden.safetensors", "--overwrite"],
          [g, c, f"--html={tmp_path / 'x.png'}", f"--plot={tmp_path / 'x.png'}"],
          [g, c, f"--html={tmp_path / 'no' / 'r.html'}"],
          [g, c, f"--html={tmp_path / 'j.html'}", "--format=json", "--noprogress"],
      ],
  )
  assert first.returncode == 1 and first.stderr == "", first
  verdict = first.stdout.splitlines()[-2]
  assert "layers.2.k_proj" in verdict, first.stdout
  assert first.stdout.splitlines()[-1] == f"html: {page}"
  html = page.read_text(encoding="utf-8")
  assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
  assert verdict.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in html
  assert f"golden: {d}/golden.safetensors (producer=test-golden," in html
  one_line_error(again, "--html=")
  assert "exists; refusing to overwrite it (pass --overwrite)" in again.stderr
  assert page.read_text(encoding="utf-8") == html  # the refusal left it alone
  assert replaced.returncode == 0 and replaced.stdout.splitlines()[-1] == f"html: {old}", replaced
  assert replaced.stdout.splitlines()[-2] in old.read_text(encoding="utf-8")  # the passing verdict
  one_line_error(on_input, "would overwrite or lie inside an input")
  one_line_error(same, "--plot and --html name the same file")
  one_line_error(no_dir, "does not exist")
  assert as_json.returncode == 1 and json.loads(as_json.stdout)["verdict"]["status"] == "jump"
  assert as_json.stderr.strip() == f"html: {tmp_path / 'j.html'}"
  assert not (tmp_path / "x.png").exists() and {p.name: p.read_bytes() for p in d.iterdir()} == before
