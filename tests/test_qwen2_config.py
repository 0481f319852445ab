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
    "rope_scaling": (dict(style="4.x", rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
    "rope_type": (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}), "rope_type"),
    "rope_extra_key": (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "default", "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
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


def test_sliding_window_refused_only_where_it_would_apply(tmp_path):
  cfg_dict = config_dict(use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "sliding_attention"])
  cfg = qwen2.parse_config(cfg_dict)
  assert cfg.sliding_window == 4 and cfg.sliding_layers == (1,)
  model = qwen2.load(write_checkpoint(tmp_path / "m", cfg_dict, random_tensors(cfg_dict)))
  qwen2.forward(model, np.ones((1, 4), np.int32))  # fits in the window: the window masks nothing
  with pytest.raises(UsageError, match="sliding_window=4 would apply to layers \\[1\\] at sequence length 5"):
    qwen2.forward(model, np.ones((1, 5), np.int32))
  # 4.x style without layer_types: every layer may slide, conservatively.
  assert qwen2.parse_config(config_dict(style="4.x", use_sliding_window=True, sliding_window=8)).sliding_layers == (0, 1)
  # transformers ignores the window unless use_sliding_window is true.
  assert qwen2.parse_config(config_dict(use_sliding_window=False, sliding_window=4)).sliding_window is None
  # no layer is a sliding layer: nothing to refuse
  full = qwen2.parse_config(config_dict(use_sliding_window=True, sliding_window=4))
  full.check_seq_len(1000)


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


def test_config_is_hashable_and_static():
  cfg = qwen2.parse_config(config_dict())
  assert hash(cfg) == hash(qwen2.parse_config(config_dict()))
