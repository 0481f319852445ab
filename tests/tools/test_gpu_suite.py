"""bench.gpu_suite --tiny runs on CPU the way the GPU machine runs it: from the repo root, nothing beyond its image.

The GPU image has jax, torch, transformers, orbax, safetensors and absl, and
nothing can be installed there; so the suite runs here with every other
third-party package the library might reach for made unimportable, with
``PYTHONPATH=.`` from the repository root. A second run without torch and
transformers must report the torch comparisons as skipped and still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.devices import ROOT

# Installed here (test extras, flax for the library) but absent from the GPU image. (tqdm, humanize, PyYAML ...
# come with transformers and orbax; without transformers, tqdm may be missing too: the second test blocks it.)
NOT_ON_GPU_IMAGE = ("flax", "matplotlib", "pytest", "PIL")

RUNNER = """
import runpy, sys
blocked, argv = sys.argv[1].split(","), sys.argv[2:]
for name in blocked:
  sys.modules[name] = None  # import fails, as on a machine without it
sys.argv = ["bench/gpu_suite.py", *argv]
runpy.run_module("bench.gpu_suite", run_name="__main__", alter_sys=True)
"""


def _run(out, blocked, *args):
  # as on the GPU machine: no forced devices, and no compilation cache (its determinism check compiles twice)
  env = {
      k: v
      for k, v in os.environ.items()
      if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
  }
  env.update(PYTHONPATH=".", JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-c", RUNNER, ",".join(blocked), f"--out={out}", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


@pytest.mark.oracle
def test_tiny_suite_runs_every_section(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  p = _run(tmp_path, NOT_ON_GPU_IMAGE, "--tiny")
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  doc = json.loads((tmp_path / "gpu_suite.json").read_text())
  text = (tmp_path / "gpu_suite.txt").read_text()
  assert doc["schema"] == "parity_jax.gpu_suite/1" and doc["mode"] == {"shapes": "tiny", "quick": True}
  assert text.strip() in p.stdout and text.strip().endswith("verdict: PASS (correctness: parity and determinism)")
  s = doc["sections"]
  assert set(s) == {"peaks", "parity", "prefill", "svf", "determinism"}
  assert not [k for k, v in s.items() if "error" in v or "skipped" in v], {k: v.get("error") for k, v in s.items()}
  # f32 parity against HF torch, every stage, both model families
  models = s["parity"]["models"]
  assert set(models) == {"qwen2", "qwen3"} and all(m["passed"] and m["stages"] >= 19 for m in models.values())
  assert s["parity"]["precision"]["torch.backends.cuda.matmul.allow_tf32"] is False
  assert s["parity"]["precision"]["jax_default_matmul_precision"] == "highest"
  # prefill: eager, fused attention and capture timed, torch timed, figures derived
  runs = s["prefill"]["runs"]
  assert {"eager", "fused_xla", "eager_capture"} <= set(runs) and s["prefill"]["logits_finite"]
  assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in runs.values())
  assert s["prefill"]["torch"]["attn_implementation"] == "sdpa" and s["prefill"]["ours_over_torch_time"] > 0
  assert s["peaks"]["bf16"]["peak_tflops"] > 0 and s["peaks"]["f32_highest"]["torch_tflops"] > 0
  # SVF: both sides timed on the same arrays; the bf16 results agree up to legitimate ties
  assert s["svf"]["jax"]["tflops"] > 0 and s["svf"]["torch"]["best_s"] > 0
  assert s["svf"]["layer0_bf16_elements_differing_from_torch"] <= s["svf"]["layer0_bf16_elements"] // 100
  # determinism: in process, in the flagged child, and across the two
  d = s["determinism"]
  assert d["identical"] and d["across_processes_identical"] and d["flag"] == "--xla_gpu_deterministic_ops=true"
  assert doc["targets"]["parity_f32_every_stage"] and doc["targets"]["deterministic"]


def test_without_torch_the_torch_sides_are_skipped(tmp_path):
  p = _run(tmp_path, NOT_ON_GPU_IMAGE + ("torch", "transformers", "tqdm"), "--tiny", "--sections=parity,svf")
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  s = json.loads((tmp_path / "gpu_suite.json").read_text())["sections"]
  assert s["parity"]["skipped"].startswith("torch/transformers not importable")
  assert s["svf"]["torch"]["skipped"].startswith("torch/transformers not importable") and s["svf"]["jax"]["tflops"] > 0
  assert "parity: skipped (torch/transformers not importable" in p.stdout


@pytest.mark.parametrize("golden", ["qwen3", "qwen2_gqa_bias.padded"])
def test_fused_attention_is_within_f32_of_hf(golden):
  """forward(attention="xla"), the suite's fused-attention path (causal, or a boolean mask when padded)."""
  from parity_jax import qwen2
  from parity_jax.bundles import StageBundle, compare_bundles
  from parity_jax.errors import UsageError
  from parity_jax.qwen2.parity import golden_inputs
  from tests.helpers.qwen import FORWARD, MODELS

  path = FORWARD / f"{golden}.safetensors"
  tokens, mask, _ = golden_inputs(path)
  model = qwen2.load(MODELS / golden.split(".")[0])
  _, stages = qwen2.forward(model, tokens, attention_mask=mask, capture=True, attention="xla")
  rep = compare_bundles(path, StageBundle({k: np.asarray(v) for k, v in stages.items()}), "f32")
  assert rep.passed, rep.text(failing_only=True)
  with pytest.raises(UsageError, match="attention must be one of eager, xla, cudnn, auto"):
    qwen2.forward(model, tokens, attention="flash")
