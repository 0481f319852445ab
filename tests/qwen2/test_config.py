"""Config parsing: transformers 4.x and 5.x styles load; anything that changes the math and is not implemented is refused."""

import dataclasses
import json

import numpy as np
import pytest

from parity_jax import qwen2
from parity_jax.errors import UsageError
from tests.helpers.qwen import MODELS, config_dict, random_tensors, write_checkpoint


def test_5x_style_golden_config():
  cfg = qwen2.load_config(MODELS / "qwen2_gqa_bias")
  assert (cfg.model_type, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("qwen2", 3, 4, 2, 16)
  assert cfg.rope_theta == 10000.0 and cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm
  assert not cfg.tie_word_embeddings and cfg.sliding_window is None and cfg.stored_dtype == "float32"
  # a dense model: every mixture-of-experts field says "none"
  assert not cfg.is_moe and cfg.moe_layers == () and cfg.norm_topk_prob is False
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) == (
      0,
      0,
      0,
      0,
  )


def test_4x_style_golden_config_like_published_qwen25():
  raw = json.loads((MODELS / "qwen2_tied" / "config.json").read_text())
  assert "rope_parameters" not in raw and raw["rope_scaling"] is None and raw["use_sliding_window"] is False
  cfg = qwen2.load_config(MODELS / "qwen2_tied")
  assert cfg.rope_theta == 1e6 and cfg.tie_word_embeddings and cfg.num_kv_heads == 1
  assert cfg.sliding_window is None and cfg.sliding_layers == ()  # window 32768 present but disabled
  assert cfg.stored_dtype == "bfloat16"


def test_qwen3_fields():
  cfg = qwen2.parse_config(config_dict("qwen3", head_dim=24))
  assert cfg.qk_norm and not cfg.qkv_bias and not cfg.o_bias and cfg.head_dim == 24 and cfg.q_dim == 96
  cfg = qwen2.parse_config(config_dict("qwen3", attention_bias=True))
  assert cfg.qkv_bias and cfg.o_bias
  assert qwen2.parse_config({k: v for k, v in config_dict("qwen3").items() if k != "head_dim"}).head_dim == 128


def test_both_styles_parse_to_the_same_config():
  a = qwen2.parse_config(config_dict(style="5.x"), source="x")
  b = qwen2.parse_config(config_dict(style="4.x"), source="x")
  assert a == dataclasses.replace(b, stored_dtype="float32")


