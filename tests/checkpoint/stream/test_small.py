"""Many small leaves read in batches, and a two-piece leaf compared from the buffers its hash thread filled.

Expected values are the numpy arrays written here; hashes are ``hashlib`` of
their bytes and difference statistics :func:`parity_jax.arraydiff.diff_stats`
of the whole arrays, never the verifier's own output.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from parity_jax import arraydiff
from parity_jax.checkpoint import RemapSpec, migrate, stream, verify_migration
from tests.helpers import ckpt as H

N = 300
SPEC = RemapSpec.from_rules(
    [{"match": r"^layers/(?P<i>\d+)/(?P<k>\w+)$", "to": r"model/l\g<i>/\g<k>"}, {"match": r"^step$", "to": "step"}]
)


def _tree():
  rng = np.random.default_rng(5)
  layers = {}
  for i in range(N // 3):
    layers[str(i)] = {
        "w": rng.standard_normal((8, 8)).astype(np.float32),
        "b": np.zeros((8,), np.float32),  # equal to the fill value
        "m": rng.integers(-5, 5, (3, 5)).astype(np.int8),
    }
  return {"layers": layers, "step": 12}


def _migrated(tree):
  return {"model": {f"l{i}": v for i, v in tree["layers"].items()}, "step": np.array(tree["step"], np.int64)}


@pytest.fixture(scope="module")
def many(tmp_path_factory):
  root = tmp_path_factory.mktemp("many")
  tree = _tree()
  src = H.save_v0(root / "src", tree)
  mig = root / "mig"
  migrate(src, mig, SPEC)
  return root, tree, src, mig


def test_many_small_leaves_pass_in_batches_with_exact_hashes(many):
  root, tree, src, mig = many
  rep = verify_migration(src, mig, SPEC)
  assert rep.passed and len(rep.leaves) == N + 1, rep.text()
  want = {
      f"model/l{i}/{k}": hashlib.sha256(v.tobytes()).hexdigest()
      for i, layer in tree["layers"].items()
      for k, v in layer.items()
  }
  want["step"] = hashlib.sha256(np.array(12, np.int64).tobytes()).hexdigest()
  got = {r.migrated_path: (r.sha256, r.source_sha256) for r in rep.leaves}
  assert got == {p: (h, h) for p, h in want.items()}
  sizes = []
  for r in rep.leaves:
    m = re.fullmatch(r"small: whole leaves read in a batch of (\d+) pairs; sha256 inline", r.read_mode)
    assert m, r.read_mode
    sizes.append(int(m.group(1)))
  assert max(sizes) > 1  # really batched, and each batch within its byte budget
  assert max(sizes) * 2 * 256 <= stream.SMALL_BATCH_BYTES


def _flip(a, idx, bit):
  a.view(np.uint8 if a.dtype.itemsize == 1 else np.uint32)[idx] ^= bit


FAULTS = {
    "flipped bit in a weight": ("model/l7/w", lambda t: _flip(t["model"]["l7"]["w"], (3, 4), 1 << 3)),
    "-0.0 in a zero bias": ("model/l50/b", lambda t: t["model"]["l50"]["b"].__setitem__(2, -0.0)),
    "NaN in the last leaf's batch": ("model/l99/w", lambda t: t["model"]["l99"]["w"].__setitem__((0, 0), np.nan)),
    "int8 off by one": (
        "model/l0/m",
        lambda t: t["model"]["l0"]["m"].__setitem__((2, 4), t["model"]["l0"]["m"][2, 4] + 1),
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_in_one_small_leaf_fails_exactly_that_leaf_with_whole_array_stats(many, tmp_path, fault):
  root, tree, src, mig = many
  leaf, inject = FAULTS[fault]
  good = _migrated(tree)
  bad = _migrated(H.deepcopy(tree))
  inject(bad)
  H.save_v0(tmp_path / "bad", bad)
  rep = verify_migration(src, tmp_path / "bad", SPEC)
  assert {r.migrated_path: r.status for r in rep.failures} == {leaf: "VALUE_MISMATCH"}, rep.text()
  r = rep.leaf(leaf)
  _, l, k = leaf.split("/")
  g, b = good["model"][l][k], bad["model"][l][k]
  assert r.diff.to_dict() == arraydiff.diff_stats(g, b, top_k=10).to_dict()
  assert (
      r.source_sha256 == hashlib.sha256(g.tobytes()).hexdigest() and r.sha256 == hashlib.sha256(b.tobytes()).hexdigest()
  )
  assert r.read_mode.startswith("stream: ")  # the differing pair was streamed again for its statistics


def test_an_unreadable_small_leaf_is_named(many, tmp_path):
  import orbax.checkpoint as ocp

  from parity_jax.checkpoint.formats.tstore import quiet_orbax

  root, tree, src, mig = many
  bad = tmp_path / "bad"
  with quiet_orbax():  # one directory per leaf, so that one leaf's data can be removed
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(str(bad), _migrated(tree))
  chunks = [p for p in (bad / "model.l42.w").rglob("*") if p.is_file() and p.name not in (".zarray", "zarr.json")]
  assert chunks
  for c in chunks:  # the writer (current orbax) stored every chunk: a missing one is damage
    c.unlink()
  rep = verify_migration(src, bad, SPEC)
  assert {r.migrated_path: r.status for r in rep.failures} == {"model/l42/w": "UNREADABLE"}, rep.text()


# ---- a two-piece migrated leaf, hashed and kept by the background thread ----------------------------------------

PIECE_MB = 4 / 1024  # 4 KiB pieces; the leaf is 8 KiB: two pieces


@pytest.fixture(scope="module")
def two_piece(tmp_path_factory):
  root = tmp_path_factory.mktemp("kept")
  rng = np.random.default_rng(9)
  w = rng.standard_normal((1, 32, 64)).astype(np.float32)
  tree = {"w": w, "s": np.array(3, np.int32)}
  H.save_v1(root / "src", tree)  # orbax's default: one zstd chunk per leaf
  spec = RemapSpec.from_rules([{"match": "^w$", "to": "w", "squeeze": [0]}, {"match": "^s$", "to": "s"}])
  return root, tree, spec


def _kept_migration(root, name, w2d, s):
  src = H.save_v1(root / f"{name}_src", {"w": w2d[None], "s": s})
  dest = root / name
  migrate(src, dest, RemapSpec.from_rules([{"match": "^w$", "to": "w", "squeeze": [0]}, {"match": "^s$", "to": "s"}]))
  return dest


def test_two_piece_leaf_compared_from_the_hash_threads_buffers_passes(two_piece):
  root, tree, spec = two_piece
  mig = _kept_migration(root, "good", tree["w"][0], tree["s"])
  rep = verify_migration(root / "src", mig, spec, slab_mb=PIECE_MB)
  assert rep.passed, rep.text()
  r = rep.leaf("w")
  assert "2 slab(s)" in r.read_mode and "which keeps its pieces for the comparison" in r.read_mode, r.read_mode
  assert r.sha256 == r.source_sha256 == hashlib.sha256(tree["w"][0].tobytes()).hexdigest()


@pytest.mark.parametrize("where", [(0, 0), (15, 63), (16, 0), (31, 63)])  # first/last element of each piece
def test_two_piece_leaf_fault_in_either_piece_is_caught_with_exact_stats(two_piece, where):
  root, tree, spec = two_piece
  good = tree["w"][0]
  bad = good.copy()
  bad.view(np.uint32)[where] ^= 1
  mig = _kept_migration(root, f"bad_{where[0]}_{where[1]}", bad, tree["s"])
  rep = verify_migration(root / "src", mig, spec, slab_mb=PIECE_MB)
  assert [r.migrated_path for r in rep.failures] == ["w"], rep.text()
  r = rep.leaf("w")
  assert r.status == "VALUE_MISMATCH" and r.diff.n_diff == 1 and list(r.diff.top_k[0].index) == list(where)
  got, want = r.diff.to_dict(), arraydiff.diff_stats(good, bad, top_k=10).to_dict()
  for k in ("cosine", "rel_l2", "rms_diff"):  # float64 sums over pieces: the order may change the last bits
    assert got.pop(k) == pytest.approx(want.pop(k), rel=1e-12, abs=1e-15), k
  assert got == want
  assert r.source_sha256 == hashlib.sha256(good.tobytes()).hexdigest()
  assert r.sha256 == hashlib.sha256(bad.tobytes()).hexdigest()


def _leaf(path: str, nbytes: int, dtype=np.uint8, kind: str = "array", error: str | None = None):
  from parity_jax.checkpoint.formats.base import LeafMeta

  dt = np.dtype(dtype)
  return LeafMeta(path, (path,), kind, (nbytes // dt.itemsize,), dt, None, path, "np.ndarray", error=error)


def test_small_pairs_are_batched_by_the_bytes_of_both_sides_and_the_rest_left_to_streaming():
  """Batches fill up to batch_bytes counting both sides (at least one pair each); a pair too big, of unequal size or
  dtype, unreadable or a string is not taken (the ordinary path streams it)."""
  from parity_jax.checkpoint.stream.small import SmallPairs

  ok = [(_leaf(f"s{i}", 100), _leaf(f"m{i}", 100)) for i in range(5)]  # 200 bytes a pair
  skipped = [
      (_leaf("big", 101), _leaf("big_m", 101)),  # over leaf_bytes
      (_leaf("uneven", 100), _leaf("uneven_m", 96)),
      (_leaf("u8", 100), _leaf("u16", 100, np.uint16)),
      (_leaf("bad", 100, error="unreadable"), _leaf("bad_m", 100)),
      (_leaf("str", 0, kind="string"), _leaf("str_m", 0, kind="string")),
  ]
  sp = SmallPairs(None, None, ok[:2] + skipped + ok[2:], leaf_bytes=100, batch_bytes=400)
  assert len(sp) == 5 and ("s0", "m0") in sp and ("big", "big_m") not in sp and ("s0", "m1") not in sp
  sizes = [int(re.search(r"batch of (\d+) pairs", sp.describe(f"s{i}", f"m{i}")).group(1)) for i in range(5)]
  assert sizes == [2, 2, 2, 2, 1]  # 200 + 200 fits in 400 bytes, a third pair does not
  one = SmallPairs(None, None, [(_leaf("a", 100), _leaf("b", 100))], leaf_bytes=100, batch_bytes=10)
  assert "batch of 1 pairs" in one.describe("a", "b")  # a pair over the batch size still gets a batch
  assert SmallPairs(None, None, skipped, leaf_bytes=100, batch_bytes=400).take(*skipped[0]) is None
