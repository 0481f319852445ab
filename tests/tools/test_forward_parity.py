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
  out, png, page = tmp_path / "ours.safetensors", tmp_path / "p.png", tmp_path / "report.html"
  r = _tool(
      f"--model_dir={model}",
      f"--golden={GOLDENS / 'forward' / 'qwen3.padded.safetensors'}",
      f"--save_candidate={out}",
      f"--plot={png}",
      f"--html={page}",
  )
  assert r.returncode == 0, r.stdout + r.stderr
  assert "PASS" in r.stdout
  assert f"wrote {page}" in r.stdout or str(page) in r.stdout.splitlines()[-1], r.stdout
  text = page.read_text()
  assert text.lstrip().lower().startswith("<!doctype html") and "layers.0.q_norm" in text and "</html>" in text
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
    (
        ["--model_dir=goldens/models/qwen3", "--golden=goldens/forward/qwen3.safetensors", "--attention_mask=1,1"],
        "--attention_mask needs --tokens",
    ),
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
    # an all-padding row: nothing a model computes for use would be compared
    (
        [
            "--model_dir=goldens/models/qwen3",
            "--golden=goldens/forward/qwen3.safetensors",
            "--tokens=0,0,0;1,2,3",
            "--attention_mask=0,0,0;1,1,1",
        ],
        "attention_mask row 0 is all padding",
    ),
    (["--model_dir=goldens/models/qwen3", "--tokens=0,0,0", "--attention_mask=0,0,0", "--oracle"], "all padding"),
    (
        ["--model_dir=goldens/models/qwen3", "--golden=goldens/forward/qwen3.safetensors", "--oracle"],
        "give --golden or --oracle, not both",
    ),
    (["--model_dir=goldens/models/qwen3", "--reference_dir=/nonexistent"], "no such reference directory"),
    (
        ["--model_dir=goldens/models/qwen3", "--golden=goldens/forward/qwen3.safetensors", "--decode_steps=2"],
        "--decode_steps needs the live oracle",
    ),
    (["--model_dir=goldens/models/qwen3", "--oracle", "--decode_steps=0"], "decode_steps"),
    (["--model_dir=goldens/models/qwen3", "--oracle", "--decode_steps=2", "--plot=x.png"], "not with --decode_steps"),
    (
        ["--model_dir=goldens/models/qwen3", "--golden=goldens/forward/qwen3.safetensors", "--shard_rules=heads=tp"],
        "--shard_rules needs --mesh",
    ),
    (
        [
            "--model_dir=goldens/models/qwen3",
            "--golden=goldens/forward/qwen3.safetensors",
            "--mesh=tp:1",
            "--shard_rules=bogus=tp",
        ],
        "unknown logical axis 'bogus'",
    ),
    (
        [
            "--model_dir=goldens/models/qwen3",
            "--golden=goldens/forward/qwen3.safetensors",
            "--html=goldens/models/qwen3/report.html",
        ],
        "would overwrite or lie inside an input",
    ),
    (
        ["--model_dir=goldens/models/qwen3", "--golden=goldens/forward/qwen3.safetensors", "--html=report.txt"],
        r"\.html",
    ),
]


@pytest.fixture(scope="module")
def bad_runs():
  """Every BAD case through the tool in one process (tests.helpers.tools.run_many), from the repository root."""
  before = {p: p.read_bytes() for p in (GOLDENS / "forward").glob("qwen3*.safetensors")}
  listing = sorted(p.name for p in (GOLDENS / "models" / "qwen3").iterdir())
  results = run_many("forward_parity", [args for args, _ in BAD])
  assert {p: p.read_bytes() for p in before} == before
  assert sorted(p.name for p in (GOLDENS / "models" / "qwen3").iterdir()) == listing
  assert not (ROOT / "report.txt").exists() and not (ROOT / "x.png").exists()
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


def test_help_is_fast_it_imports_no_jax():
  """--help needs only absl: importing the tool's module loads neither jax nor numpy (nor torch)."""
  code = (
      "import sys, parity_jax.cli.forward_parity as m; "
      "bad = [k for k in ('jax', 'numpy', 'torch', 'ml_dtypes') if k in sys.modules]; "
      "assert not bad, bad; print(','.join(m.PROFILE_NAMES))"
  )
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  from parity_jax.bundles import BUILTIN_PROFILES

  assert p.stdout.strip().split(",") == list(BUILTIN_PROFILES)  # the --profile choices spelled out stay true
  h = _tool("--help")
  assert h.returncode == 0 and "--decode_steps" in h.stdout and "--reference_dir" in h.stdout and "--html" in h.stdout


# ------------------------------------------------------------------------------------------------------------------
# --reference_dir (is my converted checkpoint the same model?) and --decode_steps, on tiny HF models built here


MOE_TOKENS = np.random.default_rng(3).integers(0, 128, (2, 12))


def _rows(a) -> str:
  return ";".join(",".join(str(int(t)) for t in row) for row in np.asarray(a))


