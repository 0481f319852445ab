"""Self-test of tests/helpers/maxtext_layout.py, the MaxText layout built from MaxText's public mapping.

MaxText needs Python >= 3.12, which these machines do not have, so its conversion cannot run here; the helper
transcribes its mapping and hooks (commit e591f30c). These tests check the transcription against evidence that
does not come from the helper: MaxText's own dump of qwen3-4b's parameter shapes, element positions written out
by hand from the meaning of each layout (HF ``y = x @ W.T``; MaxText ``y[h, d] = sum_e x[e] K[e, h, d]``),
hand-computed bf16 bit patterns, and the leaves tunix's own loader produced from the committed HF fixtures.
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_dtypes
import numpy as np
import pytest

from tests.helpers import maxtext_layout as mt

DATA = os.path.join(os.path.dirname(__file__), os.pardir, "data", "conversions")

TINY = dict(vocab_size=40, hidden_size=8, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=2)
CONFIGS = {
    "qwen3": dict(TINY, model_type="qwen3", intermediate_size=12, tie_word_embeddings=False),
    "qwen3_tied": dict(TINY, model_type="qwen3", intermediate_size=12, tie_word_embeddings=True),
    "qwen2": dict(TINY, model_type="qwen2", intermediate_size=12, tie_word_embeddings=True),
    # transformers 5 writes num_local_experts, the Hub's Qwen3-MoE config.json num_experts: both are read.
    "qwen3_moe": dict(
        TINY,
        model_type="qwen3_moe",
        num_experts=3,
        moe_intermediate_size=6,
        intermediate_size=12,
        tie_word_embeddings=False,
    ),
    "qwen3_moe_local": dict(
        TINY,
        model_type="qwen3_moe",
        num_local_experts=3,
        moe_intermediate_size=6,
        intermediate_size=12,
        tie_word_embeddings=False,
    ),
}


def hf_state(cfg: dict, dtype=np.float32, seed: int = 0) -> dict:
  """A hand-built HF state dict: every tensor distinct, with -0.0, a NaN payload and inf planted."""
  rng = np.random.default_rng(seed)
  d, h, kv, hd, f = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], 12
  shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,)}
  if not cfg["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (cfg["vocab_size"], d)
  experts = cfg.get("num_experts", cfg.get("num_local_experts", 0))
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}"
    shapes.update(
        {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (h * hd, d),
            f"{p}.self_attn.k_proj.weight": (kv * hd, d),
            f"{p}.self_attn.v_proj.weight": (kv * hd, d),
            f"{p}.self_attn.o_proj.weight": (d, h * hd),
        }
    )
    if cfg["model_type"] == "qwen2":
      shapes.update({f"{p}.self_attn.{x}_proj.bias": (n * hd,) for x, n in (("q", h), ("k", kv), ("v", kv))})
    else:
      shapes.update({f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,)})
    if experts:
      m = cfg["moe_intermediate_size"]
      shapes[f"{p}.mlp.gate.weight"] = (experts, d)
      for j in range(experts):
        shapes.update(
            {
                f"{p}.mlp.experts.{j}.gate_proj.weight": (m, d),
                f"{p}.mlp.experts.{j}.up_proj.weight": (m, d),
                f"{p}.mlp.experts.{j}.down_proj.weight": (d, m),
            }
        )
    else:
      shapes.update({f"{p}.mlp.gate_proj.weight": (f, d), f"{p}.mlp.up_proj.weight": (f, d)})
      shapes[f"{p}.mlp.down_proj.weight"] = (d, f)
  out = {k: rng.standard_normal(s).astype(dtype) for k, s in sorted(shapes.items())}
  q0 = out["model.layers.0.self_attn.q_proj.weight"]
  q0[0, 0] = -0.0
  q0[1, 1] = np.inf
  bits = np.dtype(f"u{q0.itemsize}")
  q0.view(bits)[2, 2] = 0x7FC00123 if q0.itemsize == 4 else 0x7FC3  # quiet NaN with a payload
  return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_the_identity_bit_for_bit(name, scan, dtype):
  cfg = CONFIGS[name]
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  hf = hf_state(cfg, np_dtype)
  tree = mt.hf_to_maxtext(hf, cfg, scan_layers=scan)
  flat = mt.flatten(tree)
  dims = mt.QwenDims.from_hf_config(cfg)
  assert {k: v.shape for k, v in flat.items()} == mt.maxtext_shapes(dims, scan)
  assert all(v.dtype == np_dtype for v in flat.values())
  back = mt.maxtext_to_hf(tree, cfg, scan_layers=scan, weight_dtype=None)
  assert sorted(back) == sorted(hf)
  bad = [k for k in hf if not same_bits(back[k], hf[k])]
  assert not bad, bad


# --------------------------------------------------------------------------- shapes


def test_shapes_equal_maxtexts_own_dump_for_qwen3_4b():
  """MaxText's qwen3-4b parameter dump (context/qwen3/maxtext_params.json), and the HF names/shapes next to it."""
  with open(os.path.join(DATA, "maxtext", "qwen3-4b_maxtext_params.json")) as f:
    want_mt = {k: tuple(v) for k, v in json.load(f).items()}
  with open(os.path.join(DATA, "maxtext", "qwen3-4b_hf_params.json")) as f:
    want_hf = {k: tuple(v) for k, v in json.load(f).items()}
  # maxtext's hf_model_configs.qwen3_4b_config
  cfg = dict(
      model_type="qwen3",
      vocab_size=151936,
      hidden_size=2560,
      intermediate_size=9728,
      num_hidden_layers=36,
      num_attention_heads=32,
      num_key_value_heads=8,
      head_dim=128,
      tie_word_embeddings=True,
  )
  dims = mt.QwenDims.from_hf_config(cfg)
  assert mt.maxtext_shapes(dims, scan_layers=False) == want_mt
  # The HF dump lists transformers' parameters, the tied lm_head included; a tied checkpoint file has none.
  assert want_hf.pop("lm_head.weight") == want_hf["model.embed_tokens.weight"]
  assert mt.hf_shapes(dims) == want_hf


