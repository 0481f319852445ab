"""Checkpoints written by old orbax releases (0.5.10, 0.6.4, 0.10.2): opened, migrated and verified right.

The checkpoints are committed under ``tests/data/orbax_legacy`` (written by the
real releases, see its README.md); every expected value comes from their
``expected.json`` (the old writer's sha256 of the values it saved). What the
old formats look like on disk, and why each rule below holds, is in
``tests/data/orbax_legacy/FINDINGS.md``.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from parity_jax.checkpoint import RemapSpec, migrate, open_checkpoint, restore_leaves, verify_migration
from parity_jax.checkpoint.keypath import nest
from parity_jax.checkpoint.formats.orbax_layout import resolve_item_dir
from parity_jax.errors import UsageError
from tests.helpers import ckpt as H
from tests.helpers import legacy as L
from tests.helpers.files import hash_file_tree

FIXTURES = L.all_fixtures()
ITEMS = [(fx, name) for fx in FIXTURES for name in fx.item_names()]
SINGLE = [fx for fx in FIXTURES if len(fx.items) == 1]

# A renaming spec, so that the migrated side is not the source under another directory name.
SPEC = RemapSpec.from_rules(
    [{"match": r"^params/(?P<r>.+)$", "to": r"model/\g<r>"}, {"match": r"^(?!params/)(?P<r>.+)$", "to": r"\g<r>"}],
    name="legacy-rename",
)
SPEC_NO_PARAMS = RemapSpec.from_rules([{"match": r"(.+)", "to": r"\1"}], name="legacy-rename")  # the 'extra' item
IDENTITY = RemapSpec.from_rules([{"match": "(.*)", "to": r"\1"}], name="identity")


def _dest(path: str) -> str:
  return "model/" + path[len("params/") :] if path.startswith("params/") else path


# Leaves equal to the zarr fill value (0.0) in some or all of their chunks: on disk in zarr3 from orbax < 0.10
# those chunks are missing. Each fixture flips a bit in one of them and in one other leaf.
FILL_LEAVES = ("params/dense/bias", "opt_state/mu/kernel", "opt_state/nu/kernel", "params/mixed", "params/sub")


def test_fixtures_are_the_documented_set():
  assert {fx.release for fx in FIXTURES} == set(L.RELEASES)
  assert len(FIXTURES) == 30 and len(ITEMS) == 33
  # each release: OCDBT and not, zarr v2 and zarr3, and a CheckpointManager step dir
  for rel in L.RELEASES:
    names = {fx.name for fx in FIXTURES if fx.release == rel}
    assert {
        "pytree_ocdbt_zarr2",
        "pytree_noocdbt_zarr2",
        "pytree_ocdbt_zarr3",
        "pytree_noocdbt_zarr3",
        "manager_step_default",
        "manager_step_two_items",
    } <= names


@pytest.mark.parametrize("fx,item", ITEMS, ids=[f"{fx.id}:{item or 'pytree'}" for fx, item in ITEMS])
def test_every_leaf_reads_bit_exact_through_both_read_paths(fx, item):
  """tensorstore (the verifier's reader) and orbax's restore (the migrator's) both give the saved bytes."""
  item_dir, leaves = fx.items[item]
  ck = open_checkpoint(item_dir)
  assert sorted(ck.leaves) == sorted(l.path for l in leaves)
  restored = restore_leaves(ck, list(ck.leaves))
  for leaf in leaves:
    meta = ck.leaves[leaf.path]
    with ck.reader(meta) as r:
      a = r.read()
    b = restored[leaf.path]
    for got in (a, b):
      assert (str(got.dtype), got.shape, L.sha256_of(got)) == (leaf.dtype, leaf.shape, leaf.sha256), leaf.path


def _orbax_restore(item_dir) -> dict:
  """Orbax's own restore of a whole item as numpy (no parity_jax code involved), flattened."""
  import jax
  import orbax.checkpoint as ocp

  from parity_jax.checkpoint.keypath import flatten
  from parity_jax.checkpoint.formats.tstore import quiet_orbax

  with quiet_orbax():
    meta = ocp.PyTreeCheckpointer().metadata(str(item_dir)).item_metadata.tree
    ra = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    return flatten(ocp.PyTreeCheckpointer().restore(str(item_dir), args=ocp.args.PyTreeRestore(restore_args=ra)))


def _flip_one_bit(a: np.ndarray, k: int) -> np.ndarray:
  a = np.array(a, copy=True)
  flat = a.reshape(-1).view(np.uint8)
  flat[(k * 7) % flat.size] ^= 1
  return a


@pytest.mark.parametrize(
    "i,fx,item",
    [(i, fx, item) for i, (fx, item) in enumerate(ITEMS)],
    ids=[f"{fx.id}:{item or 'pytree'}" for fx, item in ITEMS],
)
def test_migrate_then_verify_passes_and_a_flipped_bit_fails_naming_the_leaf(i, fx, item, tmp_path):
  item_dir, leaves = fx.items[item]
  spec = SPEC if any(l.path.startswith("params/") for l in leaves) else SPEC_NO_PARAMS
  before = hash_file_tree(fx.dir)
  mig = tmp_path / "mig"
  migrate(item_dir, mig, spec)
  # The migrated values, read independently of the verifier, are the old writer's saved bytes.
  ck = open_checkpoint(mig)
  for leaf in leaves:
    with ck.reader(ck.leaves[_dest(leaf.path)]) as r:
      assert L.sha256_of(r.read()) == leaf.sha256, leaf.path
  rep = verify_migration(item_dir, mig, spec)
  assert rep.passed, rep.text()
  assert len(rep.leaves) == len(leaves)
  for leaf in leaves:
    r = rep.leaf(_dest(leaf.path))
    assert r.sha256 == r.source_sha256 == leaf.sha256

  # One flipped bit in a leaf whose chunks equal the fill value (missing on disk in old zarr3), one in another.
  paths = [l.path for l in leaves]
  fill = [p for p in FILL_LEAVES if p in paths]
  victims = {fill[i % len(fill)]} if fill else set()
  others = [p for p in paths if p not in victims]
  victims.add(others[i % len(others)])
  values = _orbax_restore(item_dir)
  assert {p: L.sha256_of(v) for p, v in values.items()} == {l.path: l.sha256 for l in leaves}
  bad = {_dest(p): (_flip_one_bit(v, i) if p in victims else np.asarray(v)) for p, v in values.items()}
  H.save_v0(tmp_path / "bad", nest(bad))
  rep = verify_migration(item_dir, tmp_path / "bad", spec)
  assert not rep.passed
  assert {r.migrated_path: r.status for r in rep.failures} == {_dest(p): "VALUE_MISMATCH" for p in victims}
  text = rep.text()
  assert all(_dest(p) in text for p in victims)
  assert hash_file_tree(fx.dir) == before  # the committed fixture was never written


# ---- missing chunks: the fill value, or damage, decided from the checkpoint's own metadata ---------------------


def _fixture(release: str, name: str) -> L.Fixture:
  (fx,) = [f for f in FIXTURES if f.release == release and f.name == name]
  return fx


@pytest.mark.parametrize("release", ["0.5.10", "0.6.4"])
def test_zarr3_from_orbax_before_0_10_reads_missing_chunks_as_the_fill_value(release):
  fx = _fixture(release, "pytree_noocdbt_zarr3")
  ck = open_checkpoint(fx.checkpoint)
  assert not (fx.checkpoint / "params.dense.bias" / "c").exists()  # its only chunk was never written
  assert ck.facts["missing_chunks"] == "fill value" and not ck.leaves["params/dense/bias"].strict
  with ck.reader(ck.leaves["params/dense/bias"]) as r:
    bias = r.read()
  assert bias.shape == (4, 8) and not bias.view(np.uint32).any()  # +0.0 exactly, not merely == 0
  rep = verify_migration(fx.checkpoint, fx.checkpoint, IDENTITY)
  assert rep.passed, rep.text()


@pytest.mark.parametrize(
    "release,name,leaf,chunk",
    [
        ("0.10.2", "pytree_noocdbt_zarr3", "params/dense/bias", "params.dense.bias/c/0/0"),  # flag in _METADATA
        ("0.10.2", "pytree_noocdbt_zarr3", "opt_state/nu/kernel", "opt_state.nu.kernel/c/2/0"),
        ("0.5.10", "pytree_noocdbt_zarr2", "params/mixed", "params.mixed/2.0"),  # zarr v2, fill_value null
        ("0.6.4", "manager_step_noocdbt", "opt_state/mu/kernel", "state/opt_state.mu.kernel/0.0"),
    ],
)
def test_missing_chunk_where_the_writer_stored_every_chunk_is_unreadable(tmp_path, release, name, leaf, chunk):
  fx = _fixture(release, name)
  damaged = L.copy_checkpoint(fx, tmp_path / "damaged")
  assert (damaged / chunk).is_file()
  (damaged / chunk).unlink()
  rep = verify_migration(fx.checkpoint, damaged, IDENTITY)  # the damaged copy as the migrated side
  assert {r.migrated_path: r.status for r in rep.failures} == {leaf: "UNREADABLE"}, rep.text()
  assert "missing" in rep.leaf(leaf).reason or "not found" in rep.leaf(leaf).reason.lower()
  rep = verify_migration(damaged, fx.checkpoint, IDENTITY)  # ... and as the source
  assert {r.source_path: r.status for r in rep.failures} == {leaf: "UNREADABLE"}, rep.text()


def test_zarr_v2_leaves_with_fill_value_null_are_named_only_where_chunks_could_be_left_out(tmp_path):
  """The same zarr v2 leaves (some with fill_value null): left-out chunks read as the fill value without the flag,
  so the null ones are named as strict; with the flag recorded true every leaf is strict, and nothing is named."""
  fx = _fixture("0.5.10", "pytree_noocdbt_zarr2")
  facts = open_checkpoint(fx.checkpoint).facts
  assert facts["missing_chunks"] != "fill value" and "have fill_value null" in facts["missing_chunks_decided_by"]
  flagged = L.copy_checkpoint(fx, tmp_path / "flagged")
  meta = json.loads((flagged / "_METADATA").read_text())
  assert "store_array_data_equal_to_fill_value" not in meta and "use_ocdbt" not in meta
  meta["store_array_data_equal_to_fill_value"] = True
  (flagged / "_METADATA").write_text(json.dumps(meta))
  ck = open_checkpoint(flagged)
  assert ck.facts["missing_chunks"] == "error" and all(leaf.strict for leaf in ck.leaves.values())
  assert ck.facts["missing_chunks_decided_by"] == "_METADATA store_array_data_equal_to_fill_value: true"


def test_migrator_refuses_a_source_with_a_missing_chunk_where_every_chunk_was_stored(tmp_path):
  fx = _fixture("0.10.2", "pytree_noocdbt_zarr3")
  damaged = L.copy_checkpoint(fx, tmp_path / "damaged")
  (damaged / "params.dense.bias" / "c" / "0" / "0").unlink()
  with pytest.raises(UsageError, match=re.escape("params/dense/bias")):
    migrate(damaged, tmp_path / "out", IDENTITY)
  assert not (tmp_path / "out").exists()
  # nor the hidden temporary the migration wrote into before the read failed
  assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]


def test_migrate_tool_on_a_damaged_source_prints_one_line_only(tmp_path):
  """orbax's failed restore leaves tensorstore callbacks behind ('Event loop is closed'); none may reach stderr."""
  fx = _fixture("0.10.2", "pytree_noocdbt_zarr3")
  damaged = L.copy_checkpoint(fx, tmp_path / "damaged")
  (damaged / "params.dense.bias" / "c" / "0" / "0").unlink()  # its metadata opens; its data read fails mid-batch
  spec = H.write_spec(tmp_path / "id.json", {"rules": [{"match": "(.*)", "to": r"\1"}]})
  for _ in range(2):  # the stray callbacks race with the exit; two runs make it likely to show if unfixed
    proc = H.run_tool(
        "migrate_checkpoint", f"--source={damaged}", f"--dest={tmp_path / 'out'}", f"--spec={spec}", "--noprogress"
    )
    lines = H.stderr_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "params/dense/bias" in lines[0]
  assert not (tmp_path / "out").exists()


def test_lost_data_chunk_in_an_old_zarr3_checkpoint_is_a_value_mismatch(tmp_path):
  """Where a missing chunk means the fill value, losing a chunk that held data shows as differing values."""
  fx = _fixture("0.6.4", "pytree_noocdbt_zarr3")
  damaged = L.copy_checkpoint(fx, tmp_path / "damaged")
  (damaged / "params.mixed" / "c" / "1" / "0").unlink()  # rows 2-3: not zero
  rep = verify_migration(fx.checkpoint, damaged, IDENTITY)
  assert {r.migrated_path: r.status for r in rep.failures} == {"params/mixed": "VALUE_MISMATCH"}, rep.text()
  assert rep.leaf("params/mixed").diff.n_diff == 16


# ---- step directories, several items, other libraries' layouts ----------------------------------------------


@pytest.mark.parametrize("release", L.RELEASES)
def test_step_directory_with_one_item_is_used_even_without_a_marker(release):
  for name, item in (
      ("manager_step_default", "default"),
      ("manager_step_legacy_api", "default"),
      ("manager_step_noocdbt", "state"),
  ):
    fx = _fixture(release, name)
    item_dir, layout = resolve_item_dir(fx.checkpoint)
    assert (item_dir, layout) == (str(fx.checkpoint / item), "step")
    if release == "0.5.10":
      assert not (fx.checkpoint / "_CHECKPOINT_METADATA").exists()
      assert "orbax 0.5" in open_checkpoint(fx.checkpoint).facts["container"]


@pytest.mark.parametrize("release", L.RELEASES)
def test_step_directory_with_two_items_is_refused_naming_them(release):
  fx = _fixture(release, "manager_step_two_items")
  with pytest.raises(UsageError, match=r"holds 2 PyTree items \(extra, state\); pass one of them"):
    resolve_item_dir(fx.checkpoint, "source checkpoint")


def test_unmarked_directories_that_are_not_step_directories_are_still_refused(tmp_path):
  fx = _fixture("0.5.10", "manager_step_default")
  with pytest.raises(UsageError, match="looks like a CheckpointManager directory"):
    resolve_item_dir(fx.checkpoint.parent)  # the CheckpointManager root
  (tmp_path / "experiments").mkdir()
  os.symlink(fx.checkpoint / "default", tmp_path / "experiments" / "run")
  with pytest.raises(UsageError, match=r"is not an Orbax checkpoint but holds one or more \(run\); pass it directly"):
    resolve_item_dir(tmp_path / "experiments")


def _flax_msgpack(path):
  from flax import serialization

  path.write_bytes(serialization.to_bytes({"params": {"w": np.ones((2, 2), np.float32)}}))
  return path


@pytest.mark.parametrize("case", ["flax msgpack file", "flax checkpoints dir", "pre-_METADATA orbax", "pytorch dir"])
def test_layouts_of_other_libraries_get_one_line_naming_them_and_what_is_supported(tmp_path, case):
  d = tmp_path / "ck"
  d.mkdir()
  if case == "flax msgpack file":
    target, want = _flax_msgpack(d / "checkpoint_100"), "a flax msgpack checkpoint file"
  elif case == "flax checkpoints dir":
    _flax_msgpack(d / "checkpoint_100")
    target, want = d, "a directory of flax msgpack checkpoints (e.g. checkpoint_100)"
  elif case == "pre-_METADATA orbax":
    _flax_msgpack(d / "checkpoint")
    target, want = d, "a pre-_METADATA Orbax/flax checkpoint"
  else:  # a safetensors directory is a checkpoint format of its own (tests/checkpoint/formats/test_safetensors.py)
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    target, want = d, "a PyTorch / Hugging Face model directory"
  for tool_call in (
      lambda: verify_migration(target, target, IDENTITY),
      lambda: migrate(target, tmp_path / "o", IDENTITY),
  ):
    with pytest.raises(UsageError) as e:
      tool_call()
    msg = str(e.value)
    assert "\n" not in msg and "is not an Orbax checkpoint but " + want in msg, msg
    assert "supported: Orbax PyTree checkpoints" in msg and "CheckpointManager step dir" in msg
    assert len(msg) - len(str(target)) < 280
  assert not (tmp_path / "o").exists()


# ---- leaf-name collisions in the source -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def colliding(tmp_path_factory):
  """orbax (current) saves both without a word; both leaves then restore the same array."""
  root = tmp_path_factory.mktemp("collide")
  tree = {
      "a.b": {"c": np.arange(4, dtype=np.float32)},
      "a": {"b.c": np.ones(4, np.float32)},
      "z": np.zeros(3, np.int32),
  }
  return H.save_v0(root / "src", tree), root


def test_colliding_leaf_names_in_the_source_are_refused_by_both_tools_naming_both_keys(colliding, tmp_path):
  src, root = colliding
  spec = RemapSpec.from_rules(
      [{"match": "^a\\.b/c$", "to": "x/c"}, {"match": "^a/b\\.c$", "to": "y/c"}, {"match": "^z$", "to": "z"}]
  )
  for call in (lambda: migrate(src, tmp_path / "out", spec), lambda: verify_migration(src, src, IDENTITY)):
    with pytest.raises(UsageError) as e:
      call()
    msg = str(e.value)
    assert "'a.b/c'" in msg and "'a/b.c'" in msg and "'a.b.c'" in msg and "\n" not in msg, msg
  assert not (tmp_path / "out").exists()


def test_colliding_leaf_names_in_the_migrated_checkpoint_fail(colliding, tmp_path):
  src, root = colliding
  good = H.save_v0(tmp_path / "good", {"p": np.arange(4, dtype=np.float32), "z": np.zeros(3, np.int32)})
  spec = RemapSpec.from_rules([{"match": "^p$", "to": "a.b/c"}, {"match": "^z$", "to": "z"}])
  rep = verify_migration(good, src, spec)
  assert {r.migrated_path: r.status for r in rep.failures} == {"a.b/c": "UNREADABLE", "a/b.c": "EXTRA"}, rep.text()
  assert "'a/b.c'" in rep.leaf("a.b/c").reason
  assert rep.leaf("z").passed


def test_colliding_source_via_both_tools_exits_2_with_one_line(colliding, tmp_path):
  src, root = colliding
  spec = H.write_spec(tmp_path / "id.json", {"rules": [{"match": "(.*)", "to": r"\1"}]})
  for tool, args in (
      ("migrate_checkpoint", [f"--dest={tmp_path / 'out'}"]),
      ("verify_migration", [f"--migrated={src}"]),
  ):
    proc = H.run_tool(tool, f"--source={src}", f"--spec={spec}", "--noprogress", *args)
    lines = H.stderr_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", proc.stdout + proc.stderr
    assert "'a.b/c'" in lines[0] and "'a/b.c'" in lines[0], lines[0]
  assert not (tmp_path / "out").exists()


# ---- the report says how each side was read ---------------------------------------------------------------------


def test_report_records_the_layout_facts_of_each_side(tmp_path):
  import orbax.checkpoint  # noqa: F401
  from importlib.metadata import version

  fx = _fixture("0.6.4", "pytree_noocdbt_zarr3")
  migrate(fx.checkpoint, tmp_path / "mig", SPEC)
  rep = verify_migration(fx.checkpoint, tmp_path / "mig", SPEC)
  d = json.loads(rep.to_json())
  src, mig = d["source"]["storage"], d["migrated"]["storage"]
  assert src["ocdbt"] is False and "manifest.ocdbt absent" in src["ocdbt_decided_by"]
  assert src["zarr_format"] == 3 and src["missing_chunks"] == "fill value"
  assert "store_array_data_equal_to_fill_value" in src["missing_chunks_decided_by"]
  assert src["orbax_version"] is None and src["orbax_version_hint"] == "orbax < 0.10.0"
  assert {g["storage"] for g in src["leaf_storage"]} == {
      "zstd, 1 chunk, missing chunk = fill value",
      "zstd, 4 chunks, missing chunk = fill value",
  }
  assert mig["ocdbt"] is True and mig["zarr_format"] == 3 and mig["missing_chunks"] == "error"
  assert mig["orbax_version"] == version("orbax-checkpoint")
  assert sum(g["leaves"] for g in mig["leaf_storage"]) == 17
  assert "one directory per leaf, zarr 3, zstd; missing chunks: fill value; orbax < 0.10.0" in rep.text()