def _copy_with(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  """A "converted" copy of an HF checkpoint directory with ``edit(tensors)`` applied to its weights."""
  shutil.copytree(src, dst)
  (weights,) = dst.glob("*.safetensors")
  tensors = safetensors.numpy.load_file(str(weights))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(weights), metadata={"format": "pt"})
  return dst


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
  """An original Qwen2-MoE checkpoint, a faithful copy, and a copy whose layer-1 expert 3 down_proj is scaled."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from tests.helpers.moe import save, tiny_moe

  root = tmp_path_factory.mktemp("converted")
  original = save(tiny_moe("qwen2_moe", seed=8101, num_hidden_layers=2), root / "original")

  def scale(t):
    t["model.layers.1.mlp.experts.3.down_proj.weight"] *= np.float32(1.01)

  return original, _copy_with(original, root / "faithful", lambda t: None), _copy_with(original, root / "bad", scale)


@pytest.mark.oracle
def test_reference_dir_catches_a_corrupted_converted_checkpoint_in_one_command(moe_pair, pair_runs):
  original, faithful, bad = moe_pair
  ok = forward_parity(faithful, reference_dir=original, tokens=MOE_TOKENS)
  assert ok.passed and ok.routing is not None and not ok.routing.flips, ok.text(failing_only=True)
  # --oracle on the corrupted copy loads the same corrupted weights into HF: it passes by design
  assert forward_parity(bad, oracle=True, tokens=MOE_TOKENS).passed
  r, page = pair_runs["reference_dir"]
  assert r.returncode == 1, r.stdout + r.stderr
  assert f"vs HF on the reference {original}" in r.stdout
  assert "first divergent stage layers.1.routed_out" in r.stdout, r.stdout
  assert "layers.1.routed_out" in page.read_text()


@pytest.mark.oracle
def test_a_dense_golden_for_a_moe_model_is_a_usage_error(moe_pair, tmp_path):
  """The routing replay reads the golden's expert choices; a golden without them is refused with a hint."""
  from parity_jax.bundles import save_bundle

  dense = tmp_path / "dense.safetensors"
  save_bundle(dense, {"embedding": np.zeros((2, 12, 4), np.float32)})
  with pytest.raises(UsageError, match=r"has no stage 'layers\.0\.selected_experts' \(is it from a dense model\?\)"):
    forward_parity(moe_pair[1], golden=dense, tokens=MOE_TOKENS)


@pytest.fixture(scope="module")
def dense_pair(tmp_path_factory):
  """A dense Qwen3 original, and a copy whose embedding row of the token HF generates first (row 0) is off.

  The prompt never holds that token, so the prefill (step 0) matches and step 1, which feeds it, is the first
  divergent step, at its embedding.
  """
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from parity_jax.oracle.hf_forward import hf_generate
  from tests.helpers import hf as hf_capture

  root = tmp_path_factory.mktemp("decode")
  model = hf_capture.tiny_qwen("qwen3", num_layers=2, init=0.08, seed=8102, hidden=32, vocab=128)
  model.save_pretrained(root / "original")
  tokens = np.array([[0, 0, 6, 17, 99, 4], [9, 120, 33, 2, 76, 54]])
  mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6])
  seq, _ = hf_generate(model, tokens, 1, mask)
  first = int(seq[0, -1])
  assert first not in tokens[:, 2:] and first not in tokens[1]

  def shift(t):
    t["model.embed_tokens.weight"][first] += np.float32(0.05)

  return root / "original", _copy_with(root / "original", root / "bad", shift), tokens, mask


@pytest.fixture(scope="module")
def pair_runs(moe_pair, dense_pair, tmp_path_factory):
  """The tool on both corrupted copies, in one child process (tests.helpers.tools.run_many)."""
  original, _, bad = moe_pair
  d_original, d_bad, tokens, mask = dense_pair
  page = tmp_path_factory.mktemp("html") / "bad.html"
  runs = run_many(
      "forward_parity",
      [
          [f"--model_dir={bad}", f"--reference_dir={original}", f"--tokens={_rows(MOE_TOKENS)}", f"--html={page}"],
          [
              f"--model_dir={d_bad}",
              f"--reference_dir={d_original}",
              f"--tokens={_rows(tokens)}",
              f"--attention_mask={_rows(mask)}",
              "--decode_steps=4",
              "--format=json",
          ],
      ],
  )
  return {"reference_dir": (runs[0], page), "decode_steps": runs[1]}


@pytest.mark.oracle
def test_decode_steps_names_the_first_divergent_step_then_stage(dense_pair, pair_runs):
  original, bad, tokens, mask = dense_pair
  r = pair_runs["decode_steps"]
  assert r.returncode == 1, r.stdout + r.stderr
  d = json.loads(r.stdout)
  assert d["first_divergent_step"] == 1 and d["first_divergent_stage"] == "embedding", d
  assert d["rows"][0]["passed"] and not d["rows"][1]["passed"]
  from parity_jax.qwen2 import decode_parity

  same = decode_parity(original, steps=4, tokens=tokens, attention_mask=mask)
  assert same.passed and same.first_divergent_step is None, same.text()
  assert "PASS: 4 steps" in same.text()
