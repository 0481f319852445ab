#!/usr/bin/env python3
"""Tiny Hugging Face Qwen checkpoints converted by google-tunix's own loader, saved as tunix users save them.

Independent ground truth for parity_jax's ``hf-to-tunix`` / ``tunix-to-hf`` presets (issue 17): the
conversion below is done by *tunix's* code (``tunix.models.<family>.params.create_model_from_safe_tensors``),
never by parity_jax. Run it inside the throwaway venv described in README.md (never parity_jax's venv):

    python make_fixtures.py --out . --force              # (re)write every fixture under ./<name>/
    python make_fixtures.py --check_restore=DIR --fixture=NAME [--conversion=default]

For every fixture ``<out>/<name>/``:

* ``hf/``: a seeded random model written by ``transformers`` ``save_pretrained`` (safetensors; sharded with
  ``model.safetensors.index.json`` when the fixture says so), config.json included.
* ``tunix_<conversion>/``: ``ocp.StandardCheckpointer().save(dir, nnx.state(model).to_pure_dict())`` of the tunix
  model that ``create_model_from_safe_tensors(hf/, config, dtype=...)`` built: the layout tunix users save.
* ``tokens.npy`` (int32 [2, 7]), ``logits_hf.npy`` (float32, transformers + torch, eager attention) and
  ``logits_tunix_<conversion>.npy`` (float32, the tunix model on CPU) for the same tokens.
* ``expected.json``: versions, the HF config, every HF tensor (name, file, dtype, shape, sha256 of its raw bytes
  as stored in the safetensors file), every tunix leaf (key path, dtype, shape, sha256 of the saved bytes, C
  order), the HF key -> tunix key mapping as *tunix's* key map states it (``_get_key_and_transform_mapping``),
  and how far the tunix logits are from HF's.

``--check_restore=DIR`` is for checkpoints made by someone else (parity_jax's migrator) from a fixture's ``hf/``:
it restores DIR into the tunix model with ``ocp.StandardCheckpointer().restore(DIR, abstract_pure_dict)`` and
compares, bit for bit, every leaf (dtype, shape, bytes) and the logits with those of tunix's own loading of the
same ``hf/``. Exit 0 = identical, 1 = a difference (each one is printed), 2 = bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

SEED = 20260517
TOKENS_SHAPE = (2, 7)
HERE = os.path.dirname(os.path.abspath(__file__))

# The tiny shapes of the brief: 2 layers, hidden 64, 4 heads of 16, 2 kv heads, vocab 128.
_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=64,
    # Real Qwen2.5/Qwen3 value. It matters: tunix's Qwen3 attention calls apply_rope without the config's
    # rope_theta, so it always uses its default 1_000_000 (tunix 0.1.7, qwen3/model.py); any other theta would
    # make tunix's logits differ from HF's for reasons unrelated to the conversion.
    rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0),
)

# name -> what to build. `conversions`: name -> the `dtype` argument given to tunix's loader (None: keep the
# checkpoint's dtype, as tunix does when no dtype is given).
FIXTURES = {
    # f32 so that the tunix and HF logits can be compared tightly; untied (lm_head.weight present); one file.
    "qwen3_dense_f32": dict(
        family="qwen3",
        dtype="float32",
        tied=False,
        max_shard_size=None,
        config=dict(intermediate_size=128),
        conversions={"default": None},
    ),
    # bf16 as real Qwen3 releases are; tied like Qwen3-0.6B..4B (no lm_head.weight in the files); sharded.
    # Converted twice: keeping bf16 (tunix's default) and with dtype=float32 (an exact widening cast).
    "qwen3_dense_bf16_tied_sharded": dict(
        family="qwen3",
        dtype="bfloat16",
        tied=True,
        max_shard_size="40KB",
        config=dict(intermediate_size=128),
        conversions={"default": None, "f32": "float32"},
    ),
    # Qwen3-MoE (like Qwen3-30B-A3B: untied, norm_topk_prob): 4 experts, top-2, moe_intermediate 32; f32 so the
    # top-k routing of HF and tunix agree and the logits compare tightly; sharded, so experts of one layer lie
    # in different files.
    "qwen3_moe_f32_sharded": dict(
        family="qwen3_moe",
        dtype="float32",
        tied=False,
        max_shard_size="100KB",
        config=dict(
            intermediate_size=128,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        conversions={"default": None},
    ),
    # Qwen2 (q/k/v biases, no q/k norm), tied like Qwen2.5-0.5B; f32; one file.
    "qwen2_dense_f32_tied": dict(
        family="qwen2",
        dtype="float32",
        tied=True,
        max_shard_size=None,
        config=dict(intermediate_size=96),
        conversions={"default": None},
    ),
}


class BadInput(Exception):
  """Bad input: one line on stderr, exit 2."""


def _versions():
  import importlib.metadata as md

  out = {}
  for pkg in (
      "google-tunix",
      "jax",
      "jaxlib",
      "flax",
      "orbax-checkpoint",
      "tensorstore",
      "transformers",
      "torch",
      "safetensors",
      "numpy",
      "ml_dtypes",
  ):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  out["python"] = ".".join(map(str, sys.version_info[:3]))
  return out


def _sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --------------------------------------------------------------------------- Hugging Face side


def _hf_classes(family):
  import transformers as tf

  return {
      "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
      "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
      "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
  }[family]


def _fill_random(model, rng: np.random.Generator):
  """Every parameter from one seeded numpy generator, in named_parameters() order.

  Norm weights are 1 + 0.1 N(0, 1) (not HF's all-ones init, so a swapped or misplaced norm shows), biases and
  matrices 0.02 N(0, 1) (HF's initializer_range).
  """
  import torch

  with torch.no_grad():
    for name, p in model.named_parameters():
      shape = tuple(p.shape)
      if "norm" in name:
        v = 1.0 + 0.1 * rng.standard_normal(shape)
      else:
        v = 0.02 * rng.standard_normal(shape)
      p.copy_(torch.from_numpy(v.astype(np.float32)))


def build_hf(spec, hf_dir: str, seed: int):
  """Writes the seeded random HF model to hf_dir with save_pretrained; returns the config dict."""
  import torch

  config_cls, model_cls = _hf_classes(spec["family"])
  kwargs = dict(_COMMON)
  kwargs.update(spec["config"])
  kwargs["tie_word_embeddings"] = spec["tied"]
  if spec["family"] == "qwen2":
    kwargs.pop("head_dim")  # Qwen2 derives head_dim = hidden_size / heads (64 / 4 = 16)
  config = config_cls(**kwargs)
  torch.manual_seed(seed)
  model = model_cls(config)
  _fill_random(model, np.random.default_rng(seed))
  if spec["dtype"] == "bfloat16":
    model = model.to(torch.bfloat16)  # torch's f32 -> bf16 cast (round to nearest even)
  model.config.dtype = spec["dtype"]
  save_kwargs = {}
  if spec["max_shard_size"]:
    save_kwargs["max_shard_size"] = spec["max_shard_size"]
  # transformers 5 writes safetensors only (the old safe_serialization flag is gone).
  model.save_pretrained(hf_dir, **save_kwargs)
  with open(os.path.join(hf_dir, "config.json")) as f:
    return json.load(f)


def hf_tensors(hf_dir: str):
  """name -> (file, dtype string, shape, sha256 of the raw stored bytes), read from the safetensors headers."""
  import struct

  out = {}
  for fn in sorted(os.listdir(hf_dir)):
    if not fn.endswith(".safetensors"):
      continue
    with open(os.path.join(hf_dir, fn), "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
      base = 8 + n
      for name, meta in sorted(header.items()):
        if name == "__metadata__":
          continue
        b, e = meta["data_offsets"]
        f.seek(base + b)
        raw = f.read(e - b)
        out[name] = dict(
            file=fn, dtype=meta["dtype"], shape=list(meta["shape"]), sha256=hashlib.sha256(raw).hexdigest()
        )
  return out


def hf_logits(hf_dir: str, dtype: str, tokens: np.ndarray) -> np.ndarray:
  """Logits of transformers' model loaded back from hf_dir (eager attention), as float32."""
  import torch
  import transformers as tf

  model = tf.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=getattr(torch, dtype), attn_implementation="eager"
  ).eval()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)))
  return out.logits.float().numpy()


