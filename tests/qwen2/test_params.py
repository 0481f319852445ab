"""The safetensors loader: single file and sharded, tied embeddings, dtypes, missing/unknown keys, shapes."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from parity_jax import qwen2
from parity_jax.arraydiff import bit_equal
from parity_jax.errors import UsageError
from tests.helpers.qwen import MODELS, config_dict, random_tensors, write_checkpoint


def _leaves_equal(a, b):
  import jax

  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      bit_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
  )


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_roundtrip_single_and_sharded(tmp_path, model_type):
  cfg_dict = config_dict(model_type)
  tensors = random_tensors(cfg_dict, seed=1)
  single = qwen2.load(write_checkpoint(tmp_path / "single", cfg_dict, tensors))
  sharded = qwen2.load(write_checkpoint(tmp_path / "sharded", cfg_dict, tensors, shards=3))
  assert _leaves_equal(single.params, sharded.params)
  # read shard by shard onto a mesh (each box by byte range): the same values, placed on the mesh
  mesh = qwen2.make_mesh("dp:1")
  on_mesh = qwen2.load(tmp_path / "sharded", mesh=mesh)
  assert _leaves_equal(single.params, on_mesh.params)
  assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(on_mesh.params))
  bf16 = qwen2.load(tmp_path / "sharded", mesh=mesh, dtype=jnp.bfloat16)
  assert _leaves_equal(bf16.params, qwen2.load(tmp_path / "single", dtype=jnp.bfloat16).params)
  back = qwen2.to_hf_tensors(single.params, single.config)
  assert sorted(back) == sorted(tensors) and all(bit_equal(back[k], tensors[k]) for k in tensors)
  p = single.params.layers[1].attn
  hd = 8 if model_type == "qwen2" else 16  # qwen3 config: explicit head_dim 16 != 32 // 4
  assert p.wq.shape == (4, hd, 32) and p.wk.shape == (2, hd, 32) and p.wo.shape == (32, 4, hd)
  if model_type == "qwen2":
    assert p.bq.shape == (4, 8) and p.bk.shape == (2, 8) and p.q_norm is None and p.bo is None
  else:
    assert p.bq is None and p.bo is None and p.q_norm.shape == (16,) and p.k_norm.shape == (16,)


def test_golden_sharded_bf16_checkpoint_upcasts_exactly():
  """qwen2_tied: 5 bf16 shards, tied embeddings, no lm_head.weight on disk (like Qwen2.5-0.5B)."""
  index = json.loads((MODELS / "qwen2_tied" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) >= 3 and "lm_head.weight" not in index["weight_map"]
  m32 = qwen2.load(MODELS / "qwen2_tied", dtype=jnp.float32)
  m16 = qwen2.load(MODELS / "qwen2_tied", dtype=jnp.bfloat16)
  assert m32.params.lm_head is None and m32.config.tie_word_embeddings
  stored = {}
  for fname in set(index["weight_map"].values()):
    with safetensors.safe_open(str(MODELS / "qwen2_tied" / fname), framework="numpy") as f:
      stored.update({k: f.get_tensor(k) for k in f.keys()})
  h32 = qwen2.to_hf_tensors(m32.params, m32.config)
  h16 = qwen2.to_hf_tensors(m16.params, m16.config)
  for name, value in stored.items():
    assert value.dtype == ml_dtypes.bfloat16
    assert bit_equal(h16[name], value), name  # bf16 as stored
    assert bit_equal(h32[name], value.astype(np.float32)), name  # exact upcast
    assert bit_equal(h32[name].astype(ml_dtypes.bfloat16), value), name  # ... and nothing was rounded


def test_tied_embeddings_use_embed_as_lm_head(tmp_path):
  tied_cfg = config_dict(tie_word_embeddings=True)
  tensors = random_tensors(tied_cfg, seed=2)
  assert "lm_head.weight" not in tensors
  tied = qwen2.load(write_checkpoint(tmp_path / "tied", tied_cfg, tensors))
  assert tied.params.lm_head is None
  untied_cfg = config_dict(tie_word_embeddings=False)
  untied = qwen2.load(
      write_checkpoint(
          tmp_path / "untied",
          untied_cfg,
          dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].copy()}),
      )
  )
  tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
  assert bit_equal(np.asarray(qwen2.forward(tied, tokens)), np.asarray(qwen2.forward(untied, tokens)))
  # A tied config with a bit-identical lm_head.weight on disk loads; a different one is refused.
  same = write_checkpoint(
      tmp_path / "tied_same", tied_cfg, dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].copy()})
  )
  assert qwen2.load(same).params.lm_head is None
  mesh = qwen2.make_mesh("dp:1")
  assert _leaves_equal(qwen2.load(same, mesh=mesh).params, tied.params)  # compared box by box on a mesh
  other = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"] + 1})
  with pytest.raises(UsageError, match="ties word embeddings but lm_head.weight differs"):
    qwen2.load(write_checkpoint(tmp_path / "tied_diff", tied_cfg, other))
  with pytest.raises(UsageError, match="ties word embeddings but lm_head.weight differs"):
    qwen2.load(tmp_path / "tied_diff", mesh=mesh)
  one_row = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].copy()})
  one_row["lm_head.weight"][-1, -1] += 1  # the last row only: every piece is compared
  with pytest.raises(UsageError, match="ties word embeddings but lm_head.weight differs"):
    qwen2.load(write_checkpoint(tmp_path / "tied_row", tied_cfg, one_row), mesh=mesh)
  ints = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].astype(np.int32)})
  with pytest.raises(UsageError, match="lm_head.weight: stored dtype int32 is not a float dtype this loader reads"):
    qwen2.load(write_checkpoint(tmp_path / "tied_ints", tied_cfg, ints))
  emb = tensors["model.embed_tokens.weight"]
  longer = dict(tensors, **{"lm_head.weight": np.concatenate([emb, emb[:1]])})  # equal over every embedding row
  for kwargs in ({}, {"mesh": mesh}):
    with pytest.raises(UsageError, match="ties word embeddings but lm_head.weight differs"):
      qwen2.load(write_checkpoint(tmp_path / f"tied_long{len(kwargs)}", tied_cfg, longer), **kwargs)


def test_missing_unknown_and_misshapen_tensors(tmp_path):
  cfg_dict = config_dict()
  tensors = random_tensors(cfg_dict, seed=3)
  missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.bias"}
  with pytest.raises(UsageError, match=r"1 missing tensors: model.layers.1.self_attn.k_proj.bias"):
    qwen2.load(write_checkpoint(tmp_path / "missing", cfg_dict, missing))
  # six missing: five named, then the count of the rest; seven: two more
  for n in (6, 7):
    gone = [f"model.layers.0.{m}.weight" for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")][: n - 4]
    gone += [
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    gone += ["model.layers.1.post_attention_layernorm.weight"]
    kept = {k: v for k, v in tensors.items() if k not in gone}
    with pytest.raises(UsageError, match=rf"{n} missing tensors: [^(]*\(\+{n - 5} more\)$"):
      qwen2.load(write_checkpoint(tmp_path / f"missing{n}", cfg_dict, kept))
  five = {
      k: v for k, v in tensors.items() if not k.startswith("model.layers.1.mlp.") and "layers.1.post_attention" not in k
  }
  five.pop("model.layers.0.mlp.up_proj.weight")
  with pytest.raises(UsageError, match=r"5 missing tensors: [^(]*$"):
    qwen2.load(write_checkpoint(tmp_path / "missing5", cfg_dict, five))
  no_head = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
  with pytest.raises(UsageError, match="missing tensors: lm_head.weight"):
    qwen2.load(write_checkpoint(tmp_path / "nohead", cfg_dict, no_head))
  extra = dict(
      tensors,
      **{
          "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
          "model.layers.5.mlp.gate_proj.weight": np.ones((48, 32), np.float32),
      },
  )
  path = write_checkpoint(tmp_path / "extra", cfg_dict, extra)
  with pytest.raises(
      UsageError, match="2 unknown tensors: model.layers.0.self_attn.rotary_emb.inv_freq, model.layers.5"
  ):
    qwen2.load(path)
  with pytest.warns(UserWarning, match="2 unknown tensors"):
    model = qwen2.load(path, strict=False)
  cfg = qwen2.parse_config(cfg_dict)
  with pytest.warns(UserWarning):
    _, report = qwen2.load_params(path, cfg, strict=False)
  assert report.unknown_keys == ("model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.5.mlp.gate_proj.weight")
  assert model.params.layers[0].mlp.w_gate.shape == (48, 32)
  bad = dict(tensors, **{"model.layers.0.self_attn.q_proj.weight": np.ones((32, 33), np.float32)})
  with pytest.raises(
      UsageError,
      match=r"model.layers.0.self_attn.q_proj.weight: shape \[32, 33\] does not match the config's \[32, 32\]",
  ):
    qwen2.load(write_checkpoint(tmp_path / "shape", cfg_dict, bad))
  # Qwen3 without biases: a q_proj.bias on disk is an unknown key, not silently used or dropped.
  q3 = config_dict("qwen3")
  t3 = dict(random_tensors(q3, seed=4), **{"model.layers.0.self_attn.q_proj.bias": np.ones(64, np.float32)})
  with pytest.raises(UsageError, match="unknown tensors: model.layers.0.self_attn.q_proj.bias"):
    qwen2.load(write_checkpoint(tmp_path / "q3bias", q3, t3))


def test_checkpoint_layout_errors(tmp_path):
  cfg_dict = config_dict()
  tensors = random_tensors(cfg_dict, seed=5)
  with pytest.raises(UsageError, match="no such checkpoint directory"):
    qwen2.load(tmp_path / "nope")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps(cfg_dict))
  with pytest.raises(UsageError, match="no model.safetensors"):
    qwen2.load(empty)
  sharded = write_checkpoint(tmp_path / "sharded", cfg_dict, tensors, shards=3)
  broken = tmp_path / "broken"
  shutil.copytree(sharded, broken)
  (broken / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(UsageError, match="shard model-00002-of-00003.safetensors is missing"):
    qwen2.load(broken)
  lying = tmp_path / "lying"
  shutil.copytree(sharded, lying)
  index = json.loads((lying / "model.safetensors.index.json").read_text())
  index["weight_map"]["model.norm.weight"] = (
      "model-00001-of-00003.safetensors"
      if index["weight_map"]["model.norm.weight"] != "model-00001-of-00003.safetensors"
      else "model-00002-of-00003.safetensors"
  )
  (lying / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(UsageError, match="model.norm.weight, which the index maps to"):
    qwen2.load(lying)
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "config.json").write_text(json.dumps(cfg_dict))
  (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
  with pytest.raises(UsageError, match="cannot read .* as safetensors"):
    qwen2.load(corrupt)
  ints = dict(tensors, **{"model.norm.weight": np.ones(32, np.int32)})
  with pytest.raises(UsageError, match="stored dtype int32"):
    qwen2.load(write_checkpoint(tmp_path / "ints", cfg_dict, ints))
  with pytest.raises(UsageError, match="dtype must be float32 or bfloat16"):
    qwen2.load(sharded, dtype=jnp.float16)


def test_bad_indexes_and_stray_files_are_refused(tmp_path):
  """Each way a checkpoint's index or file set can be wrong is one UsageError naming it, before any tensor is read."""
  cfg_dict = config_dict()
  tensors = random_tensors(cfg_dict, seed=5)
  sharded = write_checkpoint(tmp_path / "sharded", cfg_dict, tensors, shards=2)
  good = json.loads((sharded / "model.safetensors.index.json").read_text())
  first = sorted(set(good["weight_map"].values()))[0]
  with pytest.raises(UsageError, match="expected a checkpoint directory, got a file"):
    qwen2.load(sharded / "config.json")

  def index_case(name, text):
    d = tmp_path / name
    shutil.copytree(sharded, d)
    (d / "model.safetensors.index.json").write_text(text)
    return d

  for i, (text, words) in enumerate(
      [
          ("{not json", r"not a valid safetensors index \(JSONDecodeError"),
          (json.dumps({"metadata": {}}), r"not a valid safetensors index \(KeyError"),
          (json.dumps({"weight_map": {}}), "weight_map is empty or not an object"),
          (json.dumps({"weight_map": ["a"]}), "weight_map is empty or not an object"),
          (json.dumps({"weight_map": {"model.norm.weight": "../x.safetensors"}}), "shard name '../x.safetensors' must"),
          (
              json.dumps({"weight_map": {**good["weight_map"], "extra.weight": first}}),
              r"index lists 1 tensors its shards do not hold, e.g. \['extra.weight'\]",
          ),
      ]
  ):
    with pytest.raises(UsageError, match=words):
      qwen2.load(index_case(f"index{i}", text))
  stray = tmp_path / "stray"
  stray.mkdir()
  (stray / "config.json").write_text(json.dumps(cfg_dict))
  safetensors.numpy.save_file(tensors, str(stray / "weights.safetensors"))
  with pytest.raises(UsageError, match=r"has \['weights.safetensors'\] but neither model.safetensors nor"):
    qwen2.load(stray)
  twice = tmp_path / "twice"  # one tensor in two shards: refused whatever the index says
  twice.mkdir()
  (twice / "config.json").write_text(json.dumps(cfg_dict))
  other = "model.embed_tokens.weight"
  safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != other}, str(twice / "a.safetensors"))
  safetensors.numpy.save_file({k: tensors[k] for k in ("model.norm.weight", other)}, str(twice / "b.safetensors"))
  weight_map = {k: "b.safetensors" if k == other else "a.safetensors" for k in tensors}
  (twice / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(UsageError, match="model.norm.weight appears in both a.safetensors and b.safetensors"):
    qwen2.load(twice)


def test_bfloat16_load_rounds_float32_to_nearest_even(tmp_path):
  cfg_dict = config_dict()
  tensors = random_tensors(cfg_dict, seed=6)
  model = qwen2.load(write_checkpoint(tmp_path / "m", cfg_dict, tensors), dtype=jnp.bfloat16)
  back = qwen2.to_hf_tensors(model.params, model.config)
  for name, value in tensors.items():
    assert bit_equal(back[name], value.astype(ml_dtypes.bfloat16)), name


def test_random_params_on_device_have_the_model_structure_and_the_stated_law():
  """Shapes as init_params; norm weights ones; the rest uniform in [-a, a) with a = scale * sqrt(3) (std = scale)."""
  import jax

  cfg = qwen2.parse_config(config_dict())
  p = qwen2.random_params(cfg, seed=3, scale=0.02)
  ref = qwen2.init_params(cfg)
  assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(ref)
  leaves = jax.tree_util.tree_leaves_with_path(p)
  assert [x.shape for _, x in leaves] == [x.shape for x in jax.tree_util.tree_leaves(ref)]
  norms = [np.asarray(x) for path, x in leaves if "norm" in jax.tree_util.keystr(path)]
  rest = np.concatenate([np.asarray(x).ravel() for path, x in leaves if "norm" not in jax.tree_util.keystr(path)])
  assert norms and all(n.dtype == np.float32 and (n == 1).all() for n in norms)
  a = 0.02 * np.sqrt(3)
  assert rest.dtype == np.float32 and rest.min() >= -a and rest.max() < a
  assert abs(rest.std() - 0.02) < 0.001 and abs(rest.mean()) < 0.001 and len(np.unique(rest)) > 0.99 * rest.size
  # the stated generator, written here in numpy: lowbias32 (Wellons) of the element index salted by seed and leaf
  # (the embedding is leaf 0), its top 24 bits as a uniform in [-0.5, 0.5), times scale * sqrt(12)
  m = 0xFFFFFFFF
  x = np.arange(cfg.vocab_size * cfg.hidden_size, dtype=np.uint64) * 0x9E3779B1 & m
  x = (x + (3 * 0x85EBCA77 + 0 * 0xC2B2AE3D + 0x27D4EB2F)) & m  # seed 3, leaf 0
  x ^= x >> 16
  x = x * 0x7FEB352D & m
  x ^= x >> 15
  x = x * 0x846CA68B & m
  x ^= x >> 16
  u = (x >> 8).astype(np.float32) * np.float32(2.0**-24) - np.float32(0.5)
  want = (u * np.float32(0.02 * np.sqrt(12.0))).reshape(cfg.vocab_size, cfg.hidden_size)
  assert bit_equal(np.asarray(p.embed), want)
  same = jax.tree_util.tree_leaves(qwen2.random_params(cfg, seed=3, scale=0.02))
  assert all(bit_equal(x, y) for (_, x), y in zip(leaves, same))
  firsts = [np.asarray(x).ravel()[:8] for path, x in leaves if "norm" not in jax.tree_util.keystr(path)]
  assert len({f.tobytes() for f in firsts}) == len(firsts)  # each leaf its own draw (salted by its index)
  # on a mesh: the same values, placed with a sharding of that mesh
  mesh = qwen2.make_mesh("dp:1")
  on_mesh = jax.tree_util.tree_leaves(qwen2.random_params(cfg, seed=3, scale=0.02, mesh=mesh))
  assert all(y.sharding.mesh.shape == mesh.shape for y in on_mesh)
  assert all(bit_equal(np.asarray(x), np.asarray(y)) for (_, x), y in zip(leaves, on_mesh))


def test_qwen2_moe_tensor_names_and_shapes_are_hf_s():
  """Every tensor of a tiny Qwen2-MoE, as HF's Qwen2MoeForCausalLM names and shapes it (written out here): the
  router [E, D], each expert's projections, the shared expert and its gate, an nn.Linear(D, 1): [1, D]."""
  d = config_dict(
      "qwen2_moe", num_experts=3, num_experts_per_tok=2, moe_intermediate_size=12, shared_expert_intermediate_size=20
  )
  d.pop("layer_types")
  d["architectures"] = ["Qwen2MoeForCausalLM"]
  cfg = qwen2.parse_config(d)
  want = {"model.embed_tokens.weight": (96, 32), "model.norm.weight": (32,), "lm_head.weight": (96, 32)}
  for i in range(2):
    p = f"model.layers.{i}."
    want.update(
        {
            p + "input_layernorm.weight": (32,),
            p + "post_attention_layernorm.weight": (32,),
            p + "self_attn.q_proj.weight": (32, 32),
            p + "self_attn.q_proj.bias": (32,),
            p + "self_attn.k_proj.weight": (16, 32),
            p + "self_attn.k_proj.bias": (16,),
            p + "self_attn.v_proj.weight": (16, 32),
            p + "self_attn.v_proj.bias": (16,),
            p + "self_attn.o_proj.weight": (32, 32),
            p + "mlp.gate.weight": (3, 32),
            p + "mlp.shared_expert.gate_proj.weight": (20, 32),
            p + "mlp.shared_expert.up_proj.weight": (20, 32),
            p + "mlp.shared_expert.down_proj.weight": (32, 20),
            p + "mlp.shared_expert_gate.weight": (1, 32),
        }
    )
    for e in range(3):
      q = f"{p}mlp.experts.{e}."
      want.update({q + "gate_proj.weight": (12, 32), q + "up_proj.weight": (12, 32), q + "down_proj.weight": (32, 12)})
  got = {k: tuple(v.shape) for k, v in qwen2.to_hf_tensors(qwen2.init_params(cfg), cfg).items()}
  assert got == want
