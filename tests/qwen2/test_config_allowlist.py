"""config.json as an allowlist: every attribute is handled, knowingly ignored, or conditional; anything else is refused.

The published configs below are the config.json files of the Qwen checkpoints
on the Hugging Face Hub (Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen2.5-0.5B,
Qwen/Qwen3-0.6B, Qwen/Qwen3-8B), written out as literals so the test runs
offline. The tests marked ``oracle`` also check the table against the keys
transformers itself writes (``to_dict``, ``save_pretrained``) and the parsed
values against transformers' own config classes.
"""

from __future__ import annotations

import json
import string

import numpy as np
import pytest

from parity_jax import qwen2
from parity_jax.errors import UsageError
from parity_jax.qwen2.config import CONDITIONAL, HANDLED, IGNORED
from tests.helpers.qwen import GOLDEN_MODELS, MODELS, config_dict

QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

PUBLISHED = {
    "Qwen2.5-7B-Instruct": QWEN25_7B_INSTRUCT,
    "Qwen2.5-0.5B": QWEN25_05B,
    "Qwen3-0.6B": QWEN3_06B,
    "Qwen3-8B": QWEN3_8B,
}

# The long-context snippets the model cards tell users to add to config.json.
YARN_QWEN25 = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
YARN_QWEN3 = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}

# transformers 4.x's PretrainedConfig.to_dict() added these (with these defaults) to every config it saved in full,
# e.g. with use_diff=False; from PretrainedConfig.__init__ of the 4.4x-4.5x releases.
TO_DICT_4X = {
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "torchscript": False,
    "use_bfloat16": False,
    "tf_legacy_loss": False,
    "pruned_heads": {},
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "is_decoder": False,
    "cross_attention_hidden_size": None,
    "add_cross_attention": False,
    "tie_encoder_decoder": False,
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "finetuning_task": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "tokenizer_class": None,
    "prefix": None,
    "sep_token_id": None,
    "decoder_start_token_id": None,
    "task_specific_params": None,
    "problem_type": None,
    "_name_or_path": "",
    "_attn_implementation_autoset": True,
}


def _known(model_type: str) -> set[str]:
  return set(HANDLED[model_type]) | set(IGNORED) | set(CONDITIONAL)


def _valid_configs() -> dict[str, dict]:
  out = {name: dict(cfg) for name, cfg in PUBLISHED.items()}
  for name in GOLDEN_MODELS:
    out[f"goldens/{name}"] = json.loads((MODELS / name / "config.json").read_text())
  out["testlib 5.x qwen3"] = config_dict("qwen3")
  out["testlib 4.x qwen2"] = config_dict("qwen2", style="4.x")
  return out


def test_published_configs_parse_to_their_architecture():
  expect = {  # layers, heads, kv heads, head_dim, tied, qwen3
      "Qwen2.5-7B-Instruct": (28, 28, 4, 128, False, False),
      "Qwen2.5-0.5B": (24, 14, 2, 64, True, False),
      "Qwen3-0.6B": (28, 16, 8, 128, True, True),
      "Qwen3-8B": (36, 32, 8, 128, False, True),
  }
  for name, raw in PUBLISHED.items():
    cfg = qwen2.parse_config(raw, source=name)
    assert (
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.tie_word_embeddings,
        cfg.qk_norm,
    ) == expect[name], name
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None, name
    assert cfg.sliding_window is None and cfg.sliding_layers == (), name  # use_sliding_window false
    assert cfg.stored_dtype == "bfloat16", name


def test_published_configs_with_the_model_cards_yarn_snippet():
  for name, raw, snippet in (
      ("Qwen2.5-7B-Instruct", QWEN25_7B_INSTRUCT, YARN_QWEN25),
      ("Qwen3-8B", QWEN3_8B, YARN_QWEN3),
  ):
    cfg = qwen2.parse_config(dict(raw, rope_scaling=dict(snippet)), source=name)
    s = cfg.rope_scaling
    assert (s.rope_type, s.factor, s.original_max_position_embeddings) == ("yarn", 4.0, 32768), name
    assert s.attention_factor == pytest.approx(1.1386294361119891, abs=0), name  # 0.1 * ln 4 + 1, as HF computes it


def test_committed_goldens_and_full_4x_to_dict_parse():
  for name, raw in _valid_configs().items():
    qwen2.parse_config(raw, source=name)
  full = dict(QWEN25_05B, **TO_DICT_4X)
  assert qwen2.parse_config(full) == qwen2.parse_config(QWEN25_05B)


def _random_name(rng: np.random.Generator, taken: set[str]) -> str:
  letters = np.array(list(string.ascii_lowercase))
  while True:
    parts = ["".join(rng.choice(letters, rng.integers(3, 8))) for _ in range(rng.integers(1, 4))]
    name = "_".join(parts)
    if name not in taken:
      return name