# --------------------------------------------------------------------------- tunix side


def _tunix_modules(family):
  if family in ("qwen3", "qwen3_moe"):
    from tunix.models.qwen3 import model as model_lib
    from tunix.models.qwen3 import params as params_lib

    return model_lib, params_lib, model_lib.Qwen3
  if family == "qwen2":
    from tunix.models.qwen2 import model as model_lib
    from tunix.models.qwen2 import params as params_lib

    return model_lib, params_lib, model_lib.Qwen2
  raise BadInput(f"unknown family {family!r}")


def tunix_config(family, hf_config: dict, dtype: str):
  """tunix's ModelConfig for the HF config (the fields tunix's own presets set), compute/param dtype `dtype`."""
  import jax.numpy as jnp

  model_lib, _, _ = _tunix_modules(family)
  rope = hf_config.get("rope_parameters") or {}
  rope_theta = rope.get("rope_theta", hf_config.get("rope_theta"))
  kw = dict(
      num_layers=hf_config["num_hidden_layers"],
      vocab_size=hf_config["vocab_size"],
      embed_dim=hf_config["hidden_size"],
      hidden_dim=hf_config["intermediate_size"],
      num_heads=hf_config["num_attention_heads"],
      head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"],
      num_kv_heads=hf_config["num_key_value_heads"],
      rope_theta=int(rope_theta),
      norm_eps=hf_config["rms_norm_eps"],
      use_tied_embedding=bool(hf_config["tie_word_embeddings"]),
      dtype=getattr(jnp, dtype),
      param_dtype=getattr(jnp, dtype),
  )
  if family == "qwen3_moe":
    # tunix's qwen3_30b_a3b preset: hidden_dim is the expert width, num_experts / num_experts_per_tok set.
    kw["hidden_dim"] = hf_config["moe_intermediate_size"]
    kw["num_experts"] = hf_config.get("num_experts", hf_config.get("num_local_experts"))
    kw["num_experts_per_tok"] = hf_config["num_experts_per_tok"]
  return model_lib.ModelConfig(**kw)


