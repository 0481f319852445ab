"""parity_jax.oracle.forward_goldens, called directly: the seeded model and inputs, and compare_regenerated on trees.

test_regeneration.py regenerates the real goldens (slow, and on most machines it can only take the invariant
path). Here compare_regenerated runs on small hand-built trees (a MANIFEST, a model's config.json and weights, a
stage bundle) with one thing changed at a time, on both paths: the same backend (bytes) and another (invariants,
with no goldens to re-run so no torch model is needed). The expected problems are written out by hand.
"""

from __future__ import annotations

import json
import pathlib

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity_jax import bundles  # noqa: E402
from parity_jax.oracle import forward_goldens  # noqa: E402

BF16 = ml_dtypes.bfloat16


def test_build_model_is_a_float32_model_in_eval_mode_of_its_type():
  config = dict(forward_goldens.MODELS["qwen3"]["config"], num_hidden_layers=1)
  model = forward_goldens.build_model("qwen3", config, seed=1)
  assert type(model).__name__ == "Qwen3ForCausalLM" and not model.training
  assert {p.dtype for p in model.parameters()} == {torch.float32}
  with pytest.raises(ValueError):
    forward_goldens.build_model("llama", config, seed=1)


def test_make_inputs_pads_the_sides_it_is_told():
  spec = {"batch": 3, "seq": 6, "pad": [("left", 2), ("right", 1), (None, 0)]}
  tokens, mask = forward_goldens.make_inputs(50, seed=4, spec=spec)
  want_mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(mask, want_mask)
  assert tokens.shape == (3, 6) and tokens.dtype == np.int64 and mask.dtype == np.int64
  assert (tokens[want_mask == 0] == 0).all() and (tokens[want_mask == 1] >= 1).all() and (tokens < 50).all()
  single, none = forward_goldens.make_inputs(50, seed=4, spec={"batch": 1, "seq": 5, "pad": None})
  assert none is None and single.shape == (1, 5) and (single >= 1).all()


STAGES = {"embed": np.arange(6, dtype=np.float32).reshape(2, 3), "logits": np.ones((2, 4), np.float32)}
WEIGHTS = {
    "a.weight": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "b.weight": np.linspace(-2, 2, 8, dtype=np.float32).astype(BF16),
}


def _tree(root: pathlib.Path, backend: str, weights=None, config=None, stages=None, prov=None, goldens=True):
  """One model ``m`` (config.json + one safetensors file) and, with ``goldens``, one stage bundle ``m.safetensors``."""
  (root / "models" / "m").mkdir(parents=True)
  (root / "forward").mkdir()
  (root / "models" / "m" / "config.json").write_text(json.dumps(config or {"hidden_size": 4}))
  bundles.save_bundle(root / "models" / "m" / "model.safetensors", WEIGHTS if weights is None else weights)
  names = {}
  if goldens:
    bundles.save_bundle(root / "forward" / "m.safetensors", STAGES if stages is None else stages, prov or {"seed": 1})
    names = {"m.safetensors": {"model": "m", "dtype": "float32"}}
  manifest = {"backend": backend, "models": {"m": {}}, "goldens": names}
  (root / "forward" / "MANIFEST.json").write_text(json.dumps(manifest))
  return root


def _problems(tmp_path, name, backend="B", **fresh):
  committed = tmp_path / "committed"
  if not committed.exists():
    _tree(committed, "A", goldens=backend == "A")
  fresh.setdefault("goldens", backend == "A")
  result = forward_goldens.compare_regenerated(committed, _tree(tmp_path / name, backend, **fresh))
  assert result["mode"] == ("bytes" if backend == "A" else "invariants"), result
  return result


def test_same_backend_compares_every_byte(tmp_path):
  same = _problems(tmp_path, "same", "A")
  assert same["problems"] == [] and same["bf16_weight_flips"] == 0
  # the writer's version may differ; nothing else in the config may
  assert _problems(tmp_path, "version", "A", config={"hidden_size": 4, "transformers_version": "9"})["problems"] == []
  assert _problems(tmp_path, "config", "A", config={"hidden_size": 5})["problems"] == [
      "models/m/config.json differs beyond ('transformers_version',)"
  ]
  flipped = dict(WEIGHTS, **{"a.weight": WEIGHTS["a.weight"].copy()})
  flipped["a.weight"].view(np.uint32)[0, 0] ^= 1  # one bit
  assert _problems(tmp_path, "bit", "A", weights=flipped)["problems"] == ["models/m: a.weight not bit-identical"]
  assert _problems(tmp_path, "names", "A", weights={"a.weight": WEIGHTS["a.weight"]})["problems"] == [
      "models/m: tensor names differ"
  ]
  wide = dict(WEIGHTS, **{"b.weight": WEIGHTS["b.weight"].astype(np.float32)})
  assert _problems(tmp_path, "dtype", "A", weights=wide)["problems"] == [
      "models/m: b.weight is float32[8], committed bfloat16[8]"
  ]
  # the stage bundles: names and order, provenance less the environment, every stage's bits
  swapped = {"logits": STAGES["logits"], "embed": STAGES["embed"]}
  assert _problems(tmp_path, "order", "A", stages=swapped)["problems"] == [
      "forward/m.safetensors: stage names or order differ"
  ]
  env = {"seed": 1, "versions": {"torch": "0"}, "platform": "x", "python": "3"}
  assert _problems(tmp_path, "env", "A", prov=env)["problems"] == []
  assert _problems(tmp_path, "prov", "A", prov={"seed": 2})["problems"] == [
      "forward/m.safetensors: provenance differs beyond environment fields"
  ]
  stage = dict(STAGES, embed=STAGES["embed"] + np.float32(1))
  assert _problems(tmp_path, "stage", "A", stages=stage)["problems"] == [
      "forward/m.safetensors: embed not bit-identical"
  ]
  assert _problems(tmp_path, "files", "A", goldens=False)["problems"] == [
      "the regenerated goldens do not have the committed file set"
  ]


