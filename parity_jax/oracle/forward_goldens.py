"""Forward-pass goldens from the oracle: small seeded HF Qwen2/Qwen3 models and their stages.

``regenerate(goldens_dir)`` (``python -m tools.regen_goldens --what=forward``)
builds three tiny models with transformers, re-initialises every weight from a
seeded ``torch.Generator`` with widened scales (so a wrong RoPE, a dropped bias
or a swapped norm moves the stages far beyond float32 noise), saves them with
``save_pretrained`` under ``goldens/models/<name>/`` and writes the float32
stages of HF's eager forward, captured by :mod:`parity_jax.oracle.hf_forward`,
to ``goldens/forward/``:

* ``<name>.safetensors``        -- one unpadded sequence, float32;
* ``<name>.padded.safetensors`` -- a batch with a left-padded, a right-padded
  and an unpadded row (HF's 2-D attention_mask, default positions), float32;
* ``<name>.bf16.safetensors``   -- HF's own bfloat16 forward of the unpadded
  sequence: the yardstick for how far a correct bfloat16 run may drift from
  float32.

Models:

* ``qwen2_gqa_bias``: Qwen2, GQA 4 q / 2 kv heads, q/k/v biases, untied
  lm_head, float32 weights, one ``model.safetensors``, config as transformers
  5.x writes it (``rope_parameters``, ``layer_types``, ``dtype``).
* ``qwen2_tied``: Qwen2, 4 q / 1 kv heads, tied embeddings (no
  ``lm_head.weight`` on disk, like Qwen2.5-0.5B), bfloat16 weights, sharded
  into several files with ``model.safetensors.index.json``, config rewritten in
  the transformers 4.x style of the published checkpoints (top-level
  ``rope_theta``, ``rope_scaling: null``, ``sliding_window`` with
  ``use_sliding_window: false``, ``torch_dtype``).
* ``qwen3``: Qwen3, q_norm/k_norm, explicit ``head_dim`` (32, so ``H*hd`` is
  not the hidden size), no biases, untied.

``MANIFEST.json`` records the seeds, configs, inputs, torch/transformers
versions and the sha256 of every file written under ``models/`` and
``forward/``. The output is byte-for-byte deterministic for fixed versions.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from typing import Any

import numpy as np

from parity_jax import bundles
from parity_jax.oracle import require_oracle
from parity_jax.dtypes import BF16
from parity_jax.files import file_sha256, write_text_atomic
from parity_jax.provenance import default_provenance, torch_backend
from parity_jax.oracle.hf_forward import capture_hf_stages, load_hf_model

__all__ = ["MODELS", "INPUTS", "build_model", "compare_regenerated", "regenerate", "widen_weights"]

PRODUCER = "parity_jax.oracle.forward_goldens"

MODELS: dict[str, dict[str, Any]] = {
    "qwen2_gqa_bias": {
        "seed": 20261123,
        "model_type": "qwen2",
        "config": dict(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
        "store_dtype": "float32",
        "max_shard_size": None,
        "config_style": "5.x",
    },
    "qwen2_tied": {
        "seed": 20261124,
        "model_type": "qwen2",
        "config": dict(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
        "store_dtype": "bfloat16",
        "max_shard_size": "40KB",
        "config_style": "4.x",
    },
    "qwen3": {
        "seed": 20261125,
        "model_type": "qwen3",
        "config": dict(
            vocab_size=352,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=256,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            attention_bias=False,
        ),
        "store_dtype": "float32",
        "max_shard_size": None,
        "config_style": "5.x",
    },
}

# Inputs per model: token ids are drawn from the model's seed; padded rows hold token 0.
INPUTS = {
    "single": {"batch": 1, "seq": 11, "pad": None},
    # row 0 left-padded by 3, row 1 right-padded by 2, row 2 unpadded
    "padded": {"batch": 3, "seq": 9, "pad": [("left", 3), ("right", 2), (None, 0)]},
}

# Widened weight scales: unit-variance projections (HF's init is 0.02, which
# leaves attention nearly uniform and hides RoPE errors), sharper q/k, biases
# and norm weights far from their trivial values.
_GAIN = {"q_proj": 1.5, "k_proj": 1.5, "lm_head": 3.0}
_BIAS_STD = 0.5
_NORM_STD = 0.3
_MIN_TOP1_GAP = 1e-3  # golden logits must have an unambiguous top-1 token at every position


def widen_weights(model, seed: int) -> None:
  """Re-initialises every parameter of an HF Qwen model from ``torch.Generator(seed)``, in name order."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("norm.weight"):
        value = 1.0 + _NORM_STD * noise
      elif name.endswith(".bias"):
        value = _BIAS_STD * noise
      elif name.endswith("embed_tokens.weight"):
        value = noise
      else:
        gain = next((g for k, g in _GAIN.items() if k in name), 1.0)
        value = noise * (gain / p.shape[-1] ** 0.5)
      p.copy_(value.to(p.dtype))