def tunix_load(family, hf_dir: str, hf_config: dict, conv_dtype, mode: str = "auto"):
  """tunix's own conversion: create_model_from_safe_tensors(hf_dir, config, dtype=conv_dtype, mode=mode)."""
  import jax.numpy as jnp

  _, params_lib, _ = _tunix_modules(family)
  model_dtype = conv_dtype or _hf_dtype(hf_config)
  cfg = tunix_config(family, hf_config, model_dtype)
  dtype = getattr(jnp, conv_dtype) if conv_dtype else None
  return params_lib.create_model_from_safe_tensors(hf_dir, cfg, mesh=None, dtype=dtype, mode=mode), cfg


def _hf_dtype(hf_config: dict) -> str:
  return hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"


def tunix_logits(model, tokens: np.ndarray) -> np.ndarray:
  """The tunix model's logits for `tokens` (no cache, causal mask, positions 0..L-1), as float32."""
  import jax.numpy as jnp

  b, n = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), dtype=jnp.bool_)), (b, n, n))
  logits, _ = model(jnp.asarray(tokens, dtype=jnp.int32), positions, None, mask)
  return np.asarray(logits, dtype=np.float32)


def pure_state(model):
  """nnx.state(model).to_pure_dict(): what tunix users hand to orbax."""
  from flax import nnx

  return nnx.state(model).to_pure_dict()


def flat_leaves(tree, prefix=()):
  """[(key path as a tuple of str, leaf)] in sorted key order (orbax stores int keys as their str)."""
  out = []
  for k in sorted(tree, key=lambda x: (str(type(x)), x)):
    v = tree[k]
    path = prefix + (str(k),)
    if isinstance(v, dict):
      out.extend(flat_leaves(v, path))
    else:
      out.append((path, v))
  return out


