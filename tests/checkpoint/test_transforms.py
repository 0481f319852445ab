"""Element rules (transpose/reshape chains, stacks, casts) verified against conversions others wrote.

Ground truth, none of it from parity_jax: the tunix fixtures (tests/data/conversions/tunix: HF checkpoints and
google-tunix's own conversion saved with orbax, plus tunix's own key map in expected.json, from which the specs
below are built), and MaxText's layout built by tests/helpers/maxtext_layout.py (a numpy transcription of
MaxText's param_mapping: MaxText needs Python >= 3.12, which this machine does not have). Faulty conversions are
those trees with one fault put in by hand, written as safetensors sides by tests/helpers/safetensors_files.
"""

from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest

from parity_jax.checkpoint import RemapSpec, SpecError, migrate, open_checkpoint, restore_leaves, verify_migration
from tests.helpers import fused as FU
from tests.helpers import maxtext_layout as MT
from tests.helpers.conversion_specs import TUNIX_CONVERSIONS, maxtext_rules, tunix_rules
from tests.helpers import safetensors_files as W

TUNIX = os.path.join(os.path.dirname(__file__), "..", "data", "conversions", "tunix")


def _expected(fixture):
  with open(os.path.join(TUNIX, fixture, "expected.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def hf_trees():
  out = {}
  for fx in ("qwen3_dense_f32", "qwen3_moe_f32_sharded", "qwen3_dense_bf16_tied_sharded"):
    ck = open_checkpoint(os.path.join(TUNIX, fx, "hf"))
    out[fx] = {n: ck.read_whole(m) for n, m in ck.leaves.items()}
  return out


def _write(directory, flat: dict) -> str:
  os.makedirs(directory, exist_ok=True)
  W.write_file(os.path.join(directory, "model.safetensors"), flat)
  return str(directory)


def _tunix_tree(fixture, conversion="default") -> dict:
  ck = open_checkpoint(os.path.join(TUNIX, fixture, f"tunix_{conversion}"))
  return {p: np.asarray(a) for p, a in restore_leaves(ck, sorted(ck.leaves)).items()}


def _failed(rep) -> dict:
  return {r.migrated_path: r for r in rep.leaves if r.status != "PASS"}


@pytest.mark.parametrize("fixture,conversion,cast", TUNIX_CONVERSIONS)
def test_tunix_conversions_pass(fixture, conversion, cast):
  spec = RemapSpec.from_rules(tunix_rules(_expected(fixture)["tunix_key_map"], cast))
  rep = verify_migration(os.path.join(TUNIX, fixture, "hf"), os.path.join(TUNIX, fixture, f"tunix_{conversion}"), spec)
  assert rep.passed, rep.text()
  assert all(r.status == "PASS" for r in rep.leaves) and len(rep.leaves) == len(spec.rules) - sum(
      1 for r in spec.rules if r.stack and r.stack[0][1] != "0"
  )


def test_tunix_faults_fail_naming_target_and_source(hf_trees, tmp_path):
  fx = "qwen3_moe_f32_sharded"
  hf = os.path.join(TUNIX, fx, "hf")
  spec = RemapSpec.from_rules(tunix_rules(_expected(fx)["tunix_key_map"]))
  good = _tunix_tree(fx)
  h = hf_trees[fx]

  # two experts swapped
  t = dict(good)
  t["layers/1/mlp/up_proj"] = good["layers/1/mlp/up_proj"][[1, 0, 2, 3]]
  # a transpose missing on a square matrix (o_proj is [64, 64] in HF)
  t["layers/0/attn/o_proj/w"] = h["model.layers.0.self_attn.o_proj.weight"].reshape(4, 16, 64)
  # heads and head_dim swapped in the reshape of q_proj
  t["layers/1/attn/q_proj/w"] = h["model.layers.1.self_attn.q_proj.weight"].T.reshape(64, 16, 4).transpose(0, 2, 1)
  # a leaf converted but left out
  del t["layers/0/mlp/router/kernel"]
  rep = verify_migration(hf, _write(tmp_path / "faults", t), spec)
  failed = _failed(rep)
  assert sorted(failed) == sorted(
      ["layers/1/mlp/up_proj", "layers/0/attn/o_proj/w", "layers/1/attn/q_proj/w", "layers/0/mlp/router/kernel"]
  ), rep.text()
  assert failed["layers/0/mlp/router/kernel"].status == "MISSING"
  up = failed["layers/1/mlp/up_proj"]
  assert up.status == "VALUE_MISMATCH"
  # the first differing element is [0, 0, 0] (expert 0 now holds expert 1); it comes from expert 0's [0, 0]
  assert (
      "layers/1/mlp/up_proj[0, 0, 0]" in up.reason and "model.layers.1.mlp.experts.0.up_proj.weight[0, 0]" in up.reason
  )
  assert f"{4 * 64 * 32 - int(np.sum(good['layers/1/mlp/up_proj'] == t['layers/1/mlp/up_proj']))} of" in up.reason
  o = failed["layers/0/attn/o_proj/w"]
  # target o_proj[0, 0, 1] (head 0, dim 0, embed 1) is HF o_proj[1, 0] after the transpose
  assert "model.layers.0.self_attn.o_proj.weight[1, 0]" in o.reason and "o_proj/w[0, 0, 1]" in o.reason
  assert not rep.passed


def test_bf16_one_ulp_and_truncating_cast(hf_trees, tmp_path):
  # one bf16 value 1 ULP off in tunix's own bf16 conversion
  fx = "qwen3_dense_bf16_tied_sharded"
  spec = RemapSpec.from_rules(tunix_rules(_expected(fx)["tunix_key_map"]))
  t = _tunix_tree(fx)
  victim = "layers/1/mlp/gate_proj/kernel"
  t[victim] = t[victim].copy()
  t[victim].view(np.uint16)[7, 3] += 1
  rep = verify_migration(os.path.join(TUNIX, fx, "hf"), _write(tmp_path / "ulp", t), spec)
  assert list(_failed(rep)) == [victim]
  # gate_proj kernel [7, 3] is HF gate_proj.weight [3, 7]
  assert "1 of 8192 elements differ" in _failed(rep)[victim].reason
  assert "model.layers.1.mlp.gate_proj.weight[3, 7]" in _failed(rep)[victim].reason

  # f32 -> bf16: round to nearest even (written out by hand on the bits) PASSes, truncation FAILs
  fx = "qwen3_dense_f32"
  h = hf_trees[fx]
  spec = RemapSpec.from_rules([{"match": "(.*)", "to": r"\1", "cast": "bfloat16"}])

  def rne(x):
    b = x.view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)

  def trunc(x):
    return (x.view(np.uint32) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)

  rounded = {n: rne(a) for n, a in h.items()}
  rep = verify_migration(os.path.join(TUNIX, fx, "hf"), _write(tmp_path / "rne", rounded), spec)
  assert rep.passed, rep.text()
  truncated = dict(rounded)
  truncated["model.norm.weight"] = trunc(h["model.norm.weight"])
  rep = verify_migration(os.path.join(TUNIX, fx, "hf"), _write(tmp_path / "trunc", truncated), spec)
  n_diff = int(np.sum(rne(h["model.norm.weight"]).view(np.uint16) != truncated["model.norm.weight"].view(np.uint16)))
  assert n_diff > 0 and list(_failed(rep)) == ["model.norm.weight"]
  assert f"{n_diff} of 64 elements differ" in _failed(rep)["model.norm.weight"].reason


def test_cast_rules_for_nan_inf_zero_and_overflow(tmp_path):
  """Widening exact; narrowing = RNE; NaN must stay NaN of its sign (payload free); overflow -> inf as RNE gives."""
  src = np.array([1.0, -0.0, np.inf, -np.inf, np.nan, 3.0e38, 1 + 2**-9, -(1 + 3 * 2**-9)], np.float32)
  src[4] = np.frombuffer(np.uint32(0x7FA00001).tobytes(), np.float32)[0]  # a signalling NaN with a payload
  _write(tmp_path / "src", {"x": src})
  spec = RemapSpec.from_rules([{"match": "x", "to": "x", "cast": "bfloat16"}])
  # by hand: 1.0, -0.0, inf, -inf, a NaN, 3e38 (finite in bf16, max 3.39e38), 1 (a tie below half an ULP
  # rounds down), -(1 + 2^-7) (0.75 ULP rounds up)
  want = np.array([0x3F80, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0, 0x3F80, 0xBF81], np.uint16)
  want[5] = (np.float32(3.0e38).view(np.uint32) + 0x7FFF + ((np.float32(3.0e38).view(np.uint32) >> 16) & 1)) >> 16
  ok = _write(tmp_path / "ok", {"x": want.view(ml_dtypes.bfloat16)})
  assert verify_migration(tmp_path / "src", ok, spec).passed
  other_nan = want.copy()
  other_nan[4] = 0x7FFF  # torch's NaN: same sign, other payload
  assert verify_migration(
      tmp_path / "src", _write(tmp_path / "nan", {"x": other_nan.view(ml_dtypes.bfloat16)}), spec
  ).passed
  for i, bits in ((4, 0xFFC0), (1, 0x0000), (2, 0x7F7F), (7, 0xBF80)):  # NaN sign, -0.0, saturated inf, 1 ULP
    bad = want.copy()
    bad[i] = bits
    rep = verify_migration(tmp_path / "src", _write(tmp_path / f"bad{i}", {"x": bad.view(ml_dtypes.bfloat16)}), spec)
    assert not rep.passed and f"x[{i}]" in rep.leaves[0].reason, (i, rep.leaves[0].reason)


@pytest.fixture(scope="module")
def maxtext(hf_trees, tmp_path_factory):
  """MaxText scanned trees (dense and MoE) from the helper, as safetensors sides, with their specs."""
  root = tmp_path_factory.mktemp("maxtext")
  out = {}
  for fx in ("qwen3_dense_f32", "qwen3_moe_f32_sharded"):
    with open(os.path.join(TUNIX, fx, "hf", "config.json")) as f:
      cfg = json.load(f)
    tree = MT.hf_to_maxtext(hf_trees[fx], cfg, scan_layers=True)
    flat = {k.replace("-", "/"): v for k, v in MT.flatten(tree).items()}
    out[fx] = dict(
        cfg=cfg, flat=flat, spec=RemapSpec.from_rules(maxtext_rules(cfg, "")), hf=os.path.join(TUNIX, fx, "hf")
    )
    out[fx]["dir"] = _write(root / fx, flat)
  return out


def test_maxtext_scanned_layouts_pass(maxtext):
  for fx, d in maxtext.items():
    rep = verify_migration(d["hf"], d["dir"], d["spec"])
    assert rep.passed, (fx, rep.text())


def test_maxtext_stack_faults(maxtext, tmp_path):
  d = maxtext["qwen3_moe_f32_sharded"]
  flat = d["flat"]
  t = dict(flat)
  q = "params/decoder/layers/self_attention/query/kernel"  # [embed, layers, heads, head_dim]
  t[q] = flat[q][:, [1, 0]]  # two layers swapped in a stack
  k = "params/decoder/layers/self_attention/key/kernel"
  t[k] = flat[k][:, [1, 1]]  # an off-by-one layer index: position 0 holds layer 1
  wi = "params/decoder/layers/moe_block/wi_0"  # [experts, layers, embed, moe_mlp]
  t[wi] = flat[wi][[0, 2, 1, 3]]  # two experts swapped in the nested stack
  rep = verify_migration(d["hf"], _write(tmp_path / "mt", t), d["spec"])
  failed = _failed(rep)
  assert sorted(failed) == sorted([q, k, wi]), rep.text()
  assert "model.layers.0.self_attn.q_proj.weight[0, 0]" in failed[q].reason and f"{q}[0, 0, 0, 0]" in failed[q].reason
  assert "model.layers.0.self_attn.k_proj.weight[0, 0]" in failed[k].reason
  # expert 1's slot holds expert 2: target [1, 0, 0, 0] comes from layer 0 expert 1's gate_proj [0, 0]
  assert f"{wi}[1, 0, 0, 0]" in failed[wi].reason
  assert "model.layers.0.mlp.experts.1.gate_proj.weight[0, 0]" in failed[wi].reason


def test_spec_mistakes_are_listed_together(maxtext):
  d = maxtext["qwen3_moe_f32_sharded"]
  rules = [r for r in maxtext_rules(d["cfg"]) if r["match"] != re.escape("model.layers.1.mlp.experts.2.up_proj.weight")]
  rules.append({"match": re.escape("model.layers.1.mlp.experts.2.up_proj.weight"), "to": "dropped", "drop": True})
  for r in rules:
    if r["match"] == re.escape("model.layers.0.self_attn.o_proj.weight"):
      r["ops"] = [{"transpose": [1, 0, 2]}, {"reshape": [4, 16, 64]}]  # a permutation of the wrong length
    if r["match"] == re.escape("model.layers.1.self_attn.k_norm.weight"):
      r["stack"] = [{"axis": 1, "index": "0"}]  # the same place as layer 0's: overlapping stacks
  with pytest.raises(SpecError) as e:
    RemapSpec.from_rules(rules).bind(open_checkpoint(d["hf"]).leaves)
  problems = e.value.problems
  assert len(problems) == 3, problems
  assert any("transpose [1, 0, 2] is not a permutation of the 2 axes" in p for p in problems)
  assert any("is missing member(s) at [2, 1]" in p and "wi_1" in p for p in problems)
  assert any("overlapping stacks" in p and "k_norm" in p for p in problems)


def test_transposed_leaves_stream_in_small_slabs_reading_each_byte_about_once():
  """1 KiB slabs: every target slab reads only its members' bounding boxes (about its own bytes), never a leaf."""
  fx = "qwen3_moe_f32_sharded"
  spec = RemapSpec.from_rules(tunix_rules(_expected(fx)["tunix_key_map"]))
  hf = os.path.join(TUNIX, fx, "hf")
  rep = verify_migration(hf, os.path.join(TUNIX, fx, "tunix_default"), spec, slab_mb=1 / 1024)
  assert rep.passed, rep.text()
  total = open_checkpoint(hf).nbytes
  assert 2 * total <= rep.bytes_read <= 2.5 * total, (rep.bytes_read, total)


def test_maxtext_vocab_padding_and_the_way_back(hf_trees, tmp_path):
  """HF -> MaxText with the vocabulary padded to 160 rows of +0.0 (MaxText's pad_embedding_layer), and back."""
  fx = "qwen3_dense_bf16_tied_sharded"  # tied: MaxText pads only the embedding (an untied lm_head cannot be)
  hf_dir = os.path.join(TUNIX, fx, "hf")
  with open(os.path.join(hf_dir, "config.json")) as f:
    cfg = json.load(f)
  flat = {
      k.replace("-", "/"): v
      for k, v in MT.flatten(
          MT.hf_to_maxtext(hf_trees[fx], cfg, scan_layers=True, vocab_size=160, strict=False)
      ).items()
  }
  emb = "params/token_embedder/embedding"
  assert flat[emb].shape == (160, 64)
  rules = maxtext_rules(cfg)
  for r in rules:
    if r["to"] == emb:
      r["ops"], r["fill"] = [{"pad": [[0, 32], [0, 0]]}], 0.0
  spec = RemapSpec.from_rules(rules)
  assert verify_migration(hf_dir, _write(tmp_path / "padded", flat), spec).passed
  bad = dict(flat)
  bad[emb] = flat[emb].copy()
  bad[emb][150, 3] = -0.0  # padding rows that are not the fill (+0.0): -0.0 has other bits
  rep = verify_migration(hf_dir, _write(tmp_path / "badpad", bad), spec)
  (f,) = _failed(rep).values()
  assert f.migrated_path == emb and f"{emb}[150, 3]" in f.reason and "the fill 0.0 (padding)" in f.reason
  assert "1 of 10240 elements differ" in f.reason
  # a -0.0 fill declared: every padded element now differs but the one
  rules[[r["to"] for r in rules].index(emb)]["fill"] = -0.0
  rep = verify_migration(hf_dir, _write(tmp_path / "badpad2", bad), RemapSpec.from_rules(rules))
  assert f"{32 * 64 - 1} of 10240 elements differ" in _failed(rep)[emb].reason

  # the way back: slice the padded vocabulary off (the dropped rows are declared by the slice)
  back = [
      {"match": re.escape(emb), "to": "model.embed_tokens.weight", "ops": [{"slice": [[0, 128], [0, 64]]}]},
      {"match": "(?!" + re.escape(emb) + ").*", "to": "unused", "drop": True},
  ]
  rep = verify_migration(
      tmp_path / "padded",
      _write(tmp_path / "hf_back", {"model.embed_tokens.weight": hf_trees[fx]["model.embed_tokens.weight"]}),
      RemapSpec.from_rules(back),
  )
  assert rep.passed, rep.text()
  back[0]["ops"] = [{"slice": [[100, 128], [8, 64]]}]  # a window with offsets on both axes
  window = hf_trees[fx]["model.embed_tokens.weight"][100:, 8:]
  rep = verify_migration(
      tmp_path / "padded",
      _write(tmp_path / "window", {"model.embed_tokens.weight": window}),
      RemapSpec.from_rules(back),
  )
  assert rep.passed, rep.text()
  with pytest.raises(SpecError, match="slice .* axis 0 range is not within 0..160"):
    back[0]["ops"] = [{"slice": [[0, 170], [0, 64]]}]
    RemapSpec.from_rules(back).bind(open_checkpoint(tmp_path / "padded").leaves)


def test_unstack_rules_are_checked():
  with pytest.raises(SpecError) as e:
    RemapSpec.from_rules(
        [
            {"match": "a", "to": "b.{i}", "unstack": [{"axis": 0, "name": "j"}]},
            {"match": "c", "to": "d.{i}", "unstack": [{"axis": -1, "name": "i"}]},
        ]
    )
  assert len(e.value.problems) == 2
  assert "unstack name 'j' does not appear as {j} in 'to'" in e.value.problems[0]
  spec = RemapSpec.from_rules(
      [{"match": "a", "to": "b.{i}.{k}", "unstack": [{"axis": 2, "name": "i"}, {"axis": 0, "name": "k"}]}]
  )
  meta = type("M", (), {"shape": (2, 3, 4), "kind": "array", "dtype": np.dtype(np.float32)})()
  plan = spec.bind({"a": meta})
  assert sorted(e.dest for e in plan.elements) == sorted(f"b.{i}.{k}" for i in range(4) for k in range(2))
  e12 = next(e for e in plan.elements if e.dest == "b.1.0")
  assert e12.dst_shape == (3,)
  assert e12.source_of((2,)) == ("a", (0, 2, 1))  # piece k=0 of axis 0, i=1 of axis 2
  with pytest.raises(SpecError, match="unstack axis 2 is out of range"):
    spec.bind({"a": type("M", (), {"shape": (2, 3), "kind": "array", "dtype": np.dtype(np.float32)})()})


# ---- concat / split: fused projections (tests/helpers/fused.py; expected values from np.concatenate / np.split)


@pytest.fixture(scope="module")
def fused_sides(tmp_path_factory):
  root = tmp_path_factory.mktemp("fused")
  t = FU.separate()
  return dict(
      root=root,
      t=t,
      src=FU.write(root / "src", t),
      fused=FU.write(root / "fused", FU.fused(t)),
      hf_fused=FU.write(root / "hf_fused", FU.hf_fused(t)),
  )


def test_concat_of_fused_qkv_and_gate_up_passes_and_swapped_members_fail(fused_sides):
  s = fused_sides
  spec = RemapSpec.from_rules(FU.CONCAT_RULES)
  rep = verify_migration(s["src"], s["fused"], spec)
  assert rep.passed and len(rep.leaves) == 3, rep.text()
  # 256-byte slabs over parts of different sizes: every byte of either side is read about once
  small = verify_migration(s["src"], s["fused"], spec, slab_mb=256 / 2**20)
  total = open_checkpoint(s["src"]).nbytes
  assert small.passed and 2 * total <= small.bytes_read <= 2.5 * total, (small.bytes_read, total)
  shapes = {e.dest: e.dst_shape for e in spec.bind(open_checkpoint(s["src"]).leaves).elements}
  assert shapes == {
      **{f"layers/{i}/attn/qkv/kernel": (FU.D, FU.Q + 2 * FU.KV) for i in range(2)},
      "mlp/gate_up": (2, 12, 8),
  }
  t = s["t"]
  bad = FU.fused(t)
  qkv = "layers/1/attn/qkv/kernel"  # k and v (both 4 columns) swapped in layer 1
  bad[qkv] = np.concatenate([t[f"model.layers.1.self_attn.{p}_proj.weight"].T for p in "qvk"], axis=1)
  bad["mlp/gate_up"] = bad["mlp/gate_up"].copy()  # layer 0's gate and up swapped in the stacked concat
  bad["mlp/gate_up"][0] = np.concatenate(
      [t["model.layers.0.mlp.up_proj.weight"], t["model.layers.0.mlp.gate_proj.weight"]]
  )
  rep = verify_migration(s["src"], FU.write(s["root"] / "swapped", bad), spec)
  failed = _failed(rep)
  assert sorted(failed) == ["layers/1/attn/qkv/kernel", "mlp/gate_up"], rep.text()
  # qkv[0, 8] is the first column of the k part: k_proj.weight[0, 0] (after the transpose)
  r = failed[qkv].reason
  assert f"{qkv}[0, {FU.Q}]" in r and "from model.layers.1.self_attn.k_proj.weight[0, 0]" in r, r
  assert f"{bad[qkv].size - int(np.sum(bad[qkv] == FU.fused(t)[qkv]))} of {bad[qkv].size} elements differ" in r
  # the verdict says how each target joins its members (qkv: 3 parts; gate_up: 2 layers x 2 parts)
  assert failed[qkv].source_path == "model.layers.1.self_attn.q_proj.weight (+2 concatenated)"
  assert failed["mlp/gate_up"].source_path.endswith("(+3 stacked and concatenated)"), failed["mlp/gate_up"]
  r = failed["mlp/gate_up"].reason
  assert "mlp/gate_up[0, 0, 0]" in r and "from model.layers.0.mlp.gate_proj.weight[0, 0]" in r, r


def test_split_of_hf_fused_projections_passes_and_a_wrong_offset_fails(fused_sides):
  s = fused_sides
  spec = RemapSpec.from_rules(FU.SPLIT_RULES)
  rep = verify_migration(s["hf_fused"], s["src"], spec)
  assert rep.passed and len(rep.leaves) == len(s["t"]), rep.text()
  t = dict(s["t"])
  fused = FU.hf_fused(s["t"])["model.layers.0.self_attn.qkv_proj.weight"]
  q = "model.layers.0.self_attn.q_proj.weight"
  t[q] = np.split(fused, [1, 1 + FU.Q])[1]  # q read one row too late
  rep = verify_migration(s["hf_fused"], FU.write(s["root"] / "offset", t), spec)
  (f,) = _failed(rep).values()
  assert f.migrated_path == q and f"{q}[0, 0]" in f.reason, rep.text()
  assert "from model.layers.0.self_attn.qkv_proj.weight[0, 0]" in f.reason
  # the k piece starts at row Q of the fused tensor: its element [1, 2] is qkv_proj[Q + 1, 2]
  plan = spec.bind(open_checkpoint(s["hf_fused"]).leaves)
  k = next(e for e in plan.elements if e.dest == "model.layers.0.self_attn.k_proj.weight")
  assert k.source_of((1, 2)) == ("model.layers.0.self_attn.qkv_proj.weight", (FU.Q + 1, 2))


def test_concat_and_split_spec_mistakes_are_listed_together():
  def meta(*shape):
    return type("M", (), {"shape": shape, "kind": "array", "dtype": np.dtype(np.float32)})()

  with pytest.raises(SpecError) as e:
    RemapSpec.from_rules(
        [
            {"match": "a", "to": "b.{p}", "split": {"axis": 0, "name": "p"}},  # neither sizes nor sections
            {"match": "c", "to": "d.{p}", "split": {"axis": 0, "sizes": [1, 2], "name": "p", "names": ["x"]}},
            {"match": "e", "to": "f", "concat": {"axis": 0}},  # no index
            {
                "match": "g",
                "to": "h{q}",
                "concat": {"axis": 0, "index": "0"},
                "split": {"axis": 0, "sections": 2, "name": "q"},
            },
            {"match": "i", "to": "j", "split": {"axis": 0, "sections": 2, "name": "q"}},  # no {q} in 'to'
            {"match": r"y(\d)", "to": "yy", "concat": {"axis": 0, "index": r"\2"}},  # the pattern has one group
            {"match": "k", "to": "l", "transpose": [1, 0], "ops": [{"transpose": [1, 0]}]},
        ]
    )
  p = e.value.problems
  assert len(p) == 7, p
  assert "rule #7: give 'transpose' or 'ops', not both (put the transpose in 'ops')" in p[6], p[6]
  assert p[5].startswith("rule #6: stack or concat index") and "invalid group reference 2" in p[5], p[5]
  assert "exactly one" in p[0] and "2 pieces but 1 names" in p[1] and "'concat' must be" in p[2]
  assert "rule #4: give 'concat' (many leaves into one) or 'split' (one into many), not both" in p[3]
  assert "rule #5: split name 'q' does not appear as {q} in 'to'" in p[4]
  spec = RemapSpec.from_rules(
      [
          {"match": r"(q|k|v)", "to": "qkv", "concat": {"axis": 0, "index": r"\1", "order": ["q", "k", "v", "o"]}},
          {"match": r"g(\d)", "to": "gu", "ops": [{"transpose": [1, 0]}], "concat": {"axis": 1, "index": r"\1"}},
          {"match": r"x(\d)", "to": "xx", "concat": {"axis": 0, "index": "0"}},
          {"match": "fused", "to": "p.{i}", "split": {"axis": 1, "sizes": [4, 3], "name": "i"}},
          {"match": r"z(\w)", "to": "zz", "concat": {"axis": 0, "index": r"\1"}},  # 'a': no order, not an integer
          {"match": r"w(\w)", "to": "ww", "concat": {"axis": 0, "index": r"\1", "order": ["x"]}},  # 'y' not in order
          {"match": "s", "to": "s.{i}", "split": {"axis": 2, "sections": 2, "name": "i"}},  # axis 2 of a 2-D leaf
          {"match": "o", "to": "oo", "ops": [{"transpose": [1, 0, 2]}]},  # three axes for a 2-D leaf
      ]
  )
  leaves = {"q": meta(8, 4), "k": meta(4, 4), "v": meta(4, 4)}  # no "o": a missing member
  leaves |= {"g0": meta(6, 4), "g1": meta(6, 5)}  # transposed: [4, 6] and [5, 6] differ off the concat axis
  leaves |= {"x0": meta(2), "x1": meta(2), "fused": meta(3, 8)}  # x: overlapping members; 4 + 3 != 8
  leaves |= {"za": meta(2), "wy": meta(2), "s": meta(4, 4), "o": meta(2, 3)}
  with pytest.raises(SpecError) as e:
    spec.bind(leaves)
  p = e.value.problems
  assert len(p) == 8, p
  assert any("split axis 2 is out of range for shape [4, 4]" in x for x in p), p
  assert any("does not fit source leaf 'o'" in x and "transpose [1, 0, 2]" in x for x in p), p
  assert any(x.endswith("concat 'qkv' is missing member(s) at [3] of a [4] grid") for x in p), p
  assert any("concat index of 'za' 'a' is not an integer (give 'order' to name the parts)" in x for x in p), p
  assert any("concat index of 'wy' 'y' is not one of the concat order ['x']" in x for x in p), p
  assert any("concat 'qkv' is missing member(s) at [3]" in x for x in p), p
  assert any("parts of 'gu' differ on an axis other than concat axis 1" in x and "[5, 6]" in x for x in p), p
  assert any("overlapping concat members" in x and "'x0'" in x and "'x1'" in x for x in p), p
  assert any("split sizes [4, 3] sum to 7, axis 1 of [3, 8] has 8" in x for x in p), p


def _assert_fused(path, t):
  """The checkpoint at ``path`` holds exactly numpy's fused leaves of the source tree ``t``, bit for bit."""
  ck = open_checkpoint(path)
  got = restore_leaves(ck, sorted(ck.leaves))
  want = FU.fused(t)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    g = np.asarray(got[k])
    assert (g.dtype, g.shape, g.tobytes()) == (v.dtype, v.shape, v.tobytes()), k


def test_migrator_concatenates_and_splits_and_the_results_verify(fused_sides, tmp_path):
  s = fused_sides
  spec = RemapSpec.from_rules(FU.CONCAT_RULES)
  migrate(s["src"], tmp_path / "fused", spec, chunk_mb=0.0001)  # chunks of a few rows: many slabs
  _assert_fused(tmp_path / "fused", s["t"])
  assert verify_migration(s["src"], tmp_path / "fused", spec).passed
  back = RemapSpec.from_rules(FU.SPLIT_RULES)
  migrate(s["hf_fused"], tmp_path / "split", back, dest_format="safetensors")
  ck = open_checkpoint(tmp_path / "split")
  for k, v in s["t"].items():
    g = ck.read_whole(ck.leaves[k])
    assert g.dtype == v.dtype and g.tobytes() == v.tobytes(), k
  assert verify_migration(s["hf_fused"], tmp_path / "split", back).passed


def test_a_stack_of_concats_named_by_order_has_the_stack_and_the_parts_it_names():
  meta = type("M", (), {"shape": (2, 4), "kind": "array", "dtype": np.dtype(np.float32)})()
  spec = RemapSpec.from_rules(
      [
          {
              "match": r"l(\d)\.(q|k)",
              "to": "qk",
              "stack": [{"axis": 0, "index": r"\1"}],
              "concat": {"axis": 1, "index": r"\2", "order": ["q", "k"]},
          }
      ]
  )
  (e,) = spec.bind({f"l{i}.{p}": meta for i in range(3) for p in "qk"}).elements
  assert e.dst_shape == (3, 4, 4)  # 3 layers stacked; q then k, 2 rows each, along axis 1
  assert [e.source_of((i, r, 0)) for i, r in ((0, 0), (0, 2), (2, 3))] == [
      ("l0.q", (0, 0)),
      ("l0.k", (0, 0)),
      ("l2.k", (1, 0)),
  ]


def test_overlapping_stack_members_are_the_one_problem_of_their_target():
  """Members at 0, 0 and 2: the overlap is reported, and the target goes no further (no "missing [1]" on top)."""
  meta = type("M", (), {"shape": (2,), "kind": "array", "dtype": np.dtype(np.float32)})()
  spec = RemapSpec.from_rules([{"match": r"l(\d)(\w)", "to": "st", "stack": [{"axis": 0, "index": r"\1"}]}])
  with pytest.raises(SpecError) as e:
    spec.bind({"l0a": meta, "l0b": meta, "l2a": meta})
  (p,) = e.value.problems
  assert "overlapping stacks: source leaves 'l0a' and 'l0b' both go to 'st' at [0]" in p, p


_SP = {"axis": 0, "sections": 2, "name": "i"}


@pytest.mark.parametrize(
    "extra, problem",
    [
        ({"ops": {"transpose": [1, 0]}}, "'ops' must be a list of {'transpose': [...]} / {'reshape': [...]}"),
        (
            {"ops": [{"pad": [[1, 0], [2]]}]},
            "ops[0] pad must be a list of [a, b] pairs of integers >= 0, got [[1, 0], [2]]",
        ),
        (
            {"ops": [{"slice": [[0, -1]]}]},
            "ops[0] slice must be a list of [a, b] pairs of integers >= 0, got [[0, -1]]",
        ),
        ({"ops": [{"reshape": [2, True]}]}, "ops[0] reshape must be a list of integers, got [2, True]"),
        ({"ops": [{"reshape": [2, -2]}]}, "ops[0] reshape [2, -2] may hold sizes >= 0 and at most one -1"),
        ({"ops": [{"transpose": [0, 2]}]}, "ops[0] transpose [0, 2] is not a permutation of 0..1"),
        ({"stack": [{"axis": 1, "index": "0"}, {"axis": 1, "index": "1"}]}, "two stack levels use the same axis"),
        (
            {"concat": {"axis": 0, "index": "0", "order": ["a", "a"]}},
            "concat 'order' must be a non-empty list of distinct strings, got ['a', 'a']",
        ),
        (
            {"concat": {"axis": 0, "index": "0", "order": []}},
            "concat 'order' must be a non-empty list of distinct strings, got []",
        ),
        (
            {"split": {**_SP, "sections": None, "sizes": [2, 0]}},
            "split 'sizes' must be a non-empty list of integers > 0, got [2, 0]",
        ),
        ({"split": {**_SP, "sections": 0}}, "split 'sections' must be an integer > 0, got 0"),
        ({"split": {**_SP, "sections": True}}, "split 'sections' must be an integer > 0, got True"),
        (
            {"split": {**_SP, "names": ["a", "a"]}},
            "split 'names' must be a list of distinct non-empty strings, got ['a', 'a']",
        ),
        (
            {"split": {**_SP, "names": ["a", ""]}},
            "split 'names' must be a list of distinct non-empty strings, got ['a', '']",
        ),
        (
            {"split": _SP, "stack": [{"axis": 0, "index": "0"}]},
            "'split' does not combine with 'stack' or 'unstack' in one rule",
        ),
        (
            {"ops": [{"flip": [1]}]},
            "ops[0] must be {'transpose': [perm]}, {'reshape': [shape]}, {'pad': [[before, after], ...]} or {'slice': [[start, stop], ...]}, got {'flip': [1]}",
        ),
        (
            {"ops": [{"transpose": [0]}, 5]},
            "ops[1] must be {'transpose': [perm]}, {'reshape': [shape]}, {'pad': [[before, after], ...]} or {'slice': [[start, stop], ...]}, got 5",
        ),
        (
            {"ops": [{"transpose": [0], "reshape": [1]}]},
            "ops[0] must be {'transpose': [perm]}, {'reshape': [shape]}, {'pad': [[before, after], ...]} or {'slice': [[start, stop], ...]}, got {'transpose': [0], 'reshape': [1]}",
        ),
        (
            {"concat": {"axis": -1, "index": "0"}},
            "'concat' must be {'axis': int >= 0, 'index': template[, 'order': [names]]}, got {'axis': -1, 'index': '0'}",
        ),
        (
            {"concat": {"axis": True, "index": "0"}},
            "'concat' must be {'axis': int >= 0, 'index': template[, 'order': [names]]}, got {'axis': True, 'index': '0'}",
        ),
        (
            {"concat": {"axis": 0, "index": 0}},
            "'concat' must be {'axis': int >= 0, 'index': template[, 'order': [names]]}, got {'axis': 0, 'index': 0}",
        ),
        (
            {"concat": {"axis": 0}},
            "'concat' must be {'axis': int >= 0, 'index': template[, 'order': [names]]}, got {'axis': 0}",
        ),
        (
            {"concat": {"axis": 0, "index": "0", "at": 1}},
            "'concat' must be {'axis': int >= 0, 'index': template[, 'order': [names]]}, got {'axis': 0, 'index': '0', 'at': 1}",
        ),
        ({"split": {"axis": 0, "name": "i"}}, "split takes 'sizes' or 'sections', exactly one"),
        (
            {"split": "x"},
            "'split' must be {'axis': int >= 0, 'sizes': [int, ...] or 'sections': int, 'name': str[, 'names': [str, ...]]}, got 'x'",
        ),
        (
            {"split": {**_SP, "at": 1}},
            "'split' must be {'axis': int >= 0, 'sizes': [int, ...] or 'sections': int, 'name': str[, 'names': [str, ...]]}, got {'axis': 0, 'sections': 2, 'name': 'i', 'at': 1}",
        ),
        (
            {"split": {"sections": 2, "name": "i"}},
            "'split' must be {'axis': int >= 0, 'sizes': [int, ...] or 'sections': int, 'name': str[, 'names': [str, ...]]}, got {'sections': 2, 'name': 'i'}",
        ),
        (
            {"split": {**_SP, "axis": -1}},
            "'split' must be {'axis': int >= 0, 'sizes': [int, ...] or 'sections': int, 'name': str[, 'names': [str, ...]]}, got {'axis': -1, 'sections': 2, 'name': 'i'}",
        ),
        (
            {"split": {**_SP, "axis": True}},
            "'split' must be {'axis': int >= 0, 'sizes': [int, ...] or 'sections': int, 'name': str[, 'names': [str, ...]]}, got {'axis': True, 'sections': 2, 'name': 'i'}",
        ),
        (
            {"split": {**_SP, "name": 1}},
            "'split' must be {'axis': int >= 0, 'sizes': [int, ...] or 'sections': int, 'name': str[, 'names': [str, ...]]}, got {'axis': 0, 'sections': 2, 'name': 1}",
        ),
    ],
)
def test_a_malformed_element_key_is_exactly_one_problem(extra, problem):
  with pytest.raises(SpecError) as e:
    RemapSpec.from_rules([{"match": "^a$", "to": "b{i}", **extra}])
  assert e.value.problems == [f"rule #1: {problem}"]


def test_well_formed_element_keys_parse_to_their_values():
  (r,) = RemapSpec.from_rules(
      [
          {
              "match": "^a$",
              "to": "b{i}",
              "split": {**_SP, "names": ["x", "y"]},
              "ops": [{"pad": [[0, 1]]}],
              "cast": "bfloat16",
          }
      ]
  ).rules
  assert (r.split, r.cast, [o.to_dict() for o in r.ops]) == (
      (0, None, 2, "i", ("x", "y")),
      "bfloat16",
      [{"pad": [[0, 1]]}],
  )
  (c,) = RemapSpec.from_rules(
      [{"match": "^a(.)$", "to": "b", "concat": {"axis": 1, "index": r"\1", "order": ["q", "k"]}}]
  ).rules
  (s,) = RemapSpec.from_rules(
      [{"match": "^a$", "to": "b{i}", "split": {**_SP, "sections": None, "sizes": [3, 1]}}]
  ).rules
  assert (c.concat, s.split) == ((1, r"\1", ("q", "k")), (0, (3, 1), None, "i", ("0", "1")))
  (c0,) = RemapSpec.from_rules([{"match": "^a(.)$", "to": "b", "concat": {"axis": 0, "index": r"\1"}}]).rules
  (s1,) = RemapSpec.from_rules([{"match": "^a$", "to": "b{i}", "split": {**_SP, "sections": 1}}]).rules
  assert (c0.concat, s1.split) == ((0, r"\1", ()), (0, None, 1, "i", ("0",)))  # axis 0, one section: allowed
  (one,) = RemapSpec.from_rules([{"match": "^a(.)$", "to": "b", "stack": {"axis": 0, "index": r"\1"}}]).rules
  assert one.stack == ((0, r"\1"),)  # one level may be given as an object, not a list
  with pytest.raises(SpecError) as e:
    RemapSpec.from_rules([{"match": "^a$", "to": "b", "cast": "int4"}])
  ((problem,),) = [e.value.problems]
  assert problem.startswith("rule #1: 'cast' 'int4' is not one of ") and "bfloat16" in problem, problem


def _meta(*shape, dtype=np.float32, kind="array"):
  return type("M", (), {"shape": shape, "kind": kind, "dtype": np.dtype(dtype)})()


def test_every_element_target_mistake_is_its_own_problem():
  """One rule per mistake a target of element rules can have; each is reported once, naming its rule and leaves,
  and a target with a problem is checked no further (its later mistakes, here a stack axis out of range, wait)."""
  st, st5 = [{"axis": 0, "index": r"\1"}], [{"axis": 5, "index": r"\1"}]
  spec = RemapSpec.from_rules(
      [
          {"match": r"a(\d)", "to": "A", "stack": st},
          {"match": r"b(\d)", "to": "A", "stack": [{"axis": 1, "index": r"\1"}]},  # A again, another stack axis
          {"match": r"c(\w)", "to": "C", "stack": st},  # index 'x'
          {"match": r"d(-?\d)", "to": "D", "stack": st5},  # index -1 (and an axis out of range: not reached)
          {"match": r"e(\d)", "to": "E", "stack": st5},  # [2] and [3]
          {"match": r"f(\d)", "to": "F", "stack": st},  # float32 and float16
          {"match": r"g(\d)", "to": "G", "stack": [{"axis": 3, "index": r"\1"}]},
          {"match": r"h(\d)", "to": "H", "concat": {"axis": 2, "index": r"\1"}},
          {"match": r"i(\d)", "to": "I", "stack": st, "concat": {"axis": 0, "index": "0"}},
          {"match": r"j(\d)", "to": "J", "stack": st, "cast": "bfloat16"},  # an int32 member
          {"match": r"s(\d)", "to": "S", "stack": st5},  # a string member
          {"match": r"t(\d)", "to": "T", "transpose": [1, 0]},  # two leaves, neither stacked nor concatenated
          {"match": "pad", "to": "P1", "ops": [{"pad": [[0, 1]]}]},  # one pair for two axes
          {"match": "r1", "to": "R1", "ops": [{"reshape": [-1, 4]}]},  # 6 elements
          {"match": "r2", "to": "R2", "ops": [{"reshape": [0, -1]}]},
          {"match": "r3", "to": "R3", "ops": [{"reshape": [3, 3]}]},
          {"match": "r4", "to": "R4", "ops": [{"reshape": [3, 2]}]},  # 6 elements, but not value-preserving
          {"match": "sp", "to": "sp.{i}", "split": {"axis": 0, "sections": 3, "name": "i"}},  # 4 rows
          {"match": "jj", "to": "J"},  # also to J: not named, J already has its problem
      ]
  )
  leaves = {"a0": _meta(2), "b0": _meta(2), "cx": _meta(2), "d0": _meta(2), "d-1": _meta(2)}
  leaves |= {"e0": _meta(2), "e1": _meta(3), "f0": _meta(2), "f1": _meta(2, dtype=np.float16)}
  leaves |= {"g0": _meta(2), "h0": _meta(2), "i0": _meta(2), "j0": _meta(2, dtype=np.int32), "s0": _meta(kind="string")}
  leaves |= {"t0": _meta(2, 3), "t1": _meta(2, 3), "pad": _meta(2, 3), "sp": _meta(4, 2), "jj": _meta(2)}
  leaves |= {f"r{i}": _meta(2, 3) for i in range(1, 5)}
  with pytest.raises(SpecError) as e:
    spec.bind(leaves)
  fit = "does not fit source leaf {!r} of shape [2, 3]: "
  want = [
      "rules #1, #2 map to 'A' with different transforms (ops, stack or concat axes, or cast)",
      r"rule #3 ('c(\\w)'): stack index of 'cx' is not an integer (invalid literal for int() with base 10: 'x')",
      r"rule #4 ('d(-?\\d)'): negative stack or concat index for 'D'",
      r"rule #5 ('e(\\d)'): the members of 'E' differ in shape or dtype (['[2]', '[3]'], ['float32'])",
      r"rule #6 ('f(\\d)'): the members of 'F' differ in shape or dtype (['[2]'], ['float16', 'float32'])",
      r"rule #7 ('g(\\d)'): stack axis 3 is out of range for a target of rank 2",
      r"rule #8 ('h(\\d)'): concat axis 2 of 'H' is out of range for a target of rank 1",
      r"rule #9 ('i(\\d)'): concat axis 0 of 'I' is a stack axis",
      r"rule #10 ('j(\\d)'): 'J': cast int32 -> bfloat16: only casts between float64, float32, float16, bfloat16,"
      " float8_e4m3fn, float8_e5m2 are checked",
      r"rule #11 ('s(\\d)'): string leaves cannot be transposed, stacked or cast ('S')",
      "source leaves 't0', 't1' all map to 'T'",
      "rule #13 ('pad') " + fit.format("pad") + "pad [[0, 1]] has 1 axes, the shape [2, 3] has 2",
      "rule #14 ('r1') " + fit.format("r1") + "reshape [-1, 4]: cannot infer -1 for 6 elements",
      "rule #15 ('r2') " + fit.format("r2") + "reshape [0, -1]: cannot infer -1 for 6 elements",
      "rule #16 ('r3') " + fit.format("r3") + "reshape [3, 3]: 6 elements of [2, 3] cannot become [3, 3]",
      "rule #17 ('r4') " + fit.format("r4") + "reshape [2, 3] -> [3, 2] is not value-preserving (only splits or"
      " merges of adjacent axes)",
      "rule #18 ('sp') does not fit source leaf 'sp': split into 3 sections: axis 0 of [4, 2] has 4 elements, not a"
      " multiple",
  ]
  got = e.value.problems
  assert sorted(got) == sorted(want), got


def test_a_reshape_infers_its_minus_one_from_the_member_shape():
  spec = RemapSpec.from_rules(
      [{"match": r"l(\d)", "to": "st", "stack": [{"axis": 1, "index": r"\1"}], "ops": [{"reshape": [-1, 2]}]}]
  )
  (e,) = spec.bind({f"l{i}": _meta(2, 3, 2) for i in range(4)}).elements
  assert e.dst_shape == (6, 4, 2)  # each [2, 3, 2] member becomes [6, 2]; 4 members stacked along axis 1


def test_element_targets_written_in_tiny_slabs_with_a_tiny_read_ahead_are_the_same_bytes(
    fused_sides, tmp_path, monkeypatch
):
  """The migrator's element slab and read-ahead sizes bound memory only: 1 KiB each (a few rows) gives the same
  fused leaves as numpy's concatenation."""
  from parity_jax.checkpoint.migrate import schedule

  monkeypatch.setattr(schedule, "ELEMENT_SLAB_BYTES", 1024)
  monkeypatch.setattr(schedule, "ELEMENT_CACHE_BYTES", 1024)
  migrate(fused_sides["src"], tmp_path / "fused", RemapSpec.from_rules(FU.CONCAT_RULES))
  _assert_fused(tmp_path / "fused", fused_sides["t"])