def test_scanned_and_moe_shapes_written_out():
  """The layer axis at param_scan_axis=1 of every leaf; MoE experts [E, L, ...]; the router [emb, L, E]."""
  dims = mt.QwenDims.from_hf_config(CONFIGS["qwen3_moe"])  # d=8, L=3, H=4, KV=2, hd=2, E=3, moe f=6, V=40
  s = mt.maxtext_shapes(dims, scan_layers=True, vocab_size=48)
  assert s == {
      "params-token_embedder-embedding": (48, 8),
      "params-decoder-decoder_norm-scale": (8,),
      "params-decoder-logits_dense-kernel": (8, 48),
      "params-decoder-layers-pre_self_attention_layer_norm-scale": (8, 3),
      "params-decoder-layers-post_self_attention_layer_norm-scale": (8, 3),
      "params-decoder-layers-self_attention-query-kernel": (8, 3, 4, 2),
      "params-decoder-layers-self_attention-key-kernel": (8, 3, 2, 2),
      "params-decoder-layers-self_attention-value-kernel": (8, 3, 2, 2),
      "params-decoder-layers-self_attention-out-kernel": (4, 3, 2, 8),
      "params-decoder-layers-self_attention-query_norm-scale": (2, 3),
      "params-decoder-layers-self_attention-key_norm-scale": (2, 3),
      "params-decoder-layers-moe_block-gate-kernel": (8, 3, 3),
      "params-decoder-layers-moe_block-wi_0": (3, 3, 8, 6),
      "params-decoder-layers-moe_block-wi_1": (3, 3, 8, 6),
      "params-decoder-layers-moe_block-wo": (3, 3, 6, 8),
  }
  q2 = mt.maxtext_shapes(mt.QwenDims.from_hf_config(CONFIGS["qwen2"]), scan_layers=True)
  assert q2["params-decoder-layers-self_attention-query-bias"] == (4, 3, 2)
  assert "params-decoder-logits_dense-kernel" not in q2 and not any("query_norm" in k or "key_norm" in k for k in q2)