def tunix_key_map(family, cfg, hf_names):
  """HF name -> what tunix's own key map says: target key, permutation, reshape, and expert stacking."""
  from tunix.models.safetensors_loader import torch_key_to_jax_key
  import re

  _, params_lib, _ = _tunix_modules(family)
  key_map = params_lib._get_key_and_transform_mapping(cfg)  # tunix's table (private name: tunix's own code)
  out = {}
  for name in sorted(hf_names):
    try:
      jax_key, transform = torch_key_to_jax_key(key_map, name)
    except ValueError:
      out[name] = dict(tunix_key=None, note="no pattern in tunix's key map: skipped by the loader")
      continue
    permute, reshape = transform if transform is not None else (None, None)
    entry = dict(
        tunix_key=jax_key, permute=list(permute) if permute else None, reshape=list(reshape) if reshape else None
    )
    m = re.match(r"(.*?)experts\.([0-9]+)\.(gate|up|down)_proj\.(.*)", jax_key)
    if m:  # params._stack_experts: jnp.stack over experts sorted by index, axis 0
      entry["stacked_into"] = f"{m.group(1)}{m.group(3)}_proj"
      entry["stack_axis"] = 0
      entry["stack_index"] = int(m.group(2))
    out[name] = entry
  return out


# --------------------------------------------------------------------------- writing


