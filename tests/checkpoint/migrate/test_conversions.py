"""The migrator performing conversions (element rules: transposes, reshapes, pads, stacks, casts) from HF sides.

Expected values are others': tunix's own conversions of the committed fixtures (tests/data/conversions/tunix,
their leaves' sha256 recorded by tunix's venv in expected.json) and MaxText's layout as transcribed in
tests/helpers/maxtext_layout.py (plain numpy). The migrated checkpoints are read back with orbax itself
(``ocp.StandardCheckpointer().restore`` with an abstract tree built from those expectations).
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from parity_jax.checkpoint import migrate, open_checkpoint, verify_migration
from parity_jax.checkpoint.presets import preset_spec
from parity_jax.errors import UsageError
from tests.helpers import jobs
from tests.helpers import maxtext_layout as MT
from tests.helpers.conversion_specs import TUNIX_CONVERSIONS, TUNIX_DIR

CHUNK_MB = 0.004  # 4 KiB: most leaves of these tiny models span several chunks


def _expected(fixture: str) -> dict:
  with open(os.path.join(TUNIX_DIR, fixture, "expected.json")) as f:
    return json.load(f)


def _nest(flat: dict[tuple[str, ...], object]) -> dict:
  tree: dict = {}
  for keys, v in flat.items():
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = v
  return tree


def _restore(path, abstract: dict) -> dict[tuple[str, ...], np.ndarray]:
  """``ocp.StandardCheckpointer().restore(path, abstract)``, flattened to keys -> numpy array."""
  got = ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)
  return {tuple(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}


@pytest.mark.parametrize("fixture,conversion,cast", TUNIX_CONVERSIONS)
def test_hf_to_tunix_equals_tunix_own_conversion_and_restores(fixture, conversion, cast, tmp_path):
  hf = os.path.join(TUNIX_DIR, fixture, "hf")
  exp = _expected(fixture)
  leaves = exp["conversions"][conversion]["leaves"]
  spec = preset_spec("hf-to-tunix", hf, cast=cast)
  dest = tmp_path / "tunix"
  res = migrate(hf, dest, spec, chunk_mb=CHUNK_MB)
  assert res.n_leaves == len(leaves)
  # orbax restores it as tunix's own StandardCheckpointer save, with tunix's abstract tree
  abstract = _nest({tuple(l["keys"]): jax.ShapeDtypeStruct(tuple(l["shape"]), np.dtype(l["dtype"])) for l in leaves})
  got = _restore(dest, abstract)
  assert sorted(got) == sorted(tuple(l["keys"]) for l in leaves)
  for l in leaves:
    a = got[tuple(l["keys"])]
    assert (str(a.dtype), list(a.shape)) == (l["dtype"], l["shape"]), l["keys"]
    assert hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() == l["sha256"], l["keys"]
  # recorded as tunix's own StandardCheckpointer save records it
  meta = {}
  for d in (dest, os.path.join(TUNIX_DIR, fixture, f"tunix_{conversion}")):
    with open(os.path.join(d, "_CHECKPOINT_METADATA")) as f:
      meta[d] = json.load(f)["item_handlers"]
  assert len(set(map(str, meta.values()))) == 1, meta
  # a stacked leaf (tunix's experts) is chunked one member at a time
  ck = open_checkpoint(dest)
  for t in exp["tunix_key_map"].values():
    if "stack_axis" in t:
      meta = ck.leaves[t["stacked_into"].replace(".", "/")]
      assert meta.chunk_shape[t["stack_axis"]] == 1, (meta.path, meta.chunk_shape)
  assert verify_migration(hf, dest, spec).passed


@pytest.mark.parametrize("fixture", ["qwen3_moe_f32_sharded", "qwen2_dense_f32_tied"])
def test_hf_to_maxtext_scanned_equals_maxtext_layout(fixture, tmp_path):
  hf = os.path.join(TUNIX_DIR, fixture, "hf")
  ck = open_checkpoint(hf)
  tensors = {n: ck.read_whole(m) for n, m in ck.leaves.items()}
  cfg = _expected(fixture)["hf_config"]
  vocab = 160 if cfg.get("tie_word_embeddings") else None  # MaxText pads only a tied model's vocabulary: a pad op
  tree = MT.hf_to_maxtext(tensors, cfg, scan_layers=True, vocab_size=vocab)
  want = {("params",) + tuple(k.split("-")): v for k, v in MT.flatten(tree).items()}  # TrainState.params
  spec = preset_spec("hf-to-maxtext-scanned", hf, maxtext_vocab_size=vocab)
  dest = tmp_path / "maxtext"
  migrate(hf, dest, spec, chunk_mb=CHUNK_MB)
  got = _restore(dest, _nest({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in want.items()}))
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
  meta = open_checkpoint(dest).leaves
  for mt, src in MT.param_mapping(MT.QwenDims.from_hf_config(cfg), True).items():  # stacked leaves: per member
    if not isinstance(src, str):
      axes = (0, 1) if isinstance(src[0], list) else (MT.PARAM_SCAN_AXIS,)
      chunk = meta["params/" + mt.replace("-", "/")].chunk_shape
      assert all(chunk[a] == 1 for a in axes), (mt, chunk)
  assert verify_migration(hf, dest, spec).passed


def test_hf_to_tunix_by_a_two_process_job_equals_tunix_own_conversion(tmp_path):
  """Element targets shared between the processes of one job (each computes and writes its own)."""
  fixture = "qwen3_moe_f32_sharded"
  hf = os.path.join(TUNIX_DIR, fixture, "hf")
  leaves = _expected(fixture)["conversions"]["default"]["leaves"]
  dest, report = tmp_path / "tunix", tmp_path / "r.json"
  args = [f"--source={hf}", f"--dest={dest}", "--preset=hf-to-tunix", f"--chunk_mb={CHUNK_MB}", "--noprogress"]
  (rc0, _, e0), (rc1, _, e1) = jobs.finish(jobs.start("migrate_checkpoint", args + [f"--report={report}"]))
  assert (rc0, rc1) == (0, 0), e0 + e1
  job = json.loads(report.read_text())["distributed"]
  total = sum(int(np.prod(l["shape"])) * np.dtype(l["dtype"]).itemsize for l in leaves)
  assert all(p["bytes_written"] > 0 for p in job["per_process"])
  assert sum(p["bytes_written"] for p in job["per_process"]) == total  # each byte written once
  abstract = _nest({tuple(l["keys"]): jax.ShapeDtypeStruct(tuple(l["shape"]), np.dtype(l["dtype"])) for l in leaves})
  got = _restore(dest, abstract)
  for l in leaves:
    assert hashlib.sha256(np.ascontiguousarray(got[tuple(l["keys"])]).tobytes()).hexdigest() == l["sha256"], l["keys"]


def test_hf_to_tunix_and_back_to_sharded_safetensors_loads_in_transformers_with_the_same_logits(tmp_path):
  """A tiny random HF Qwen2 (q/k/v biases) -> tunix (orbax) -> HF safetensors in shards: transformers loads the
  result, and its logits equal the original model's bit for bit (same process, same kernels)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tests.helpers.hf import tiny_qwen

  model = tiny_qwen("qwen2", num_layers=2, init=0.2, seed=3)
  hf = tmp_path / "hf"
  model.save_pretrained(hf)
  tokens = torch.tensor(np.random.default_rng(0).integers(0, 256, (2, 9)))
  with torch.no_grad():
    want = model(tokens).logits.numpy()
  to_tunix = preset_spec("hf-to-tunix", hf)
  migrate(hf, tmp_path / "tunix", to_tunix)
  back = preset_spec("tunix-to-hf", tmp_path / "tunix", hf_config=hf)
  out = tmp_path / "back"
  migrate(tmp_path / "tunix", out, back, dest_format="safetensors", max_shard_mb=0.05, hf_config=hf / "config.json")
  with open(out / "model.safetensors.index.json") as f:
    index = json.load(f)
  shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
  assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
  per = {n: [k for k, v in index["weight_map"].items() if v == n] for n in shards}
  assert all(os.path.getsize(out / n) <= 0.05 * 2**20 + 4096 or len(per[n]) == 1 for n in shards), per  # + header
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  assert sorted(index["weight_map"]) == sorted(sd)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in sd.values())
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  for k, v in loaded.state_dict().items():
    assert v.numpy().tobytes() == sd[k].tobytes(), k
  with torch.no_grad():
    got = loaded(tokens).logits.numpy()
  assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
  assert verify_migration(tmp_path / "tunix", out, back).passed


def test_a_failed_safetensors_migration_leaves_nothing(tmp_path, monkeypatch):
  """Atomic: a write that fails half way leaves neither the destination nor a temporary beside it."""
  from parity_jax.checkpoint.migrate import to_safetensors

  def half(directory, tensors, max_shard_bytes, progress):
    (open(os.path.join(directory, "model-00001-of-00002.safetensors"), "wb")).write(b"partial")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(to_safetensors, "write_safetensors_dir", half)
  src = os.path.join(TUNIX_DIR, "qwen3_dense_f32", "tunix_default")
  spec = preset_spec("tunix-to-hf", src, hf_config=os.path.join(TUNIX_DIR, "qwen3_dense_f32", "hf"))
  with pytest.raises(UsageError, match="No space left on device"):
    migrate(src, tmp_path / "hf", spec, dest_format="safetensors")
  assert os.listdir(tmp_path) == []