# --------------------------------------------------------------------------- element positions


def test_every_element_lands_where_the_layouts_mean_it():
  """Positions written out by hand: HF W[out, in] (y = x @ W.T) against MaxText's einsum layouts."""
  cfg = dict(CONFIGS["qwen3_moe"])
  hf = hf_state(cfg)
  dims = mt.QwenDims.from_hf_config(cfg)
  d, H, KV, hd, E, F = 8, 4, 2, 2, 3, 6
  s = mt.flatten(mt.hf_to_maxtext(hf, cfg, scan_layers=True))
  u = mt.flatten(mt.hf_to_maxtext(hf, cfg, scan_layers=False))
  L = dims.num_layers

  def bits(x):
    return np.asarray(x).view(np.uint32)

  for l in range(L):
    p = f"model.layers.{l}"
    q, k = hf[f"{p}.self_attn.q_proj.weight"], hf[f"{p}.self_attn.k_proj.weight"]
    o, gate = hf[f"{p}.self_attn.o_proj.weight"], hf[f"{p}.mlp.gate.weight"]
    for e in range(d):
      for h in range(H):
        for j in range(hd):
          # query: y[h, j] = sum_e x[e] K[e, h, j]; HF: y[h*hd + j] = sum_e W[h*hd + j, e]
          assert bits(s["params-decoder-layers-self_attention-query-kernel"][e, l, h, j]) == bits(q[h * hd + j, e])
          assert bits(u[f"params-decoder-layers_{l}-self_attention-query-kernel"][e, h, j]) == bits(q[h * hd + j, e])
          # out: y[e] = sum_{h,j} a[h, j] K[h, j, e]; HF: y[e] = sum_c W[e, c] a[c], c = h*hd + j
          assert bits(s["params-decoder-layers-self_attention-out-kernel"][h, l, j, e]) == bits(o[e, h * hd + j])
      for h in range(KV):
        for j in range(hd):
          assert bits(s["params-decoder-layers-self_attention-key-kernel"][e, l, h, j]) == bits(k[h * hd + j, e])
      for x in range(E):
        assert bits(s["params-decoder-layers-moe_block-gate-kernel"][e, l, x]) == bits(gate[x, e])
        g = hf[f"{p}.mlp.experts.{x}.gate_proj.weight"]
        w = hf[f"{p}.mlp.experts.{x}.down_proj.weight"]
        for c in range(F):
          assert bits(s["params-decoder-layers-moe_block-wi_0"][x, l, e, c]) == bits(g[c, e])
          assert bits(u[f"params-decoder-layers_{l}-moe_block-wi_0"][x, e, c]) == bits(g[c, e])
          assert bits(s["params-decoder-layers-moe_block-wo"][x, l, c, e]) == bits(w[e, c])
    for j in range(hd):
      assert bits(s["params-decoder-layers-self_attention-query_norm-scale"][j, l]) == bits(
          hf[f"{p}.self_attn.q_norm.weight"][j]
      )
    for e in range(d):
      assert bits(s["params-decoder-layers-pre_self_attention_layer_norm-scale"][e, l]) == bits(
          hf[f"{p}.input_layernorm.weight"][e]
      )
  lm = hf["lm_head.weight"]
  for v in range(cfg["vocab_size"]):
    for e in range(d):
      assert bits(s["params-decoder-logits_dense-kernel"][e, v]) == bits(lm[v, e])


def test_qwen2_biases_land_per_head():
  cfg = CONFIGS["qwen2"]
  hf = hf_state(cfg)
  s = mt.flatten(mt.hf_to_maxtext(hf, cfg, scan_layers=True))
  for l in range(cfg["num_hidden_layers"]):
    b = hf[f"model.layers.{l}.self_attn.k_proj.bias"]
    for h in range(2):
      for j in range(2):
        assert s["params-decoder-layers-self_attention-key-bias"][h, l, j].tobytes() == b[h * 2 + j].tobytes()