def build_model(model_type: str, config: dict[str, Any], seed: int):
  """A float32 HF ``Qwen{2,3}ForCausalLM`` with eager attention and widened seeded weights."""
  require_oracle()
  import torch
  import transformers

  torch.manual_seed(seed)
  if model_type == "qwen2":
    cfg = transformers.Qwen2Config(**config, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(cfg)
  elif model_type == "qwen3":
    cfg = transformers.Qwen3Config(**config, attn_implementation="eager")
    model = transformers.Qwen3ForCausalLM(cfg)
  else:
    raise ValueError(model_type)
  model = model.to(torch.float32).eval()
  widen_weights(model, seed)
  return model


def make_inputs(vocab_size: int, seed: int, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
  """Seeded token ids ``[B, T]`` and, for padded specs, the HF 2-D attention mask."""
  rng = np.random.default_rng(seed)
  b, t = spec["batch"], spec["seq"]
  tokens = rng.integers(1, vocab_size, size=(b, t), dtype=np.int64)
  if spec["pad"] is None:
    return tokens, None
  mask = np.ones((b, t), np.int64)
  for row, (side, n) in enumerate(spec["pad"]):
    if side == "left":
      mask[row, :n] = 0
    elif side == "right":
      mask[row, t - n :] = 0
  tokens = np.where(mask == 1, tokens, 0)
  return tokens, mask


def _to_4x_style(config_path: str, store_dtype: str) -> None:
  """Rewrites a config.json the way transformers 4.x wrote the published Qwen2.5 configs."""
  with open(config_path, encoding="utf-8") as f:
    cfg = json.load(f)
  rope = cfg.pop("rope_parameters")
  cfg.pop("layer_types", None)
  cfg.pop("dtype", None)
  cfg["rope_theta"] = rope["rope_theta"]
  cfg["rope_scaling"] = None
  cfg["sliding_window"] = 32768
  cfg["use_sliding_window"] = False
  cfg["max_window_layers"] = 21
  cfg["torch_dtype"] = store_dtype
  cfg["transformers_version"] = "4.43.1"
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(dict(sorted(cfg.items())), f, indent=2)
    f.write("\n")


def _top1_gap(logits: np.ndarray) -> float:
  top2 = np.sort(logits.astype(np.float64), axis=-1)[..., -2:]
  return float((top2[..., 1] - top2[..., 0]).min())


def regenerate(goldens_dir: str) -> list[str]:
  """Writes goldens/models/<name>/, goldens/forward/*.safetensors and MANIFEST.json; returns the paths written."""
  require_oracle()
  import torch
  import transformers

  models_root = os.path.join(goldens_dir, "models")
  forward_root = os.path.join(goldens_dir, "forward")
  os.makedirs(models_root, exist_ok=True)
  os.makedirs(forward_root, exist_ok=True)
  written: list[str] = []
  manifest: dict[str, Any] = {
      "producer": PRODUCER,
      "command": "parity-regen-goldens --goldens_dir=goldens --what=forward --overwrite",
      "oracle": "transformers AutoModelForCausalLM, attn_implementation='eager', CPU; stages captured by "
      "parity_jax.oracle.hf_forward (module hooks + wrapped eager_attention_forward)",
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
      "backend": torch_backend(),
      "weights": {
          "gain": _GAIN,
          "bias_std": _BIAS_STD,
          "norm_std": _NORM_STD,
          "other_linear": "N(0,1)/sqrt(fan_in)",
          "embed": "N(0,1)",
      },
      "positions": "default (arange(T) for every row, as transformers uses without position_ids)",
      "models": {},
      "goldens": {},
  }
  for name, spec in MODELS.items():
    model_dir = os.path.join(models_root, name)
    written += _write_model(model_dir, spec)
    manifest["models"][name] = {k: v for k, v in spec.items()}
    for path, entry in _write_stages(name, spec, model_dir, forward_root):
      written.append(path)
      manifest["goldens"][os.path.basename(path)] = entry

  root = os.path.abspath(goldens_dir)
  manifest["sha256"] = collections.OrderedDict(
      (os.path.relpath(os.path.abspath(p), root), file_sha256(p)) for p in sorted(written)
  )
  manifest_path = os.path.join(forward_root, "MANIFEST.json")
  write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
  written.append(manifest_path)
  return written


def _write_model(model_dir: str, spec: dict[str, Any]) -> list[str]:
  """Builds the seeded HF model and saves it (in its storage dtype, sharding and config style)."""
  import torch

  if os.path.isdir(model_dir):
    shutil.rmtree(model_dir)
  model = build_model(spec["model_type"], spec["config"], spec["seed"])
  to_save = model.to(torch.bfloat16) if spec["store_dtype"] == "bfloat16" else model
  save_kwargs: dict[str, Any] = {"safe_serialization": True}
  if spec["max_shard_size"]:
    save_kwargs["max_shard_size"] = spec["max_shard_size"]
  to_save.save_pretrained(model_dir, **save_kwargs)
  if spec["config_style"] == "4.x":
    _to_4x_style(os.path.join(model_dir, "config.json"), spec["store_dtype"])
  return [os.path.join(model_dir, f) for f in sorted(os.listdir(model_dir))]


def _write_stages(
    name: str, spec: dict[str, Any], model_dir: str, forward_root: str
) -> list[tuple[str, dict[str, Any]]]:
  """The oracle's stages for every input set (float32; bfloat16 too for the unpadded one), read back from disk."""
  seed = spec["seed"]
  hf32 = load_hf_model(model_dir, "float32")
  hf16 = load_hf_model(model_dir, "bfloat16")
  vocab = spec["config"]["vocab_size"]
  out = []
  for input_name, input_spec in INPUTS.items():
    tokens, mask = make_inputs(vocab, seed + 1 + list(INPUTS).index(input_name), input_spec)
    runs = [("float32", hf32, "")]
    if input_name == "single":
      runs.append(("bfloat16", hf16, ".bf16"))
    for dtype, hf, suffix in runs:
      stages = capture_hf_stages(hf, tokens, mask)
      if dtype == "float32":
        gap = _top1_gap(stages["logits"])
        if gap < _MIN_TOP1_GAP:
          raise RuntimeError(f"{name}/{input_name}: top-1 logit gap {gap:.3g} too small for a stable top-1 test")
      base = name + ("" if input_name == "single" else f".{input_name}") + suffix
      path = os.path.join(forward_root, base + ".safetensors")
      inputs = {"tokens": tokens.tolist(), "attention_mask": None if mask is None else mask.tolist()}
      prov = default_provenance(
          PRODUCER,
          seed=seed,
          model=name,
          dtype=dtype,
          inputs=inputs,
          input_set=input_name,
          model_type=spec["model_type"],
          oracle="transformers eager attention, CPU",
          positions="default arange(T)",
      )
      bundles.save_bundle(path, stages, prov)
      entry = {"model": name, "dtype": dtype, "inputs": inputs, "input_set": input_name, "stages": len(stages)}
      if dtype == "float32":
        entry["min_top1_logit_gap"] = _top1_gap(stages["logits"])
      out.append((path, entry))
  return out


# ----------------------------------------------------------------------------
# Regenerated goldens against committed ones
# ----------------------------------------------------------------------------

#: config.json keys that name the writer, not the model.
CONFIG_ENV_KEYS = ("transformers_version",)
#: Provenance fields that describe the install, not the data.
ENVIRONMENT_FIELDS = ("versions", "platform", "python")
#: Random float32 weights regenerated on another backend: torch's RNG may take
#: another code path (e.g. ATEN_CPU_CAPABILITY=default); the draws then differ
#: in their last bits only.
WEIGHT_REL_L2 = 1e-6


def compare_regenerated(committed_root: str | os.PathLike, fresh_root: str | os.PathLike) -> dict[str, Any]:
  """Compares freshly regenerated forward goldens with committed ones, promising only what holds.

  * **Same backend** (equal :func:`parity_jax.provenance.torch_backend` in both
    manifests): configs equal less the writer's version, every weight tensor and
    every stage bit for bit, provenance equal less environment fields.
  * **Another backend**: configs equal less the writer's version; float32
    weights within rel-L2 :data:`WEIGHT_REL_L2` and bfloat16-stored weights
    differing only by rounding flips (every differing element exactly one bf16
    ULP apart: a float32 draw that moved in its last bits rounded the other way);
    and the oracle, re-run here on the *committed* models and inputs, reproduces
    every committed stage under the project's profiles (``f32`` for float32
    stages, ``bf16`` for HF's bfloat16 run): the stages depend on the machine
    only through float rounding.

  Returns ``{"mode": "bytes"|"invariants", "problems": [...], ...}``.
  """
  committed, fresh = os.fspath(committed_root), os.fspath(fresh_root)
  want = _read_json(os.path.join(committed, "forward", "MANIFEST.json"))
  got = _read_json(os.path.join(fresh, "forward", "MANIFEST.json"))
  same_backend = want.get("backend") == got.get("backend")
  problems: list[str] = []
  if sorted(want["goldens"]) != sorted(got["goldens"]) or sorted(want["models"]) != sorted(got["models"]):
    problems.append("the regenerated goldens do not have the committed file set")
    return {"mode": "bytes" if same_backend else "invariants", "problems": problems}
  flips = 0
  for name in want["models"]:
    problems += _compare_configs(name, committed, fresh)
    p, f = _compare_weights(name, committed, fresh, exact=same_backend)
    problems += p
    flips += f
  if same_backend:
    problems += _compare_stage_files(want["goldens"], committed, fresh)
  else:
    problems += _rerun_committed(want["goldens"], committed)
  return {
      "mode": "bytes" if same_backend else "invariants",
      "committed_backend": want.get("backend"),
      "fresh_backend": got.get("backend"),
      "bf16_weight_flips": flips,
      "problems": problems,
  }


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _compare_configs(name: str, committed: str, fresh: str) -> list[str]:
  a, b = (_read_json(os.path.join(root, "models", name, "config.json")) for root in (committed, fresh))
  strip = lambda c: {k: v for k, v in c.items() if k not in CONFIG_ENV_KEYS}  # noqa: E731
  return [] if strip(a) == strip(b) else [f"models/{name}/config.json differs beyond {CONFIG_ENV_KEYS}"]


def _weights(root: str, name: str) -> dict[str, np.ndarray]:
  d = os.path.join(root, "models", name)
  out: dict[str, np.ndarray] = {}
  for f in sorted(os.listdir(d)):
    if f.endswith(".safetensors"):
      with bundles.BundleReader(os.path.join(d, f)) as r:
        out.update({k: r.get(k) for k in r.names})
  return out


def _compare_weights(name: str, committed: str, fresh: str, exact: bool) -> tuple[list[str], int]:
  from parity_jax import arraydiff

  a, b = _weights(committed, name), _weights(fresh, name)
  if sorted(a) != sorted(b):
    return [f"models/{name}: tensor names differ"], 0
  problems, flips = [], 0
  for k in sorted(a):
    x, y = a[k], b[k]
    if x.shape != y.shape or x.dtype != y.dtype:
      problems.append(f"models/{name}: {k} is {y.dtype}{list(y.shape)}, committed {x.dtype}{list(x.shape)}")
    elif exact:
      if not arraydiff.bit_equal(x, y):
        problems.append(f"models/{name}: {k} not bit-identical")
    elif x.dtype == BF16:
      ulps = arraydiff.ulp_distance(x, y)
      flips += int(np.count_nonzero(ulps))
      if ulps.max(initial=0) > 1:
        problems.append(f"models/{name}: bf16 weight {k} moved {int(ulps.max())} ULPs (a rounding flip moves 1)")
    else:
      st = arraydiff.diff_stats(x, y, name=k)
      if not st.rel_l2 <= WEIGHT_REL_L2:
        problems.append(f"models/{name}: {k} rel-L2 {st.rel_l2:.3g} > {WEIGHT_REL_L2:g}")
  return problems, flips


def _compare_stage_files(goldens: dict[str, Any], committed: str, fresh: str) -> list[str]:
  from parity_jax import arraydiff

  problems = []
  for fname in goldens:
    with (
        bundles.BundleReader(os.path.join(committed, "forward", fname)) as a,
        bundles.BundleReader(os.path.join(fresh, "forward", fname)) as b,
    ):
      if a.names != b.names:
        problems.append(f"forward/{fname}: stage names or order differ")
        continue
      strip = lambda p: {k: v for k, v in p.items() if k not in ENVIRONMENT_FIELDS}  # noqa: E731
      if strip(a.provenance) != strip(b.provenance):
        problems.append(f"forward/{fname}: provenance differs beyond environment fields")
      problems += [
          f"forward/{fname}: {k} not bit-identical" for k in a.names if not arraydiff.bit_equal(a.get(k), b.get(k))
      ]
  return problems


def _rerun_committed(goldens: dict[str, Any], committed: str) -> list[str]:
  """The oracle run here on the committed models and recorded inputs against the committed stages."""
  problems = []
  models = {}
  for fname, entry in goldens.items():
    key = (entry["model"], entry["dtype"])
    if key not in models:
      models[key] = load_hf_model(os.path.join(committed, "models", entry["model"]), entry["dtype"])
    inputs = entry["inputs"]
    mask = None if inputs["attention_mask"] is None else np.asarray(inputs["attention_mask"], np.int64)
    here = capture_hf_stages(models[key], np.asarray(inputs["tokens"], np.int64), mask)
    report = bundles.compare_bundles(
        os.path.join(committed, "forward", fname), here, profile="f32" if entry["dtype"] == "float32" else "bf16"
    )
    if not report.passed:
      problems.append(f"forward/{fname}: the oracle here does not reproduce it: {report.verdict_line()}")
  return problems