REFUSED = {
    "rope_scaling": (
        dict(style="4.x", rope_scaling={"type": "longrope", "factor": 4.0}),
        "rope_scaling.rope_type='longrope'",
    ),
    "rope_type": (
        dict(rope_parameters={"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0}),
        "rope_type='llama3'",
    ),
    "rope_ntk_variant": (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "proportional"}), "'proportional'"),
    "rope_unknown_key": (
        dict(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "foo": 1}),
        "\\['foo'\\], which rope_type 'yarn' does not use",
    ),
    "rope_key_of_other_type": (
        dict(style="4.x", rope_scaling={"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16}),
        "original_max_position_embeddings'\\], which rope_type 'dynamic'",
    ),
    "rope_no_factor": (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "linear"}), "has no factor"),
    "rope_bad_factor": (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "dynamic", "factor": 0}), "factor"),
    "rope_yarn_partial": (
        dict(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}),
        "partial_rotary_factor=0.5",
    ),
    "rope_yarn_attention_factor": (
        dict(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "attention_factor": 0.0}),
        "attention_factor",
    ),
    "rope_yarn_truncate": (
        dict(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "truncate": "yes"}),
        "truncate",
    ),
    "rope_type_contradiction": (
        dict(style="4.x", rope_scaling={"type": "yarn", "rope_type": "linear", "factor": 2.0}),
        "contradicts",
    ),
    "rope_both_styles": (dict(rope_scaling={"type": "linear", "factor": 2.0}), "both rope_scaling and rope_parameters"),
    "yarn_original_conflict": (
        dict(
            original_max_position_embeddings=8,
            rope_parameters={
                "rope_theta": 1e4,
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        "contradicts",
    ),
    "mrope": (dict(style="4.x", rope_scaling={"type": "default", "mrope_section": [2, 2]}), "mrope_section"),
    "sliding_without_window": (dict(layer_types=["full_attention", "sliding_attention"]), "no window"),
    "bad_window": (dict(use_sliding_window=True, sliding_window=0), "sliding_window"),
    "bad_use_sliding": (dict(use_sliding_window="yes"), "use_sliding_window"),
    "rope_extra_key": (
        dict(rope_parameters={"rope_theta": 1e4, "rope_type": "default", "partial_rotary_factor": 0.5}),
        "partial_rotary_factor",
    ),
    "partial_rotary": (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "rope_theta_conflict": (dict(rope_theta=5.0), "contradicts"),
    "no_rope_theta": (dict(style="4.x", rope_theta=None), "rope_theta"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act"),
    "llama": (dict(model_type="llama"), "model_type"),
    "no_model_type": (dict(model_type=None), "model_type"),
    "gqa_ratio": (dict(num_key_value_heads=3), "multiple"),
    "quantized": (dict(quantization_config={"quant_method": "gptq"}), "quantiz"),
    "bidirectional": (dict(is_causal=False), "is_causal"),
    "layer_type": (dict(layer_types=["full_attention", "chunked_attention"]), "chunked_attention"),
    "layer_types_len": (dict(layer_types=["full_attention"]), "layer_types"),
    "odd_head_dim": (dict(hidden_size=36, num_attention_heads=4, num_key_value_heads=2), "even"),
    "bad_hidden": (dict(hidden_size="64"), "hidden_size"),
    "bad_eps": (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    "no_vocab": (dict(vocab_size=None), "config has no 'vocab_size'$"),
    "no_layers": (dict(num_hidden_layers=0, layer_types=[]), "num_hidden_layers must be >= 1, got 0$"),
    "two_unknown": (dict(foo=1, bar=2), "unknown attributes 'bar', 'foo' \\(not handled"),
    "dynamic_head_dim_2": (
        dict(
            hidden_size=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0},
        ),
        "dynamic RoPE needs head_dim > 2 \\(its exponent is hd / \\(hd - 2\\)\\), got 2$",
    ),
    "rope_not_object": (dict(rope_parameters="x"), "rope_parameters must be an object, got 'x'$"),
    "yarn_original_zero": (
        dict(
            rope_parameters={
                "rope_theta": 1e4,
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 0,
            }
        ),
        "rope_parameters.original_max_position_embeddings must be a positive integer, got 0$",
    ),
    "yarn_beta_text": (
        dict(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, "beta_fast": "32"}),
        "rope_parameters.beta_fast must be a number, got '32'$",
    ),
    "indivisible_hidden": (
        dict(hidden_size=30, num_attention_heads=4, num_key_value_heads=2),
        "hidden_size=30 is not divisible by num_attention_heads=4 and no head_dim is given$",
    ),
    "dtype_not_text": (dict(dtype=5), "dtype must be a string, got 5$"),
    "mpe_text": (dict(max_position_embeddings="64"), "max_position_embeddings must be an integer, got '64'$"),
    "mpe_zero": (dict(max_position_embeddings=0), "max_position_embeddings must be >= 1, got 0$"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_configs(case):
  over, needle = REFUSED[case]
  over = dict(over)
  style = over.pop("style", "5.x")
  cfg = config_dict(style=style, **over)
  with pytest.raises(UsageError, match=needle) as e:
    qwen2.parse_config(cfg, source="cfg.json")
  assert "\n" not in str(e.value) and str(e.value).startswith("cfg.json: ")


def test_sliding_window_layers_and_any_length_runs(tmp_path):
  """The window applies per layer, as transformers 5.23 decides (checked against HF in test_qwen2_long_context.py)."""
  cfg_dict = config_dict(use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "sliding_attention"])
  cfg = qwen2.parse_config(cfg_dict)
  assert cfg.sliding_window == 4 and cfg.sliding_layers == (1,)
  model = qwen2.load(write_checkpoint(tmp_path / "m", cfg_dict, random_tensors(cfg_dict)))
  assert qwen2.forward(model, np.ones((1, 9), np.int32)).shape == (1, 9, 96)  # longer than the window: runs
  # 4.x style without layer_types: layers i >= max_window_layers slide (Qwen2Config.__post_init__).
  assert qwen2.parse_config(config_dict(style="4.x", use_sliding_window=True, sliding_window=8)).sliding_layers == ()
  four = qwen2.parse_config(config_dict(style="4.x", use_sliding_window=True, sliding_window=8, max_window_layers=1))
  assert four.sliding_layers == (1,) and four.sliding_window == 8
  # max_window_layers absent: Qwen2Config's class default 28, so of 30 layers the last two slide
  deep = config_dict(style="4.x", use_sliding_window=True, sliding_window=8, num_hidden_layers=30)
  del deep["max_window_layers"]
  assert qwen2.parse_config(deep).sliding_layers == (28, 29)
  # transformers ignores the window unless use_sliding_window is true.
  assert qwen2.parse_config(config_dict(use_sliding_window=False, sliding_window=4)).sliding_window is None
  # no layer is a sliding layer: the window is recorded, and nothing masks by it
  full = qwen2.parse_config(config_dict(use_sliding_window=True, sliding_window=4))
  assert full.sliding_window == 4 and full.sliding_layers == ()


def test_rope_variants_parse_from_both_styles():
  yarn4 = qwen2.parse_config(
      config_dict(
          style="4.x",
          rope_theta=1e6,
          max_position_embeddings=131072,
          rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
      )
  )
  yarn5 = qwen2.parse_config(
      config_dict(
          max_position_embeddings=131072,
          rope_parameters={
              "rope_type": "yarn",
              "rope_theta": 1e6,
              "factor": 4.0,
              "original_max_position_embeddings": 32768,
          },
      )
  )
  assert yarn4.rope_scaling == yarn5.rope_scaling and yarn4.rope_theta == yarn5.rope_theta == 1e6
  s = yarn4.rope_scaling
  assert (s.rope_type, s.factor, s.original_max_position_embeddings, s.beta_fast, s.beta_slow, s.truncate) == (
      "yarn",
      4.0,
      32768,
      32.0,
      1.0,
      True,
  )
  assert s.attention_factor == 0.1 * np.log(4.0) + 1.0
  # yarn without original_max_position_embeddings: transformers uses max_position_embeddings
  assert (
      qwen2.parse_config(
          config_dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
      ).rope_scaling.original_max_position_embeddings
      == 128
  )
  # a top-level original_max_position_embeddings (transformers reads it there too) fills in, or must agree
  top = dict(
      rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, original_max_position_embeddings=64
  )
  assert qwen2.parse_config(config_dict(**top)).rope_scaling.original_max_position_embeddings == 64
  top["rope_parameters"]["original_max_position_embeddings"] = 64
  assert qwen2.parse_config(config_dict(**top)).rope_scaling.original_max_position_embeddings == 64
  top["rope_parameters"]["original_max_position_embeddings"] = 32
  with pytest.raises(UsageError, match="original_max_position_embeddings=64 contradicts"):
    qwen2.parse_config(config_dict(**top))
  dyn = qwen2.parse_config(config_dict(style="4.x", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
  assert dyn.rope_scaling.max_position_embeddings == 128 and dyn.rope_scaling.factor == 2.0
  lin = qwen2.parse_config(config_dict(rope_parameters={"type": "linear", "rope_theta": 1e4, "factor": 2}))
  assert lin.rope_scaling.rope_type == "linear" and lin.rope_scaling.factor == 2.0
  # rope_scaling {"type": "default"} and null are both plain RoPE
  assert qwen2.parse_config(config_dict(style="4.x", rope_scaling={"type": "default"})).rope_scaling is None
  # static under jit: hashable, and equal variants hash equal
  assert hash(yarn4.rope_scaling) == hash(yarn5.rope_scaling) and isinstance(hash(yarn4), int)


def test_load_config_errors(tmp_path):
  with pytest.raises(UsageError, match="no such checkpoint directory"):
    qwen2.load_config(tmp_path / "missing")
  with pytest.raises(UsageError, match="no config.json"):
    qwen2.load_config(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UsageError, match="not valid JSON"):
    qwen2.load_config(tmp_path)
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(UsageError, match="JSON object"):
    qwen2.load_config(tmp_path)
  (tmp_path / "weights.bin").write_bytes(b"")
  with pytest.raises(UsageError, match="weights.bin is a file; expected an HF checkpoint directory"):
    qwen2.load_config(tmp_path / "weights.bin")


def test_config_is_hashable_and_static():
  cfg = qwen2.parse_config(config_dict())
  assert hash(cfg) == hash(qwen2.parse_config(config_dict()))


def _moe_cfg(model_type: str, **over):
  d = config_dict(model_type, num_hidden_layers=4, **over)
  d.pop("layer_types")
  d["architectures"] = ["Qwen2MoeForCausalLM" if model_type == "qwen2_moe" else "Qwen3MoeForCausalLM"]
  return qwen2.parse_config(d)


def _moe_fields(cfg):
  return (
      cfg.moe_layers,
      cfg.num_experts,
      cfg.num_experts_per_tok,
      cfg.moe_intermediate_size,
      cfg.norm_topk_prob,
      cfg.shared_expert_intermediate_size,
  )


def test_moe_blocks_are_the_layers_transformers_makes_sparse():
  """A layer is sparse unless listed in mlp_only_layers, when experts > 0 and (i + 1) % decoder_sparse_step == 0;
  absent keys take the MoE classes' defaults (Qwen2Moe: 60 experts, top 4, 1408, shared 5632; Qwen3Moe: 128, 8,
  768, no shared expert)."""
  assert _moe_fields(_moe_cfg("qwen2_moe")) == ((0, 1, 2, 3), 60, 4, 1408, False, 5632)
  assert _moe_fields(_moe_cfg("qwen3_moe")) == ((0, 1, 2, 3), 128, 8, 768, False, 0)
  cfg = _moe_cfg(
      "qwen2_moe",
      num_experts=6,
      num_experts_per_tok=6,
      moe_intermediate_size=12,
      shared_expert_intermediate_size=20,
      norm_topk_prob=True,
      decoder_sparse_step=2,
      mlp_only_layers=[3],
  )
  assert _moe_fields(cfg) == ((1,), 6, 6, 12, True, 20) and cfg.is_moe and cfg.shared_expert
  # Qwen3-MoE's num_local_experts alias, alone or agreeing with num_experts
  assert _moe_fields(_moe_cfg("qwen3_moe", num_local_experts=5, num_experts_per_tok=2, mlp_only_layers=[0, 2]))[:3] == (
      (1, 3),
      5,
      2,
  )
  assert _moe_cfg("qwen3_moe", num_experts=5, num_local_experts=5, num_experts_per_tok=2).num_experts == 5
  # no experts, or every layer dense: no sparse block and none of its fields
  for dense in (_moe_cfg("qwen2_moe", num_experts=0), _moe_cfg("qwen3_moe", mlp_only_layers=[0, 1, 2, 3])):
    assert _moe_fields(dense) == ((), 0, 0, 0, False, 0) and not dense.is_moe
  # the MoE classes' windows: Qwen2Moe's layer_types slide the even layers below max_window_layers (checked against
  # Qwen2MoeConfig(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2).layer_types), Qwen3Moe every
  # layer; Qwen2Moe writes sliding_window 0 when the window is off
  windowed = dict(use_sliding_window=True, sliding_window=8)
  assert _moe_cfg("qwen2_moe", **windowed, max_window_layers=2).sliding_layers == (0,)
  assert _moe_cfg("qwen3_moe", **windowed).sliding_layers == (0, 1, 2, 3)
  assert _moe_cfg("qwen2_moe", sliding_window=0).sliding_window is None
  with pytest.raises(UsageError, match="sliding_window must be a positive integer or null, got 0"):
    _moe_cfg("qwen2_moe", use_sliding_window=True, sliding_window=0)  # only an unused window may be 0
  for over, words in [
      (dict(num_experts=6, num_local_experts=5), "num_experts=6 contradicts num_local_experts=5"),
      (dict(mlp_only_layers="1"), "mlp_only_layers must be a list of layer indices, got '1'"),
      (dict(mlp_only_layers=[True]), "mlp_only_layers must be a list of layer indices"),
      (dict(mlp_only_layers=[1, 4, -1]), r"mlp_only_layers \[-1, 4\] lie outside the 4 layers"),
      (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5 exceeds num_experts=4"),
  ]:
    with pytest.raises(UsageError, match=words):
      _moe_cfg("qwen3_moe", **over)


def test_yarn_attention_factor_from_mscale_and_the_betas():
  """Without attention_factor, YaRN's is mscale(f, m) / mscale(f, m_all) when both are given (DeepSeek style), else
  mscale(f, 1), with mscale(f, m) = 0.1 m ln f + 1 (transformers' _compute_yarn_parameters); betas default 32, 1."""
  import math

  def yarn(**extra):
    rope = {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0, **extra}
    return qwen2.parse_config(config_dict(rope_parameters=rope)).rope_scaling

  both = yarn(mscale=0.707, mscale_all_dim=1.0)
  assert both.attention_factor == pytest.approx((0.1 * 0.707 * math.log(4) + 1) / (0.1 * math.log(4) + 1), rel=1e-15)
  plain = yarn(mscale=0.707)  # one of the two only: the plain formula
  assert plain.attention_factor == pytest.approx(0.1 * math.log(4) + 1, rel=1e-15)
  assert (plain.beta_fast, plain.beta_slow) == (32.0, 1.0)
  given = yarn(attention_factor=1.5, beta_fast=16, beta_slow=2)
  assert (given.attention_factor, given.beta_fast, given.beta_slow) == (1.5, 16.0, 2.0)


def test_the_smallest_counts_are_accepted():
  """One layer, one kv head, one attention head: each count's minimum is 1, and 1 itself is fine."""
  cfg = qwen2.parse_config(
      config_dict(num_hidden_layers=1, layer_types=["full_attention"], num_attention_heads=1, num_key_value_heads=1)
  )
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (1, 1, 1, 32)
  no_mpe = config_dict()
  del no_mpe["max_position_embeddings"]  # optional: only dynamic RoPE and YaRN read it
  assert qwen2.parse_config(no_mpe).max_position_embeddings is None
