"""The Qwen presets against conversions others wrote: tunix's own (the committed fixtures) and MaxText's layout
(tests/helpers/maxtext_layout.py, transcribed from MaxText's mapping: MaxText needs Python >= 3.12, not here)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from parity_jax.checkpoint import RemapSpec, open_checkpoint, restore_leaves, verify_migration
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
  with pytest.raises(UsageError, match="model_type qwen2, qwen3, qwen3_moe, qwen2_moe; config.json says 'llama'"):
    preset_rules("hf-to-tunix", {**cfg, "model_type": "llama"})
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


# ---- qwen2_moe: tunix has no Qwen2-MoE model, so its layout here is DERIVED from tunix's qwen3 MoE map (router
# and experts) and qwen2 map (flat q/k/v biases), the shared expert named as tunix names a dense MLP. The expected
# tunix tree below is written out from that statement with numpy; the HF side is transformers' own model.


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
  """A tiny HF Qwen2-MoE (shared expert as wide as an expert, so swaps are value faults) -> tunix -> HF shards."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from parity_jax.checkpoint import migrate
  from tests.helpers.moe import save, tiny_moe

  root = tmp_path_factory.mktemp("qwen2_moe")
  model = tiny_moe("qwen2_moe", seed=17, num_hidden_layers=2, num_experts=4, shared_expert_intermediate_size=16)
  hf = save(model, root / "hf")
  tokens = torch.tensor(np.random.default_rng(1).integers(0, 128, (2, 7)))
  with torch.no_grad():
    logits = model(tokens).logits.numpy()
  from safetensors.numpy import load_file  # the tensors as transformers saved them (one per expert)

  sd = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
  to_tunix = preset_spec("hf-to-tunix", hf)
  migrate(hf, root / "tunix", to_tunix)
  back = preset_spec("tunix-to-hf", root / "tunix", hf_config=hf)
  migrate(
      root / "tunix", root / "back", back, dest_format="safetensors", max_shard_mb=0.02, hf_config=hf / "config.json"
  )
  return dict(root=root, hf=hf, sd=sd, tokens=tokens, logits=logits, to_tunix=to_tunix, back=back)


def _tunix_qwen2_moe(sd: dict, layers: int, experts: int) -> dict:
  """The derived tunix layout of an HF Qwen2-MoE state dict, written out with numpy transposes and stacks."""
  out = {"embedder/input_embedding": sd["model.embed_tokens.weight"], "final_norm/w": sd["model.norm.weight"]}
  out["lm_head/w"] = sd["lm_head.weight"].T
  for l in range(layers):
    h, t = f"model.layers.{l}.", f"layers/{l}/"
    out[t + "input_layernorm/w"] = sd[h + "input_layernorm.weight"]
    out[t + "post_attention_layernorm/w"] = sd[h + "post_attention_layernorm.weight"]
    for p, n in (("q", 4), ("k", 2), ("v", 2)):
      out[t + f"attn/{p}_proj/w"] = sd[h + f"self_attn.{p}_proj.weight"].T.reshape(32, n, 8)
      out[t + f"attn/{p}_bias"] = sd[h + f"self_attn.{p}_proj.bias"]
    out[t + "attn/o_proj/w"] = sd[h + "self_attn.o_proj.weight"].T.reshape(4, 8, 32)
    out[t + "mlp/router/kernel"] = sd[h + "mlp.gate.weight"].T
    for p in ("gate", "up", "down"):
      out[t + f"mlp/{p}_proj"] = np.stack([sd[h + f"mlp.experts.{e}.{p}_proj.weight"].T for e in range(experts)])
      out[t + f"mlp/shared_expert/{p}_proj/kernel"] = sd[h + f"mlp.shared_expert.{p}_proj.weight"].T
    out[t + "mlp/shared_expert_gate/kernel"] = sd[h + "mlp.shared_expert_gate.weight"].T
  return out


