"""Shared helpers for the Qwen2/Qwen3 tests: tiny configs and checkpoints written without torch."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
import safetensors.numpy

from parity_jax import qwen2
from parity_jax.bundles import load_bundle

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "goldens"
FORWARD = GOLDENS / "forward"
MODELS = GOLDENS / "models"
GOLDEN_MODELS = ("qwen2_gqa_bias", "qwen2_tied", "qwen3")


def config_dict(model_type: str = "qwen2", style: str = "5.x", **over: Any) -> dict[str, Any]:
  """A tiny config.json as transformers 5.x (or 4.x) writes it."""
  cfg: dict[str, Any] = {
      "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "Qwen3ForCausalLM"],
      "model_type": model_type,
      "vocab_size": 96,
      "hidden_size": 32,
      "intermediate_size": 48,
      "num_hidden_layers": 2,
      "num_attention_heads": 4,
      "num_key_value_heads": 2,
      "hidden_act": "silu",
      "max_position_embeddings": 128,
      "rms_norm_eps": 1e-6,
      "tie_word_embeddings": False,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "max_window_layers": 28,
  }
  if model_type == "qwen3":
    cfg.update(head_dim=16, attention_bias=False)
  if style == "5.x":
    cfg.update(
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        dtype="float32",
        sliding_window=None,
        layer_types=["full_attention"] * cfg["num_hidden_layers"],
    )
  else:
    cfg.update(rope_theta=10000.0, rope_scaling=None, sliding_window=4096, torch_dtype="bfloat16")
  cfg.update(over)
  return cfg


def random_tensors(cfg_dict: dict[str, Any], seed: int = 0, scale: float = 0.3) -> dict[str, np.ndarray]:
  """HF-named float32 tensors for ``cfg_dict`` (random, norms around 1), via the loader's own key table."""
  cfg = qwen2.parse_config(cfg_dict)
  params = qwen2.init_params(cfg, seed, scale=scale, put=None)
  tensors = qwen2.to_hf_tensors(params, cfg)
  rng = np.random.default_rng(seed)
  for name in tensors:
    if name.endswith("norm.weight"):
      tensors[name] = (1.0 + 0.2 * rng.standard_normal(tensors[name].shape)).astype(np.float32)
  return tensors


def write_checkpoint(
    path: os.PathLike, cfg_dict: dict[str, Any], tensors: dict[str, np.ndarray], shards: int | None = None
) -> pathlib.Path:
  """Writes config.json and either model.safetensors or ``shards`` files plus model.safetensors.index.json."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg_dict, indent=2))
  if shards is None:
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    part = names[s::shards]
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    safetensors.numpy.save_file({n: tensors[n] for n in part}, str(path / fname), metadata={"format": "pt"})
    weight_map.update({n: fname for n in part})
  index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
  (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  return path


def golden(name: str):
  return load_bundle(FORWARD / f"{name}.safetensors")


def golden_inputs(bundle) -> tuple[np.ndarray, np.ndarray | None]:
  inputs = bundle.provenance["inputs"]
  mask = inputs["attention_mask"]
  return np.asarray(inputs["tokens"], np.int64), None if mask is None else np.asarray(mask, np.int64)