@pytest.mark.parametrize("draw", [0, 1, 2])
def test_an_attribute_added_at_random_is_refused_naming_it(draw, test_seed):
  seed = (test_seed, draw)
  rng = np.random.default_rng(seed)
  for source, raw in _valid_configs().items():
    name = _random_name(rng, _known(raw["model_type"]))
    value = [None, 0, 1.5, True, "x", [1], {"a": 1}][int(rng.integers(7))]
    bad = dict(raw, **{name: value})
    with pytest.raises(UsageError) as e:
      qwen2.parse_config(bad, source="cfg.json")
    msg = str(e.value)
    assert msg == f"cfg.json: unknown attribute {name!r} (not handled, not known to be harmless); refusing to guess", (
        seed,
        source,
        name,
        msg,
    )


@pytest.mark.parametrize("draw", [10, 11])
def test_a_random_key_inside_the_rope_parameters_is_refused_naming_it(draw, test_seed):
  seed = (test_seed, draw)
  rng = np.random.default_rng(seed)
  for rope in (
      {"rope_type": "default", "rope_theta": 1e4},
      {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
      {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
      {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
  ):
    name = _random_name(rng, {"type", "rope_type", "rope_theta", "factor"})
    with pytest.raises(UsageError, match=f"rope_parameters has \\['{name}'\\]") as e:
      qwen2.parse_config(config_dict(rope_parameters=dict(rope, **{name: 1.0})), source="cfg.json")
    assert "\n" not in str(e.value), (seed, name)


def test_qwen2_has_no_attention_bias_attribute():
  """transformers hard-wires Qwen2's q/k/v biases; a Qwen2 config claiming attention_bias would mislead, so it is unknown."""
  with pytest.raises(UsageError, match="unknown attribute 'attention_bias'"):
    qwen2.parse_config(config_dict("qwen2", attention_bias=False))
  assert qwen2.parse_config(config_dict("qwen3", attention_bias=True)).o_bias


def test_table_is_consistent():
  for model_type in ("qwen2", "qwen3"):
    assert not set(HANDLED[model_type]) & set(IGNORED), model_type
    assert not set(HANDLED[model_type]) & set(CONDITIONAL), model_type
  assert not set(IGNORED) & set(CONDITIONAL)
  assert all(isinstance(why, str) and why for why in IGNORED.values())


@pytest.mark.parametrize("key", sorted(IGNORED))
def test_every_ignored_attribute_is_accepted_and_changes_nothing(key):
  base = config_dict("qwen2")
  assert qwen2.parse_config(dict(base, **{key: 12345})) == qwen2.parse_config(base)


@pytest.mark.parametrize("key", sorted(CONDITIONAL))
def test_every_conditional_attribute_is_accepted_at_its_value_only(key):
  allowed, _ = CONDITIONAL[key]
  base = config_dict("qwen2")
  assert qwen2.parse_config(dict(base, **{key: allowed[0]})) == qwen2.parse_config(base)
  for other in ("other", 2, not allowed[0] if isinstance(allowed[0], bool) else True):
    with pytest.raises(UsageError, match=f"^cfg.json: {key}=") as e:
      qwen2.parse_config(dict(base, **{key: other}), source="cfg.json")
    assert "\n" not in str(e.value)


# --- Against transformers itself ----------------------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_every_key_transformers_writes_is_in_the_table(model_type, tmp_path):
  """A transformers release that adds a config key makes this fail until the key is handled, ignored or refused."""
  transformers = pytest.importorskip("transformers")
  cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
  known = _known(model_type)
  keys = set(cls().to_dict())
  keys |= set(transformers.GenerationConfig._get_default_generation_params())  # popped by HF from model configs
  missing = sorted(keys - known)
  assert not missing, f"{model_type}: transformers {transformers.__version__} writes {missing}, not in the allowlist"
  # and configs it saves parse (small, so that layer_types stays short)
  small = cls(
      vocab_size=64,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      use_sliding_window=True,
      sliding_window=8,
      max_window_layers=1,
  )
  small.save_pretrained(tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  cfg = qwen2.load_config(tmp_path)
  assert cfg.sliding_layers == (1, 2) and cfg.sliding_window == 8, saved
  assert qwen2.parse_config(small.to_dict(), source=cfg.source) == cfg


@pytest.mark.oracle
@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("yarn", [False, True])
def test_published_configs_read_as_transformers_reads_them(name, yarn):
  """Same RoPE base, RoPE variant, attention factor, window and sliding layers as transformers' own config class."""
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  raw = dict(PUBLISHED[name])
  if yarn:
    raw["rope_scaling"] = dict(YARN_QWEN3 if raw["model_type"] == "qwen3" else YARN_QWEN25)
  hf = transformers.AutoConfig.for_model(**json.loads(json.dumps(raw)))
  cfg = qwen2.parse_config(raw, source=name)
  assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
  hf_type = hf.rope_parameters["rope_type"]
  assert (cfg.rope_scaling.rope_type if cfg.rope_scaling else "default") == hf_type
  if hf_type != "default":
    _, attention_factor = ROPE_INIT_FUNCTIONS[hf_type](hf)
    assert cfg.rope_scaling.attention_factor == attention_factor
    assert cfg.rope_scaling.original_max_position_embeddings == hf.rope_parameters["original_max_position_embeddings"]
  assert cfg.sliding_layers == tuple(i for i, t in enumerate(hf.layer_types) if t == "sliding_attention")
  assert cfg.sliding_window == hf.sliding_window
  assert cfg.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