def test_qk_projection_is_the_same_function_in_both_layouts():
  """HF's x @ W.T reshaped to heads equals MaxText's einsum over its kernel (integers: exact sums)."""
  cfg = CONFIGS["qwen3"]
  rng = np.random.default_rng(3)
  hf = {k: rng.integers(-4, 5, size=v.shape).astype(np.float32) for k, v in hf_state(cfg).items()}
  u = mt.flatten(mt.hf_to_maxtext(hf, cfg, scan_layers=False))
  x = rng.integers(-4, 5, size=(5, 8)).astype(np.float32)
  w = hf["model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(
      (x @ w.T).reshape(5, 4, 2), np.einsum("te,ehd->thd", x, u["params-decoder-layers_1-self_attention-query-kernel"])
  )
  a = rng.integers(-4, 5, size=(5, 4, 2)).astype(np.float32)
  o = hf["model.layers.1.self_attn.o_proj.weight"]
  np.testing.assert_array_equal(
      a.reshape(5, 8) @ o.T, np.einsum("thd,hde->te", a, u["params-decoder-layers_1-self_attention-out-kernel"])
  )


# --------------------------------------------------------------------------- padding and casts


def test_vocab_padding_is_positive_zero_and_truncated_back():
  cfg = CONFIGS["qwen3_tied"]
  hf = hf_state(cfg, ml_dtypes.bfloat16)
  tree = mt.hf_to_maxtext(hf, cfg, scan_layers=True, vocab_size=64)
  emb = mt.flatten(tree)["params-token_embedder-embedding"]
  assert emb.shape == (64, 8)
  assert same_bits(emb[:40], hf["model.embed_tokens.weight"])
  assert not emb[40:].view(np.uint16).any()  # +0.0: all bits zero (np.zeros)
  back = mt.maxtext_to_hf(tree, cfg, scan_layers=True, weight_dtype=None)
  assert same_bits(back["model.embed_tokens.weight"], hf["model.embed_tokens.weight"])
  # logits_dense has no padding hook: for an untied model with a padded vocabulary, MaxText's reshape_kernel
  # (x.T.reshape([emb, padded vocab])) raises.
  with pytest.raises(ValueError, match="cannot reshape"):
    mt.hf_to_maxtext(hf_state(CONFIGS["qwen3"]), CONFIGS["qwen3"], scan_layers=False, vocab_size=64)


def test_eager_save_dtype_rounds_to_nearest_even():
  """f32 -> bf16 (to_maxtext's eager --save_dtype=bfloat16): hand-computed bf16 bits, ties to even."""
  cfg = CONFIGS["qwen3"]
  hf = hf_state(cfg)
  norm = hf["model.norm.weight"]
  norm[:4] = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 3 * 2**-8)], dtype=np.float32)
  out = mt.flatten(mt.hf_to_maxtext(hf, cfg, scan_layers=False, save_dtype="bfloat16"))
  got = out["params-decoder-decoder_norm-scale"][:4].view(np.uint16)
  # 1+2^-8: tie between 0x3F80 and 0x3F81 -> even 0x3F80; 1+3*2^-8: tie 0x3F81/0x3F82 -> 0x3F82 (truncation:
  # 0x3F81); just above the tie rounds up to 0x3F81; the sign bit is kept.
  assert [hex(v) for v in got] == ["0x3f80", "0x3f82", "0x3f81", "0xbf82"]


def test_to_hf_default_widens_to_float32_exactly():
  cfg = CONFIGS["qwen3_moe"]
  hf = hf_state(cfg, ml_dtypes.bfloat16)
  back = mt.maxtext_to_hf(mt.hf_to_maxtext(hf, cfg, scan_layers=True), cfg, scan_layers=True)  # weight_dtype f32
  for k, v in hf.items():
    assert back[k].dtype == np.float32
    assert np.array_equal(back[k].view(np.uint32), v.view(np.uint16).astype(np.uint32) << 16), k


# --------------------------------------------------------------------------- refusals


