"""Live-oracle tests: fresh seeded HF models and shapes that are not in the goldens, compared on the spot.

Need torch + transformers (the [oracle] extra); skipped when either is missing.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


from parity_jax import qwen2  # noqa: E402
from parity_jax.arraydiff import bit_equal, diff_stats  # noqa: E402
from parity_jax.oracle import forward_goldens  # noqa: E402
from parity_jax.oracle.hf_forward import capture_hf_stages, hf_stages, load_hf_model  # noqa: E402

pytestmark = pytest.mark.oracle

# Shapes and seeds deliberately unlike the goldens: other head counts and ratios, head_dim 8 and 24,
# Qwen3 with attention_bias (o_proj bias), tied Qwen3, odd sequence lengths.
FRESH = {
    "qwen2_mha6": (
        "qwen2",
        dict(
            vocab_size=200,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            rope_theta=50000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        911,
    ),
    "qwen3_bias_tied": (
        "qwen3",
        dict(
            vocab_size=160,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=24,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            attention_bias=True,
            tie_word_embeddings=True,
        ),
        912,
    ),
}


@pytest.fixture(scope="module")
def fresh_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("fresh")
  dirs = {}
  for name, (model_type, config, seed) in FRESH.items():
    model = forward_goldens.build_model(model_type, config, seed)
    model.save_pretrained(root / name)
    dirs[name] = root / name
  return dirs


def _assert_stages_match(ref, got, tol=1e-5):
  assert list(ref) == list(got)
  bad = []
  for name in ref:
    st = diff_stats(ref[name], np.asarray(got[name]), name=name)
    if not st.rel_l2 <= tol:
      bad.append(f"{name}: {st.summary()}")
  assert not bad, " | ".join(bad[:3])
  assert np.array_equal(np.argmax(ref["logits"], -1), np.argmax(np.asarray(got["logits"]), -1))


@pytest.mark.parametrize("name", sorted(FRESH))
def test_fresh_models_padded_batches(fresh_dirs, name):
  path = fresh_dirs[name]
  model = qwen2.load(path)
  if name == "qwen3_bias_tied":
    assert model.params.layers[0].attn.bo is not None and model.params.lm_head is None
  rng = np.random.default_rng(FRESH[name][2] + 7)
  vocab = FRESH[name][1]["vocab_size"]
  tokens = rng.integers(0, vocab, (4, 13))
  mask = np.ones((4, 13), np.int64)
  mask[0, :5] = 0  # left padding
  mask[1, 10:] = 0  # right padding
  mask[3, :12] = 0  # a single real token
  ref = hf_stages(path, tokens, mask)
  _, got = qwen2.forward(model, tokens, attention_mask=mask, capture=True)
  _assert_stages_match(ref, got)
  ref1 = hf_stages(path, tokens[2:3, :6])
  _, got1 = qwen2.forward(model, tokens[2:3, :6], capture=True)
  _assert_stages_match(ref1, got1)


def test_generate_style_positions_for_left_padding(fresh_dirs):
  """positions = cumsum(mask) - 1 (what generate() passes): RoPE sees each row's own positions."""
  path = fresh_dirs["qwen2_mha6"]
  model = qwen2.load(path)
  tokens = np.random.default_rng(5).integers(0, 200, (2, 9))
  mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
  positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
  ref = hf_stages(path, tokens, mask, position_ids=positions)
  _, got = qwen2.forward(model, tokens, attention_mask=mask, positions=positions, capture=True)
  _assert_stages_match(ref, got)
  # The left-padded row then equals the same tokens run unpadded, up to float32 rounding.
  _, alone = qwen2.forward(model, tokens[:1, 3:], capture=True)
  assert diff_stats(np.asarray(alone["logits"])[0], np.asarray(got["logits"])[0, 3:]).rel_l2 < 1e-5


def test_inv_freq_within_two_ulp_of_hf():
  """HF's inv_freq goes through SLEEF's powf; ours is the correctly rounded power (see rope_inv_freq): <= 2 ulp apart, mostly identical."""
  from parity_jax.arraydiff import ulp_distance
  from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

  total = same = 0
  for head_dim in (8, 16, 24, 32, 64, 128):
    for theta in (10000.0, 50000.0, 1000000.0, 5000000.0):
      cfg = transformers.Qwen2Config(
          hidden_size=head_dim * 2,
          num_attention_heads=2,
          num_key_value_heads=1,
          rope_theta=theta,
          num_hidden_layers=1,
          vocab_size=8,
          intermediate_size=8,
      )
      hf = Qwen2RotaryEmbedding(cfg).inv_freq.numpy()
      ours = qwen2.model.rope_inv_freq(head_dim, theta)
      assert hf.dtype == ours.dtype == np.float32 and hf.shape == ours.shape
      assert int(ulp_distance(hf, ours).max()) <= 2, (head_dim, theta)  # 1 ulp in the power, then the reciprocal
      total += hf.size
      same += int((hf.view(np.uint32) == ours.view(np.uint32)).sum())
  assert same >= 0.95 * total, (same, total)


def test_oracle_bf16_run_and_model_object(fresh_dirs):
  path = fresh_dirs["qwen3_bias_tied"]
  tokens = np.arange(1, 8)[None]
  hf = load_hf_model(path, "float32")
  assert all(bit_equal(a, b) for a, b in zip(hf_stages(hf, tokens).values(), hf_stages(str(path), tokens).values()))
  hf16 = load_hf_model(path, "bfloat16")
  st16 = capture_hf_stages(hf16, tokens)
  assert st16["logits"].dtype.name == "bfloat16"
  from parity_jax.errors import UsageError

  with pytest.raises(UsageError, match="float32"):
    hf_stages(hf16, tokens)