def test_qwen2_moe_to_tunix_and_back_loads_in_transformers_with_the_same_logits(qwen2_moe):
  import transformers
  import torch

  q = qwen2_moe
  tunix = open_checkpoint(q["root"] / "tunix")
  got = {p: np.asarray(a) for p, a in restore_leaves(tunix, sorted(tunix.leaves)).items()}
  want = _tunix_qwen2_moe(q["sd"], 2, 4)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
  assert verify_migration(q["hf"], q["root"] / "tunix", q["to_tunix"]).passed
  rep = verify_migration(q["root"] / "tunix", q["root"] / "back", q["back"])
  assert rep.passed and len(rep.leaves) == len(q["sd"]), rep.text()
  with open(q["root"] / "back" / "model.safetensors.index.json") as f:
    assert sorted(json.load(f)["weight_map"]) == sorted(q["sd"])
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      q["root"] / "back", attn_implementation="eager", experts_implementation="eager"
  ).eval()
  with torch.no_grad():
    logits = loaded(q["tokens"]).logits.numpy()
  assert logits.dtype == q["logits"].dtype and logits.tobytes() == q["logits"].tobytes()


def test_qwen2_moe_swapped_shared_expert_and_missing_gate_fail_naming_the_leaf(qwen2_moe, tmp_path):
  q = qwen2_moe
  t = _tunix_qwen2_moe(q["sd"], 2, 4)
  shared, experts = "layers/1/mlp/shared_expert/up_proj/kernel", "layers/1/mlp/up_proj"
  t[shared], t[experts] = t[experts][2], t[experts].copy()  # the shared expert and expert 2 swapped
  t[experts][2] = _tunix_qwen2_moe(q["sd"], 2, 4)[shared]
  del t["layers/0/mlp/shared_expert_gate/kernel"]
  W.write_file(tmp_path / "model.safetensors", t)
  rep = verify_migration(q["hf"], tmp_path, q["to_tunix"])
  failed = {r.migrated_path: r for r in rep.leaves if r.status != "PASS"}
  assert sorted(failed) == sorted([shared, experts, "layers/0/mlp/shared_expert_gate/kernel"]), rep.text()
  assert failed["layers/0/mlp/shared_expert_gate/kernel"].status == "MISSING"
  assert "model.layers.1.mlp.shared_expert.up_proj.weight[0, 0]" in failed[shared].reason
  assert f"{experts}[2, 0, 0]" in failed[experts].reason
  assert "model.layers.1.mlp.experts.2.up_proj.weight[0, 0]" in failed[experts].reason


def test_qwen2_moe_has_no_maxtext_layout_and_dense_layers_are_refused(qwen2_moe):
  with open(qwen2_moe["hf"] / "config.json") as f:
    cfg = json.load(f)
  for name in ("hf-to-maxtext", "hf-to-maxtext-scanned", "maxtext-to-hf", "maxtext-scanned-to-hf"):
    with pytest.raises(UsageError, match=f"preset {name} has no qwen2_moe layout: MaxText's checkpoint conversion"):
      preset_rules(name, cfg)
  with pytest.raises(UsageError, match=r"all-MoE models; config.json has dense layers \(mlp_only_layers \[1\]"):
    preset_rules("hf-to-tunix", {**cfg, "mlp_only_layers": [1]})
  rules = preset_rules("hf-to-tunix", cfg)
  gate = next(r for r in rules if "shared_expert_gate" in r["match"])
  assert gate["to"] == r"layers/\g<l>/mlp/shared_expert_gate/kernel" and gate["ops"] == [{"transpose": [1, 0]}]


def test_maxtext_pads_the_embedding_rows_with_zeros_and_the_way_back_slices_them_off():
  """MaxText's pad_embedding_layer: vocab 128 -> 160 appends 32 zero rows (the padding holds exactly 0.0); the way
  back keeps the first 128 rows of all 64 columns (no fill: nothing is padded there)."""
  with open(os.path.join(TUNIX, "qwen2_dense_f32_tied", "hf", "config.json")) as f:
    cfg = json.load(f)
  fwd = next(r for r in preset_rules("hf-to-maxtext", cfg, maxtext_vocab_size=160) if "embed" in r["match"])
  assert fwd["ops"] == [{"pad": [[0, 32], [0, 0]]}] and fwd["fill"] == 0.0
  back = next(r for r in preset_rules("maxtext-to-hf", cfg, maxtext_vocab_size=160) if "embed" in r["to"])
  assert back["ops"] == [{"slice": [[0, 128], [0, 64]]}] and "fill" not in back
  same = next(r for r in preset_rules("hf-to-maxtext", cfg, maxtext_vocab_size=128) if "embed" in r["match"])
  assert "ops" not in same and "fill" not in same  # nothing to pad
