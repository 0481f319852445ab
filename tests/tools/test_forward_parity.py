"""tools.forward_parity end to end: our JAX forward against the oracle's committed goldens.

The goldens were produced by HF transformers (parity_jax.oracle.forward_goldens),
never by parity_jax.qwen2, so a wrong model fails these tests.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from parity_jax.errors import UsageError
from parity_jax.qwen2.parity import forward_parity, golden_inputs
from tests.helpers.tools import run_many

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "goldens"
MODELS = ["qwen2_gqa_bias", "qwen2_tied", "qwen3"]


def _tool(*args, cwd=ROOT):
  return subprocess.run(
      [sys.executable, "-m", "tools.forward_parity", *args], cwd=cwd, capture_output=True, text=True, timeout=300
  )


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("inputs", ["", ".padded"])
def test_every_golden_passes_in_float32(model, inputs):
  golden = GOLDENS / "forward" / f"{model}{inputs}.safetensors"
  result = forward_parity(GOLDENS / "models" / model, golden)
  assert result.passed, result.report.text(failing_only=True)
  tokens, mask, prov = golden_inputs(golden)
  assert prov["producer"] == "parity_jax.oracle.forward_goldens"  # an independent oracle, not our own code
  np.testing.assert_array_equal(result.tokens, tokens)
  assert (mask is None) == (inputs == "")
  # every stage of the golden was compared, none silently skipped
  assert [r.name for r in result.report.rows] == result.candidate.names
  assert len(result.report.rows) == len(safetensors.numpy.load_file(str(golden)))


@pytest.mark.parametrize("model", MODELS)
def test_bfloat16_passes_the_bf16_profile(model):
  result = forward_parity(GOLDENS / "models" / model, GOLDENS / "forward" / f"{model}.safetensors", dtype="bfloat16")
  assert result.report.profile.name == "bf16"
  assert result.passed, result.report.text(failing_only=True)
  # and it really ran in bf16: stages are bf16 and far outside the f32 bound
  assert result.candidate["logits"].dtype.name == "bfloat16"
  assert max(row.rel_l2 for row in result.report.rows) > 1e-3


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory):
  """A copy of qwen2_gqa_bias with layer 1's v_proj bias zeroed, as a broken port would load it."""
  src = GOLDENS / "models" / "qwen2_gqa_bias"
  dst = tmp_path_factory.mktemp("broken") / "qwen2_gqa_bias"
  shutil.copytree(src, dst)
  (weights,) = dst.glob("*.safetensors")
  tensors = safetensors.numpy.load_file(str(weights))
  key = "model.layers.1.self_attn.v_proj.bias"
  assert np.abs(tensors[key]).max() > 0
  tensors[key] = np.zeros_like(tensors[key])
  safetensors.numpy.save_file(tensors, str(weights), metadata={"format": "pt"})
  return dst


def test_zeroed_v_proj_bias_is_named_first_divergent(broken_model):
  golden = GOLDENS / "forward" / "qwen2_gqa_bias.safetensors"
  r = _tool(f"--model_dir={broken_model}", f"--golden={golden}", "--format=json")
  assert r.returncode == 1, r.stderr
  report = json.loads(r.stdout)
  assert report["verdict"]["first_divergent"] == "layers.1.v_proj"
  assert report["verdict"]["status"] == "jump"
  rows = {row["name"]: row for row in report["stages"]}
  assert rows["layers.1.k_proj"]["passed"] and rows["layers.0.output"]["passed"]

  text = _tool(f"--model_dir={broken_model}", f"--golden={golden}", "--dtype=bfloat16")
  assert text.returncode == 1
  assert "first divergent stage layers.1.v_proj -- jump" in text.stdout, text.stdout


