"""parity_jax.qwen2.capture: one forward's stages with their provenance, against the HF oracle's golden.

The golden (goldens/forward, made by HF transformers) is the expectation for the
stages; the provenance is checked against what the model directory and the
inputs hold (file names listed here, the config read with json).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from parity_jax.bundles import compare_bundles, load_bundle
from parity_jax.errors import UsageError
from parity_jax.qwen2 import make_mesh
from parity_jax.qwen2.capture import capture_stages, capture_to_bundle
from parity_jax.qwen2.parity import golden_inputs

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "goldens" / "models" / "qwen2_tied"
GOLDEN = ROOT / "goldens" / "forward" / "qwen2_tied.padded.safetensors"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """The padded golden's inputs captured to a bundle on a one-device mesh; (path, returned provenance)."""
  tokens, mask, _ = golden_inputs(GOLDEN)
  out = tmp_path_factory.mktemp("capture") / "ours.safetensors"
  prov = capture_to_bundle(MODEL, tokens, out, attention_mask=mask, mesh=make_mesh("dp:1"))
  return out, prov


def test_captured_stages_match_the_oracle_and_say_where_they_come_from(written):
  out, prov = written
  tokens, mask, _ = golden_inputs(GOLDEN)
  bundle = load_bundle(out)
  assert bundle.provenance == prov
  rep = compare_bundles(str(GOLDEN), bundle, "f32")
  assert rep.passed and len(rep.rows) == len(load_bundle(GOLDEN)), rep.text(failing_only=True)
  cfg = json.loads((MODEL / "config.json").read_text())
  assert prov["producer"] == "parity_jax.qwen2.capture"
  assert prov["model"] == "qwen2_tied" and prov["model_dir"] == str(MODEL)
  assert prov["model_type"] == cfg["model_type"] and prov["dtype"] == "float32"
  assert prov["inputs"] == {"tokens": tokens.tolist(), "attention_mask": mask.tolist()}
  assert prov["positions"] == "default arange(T)"
  assert sorted(prov["weight_files"]) == sorted(p.name for p in MODEL.glob("*.safetensors"))
  assert prov["stored_dtypes"] == ["float32"] or prov["stored_dtypes"] == ["bfloat16"]
  assert prov["mesh"] == {"dp": 1, "tp": 1} and prov["processes"] == 1 and prov["sharding_notes"] == []


def test_without_a_mesh_no_mesh_is_recorded():
  tokens, _, _ = golden_inputs(GOLDEN)
  bundle = capture_stages(MODEL, tokens[2:])  # row 2 has no padding: the golden's unpadded row, without a mask
  prov = bundle.provenance
  assert "mesh" not in prov and "processes" not in prov and "sharding_notes" not in prov
  assert prov["inputs"] == {"tokens": tokens[2:].tolist(), "attention_mask": None}
  golden_row = {"logits": load_bundle(GOLDEN)["logits"][2:]}
  assert compare_bundles(golden_row, {"logits": bundle["logits"]}, "f32").passed


def test_the_output_is_checked_before_anything_runs(tmp_path, written):
  out, _ = written
  before = out.read_bytes()
  tokens, _, _ = golden_inputs(GOLDEN)
  tokens = tokens[2:]
  for target, words in [
      (out, "exists; refusing to overwrite"),
      (tmp_path / "x.npz", "must name a .safetensors file"),
      (MODEL / "x.safetensors", "inside"),
  ]:
    with pytest.raises(UsageError, match=words):
      capture_to_bundle(MODEL, tokens, target)
  assert out.read_bytes() == before and not (MODEL / "x.safetensors").exists()
  overwritten = tmp_path / "again.safetensors"
  overwritten.write_bytes(b"old")
  capture_to_bundle(MODEL, tokens, overwritten, overwrite=True)
  assert load_bundle(overwritten)["logits"].shape == (1, tokens.shape[1], 320)


def test_a_batch_that_cannot_split_over_the_mesh_fails_before_loading():
  with pytest.raises(UsageError):
    capture_stages(MODEL, np.ones((3, 4), int), mesh=make_mesh("dp:1"), axis_rules="batch:dp")