def write_fixture(name: str, spec: dict, out_dir: str, versions: dict):
  import orbax.checkpoint as ocp

  fdir = os.path.join(out_dir, name)
  hf_dir = os.path.join(fdir, "hf")
  os.makedirs(fdir)
  seed = SEED + sorted(FIXTURES).index(name)
  hf_config = build_hf(spec, hf_dir, seed)
  tensors = hf_tensors(hf_dir)
  tokens = np.random.default_rng(seed).integers(0, hf_config["vocab_size"], size=TOKENS_SHAPE).astype(np.int32)
  np.save(os.path.join(fdir, "tokens.npy"), tokens)
  ref = hf_logits(hf_dir, spec["dtype"], tokens)
  np.save(os.path.join(fdir, "logits_hf.npy"), ref)

  conversions = {}
  for conv, conv_dtype in spec["conversions"].items():
    model, cfg = tunix_load(spec["family"], hf_dir, hf_config, conv_dtype)
    pure = pure_state(model)
    leaves = flat_leaves(pure)
    # tunix's other loader (mode="original") must give the same bytes; recorded, not assumed.
    model_orig, _ = tunix_load(spec["family"], hf_dir, hf_config, conv_dtype, mode="original")
    orig = dict(flat_leaves(pure_state(model_orig)))
    same_as_original = all(
        np.asarray(v).dtype == np.asarray(orig[k]).dtype and _sha256(np.asarray(v)) == _sha256(np.asarray(orig[k]))
        for k, v in leaves
    ) and set(orig) == {k for k, _ in leaves}

    ckpt = os.path.join(fdir, f"tunix_{conv}")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt, pure)
    checkpointer.wait_until_finished()
    checkpointer.close()

    logits = tunix_logits(model, tokens)
    np.save(os.path.join(fdir, f"logits_tunix_{conv}.npy"), logits)
    diff = np.abs(logits.astype(np.float64) - ref.astype(np.float64))
    conversions[conv] = dict(
        checkpoint=f"tunix_{conv}",
        logits=f"logits_tunix_{conv}.npy",
        loader_call=(
            f"tunix.models.{'qwen3' if spec['family'] != 'qwen2' else 'qwen2'}.params.create_model_from_safe_tensors("
            f"'hf', ModelConfig(...), mesh=None, dtype={('jnp.' + conv_dtype) if conv_dtype else None})"
        ),
        save_call="ocp.StandardCheckpointer().save(path, nnx.state(model).to_pure_dict())",
        model_config=_config_dict(cfg),
        optimized_and_original_loaders_agree=bool(same_as_original),
        leaves=[
            dict(
                keys=list(k),
                dtype=str(np.asarray(v).dtype),
                shape=list(np.asarray(v).shape),
                sha256=_sha256(np.asarray(v)),
            )
            for k, v in leaves
        ],
        logits_vs_hf=dict(
            max_abs_diff=float(diff.max()),
            max_abs_hf_logit=float(np.abs(ref).max()),
            allclose_rtol0_atol=_smallest_atol(diff),
            argmax_agree=bool((logits.argmax(-1) == ref.argmax(-1)).all()),
        ),
    )
    # The throwaway restore check on our own checkpoint: restore must give tunix's bytes and logits back.
    problems = check_restore(ckpt, name, conv, out_dir=out_dir, quiet=True)
    if problems:
      raise SystemExit(f"self-check of {ckpt} failed: {problems[:3]}")

  expected = dict(
      fixture=name,
      family=spec["family"],
      hf_dtype=spec["dtype"],
      tied_embeddings=spec["tied"],
      max_shard_size=spec["max_shard_size"],
      seed=seed,
      tokens="tokens.npy",
      logits_hf="logits_hf.npy",
      hf_config=hf_config,
      hf_tensors=tensors,
      tunix_key_map=tunix_key_map(spec["family"], cfg, tensors),
      conversions=conversions,
      versions=versions,
  )
  with open(os.path.join(fdir, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1, sort_keys=True)
    f.write("\n")
  return expected


def _config_dict(cfg) -> dict:
  """tunix's ModelConfig as JSON (dtypes as their names; sharding and remat settings left out)."""
  out = {}
  for f in cfg.__dataclass_fields__:
    if f in ("shd_config", "remat_config"):
      continue
    v = getattr(cfg, f)
    out[f] = v if isinstance(v, (int, float, bool, type(None))) else np.dtype(v).name
  return out


def _smallest_atol(diff: np.ndarray) -> str:
  """The smallest power of ten >= max |diff| (a readable 'matches within')."""
  m = float(diff.max())
  if m == 0.0:
    return "0 (bit-identical)"
  return f"1e{int(np.ceil(np.log10(m)))}"


def _drop_empty_dirs(root: str):
  for d, subdirs, files in sorted(os.walk(root, topdown=False)):
    if d != root and not os.listdir(d):
      os.rmdir(d)


# --------------------------------------------------------------------------- the restore check


def _fixture_inputs(fixture: str, conversion: str, out_dir: str):
  """(family, hf dir, hf config, tunix dtype argument, tokens) of a written fixture."""
  if fixture not in FIXTURES:
    raise BadInput(f"unknown fixture {fixture!r} (known: {', '.join(sorted(FIXTURES))})")
  spec = FIXTURES[fixture]
  if conversion not in spec["conversions"]:
    raise BadInput(f"fixture {fixture} has no conversion {conversion!r} (has: {', '.join(spec['conversions'])})")
  hf_dir = os.path.join(out_dir, fixture, "hf")
  tokens = os.path.join(out_dir, fixture, "tokens.npy")
  if not (os.path.isfile(os.path.join(hf_dir, "config.json")) and os.path.isfile(tokens)):
    raise BadInput(f"fixture {fixture} is not written under {out_dir}")
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf_config = json.load(f)
  return spec["family"], hf_dir, hf_config, spec["conversions"][conversion], np.load(tokens)


def check_restore(ckpt_dir: str, fixture: str, conversion: str = "default", out_dir: str = HERE, quiet=False):
  """Restores ckpt_dir into the tunix model and compares it with tunix's own loading of the fixture's hf/.

  Returns the list of differences (empty: identical leaves, dtypes, shapes, bytes and logits).
  """
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx

  family, hf_dir, hf_config, conv_dtype, tokens = _fixture_inputs(fixture, conversion, out_dir)
  if not os.path.isdir(ckpt_dir):
    raise BadInput(f"not a directory: {ckpt_dir}")
  ref_model, cfg = tunix_load(family, hf_dir, hf_config, conv_dtype)
  ref_pure = pure_state(ref_model)
  ref_leaves = dict(flat_leaves(ref_pure))

  checkpointer = ocp.StandardCheckpointer()
  try:
    meta = checkpointer.metadata(ckpt_dir).item_metadata
  except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is bad input here
    raise BadInput(f"cannot read {ckpt_dir} as a StandardCheckpointer checkpoint: {str(e).splitlines()[0]}")
  if meta is None:
    raise BadInput(f"{ckpt_dir} has no StandardCheckpointer tree metadata (_METADATA)")
  meta = meta.tree
  meta_leaves = dict(flat_leaves(meta))
  problems = []
  for k in sorted(set(ref_leaves) - set(meta_leaves)):
    problems.append(f"MISSING {'/'.join(k)}")
  for k in sorted(set(meta_leaves) - set(ref_leaves)):
    problems.append(f"EXTRA {'/'.join(k)}")
  for k in sorted(set(ref_leaves) & set(meta_leaves)):
    r, m = np.asarray(ref_leaves[k]), meta_leaves[k]
    if tuple(m.shape) != r.shape or np.dtype(m.dtype) != r.dtype:
      problems.append(f"{'/'.join(k)}: stored {np.dtype(m.dtype)}{list(m.shape)}, tunix has {r.dtype}{list(r.shape)}")
  if problems:
    return _report(problems, quiet)

  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), ref_pure)
  restored = checkpointer.restore(ckpt_dir, abstract)
  checkpointer.close()
  for k, v in flat_leaves(restored):
    a, b = np.asarray(v), np.asarray(ref_leaves[k])
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      bad = np.flatnonzero(a.view(np.uint8).reshape(a.size, -1) != b.view(np.uint8).reshape(b.size, -1))
      first = [int(i) for i in np.unravel_index(bad[0] // a.dtype.itemsize, a.shape)] if bad.size else None
      problems.append(f"{'/'.join(k)}: bytes differ from tunix's own loading (first at index {first})")
  _, _, model_cls = _tunix_modules(family)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(params=0))))
  model = nnx.merge(graphdef, restored)
  got, want = tunix_logits(model, tokens), tunix_logits(ref_model, tokens)
  if got.tobytes() != want.tobytes():
    problems.append(f"logits differ from tunix's own loading: max |diff| {np.abs(got - want).max():.3g}")
  return _report(problems, quiet)


