"""The shipped example (parity_jax/checkpoint/example_data): integrity, size, deterministic regeneration."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from tests.helpers import ckpt as H
from parity_jax import arraydiff
from parity_jax.checkpoint import RemapSpec, open_checkpoint, restore_leaves, verify_migration
from parity_jax.checkpoint.example import example_source_tree, example_spec_dict, leaf_sha256, write_example
from parity_jax.checkpoint.keypath import flatten


def _manifest():
  return json.loads((H.EXAMPLE / "MANIFEST.json").read_text())


def test_manifest_lists_every_file_with_its_sha256_and_the_example_is_small():
  m = _manifest()
  files = {str(p.relative_to(H.EXAMPLE)): p for p in H.EXAMPLE.rglob("*") if p.is_file() and p.name != "MANIFEST.json"}
  assert sorted(files) == sorted(m["files"])
  for rel, p in files.items():
    assert hashlib.sha256(p.read_bytes()).hexdigest() == m["files"][rel], rel
  assert sum(p.stat().st_size for p in H.EXAMPLE.rglob("*") if p.is_file()) < 1_000_000
  assert m["provenance"]["seed"] and m["provenance"]["versions"]["orbax-checkpoint"]


def test_shipped_source_is_the_documented_tree_and_spec():
  """The committed source checkpoint holds exactly example_source_tree(seed) (bit for bit)."""
  m = _manifest()
  tree = flatten(example_source_tree(m["provenance"]["seed"]))
  ck = open_checkpoint(H.EXAMPLE / "source")
  assert ck.layout == "v0" and sorted(ck.leaves) == sorted(tree)
  vals = restore_leaves(ck, list(ck.leaves))
  for p, v in tree.items():
    assert arraydiff.bit_equal(vals[p], np.asarray(v)), p
    assert m["source_leaves"][p]["sha256"] == leaf_sha256(v)
  assert RemapSpec.from_json(H.EXAMPLE / "spec.json").to_dict() == RemapSpec.from_dict(example_spec_dict()).to_dict()
  # V and U differ in shape (swaps cannot hide), gate and up share shapes (only values tell them apart)
  v, u = ck.leaves["components/0/g/V"], ck.leaves["components/0/g/U"]
  assert v.shape != u.shape and v.shape[0] == u.shape[0] == 1
  assert ck.leaves["components/0/u/V"].shape == v.shape
  assert open_checkpoint(H.EXAMPLE / "migrated").layout == "v1"


def test_regeneration_is_deterministic_in_values(tmp_path):
  out = tmp_path / "ex"
  proc = H.run_tool("make_example_checkpoint", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  fresh = json.loads((out / "MANIFEST.json").read_text())
  assert fresh["source_leaves"] == _manifest()["source_leaves"]
  rep = verify_migration(out / "source", out / "migrated", out / "spec.json")
  assert rep.passed
  shipped = verify_migration(H.EXAMPLE / "source", H.EXAMPLE / "migrated", H.EXAMPLE / "spec.json")
  assert [(r.migrated_path, r.sha256) for r in rep.leaves] == [(r.migrated_path, r.sha256) for r in shipped.leaves]
  # a previous example is replaced whole: nothing of it is left, neither inside nor beside the new one
  (out / "stale.txt").write_text("from the previous example")
  paths = write_example(out, seed=fresh["provenance"]["seed"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"]
  assert (
      sorted(p.name for p in out.iterdir())
      == sorted(p.name for p in paths)
      == sorted(["MANIFEST.json", "migrated", "source", "spec.json"])
  )
  text = (out / "MANIFEST.json").read_text()
  assert json.loads(text)["source_leaves"] == fresh["source_leaves"]
  assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"  # the shipped file's layout


def test_regeneration_refuses_to_replace_unrelated_directories(tmp_path):
  (tmp_path / "precious.txt").write_text("keep")
  proc = H.run_tool("make_example_checkpoint", f"--out={tmp_path}")
  assert proc.returncode == 2 and "refusing to replace it" in proc.stderr
  assert (tmp_path / "precious.txt").read_text() == "keep"


def test_write_example_refuses_a_file_or_a_missing_parent_and_a_failed_write_keeps_the_previous_one(tmp_path):
  import pytest

  from parity_jax.errors import UsageError

  (tmp_path / "f").write_text("x")
  with pytest.raises(UsageError, match=f"^out={tmp_path / 'f'} exists and is not a directory$"):
    write_example(tmp_path / "f")
  with pytest.raises(UsageError, match=f"^out: directory {tmp_path / 'nowhere'} does not exist$"):
    write_example(tmp_path / "nowhere" / "ex")
  out = tmp_path / "ex"
  out.mkdir()
  (out / "MANIFEST.json").write_text(json.dumps({"format": "parity_jax.example_checkpoints/1", "mark": "previous"}))
  before = (out / "MANIFEST.json").read_text()
  with pytest.raises(TypeError):
    write_example(out, seed="not a seed")  # the write fails part way
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ex", "f"]  # the previous example back, nothing beside it
  assert sorted(p.name for p in out.iterdir()) == ["MANIFEST.json"] and (out / "MANIFEST.json").read_text() == before