def test_refusals():
  cfg = CONFIGS["qwen3"]
  hf = hf_state(cfg)
  with pytest.raises(ValueError, match="does not use"):
    mt.hf_to_maxtext(dict(hf, extra=np.zeros(2, np.float32)), cfg, scan_layers=False)
  short = dict(hf)
  del short["model.layers.2.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="model.layers.2.mlp.up_proj.weight not found"):
    mt.hf_to_maxtext(short, cfg, scan_layers=True)
  tree = mt.hf_to_maxtext(hf, cfg, scan_layers=True)
  with pytest.raises(ValueError, match="missing"):
    mt.maxtext_to_hf(tree, cfg, scan_layers=False)
  with pytest.raises(ValueError, match="qwen2_moe"):
    mt.QwenDims.from_hf_config(dict(cfg, model_type="qwen2_moe"))


# --------------------------------------------------------------------------- against tunix's own conversion


# MaxText unscanned name (after params-decoder-) -> tunix pure-dict path; the values are the same bytes: both
# frameworks transpose the HF kernels and split the heads the same way (tunix's q_bias stays flat, MaxText's is
# [heads, head_dim]: a reshape, so the C-order bytes agree too).
_TUNIX_NAMES = {
    "pre_self_attention_layer_norm-scale": "input_layernorm/w",
    "post_self_attention_layer_norm-scale": "post_attention_layernorm/w",
    "self_attention-query-kernel": "attn/q_proj/w",
    "self_attention-key-kernel": "attn/k_proj/w",
    "self_attention-value-kernel": "attn/v_proj/w",
    "self_attention-out-kernel": "attn/o_proj/w",
    "self_attention-query_norm-scale": "attn/q_norm/w",
    "self_attention-key_norm-scale": "attn/k_norm/w",
    "self_attention-query-bias": "attn/q_bias",
    "self_attention-key-bias": "attn/k_bias",
    "self_attention-value-bias": "attn/v_bias",
    "mlp-wi_0-kernel": "mlp/gate_proj/kernel",
    "mlp-wi_1-kernel": "mlp/up_proj/kernel",
    "mlp-wo-kernel": "mlp/down_proj/kernel",
    "moe_block-gate-kernel": "mlp/router/kernel",
    "moe_block-wi_0": "mlp/gate_proj",
    "moe_block-wi_1": "mlp/up_proj",
    "moe_block-wo": "mlp/down_proj",
}


def _tunix_path(name: str) -> str:
  rest = name[len("params-") :]
  if rest == "token_embedder-embedding":
    return "embedder/input_embedding"
  if rest == "decoder-decoder_norm-scale":
    return "final_norm/w"
  if rest == "decoder-logits_dense-kernel":
    return "lm_head/w"
  layer, leaf = rest[len("decoder-layers_") :].split("-", 1)
  return f"layers/{layer}/{_TUNIX_NAMES[leaf]}"


@pytest.mark.parametrize("fixture", ["qwen3_dense_f32", "qwen3_moe_f32_sharded", "qwen2_dense_f32_tied"])
def test_unscanned_layout_has_the_bytes_tunix_produced(fixture):
  """The committed HF fixture through the MaxText mapping gives, leaf for leaf, the sha256 of tunix's leaves."""
  from safetensors.numpy import load_file

  fdir = os.path.join(DATA, "tunix", fixture)
  with open(os.path.join(fdir, "expected.json")) as f:
    exp = json.load(f)
  hf = {}
  for fn in sorted(os.listdir(os.path.join(fdir, "hf"))):
    if fn.endswith(".safetensors"):
      hf.update(load_file(os.path.join(fdir, "hf", fn)))
  flat = mt.flatten(mt.hf_to_maxtext(hf, exp["hf_config"], scan_layers=False))
  tunix = {"/".join(leaf["keys"]): leaf for leaf in exp["conversions"]["default"]["leaves"]}
  assert sorted(_tunix_path(k) for k in flat) == sorted(tunix)
  for k, v in flat.items():
    t = tunix[_tunix_path(k)]
    assert (str(v.dtype), int(v.size)) == (t["dtype"], int(np.prod(t["shape"]))), k
    assert hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() == t["sha256"], k