def test_another_backend_allows_rounding_flips_and_float32_noise_only(tmp_path):
  result = _problems(tmp_path, "same")
  assert result["problems"] == [] and result["committed_backend"] == "A" and result["fresh_backend"] == "B"
  bits = WEIGHTS["b.weight"].view(np.uint16)
  one_ulp = dict(WEIGHTS, **{"b.weight": (bits + np.uint16(1) * (np.arange(8) % 2 == 0)).view(BF16)})
  flips = _problems(tmp_path, "flips", weights=one_ulp)
  assert flips["problems"] == [] and flips["bf16_weight_flips"] == 4
  two_ulps = dict(WEIGHTS, **{"b.weight": (bits + np.uint16(2)).view(BF16)})
  assert _problems(tmp_path, "ulps", weights=two_ulps)["problems"] == [
      "models/m: bf16 weight b.weight moved 2 ULPs (a rounding flip moves 1)"
  ]
  a = WEIGHTS["a.weight"]
  tiny = dict(WEIGHTS, **{"a.weight": a * np.float32(1 + 1e-7)})  # rel-L2 about 1e-7 <= 1e-6
  assert _problems(tmp_path, "tiny", weights=tiny)["problems"] == []
  off = dict(WEIGHTS, **{"a.weight": a * np.float32(1 + 1e-5)})
  (problem,) = _problems(tmp_path, "off", weights=off)["problems"]
  assert problem.startswith("models/m: a.weight rel-L2 ") and problem.endswith(" > 1e-06")
  bit = dict(WEIGHTS, **{"a.weight": a.copy()})
  bit["a.weight"].view(np.uint32)[0, 0] ^= 1  # not bit-identical, yet within float32 noise: fine here
  assert _problems(tmp_path, "bit", weights=bit)["problems"] == []


def test_another_backend_reruns_the_oracle_on_the_committed_goldens(tmp_path):
  """On another backend the stages are not compared byte for byte: the oracle re-runs on the committed model and
  inputs, and a committed stage it does not reproduce (here: one logit moved by 1.0) is a problem."""
  config = dict(forward_goldens.MODELS["qwen3"]["config"], num_hidden_layers=1)
  model = forward_goldens.build_model("qwen3", config, seed=3)
  tokens = np.array([[1, 5, 9, 2]], np.int64)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens)).logits.numpy()

  def tree(name, backend, stages):
    root = tmp_path / name
    model.save_pretrained(root / "models" / "m")
    (root / "forward").mkdir()
    bundles.save_bundle(root / "forward" / "m.safetensors", stages, {"seed": 3})
    entry = {"model": "m", "dtype": "float32", "inputs": {"tokens": tokens.tolist(), "attention_mask": None}}
    manifest = {"backend": backend, "models": {"m": {}}, "goldens": {"m.safetensors": entry}}
    (root / "forward" / "MANIFEST.json").write_text(json.dumps(manifest))
    return root

  from parity_jax.oracle.hf_forward import capture_hf_stages  # noqa: PLC0415

  stages = capture_hf_stages(model, tokens)
  np.testing.assert_allclose(stages["logits"], logits, rtol=1e-5, atol=1e-5)  # the oracle is the model's forward
  fresh = tree("fresh", "B", stages)
  assert forward_goldens.compare_regenerated(tree("good", "A", stages), fresh)["problems"] == []
  bad = dict(stages, logits=stages["logits"].copy())
  bad["logits"][0, 0, 0] += np.float32(1.0)
  (problem,) = forward_goldens.compare_regenerated(tree("bad", "A", bad), fresh)["problems"]
  assert problem.startswith("forward/m.safetensors: the oracle here does not reproduce it: "), problem
