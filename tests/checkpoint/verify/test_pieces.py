"""Pieces bigger than one 8 MiB comparison window, differences at the very end of a piece, and group names by depth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity_jax.checkpoint import verify_migration
from parity_jax.checkpoint.example import example_paths
from parity_jax.checkpoint.keypath import split
from tests.helpers.ckpt import save_v0, save_v1, write_spec

ROWS, COLS = 2048, 3072  # 24 MiB of float32; --slab_mb=12 makes two pieces of 1024 rows, 12 MiB each
IDENTITY = {"rules": [{"match": "^(.*)$", "to": "\\1"}]}


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
  d = tmp_path_factory.mktemp("big")
  w = np.random.default_rng(7).standard_normal((ROWS, COLS)).astype(np.float32)
  src = save_v0(d / "src", {"w": w, "b": np.arange(5, dtype=np.int32)})
  return d, w, src, write_spec(d / "spec.json", IDENTITY)


@pytest.mark.parametrize(
    "where",
    [(ROWS // 2 - 1, COLS - 1), (ROWS - 1, COLS - 1), (ROWS // 2, 0)],
    ids=["last element of the first piece", "last element of the leaf", "first of the second"],
)
def test_a_difference_anywhere_in_a_piece_over_8_mib_is_found(big_pair, tmp_path, where):
  d, w, src, spec = big_pair
  bad = w.copy()
  bad.view(np.uint32)[where] ^= 1  # one flipped mantissa bit
  mig = save_v1(tmp_path / "mig", {"w": bad, "b": np.arange(5, dtype=np.int32)})
  report = verify_migration(src, mig, spec, slab_mb=12)
  leaf = report.leaf("w")
  assert "12.0 MiB" in leaf.read_mode or "12 MiB" in leaf.read_mode, leaf.read_mode  # pieces really are 12 MiB
  assert not report.passed and leaf.status == "VALUE_MISMATCH", leaf
  assert leaf.diff.n_diff == 1 and leaf.diff.max_abs_index == where
  assert report.leaf("b").passed


def test_the_clean_big_pair_passes_with_the_true_hash(big_pair, tmp_path):
  import hashlib

  d, w, src, spec = big_pair
  mig = save_v1(tmp_path / "mig", {"w": w, "b": np.arange(5, dtype=np.int32)})
  report = verify_migration(src, mig, spec, slab_mb=12)
  assert report.passed
  assert report.leaf("w").sha256 == hashlib.sha256(w.tobytes()).hexdigest()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_group_depth_names_the_groups(tmp_path, depth):
  source, migrated, spec_path = example_paths()
  spec = json.loads(open(spec_path).read())
  spec["group_depth"] = depth
  report = verify_migration(source, migrated, write_spec(tmp_path / "spec.json", spec))
  assert report.passed
  paths = [r.migrated_path for r in report.leaves]
  want = sorted({"/".join(split(p)[:depth]) for p in paths})
  assert sorted(report.groups) == want
  assert all(r.group == "/".join(split(r.migrated_path)[:depth]) for r in report.leaves)
  if depth > 1:
    assert len(want) > len({split(p)[0] for p in paths})  # deeper groups really are finer