def test_tool_passes_and_writes_candidate_and_plot(tmp_path):
  model = GOLDENS / "models" / "qwen3"
  out, png = tmp_path / "ours.safetensors", tmp_path / "p.png"
  r = _tool(
      f"--model_dir={model}",
      f"--golden={GOLDENS / 'forward' / 'qwen3.padded.safetensors'}",
      f"--save_candidate={out}",
      f"--plot={png}",
  )
  assert r.returncode == 0, r.stdout + r.stderr
  assert "PASS" in r.stdout
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "layers.0.q_norm" in safetensors.numpy.load_file(str(out))


BAD = [
    (["--model_dir=/nonexistent", "--golden=goldens/forward/qwen3.safetensors"], "no such model directory"),
    (["--model_dir=goldens/models/qwen3"], "give --golden"),
    (["--model_dir=goldens/models/qwen3", "--golden=/nonexistent.safetensors"], "no such file"),
    (
        ["--model_dir=goldens/models/qwen3", "--golden=goldens/forward/qwen3.safetensors", "--tokens=1,999999"],
        r"token ids must lie in \[0, ",
    ),
    (["--model_dir=goldens/models/qwen3", "--golden=goldens/forward/qwen3.safetensors", "--tokens=1,x"], "non-integer"),
    (["--model_dir=goldens/models/qwen3", "--golden=goldens/forward/qwen2_tied.safetensors"], "one side only"),
    (
        [
            "--model_dir=goldens/models/qwen3",
            "--golden=goldens/forward/qwen3.safetensors",
            "--save_candidate=goldens/forward/qwen3.safetensors",
        ],
        "would overwrite or lie inside an input",
    ),
    (["--model_dir=goldens/models/qwen3", "--golden=goldens/forward/qwen3.safetensors", "--dtype=float8"], "dtype"),
]


@pytest.fixture(scope="module")
def bad_runs():
  """Every BAD case through the tool in one process (tests.helpers.tools.run_many), from the repository root."""
  before = {p: p.read_bytes() for p in (GOLDENS / "forward").glob("qwen3*.safetensors")}
  results = run_many("forward_parity", [args for args, _ in BAD])
  assert {p: p.read_bytes() for p in before} == before
  return results


@pytest.mark.parametrize("i", range(len(BAD)), ids=[needle for _, needle in BAD])
def test_bad_input_exits_2_with_one_line(bad_runs, i):
  import re

  r, needle = bad_runs[i], BAD[i][1]
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
  assert len(lines) == 1 and "error:" in lines[0], r.stderr
  assert re.search(needle, lines[0]), lines[0]


def test_golden_without_inputs_is_a_usage_error(tmp_path):
  plain = tmp_path / "plain.safetensors"
  safetensors.numpy.save_file({"embedding": np.zeros((1, 2, 64), np.float32)}, str(plain))
  with pytest.raises(UsageError, match="records no inputs.tokens"):
    forward_parity(GOLDENS / "models" / "qwen3", plain)


@pytest.mark.oracle
def test_live_oracle_on_a_fresh_model(tmp_path, test_seed):
  """--oracle: HF transformers produces the golden on the spot, for a model and tokens not in the goldens."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from tests.helpers import hf as hf_capture

  seed = test_seed
  model = hf_capture.tiny_qwen("qwen3", num_layers=2, init=0.08, seed=seed, hidden=96, vocab=200)
  model.save_pretrained(tmp_path / "m")
  tokens = np.random.default_rng(seed).integers(0, 200, (2, 7))
  rows = ";".join(",".join(str(t) for t in row) for row in tokens)
  saved = tmp_path / "hf.safetensors"
  r = _tool(f"--model_dir={tmp_path / 'm'}", "--oracle", f"--tokens={rows}", f"--save_golden={saved}")
  assert r.returncode == 0, f"seed {seed}\n{r.stdout}\n{r.stderr}"
  assert saved.exists()
  # the saved oracle bundle is a golden in its own right: the file path gives the same verdict
  again = forward_parity(tmp_path / "m", saved)
  assert again.passed
