"""The Qwen presets against conversions others wrote: tunix's own (the committed fixtures) and MaxText's layout
(tests/helpers/maxtext_layout.py, transcribed from MaxText's mapping: MaxText needs Python >= 3.12, not here)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from parity_jax.checkpoint import RemapSpec, open_checkpoint, verify_migration
from parity_jax.checkpoint.presets import list_presets, preset_rules, preset_spec
from parity_jax.errors import UsageError
from tests.helpers import maxtext_layout as MT
from tests.helpers import safetensors_files as W
from tests.helpers.conversion_specs import TUNIX_CONVERSIONS

TUNIX = os.path.join(os.path.dirname(__file__), "..", "data", "conversions", "tunix")


@pytest.mark.parametrize("fixture,conversion,cast", TUNIX_CONVERSIONS)
def test_hf_to_tunix_passes_tunix_own_conversions(fixture, conversion, cast):
  hf = os.path.join(TUNIX, fixture, "hf")
  rep = verify_migration(
      hf, os.path.join(TUNIX, fixture, f"tunix_{conversion}"), preset_spec("hf-to-tunix", hf, cast=cast)
  )
  assert rep.passed, rep.text()
  assert len(rep.leaves) == len(open_checkpoint(os.path.join(TUNIX, fixture, f"tunix_{conversion}")).leaves)


@pytest.mark.parametrize("fixture", ["qwen3_dense_f32", "qwen3_moe_f32_sharded", "qwen2_dense_f32_tied"])
@pytest.mark.parametrize("scanned", [True, False])
def test_hf_to_maxtext_and_back_pass_maxtext_layouts(fixture, scanned, tmp_path):
  hf = os.path.join(TUNIX, fixture, "hf")
  ck = open_checkpoint(hf)
  tensors = {n: ck.read_whole(m) for n, m in ck.leaves.items()}
  with open(os.path.join(hf, "config.json")) as f:
    cfg = json.load(f)
  vocab = 160 if cfg.get("tie_word_embeddings") else None  # MaxText pads only a tied model's vocabulary
  tree = MT.hf_to_maxtext(tensors, cfg, scan_layers=scanned, vocab_size=vocab)
  flat = {"params/" + k.replace("-", "/"): v for k, v in MT.flatten(tree).items()}  # TrainState.params
  W.write_file(tmp_path / "model.safetensors", flat)
  name = "hf-to-maxtext-scanned" if scanned else "hf-to-maxtext"
  rep = verify_migration(hf, tmp_path, preset_spec(name, hf, maxtext_vocab_size=vocab))
  assert rep.passed, rep.text()
  assert len(rep.leaves) == len(flat)
  back = "maxtext-scanned-to-hf" if scanned else "maxtext-to-hf"
  rep = verify_migration(tmp_path, hf, preset_spec(back, tmp_path, hf_config=hf, maxtext_vocab_size=vocab))
  assert rep.passed, rep.text()
  assert len(rep.leaves) == len(tensors)
  if scanned:  # a fault a real conversion has: layers swapped in the stack
    k = "params/params/decoder/layers/mlp/wi_1/kernel" if "mlp/wi_1/kernel" in str(list(flat)) else None
    k = k or "params/params/decoder/layers/moe_block/wi_1"
    axis = 1
    flat[k] = np.flip(flat[k], axis=axis).copy()
    W.write_file(tmp_path / "model.safetensors", flat)
    rep = verify_migration(hf, tmp_path, preset_spec(name, hf, maxtext_vocab_size=vocab))
    assert [r.migrated_path for r in rep.leaves if r.status != "PASS"] == [k]


def test_presets_listed_expanded_and_refused_in_one_line(tmp_path):
  assert [n for n, _ in list_presets()] == [
      "hf-to-maxtext",
      "hf-to-maxtext-scanned",
      "hf-to-tunix",
      "maxtext-scanned-to-hf",
      "maxtext-to-hf",
      "tunix-to-hf",
  ]
  hf = os.path.join(TUNIX, "qwen3_moe_f32_sharded", "hf")
  spec = preset_spec("hf-to-tunix", hf)
  again = RemapSpec.from_dict(json.loads(spec.to_json()))  # the expanded JSON a user adapts
  assert again.to_dict() == spec.to_dict()
  with open(os.path.join(hf, "config.json")) as f:
    cfg = json.load(f)
  q = next(r for r in preset_rules("hf-to-tunix", cfg) if "q_proj" in r["match"])
  assert q["ops"] == [{"transpose": [1, 0]}, {"reshape": [64, 4, 16]}]  # [embed, heads, head_dim] of config.json
  with pytest.raises(UsageError, match="unknown preset 'hf-to-flax'; presets: hf-to-maxtext"):
    preset_rules("hf-to-flax", cfg)
  with pytest.raises(UsageError, match="model_type qwen2, qwen3, qwen3_moe; config.json says 'qwen2_moe'"):
    preset_rules("hf-to-tunix", {**cfg, "model_type": "qwen2_moe"})
  with pytest.raises(UsageError, match="cannot read it"):
    preset_spec("hf-to-tunix", tmp_path)
  with pytest.raises(UsageError, match="give hf_config"):
    preset_spec("tunix-to-hf", hf)


@pytest.mark.parametrize(
    "fixture,conversion,cast",
    [(f, c, "bfloat16" if cast else None) for f, c, cast in TUNIX_CONVERSIONS],  # the way back narrows f32 -> bf16
)
def test_tunix_to_hf_passes_and_a_swapped_expert_fails(fixture, conversion, cast, tmp_path):
  hf = os.path.join(TUNIX, fixture, "hf")
  tunix = os.path.join(TUNIX, fixture, f"tunix_{conversion}")
  spec = preset_spec("tunix-to-hf", tunix, hf_config=hf, cast=cast)
  rep = verify_migration(tunix, hf, spec)
  assert rep.passed, rep.text()
  assert len(rep.leaves) == len(open_checkpoint(hf).leaves)
  if fixture == "qwen3_moe_f32_sharded":
    ck = open_checkpoint(hf)
    t = {n: ck.read_whole(m) for n, m in ck.leaves.items()}
    a, b = "model.layers.1.mlp.experts.2.down_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"
    t[a], t[b] = t[b], t[a]
    W.write_file(tmp_path / "model.safetensors", t)
    rep = verify_migration(tunix, tmp_path, spec)
    failed = {r.migrated_path: r.reason for r in rep.leaves if r.status != "PASS"}
    assert sorted(failed) == [a, b]
    # HF down_proj [64, 32] element [0, 0] of expert 2 comes from tunix layers/1/mlp/down_proj[2, 0, 0]
    assert "layers/1/mlp/down_proj[2, 0, 0]" in failed[a]
