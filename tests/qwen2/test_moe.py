"""Qwen2-MoE / Qwen3-MoE against HF transformers: every MoE stage, planted routing bugs named, bf16 ties explained.

The goldens are HF's stages of tiny seeded models built here (tests/helpers/moe.py), captured once per module
by the oracle's hooks. Bugs are planted the way a wrong port would have them: one step function of
parity_jax.qwen2.moe replaced for the duration of a test (jit caches cleared around it).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from parity_jax import bundles, qwen2  # noqa: E402
from parity_jax.qwen2 import moe  # noqa: E402
from tests.helpers.moe import save, tiny_moe  # noqa: E402

pytestmark = pytest.mark.oracle

TOKENS = np.array([[0, 0, 0, 5, 17, 99, 3, 64, 12, 7, 88, 41], [9, 120, 33, 2, 76, 54, 18, 101, 6, 45, 29, 111]])
MASK = np.array([[0, 0, 0] + [1] * 9, [1] * 12])
MOE_STAGES = ("router_logits", "routing_weights", "selected_experts", "routed_out")


def _near_ties(model) -> None:
  """Router rows 1 ~ 0 and 3 ~ 2 (differences ~1e-3): the reference has near ties that bf16 cannot resolve."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for layer in model.model.layers:
      if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts"):
        r = layer.mlp.gate.weight
        r[1] = r[0] + 1e-3 * torch.randn(r.shape[1], generator=g)
        r[3] = r[2] + 1e-3 * torch.randn(r.shape[1], generator=g)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """``{kind: (checkpoint dir, HF golden bundle path)}``; Qwen3-MoE has a dense layer (mlp_only_layers) and near ties."""
  from parity_jax.oracle.hf_forward import hf_stages

  root = tmp_path_factory.mktemp("moe")
  out = {}
  for kind, over in (
      ("qwen2_moe", dict(num_hidden_layers=2)),
      ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True)),
  ):
    hf = tiny_moe(kind, seed=5, **over)
    if kind == "qwen3_moe":
      _near_ties(hf)
    path = save(hf, root / kind)
    golden = root / f"{kind}.hf.safetensors"
    prov = {"producer": "HF transformers", "inputs": {"tokens": TOKENS.tolist(), "attention_mask": MASK.tolist()}}
    bundles.StageBundle(hf_stages(path, TOKENS, MASK), prov).save(golden)
    out[kind] = (path, golden)
  return out


@pytest.fixture
def planted(monkeypatch):
  """Replaces one step of parity_jax.qwen2.moe; compiled forwards are dropped before and after."""
  jax.clear_caches()
  yield lambda name, fn: monkeypatch.setattr(moe, name, fn)
  monkeypatch.undo()
  jax.clear_caches()


@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen3_moe"])
def test_every_moe_stage_matches_hf_in_f32(models, kind):
  path, golden = models[kind]
  result = qwen2.forward_parity(path, golden)
  assert result.passed, result.text(failing_only=True)
  assert result.routing is not None and not result.routing.flips and result.routing.runs == 1
  rows = {r.name: r for r in result.report.rows}
  moe_layers = (0, 1) if kind == "qwen2_moe" else (0, 2)
  extra = ("shared_out", "shared_gate") if kind == "qwen2_moe" else ()
  for layer in moe_layers:
    for stage in MOE_STAGES + extra:
      row = rows[f"layers.{layer}.{stage}"]
      assert row.rel_l2 <= 1e-5, (row.name, row.rel_l2)
  assert "layers.1.router_logits" not in rows or kind == "qwen2_moe"  # Qwen3's layer 1 is dense (mlp_only_layers)
  # selected experts are identical, as ints, against HF's
  with bundles.BundleReader(golden) as r:
    for layer in moe_layers:
      name = f"layers.{layer}.selected_experts"
      g = np.asarray(r.get(name))
      assert g.dtype == np.int32 and np.array_equal(g, result.candidate[name])


