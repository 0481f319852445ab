"""Numerics the goldens alone would let slip: bfloat16 runs reduce in float32, and the config's rms_norm_eps is used.

The references are numpy, computed from our own captured stage *inputs* with
HF's recipe (float32 reductions, bfloat16 roundings where HF rounds), so each
check isolates one operation. Float32 accumulation order may differ between
numpy and XLA on some machine, which can move a bfloat16 result by one ULP;
the checks allow that on at most 1% of the elements, while the bugs they guard
against (a softmax or a variance computed in bfloat16) move far more.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from parity_jax import qwen2
from parity_jax.arraydiff import ulp_distance
from tests.helpers.qwen import config_dict, random_tensors, write_checkpoint

BF16 = ml_dtypes.bfloat16


def _rb(x: np.ndarray) -> np.ndarray:
  """Round float32 to bfloat16 and back (nearest even), as a cast to the activation dtype does."""
  return x.astype(BF16).astype(np.float32)


def _assert_within_one_bf16_ulp(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
  u = ulp_distance(np.asarray(ours).astype(BF16), ref.astype(BF16))
  assert int(u.max()) <= 1 and float((u > 0).mean()) <= 0.01, (what, int(u.max()), float((u > 0).mean()))


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
  cfg = config_dict(
      "qwen2",
      hidden_size=64,
      num_attention_heads=4,
      num_key_value_heads=2,
      intermediate_size=96,
      num_hidden_layers=2,
      vocab_size=96,
  )
  path = write_checkpoint(tmp_path_factory.mktemp("bf16") / "m", cfg, random_tensors(cfg, seed=5, scale=0.5))
  model = qwen2.load(path, dtype=jnp.bfloat16)
  tokens = np.random.default_rng(1).integers(0, 96, (2, 96))  # 96 keys per row: a long softmax
  _, stages = qwen2.forward(model, tokens, capture=True)
  return model, tokens, {k: np.asarray(v).astype(np.float32) for k, v in stages.items()}


def test_bf16_softmax_is_taken_in_float32(bf16_run):
  model, tokens, st = bf16_run
  cfg = model.config
  b, t = tokens.shape
  kv, g, hd = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
  q = st["layers.0.q_rope"].reshape(b, t, kv, g, hd)
  k = st["layers.0.k_rope"].reshape(b, t, kv, hd)
  v = st["layers.0.v_proj"].reshape(b, t, kv, hd)
  scores = _rb(np.einsum("btkgh,bskh->bkgts", q, k))  # a bf16 dot: float32 accumulation, one rounding
  scores = _rb(scores * np.float32(hd**-0.5))
  scores = np.where(np.triu(np.ones((t, t), bool), 1), np.float32(ml_dtypes.finfo(BF16).min), scores)
  e = np.exp(scores - scores.max(-1, keepdims=True))  # softmax in float32, rounded once to bf16
  probs = _rb(e / e.sum(-1, keepdims=True, dtype=np.float32))
  ctx = _rb(np.einsum("bkgts,bskh->btkgh", probs, v)).reshape(b, t, -1)
  _assert_within_one_bf16_ulp(st["layers.0.attention"], ctx, "attention")


def test_bf16_rms_norm_reduces_in_float32(bf16_run):
  """layers.0.attn_norm reads the embedding (a gather), so its input is exactly the captured bf16 stage.

  (Later norms read a residual sum that XLA's CPU fusions may keep in float32
  -- ``xla_allow_excess_precision``, on by default -- so their inputs are not
  always the rounded values a stage records; see BUILD.md, bfloat16 numerics.)
  """
  model, _, st = bf16_run
  w = np.asarray(model.params.layers[0].attn_norm).astype(np.float32)
  x = st["embedding"]
  var = (x * x).mean(-1, keepdims=True, dtype=np.float32)
  ref = _rb(w * _rb(x / np.sqrt(var + np.float32(model.config.rms_norm_eps))))
  _assert_within_one_bf16_ulp(st["layers.0.attn_norm"], ref, "attn_norm")


def test_rms_norm_eps_from_the_config_reaches_the_forward(tmp_path):
  eps = 0.0371  # far above the variance of the tiny activations below, so it shapes every normed value
  cfg = config_dict("qwen3", rms_norm_eps=eps)
  tensors = random_tensors(cfg, seed=11)
  tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * np.float32(0.01)
  path = write_checkpoint(tmp_path / "m", cfg, tensors)
  assert qwen2.load_config(path).rms_norm_eps == eps == json.loads((path / "config.json").read_text())["rms_norm_eps"]
  model = qwen2.load(path)
  tokens = np.array([[3, 1, 4, 1, 5, 9]])
  _, st = qwen2.forward(model, tokens, capture=True)
  x = tensors["model.embed_tokens.weight"].astype(np.float64)[tokens]
  w = tensors["model.layers.0.input_layernorm.weight"].astype(np.float64)
  var = (x * x).mean(-1, keepdims=True)
  assert var.max() < eps / 10  # eps dominates: a forward that ignored it would be far off
  for e, close in ((eps, True), (1e-6, False)):
    ref = w * (x / np.sqrt(var + e))
    rel = np.linalg.norm(np.asarray(st["layers.0.attn_norm"]) - ref) / np.linalg.norm(ref)
    assert (rel < 1e-6) == close, (e, rel)


def test_rms_norm_eps_is_used_at_every_norm_site(tmp_path):
  """ffn (post-attention) norm, final norm and Qwen3's q/k norms use the config's eps too, not only attn_norm.

  Each norm is recomputed in float64 from the stage it reads, with the config's eps (must agree) and with 1e-6
  (must not: eps is large enough to move every normed value).
  """
  eps = 0.0371
  cfg = config_dict("qwen3", rms_norm_eps=eps)
  tensors = random_tensors(cfg, seed=12)
  path = write_checkpoint(tmp_path / "m", cfg, tensors)
  _, st = qwen2.forward(qwen2.load(path), np.array([[3, 1, 4, 1, 5, 9, 2]]), capture=True)
  st = {k: np.asarray(v, np.float64) for k, v in st.items()}
  w = {k: v.astype(np.float64) for k, v in tensors.items()}
  hd = cfg["head_dim"]

  def norm(x, weight, e):
    return weight * (x / np.sqrt((x * x).mean(-1, keepdims=True) + e))

  sites = {"final_norm": (st["layers.1.output"], w["model.norm.weight"])}
  for i in range(2):
    p = f"model.layers.{i}."
    sites[f"layers.{i}.ffn_norm"] = (st[f"layers.{i}.post_attn_residual"], w[p + "post_attention_layernorm.weight"])
    for qk in ("q", "k"):
      x = st[f"layers.{i}.{qk}_proj"]
      sites[f"layers.{i}.{qk}_norm"] = (x.reshape(x.shape[:2] + (-1, hd)), w[p + f"self_attn.{qk}_norm.weight"])
  for name, (x, weight) in sites.items():
    got = st[name].reshape(x.shape)
    for e, close in ((eps, True), (1e-6, False)):
      ref = norm(x, weight, e)
      rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
      assert (rel < 1e-5) == close, (name, e, rel)
