"""The model-directory seam: a registered source turns a directory of another format into a model.

The "converted" format here is a stand-in for a conversion preset: a directory holding only a pointer file
to an HF checkpoint. The committed HF golden (made by the oracle from the original weights) must pass
through it unchanged, and a pointer to other weights must fail, named at the first divergent stage.
"""

from __future__ import annotations

import json
import os

import pytest

from parity_jax import qwen2
from parity_jax.errors import UsageError
from parity_jax.qwen2 import sources
from tests.helpers.qwen import FORWARD, MODELS


def _pointer_source() -> sources.ModelSource:
  def detect(path):
    return os.path.isfile(os.path.join(path, "pointer.json"))

  def target(path):
    return json.loads(open(os.path.join(path, "pointer.json")).read())["hf_dir"]

  return sources.ModelSource(
      "pointer",
      detect,
      lambda path: qwen2.load_config(target(path)),
      lambda path, cfg, **kw: qwen2.load_params(target(path), cfg, **kw),
  )


@pytest.fixture
def pointer():
  source = _pointer_source()
  sources.register_source(source)
  yield source
  sources.unregister_source(source)
  assert sources.sources() == (sources.HF_SOURCE,)


def test_a_registered_source_feeds_forward_parity(pointer, tmp_path):
  """Through the source: the faithful pointer passes the HF golden; one corrupted weight is named."""
  import shutil

  import numpy as np
  import safetensors.numpy

  bad_hf = tmp_path / "bad_hf"
  shutil.copytree(MODELS / "qwen3", bad_hf)
  (weights,) = bad_hf.glob("*.safetensors")
  tensors = safetensors.numpy.load_file(str(weights))
  tensors["model.layers.1.self_attn.k_norm.weight"] *= np.float32(1.5)
  safetensors.numpy.save_file(tensors, str(weights), metadata={"format": "pt"})
  good, bad = tmp_path / "converted", tmp_path / "bad"
  for d, hf in ((good, MODELS / "qwen3"), (bad, bad_hf)):
    d.mkdir()
    (d / "pointer.json").write_text(json.dumps({"hf_dir": str(hf)}))
  assert sources.model_source(good) is pointer and sources.model_source(MODELS / "qwen3") is sources.HF_SOURCE
  model, _ = sources.load_model(good)
  assert model.config.model_type == "qwen3"
  assert qwen2.forward_parity(good, FORWARD / "qwen3.safetensors").passed
  result = qwen2.forward_parity(bad, FORWARD / "qwen3.safetensors")
  assert not result.passed and result.first_divergent == "layers.1.k_norm"


def test_a_directory_no_source_recognises_goes_to_the_hf_source(tmp_path):
  """Its errors then name what an HF checkpoint misses; a missing path is refused before any source is asked."""
  (tmp_path / "empty").mkdir()
  assert sources.model_source(tmp_path / "empty") is sources.HF_SOURCE
  with pytest.raises(UsageError, match="no such checkpoint directory"):
    sources.model_source(tmp_path / "nope")