def test_moe_layers_follow_hf_decoder_layers():
  """decoder_sparse_step and mlp_only_layers: our sparse layers are the ones HF instantiates a sparse block for."""
  cfg = transformers.Qwen3MoeConfig(
      vocab_size=32,
      hidden_size=16,
      intermediate_size=16,
      moe_intermediate_size=8,
      num_hidden_layers=7,
      num_attention_heads=2,
      num_key_value_heads=1,
      head_dim=8,
      num_experts=4,
      num_experts_per_tok=2,
      decoder_sparse_step=2,
      mlp_only_layers=[3],
  )
  hf = transformers.Qwen3MoeForCausalLM(cfg)
  sparse = tuple(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts"))
  ours = qwen2.parse_config(cfg.to_dict())
  assert ours.moe_layers == sparse and sparse == (1, 5)


def _softmax_after_topk(logits, top_k, norm_topk_prob):
  top, idx = jax.lax.top_k(logits.astype(jnp.float32), top_k)
  return jax.nn.softmax(top, axis=-1).astype(logits.dtype), idx.astype(jnp.int32)


def _norm_ignored(logits, top_k, norm_topk_prob):
  return ROUTE(logits, top_k, False)


def _gate_dropped(routed, shared_out, gate_logit):
  return routed + shared_out


def _index_off_by_one(logits, top_k, norm_topk_prob):
  w, idx = ROUTE(logits, top_k, norm_topk_prob)
  return w, (idx + 1) % logits.shape[-1]


ROUTE = moe.route


@pytest.mark.parametrize(
    "kind, step, bug, first",
    [
        ("qwen2_moe", "route", _softmax_after_topk, "layers.0.routing_weights"),
        ("qwen3_moe", "route", _norm_ignored, "layers.0.routing_weights"),
        ("qwen2_moe", "combine", _gate_dropped, "layers.0.ffn_out"),
        ("qwen3_moe", "route", _index_off_by_one, "layers.0.selected_experts"),
    ],
    ids=["softmax_after_topk", "norm_topk_prob_ignored", "shared_gate_dropped", "expert_index_off_by_one"],
)
def test_planted_routing_bug_is_named(models, planted, kind, step, bug, first):
  path, golden = models[kind]
  planted(step, bug)
  result = qwen2.forward_parity(path, golden)
  assert not result.passed
  assert result.first_divergent == first, result.text(failing_only=True)
  assert f"first real divergence {first}" in result.text() or result.report.first_divergent == first
  if bug is _index_off_by_one:  # every token flipped, each a clear winner replaced
    assert result.routing.bugs and not result.routing.ties
    assert len([f for f in result.routing.flips if f.layer == 0]) == int(MASK.sum()) + 3  # padding rows route too
    assert result.routing.to_dict()["first_divergent"] == first
  else:  # the expert choice of layer 0 is right; later layers' inputs already differ, their flips are judged too
    assert not [f for f in result.routing.flips if f.layer == 0]


def test_bf16_run_whose_flips_are_ties_passes(models):
  path, golden = models["qwen3_moe"]
  result = qwen2.forward_parity(path, golden, dtype="bfloat16")
  r = result.routing
  assert r.flips and not r.bugs, r.text()
  assert result.passed, result.text(failing_only=True)
  assert r.runs >= 2 and sum(r.forced.values()) == len(r.flips) and r.natural is not None
  for f in r.flips:  # every flip swaps near-tied experts of the reference (rows 0/1 and 2/3)
    assert (
        set(f.golden) ^ set(f.candidate) <= {0, 1}
        or set(f.golden) ^ set(f.candidate) <= {2, 3}
        or (f.golden != f.candidate and set(f.golden) == set(f.candidate))
    ), f.describe()
  d = result.to_dict()["routing"]
  assert d["ties"] == len(r.flips) and d["bugs"] == 0
  assert "tie(s) (legitimate), 0 bug(s)" in result.text()
