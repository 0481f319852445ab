"""The verdict on real transformer error propagation: HF Qwen models in torch, one bias dropped.

Golden and candidate both come from HF transformers (the candidate with one
layer's v_proj bias zeroed, as a broken port would), so the error propagates
through real attention, norms and MLPs. Runs when torch + transformers import.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.oracle

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity_jax.bundles import compare_bundles  # noqa: E402
from tests.helpers import hf as hf_capture  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 12))


@pytest.fixture(scope="module")
def model():
  return hf_capture.tiny_qwen("qwen2", num_layers=4, init=0.05)


def _drop_v_bias(model, layer):
  import copy

  broken = copy.deepcopy(model)
  with torch.no_grad():
    broken.model.layers[layer].self_attn.v_proj.bias.zero_()
  return broken


def test_f32_dropped_bias_is_named(model):
  golden = hf_capture.capture(model, TOKENS)
  ok = hf_capture.capture(model.to(torch.float64), TOKENS)  # the correctly rounded answer: honest f32 differences
  model.to(torch.float32)
  ok = {k: v.astype(np.float32) for k, v in ok.items()}
  report = compare_bundles(golden, ok, profile="f32")
  assert report.passed, report.text(failing_only=True)
  broken = hf_capture.capture(_drop_v_bias(model, 2), TOKENS)
  report = compare_bundles(golden, broken, profile="f32")
  assert report.first_divergent == "layers.2.v_proj" and report.verdict.status == "jump"
  assert report.row("layers.2.q_proj").passed and report.row("layers.2.k_proj").passed


def test_bf16_dropped_bias_is_named(model):
  golden = hf_capture.capture(model, TOKENS)
  honest = hf_capture.capture(model.to(torch.bfloat16), TOKENS)
  model.to(torch.float32)
  report = compare_bundles(golden, honest, profile="bf16")
  assert report.passed, report.text(failing_only=True)
  broken = hf_capture.capture(_drop_v_bias(model, 1).to(torch.bfloat16), TOKENS)
  report = compare_bundles(golden, broken, profile="bf16")
  assert report.first_divergent == "layers.1.v_proj" and report.verdict.status == "jump"