def _report(problems, quiet):
  if not quiet:
    for p in problems:
      print(f"FAIL {p}")
  return problems


# --------------------------------------------------------------------------- main


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=None, help="write every fixture under OUT/<name>/")
  ap.add_argument("--force", action="store_true", help="replace existing fixture directories")
  ap.add_argument("--only", default="", help="comma-separated fixture names")
  ap.add_argument("--check_restore", default=None, help="an orbax checkpoint made elsewhere from a fixture's hf/")
  ap.add_argument("--fixture", default=None, help="with --check_restore: the fixture whose hf/ it was made from")
  ap.add_argument("--conversion", default="default", help="with --check_restore: default, or f32 where listed")
  args = ap.parse_args(argv)
  try:
    if args.check_restore:
      if not args.fixture:
        raise BadInput("--check_restore needs --fixture (one of: " + ", ".join(sorted(FIXTURES)) + ")")
      problems = check_restore(os.path.abspath(args.check_restore), args.fixture, args.conversion)
      print("PASS" if not problems else f"FAIL: {len(problems)} difference(s)")
      return 1 if problems else 0
    if not args.out:
      raise BadInput("give --out=DIR (write fixtures) or --check_restore=DIR --fixture=NAME")
    names = [n for n in args.only.split(",") if n] or sorted(FIXTURES)
    for n in names:
      if n not in FIXTURES:
        raise BadInput(f"unknown fixture {n!r}")
    out = os.path.abspath(args.out)
    versions = _versions()
    written = {}
    for n in names:
      fdir = os.path.join(out, n)
      if os.path.exists(fdir):
        if not args.force:
          raise BadInput(f"{fdir} exists (use --force)")
        shutil.rmtree(fdir)
      exp = write_fixture(n, FIXTURES[n], out, versions)
      _drop_empty_dirs(fdir)
      written[n] = {c: v["logits_vs_hf"] for c, v in exp["conversions"].items()}
      print(f"wrote {fdir}: {json.dumps(written[n])}")
    index = os.path.join(out, "fixtures.json")
    prior = {}
    if os.path.isfile(index):
      with open(index) as f:
        prior = json.load(f).get("fixtures", {})
    prior.update(written)
    with open(index, "w") as f:
      json.dump(dict(versions=versions, seed=SEED, fixtures=prior), f, indent=1, sort_keys=True)
      f.write("\n")
    return 0
  except BadInput as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
