"""Checkpoints in buckets: the shipped example and every legacy fixture read and verified on gs:// and s3://.

Real servers on 127.0.0.1 (moto's S3 server, the GCS emulator: tests/helpers/objectstores.py); bucket contents
are put there with the emulators' own clients, never through parity_jax. Expected values come from the fixtures'
``expected.json`` (the old orbax writer's sha256 of what it saved) and from hashlib over numpy bytes.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from parity_jax import stores
from parity_jax.checkpoint import RemapSpec, example, migrate, open_checkpoint, verify_migration
from parity_jax.checkpoint.keypath import nest
from parity_jax.errors import UsageError
from tests.helpers import ckpt as H
from tests.helpers import legacy as L
from tests.helpers.objectstores import Bucket, running

MARKER = "commit_success.txt"
IDENTITY = RemapSpec.from_rules([{"match": "(.*)", "to": r"\1"}], name="identity")
SINGLE = [fx for fx in L.all_fixtures() if len(fx.items) == 1]


def _key(fx) -> str:
  return f"legacy/{fx.release}/{fx.name}/{fx.checkpoint.name}"  # the name kept: orbax 0.5 step dirs go by it


@pytest.fixture(scope="module", params=["gs", "s3"])
def loaded(request, _emulators):
  """One bucket per scheme holding the example (ex/source, ex/migrated) and every single-item legacy fixture.

  A legacy checkpoint gets the commit marker orbax writes last on a bucket (its ``CommitFileTemporaryPath``),
  as it would have had if orbax had saved it there; the example ships with its marker.
  """
  with pytest.MonkeyPatch.context() as mp:
    emu = running(request.param)
    emu.apply(mp)
    b = Bucket(emu, emu.create_bucket())
    src, mig, _ = example.example_paths()
    b.upload_tree(src, "ex/source")
    b.upload_tree(mig, "ex/migrated")
    for fx in SINGLE:
      b.upload_tree(fx.checkpoint, _key(fx))
      b.put(f"{_key(fx)}/{MARKER}", b"Checkpoint commit was successful")
    yield b


def test_the_example_verifies_on_the_bucket_and_across_bucket_and_disk(loaded):
  src, mig, spec = example.example_paths()
  rep = verify_migration(f"{loaded.url}/ex/source", f"{loaded.url}/ex/migrated", spec)
  assert rep.passed, rep.text()
  local = verify_migration(src, mig, spec)
  assert [(r.migrated_path, r.sha256) for r in rep.leaves] == [(r.migrated_path, r.sha256) for r in local.leaves]
  # the source's stored bytes are read once: requests and bytes counted by tensorstore, the endpoint named
  stored = sum(len(loaded.get(k)) for k in loaded.keys("ex/"))
  row = rep.io[loaded.scheme]
  assert 0 < row["bytes_read"] <= 1.05 * stored and row["requests"] > 0
  d = rep.to_dict()
  assert d["io"][loaded.scheme]["bytes_read"] == row["bytes_read"]
  assert d["source"]["storage"]["store"]["endpoint"] == loaded.emulator.url
  assert f"at {loaded.emulator.url}" in rep.text()
  mixed = verify_migration(src, f"{loaded.url}/ex/migrated", spec)  # one side on disk, one in the bucket
  assert mixed.passed, mixed.text()


@pytest.mark.parametrize("fx", SINGLE, ids=[fx.id for fx in SINGLE])
def test_every_legacy_layout_reads_the_saved_values_from_the_bucket(loaded, fx):
  ck = open_checkpoint(f"{loaded.url}/{_key(fx)}")
  assert ck.layout == open_checkpoint(fx.checkpoint).layout
  assert sorted(ck.leaves) == sorted(leaf.path for leaf in fx.leaves)
  for leaf in fx.leaves:
    meta = ck.leaves[leaf.path]
    assert (meta.shape, str(meta.dtype)) == (leaf.shape, leaf.dtype), leaf.path
    assert L.sha256_of(ck.read_whole(meta)) == leaf.sha256, leaf.path
    if meta.streamable and meta.shape:
      with ck.reader(meta) as r:  # a box read through a private context (the stream's path)
        half = tuple(slice(0, max(1, d // 2)) for d in meta.shape)
        np.testing.assert_array_equal(r.read(half).view(np.uint8), ck.read_whole(meta)[half].view(np.uint8))


def test_a_flipped_bit_in_a_bucket_leaf_fails_naming_the_leaf(loaded, tmp_path):
  fx = next(f for f in SINGLE if f.release == "0.10.2" and f.name == "pytree_ocdbt_zarr3")
  ck = open_checkpoint(fx.checkpoint)
  values = {p: ck.read_whole(m) for p, m in ck.leaves.items()}
  victim = "params/dense/kernel"
  bad = dict(values)
  flipped = np.array(values[victim], copy=True)
  flipped.reshape(-1).view(np.uint8)[5] ^= 1
  bad[victim] = flipped
  H.save_v0(tmp_path / "bad", nest(bad))
  loaded.upload_tree(tmp_path / "bad", "flipped/bad")
  loaded.put(f"flipped/bad/{MARKER}", b"done")
  rep = verify_migration(f"{loaded.url}/{_key(fx)}", f"{loaded.url}/flipped/bad", IDENTITY)
  assert not rep.passed
  assert {r.migrated_path: r.status for r in rep.failures} == {victim: "VALUE_MISMATCH"}
  assert victim in rep.text()


def test_without_its_commit_marker_a_bucket_checkpoint_is_unfinished(loaded):
  src, _, _ = example.example_paths()
  loaded.upload_tree(src, "nomarker/source")
  loaded.emulator.delete_object(loaded.name, f"nomarker/source/{MARKER}")
  with pytest.raises(UsageError) as e:
    open_checkpoint(f"{loaded.url}/nomarker/source", "source checkpoint")
  msg = str(e.value)
  assert "\n" not in msg and "unfinished" in msg and MARKER in msg and "nomarker/source" in msg


def test_missing_bucket_and_missing_checkpoint_are_one_line(loaded):
  for url, words in (
      (f"{loaded.scheme}://no-such-bucket-{loaded.name[-8:]}/x", "no such bucket"),
      (f"{loaded.url}/not/there", "does not exist"),
      (f"{loaded.url}/ex/source/_METADATA", "not a directory"),
  ):
    with pytest.raises(UsageError) as e:
      open_checkpoint(url, "source checkpoint")
    assert "\n" not in str(e.value) and words in str(e.value), (url, str(e.value))


@pytest.fixture
def fast_limits():
  previous = stores.set_limits(max_retries=2, initial_delay_s=0.05, max_delay_s=0.1, deadline_s=5.0, stall_s=2)
  yield
  stores.set_limits(**previous.__dict__)


def test_server_gone_mid_verify_leaves_unreadable_leaves_and_no_pass(loaded, fast_limits, monkeypatch):
  """The metadata is read, then every chunk request finds the connection dropped (the server went away)."""
  fx = next(f for f in SINGLE if f.release == "0.10.2" and f.name == "pytree_noocdbt_zarr3")
  with loaded.emulator.proxy() as proxy:
    loaded.emulator.apply(monkeypatch, endpoint=proxy.url)
    url = f"{loaded.url}/{_key(fx)}"
    src = open_checkpoint(url)  # metadata through the proxy, before the server "goes away"
    assert not src.unreadable()
    proxy.fail(0, path_contains="%2Fc%2F" if loaded.scheme == "gs" else "/c/")  # chunk keys: <leaf>/c/<i>/<j>
    rep = verify_migration(url, url, IDENTITY)
  assert not rep.passed and rep.failures
  assert {r.status for r in rep.failures} == {"UNREADABLE"}
  assert all("\n" not in r.reason for r in rep.failures)
  stored = {leaf.path for leaf in fx.leaves}
  assert {r.migrated_path for r in rep.failures} <= stored
  # the store still answers (only its chunk reads fail): it is not taken for gone, every leaf is tried
  assert not [r.reason for r in rep.failures if r.reason.startswith("not tried")]


def test_a_403_is_one_line_naming_where_credentials_came_from(loaded, fast_limits, monkeypatch):
  with loaded.emulator.proxy() as proxy:
    proxy.fail(403, style="s3" if loaded.scheme == "s3" else "gcs")
    loaded.emulator.apply(monkeypatch, endpoint=proxy.url)
    with pytest.raises(UsageError) as e:
      open_checkpoint(f"{loaded.url}/ex/source")
  msg = str(e.value)
  assert "\n" not in msg and "denied" in msg and "403" in msg, msg


def test_the_report_names_the_endpoint_and_never_a_secret(loaded, tmp_path):
  _, _, spec = example.example_paths()
  rep = verify_migration(f"{loaded.url}/ex/source", f"{loaded.url}/ex/migrated", spec)
  out = rep.write_json(tmp_path / "r.json")
  text = open(out, encoding="utf-8").read()
  assert loaded.emulator.url in text
  from tests.helpers.objectstores import FAKE_SECRET

  assert FAKE_SECRET not in text and FAKE_SECRET not in rep.text()
  assert json.loads(text)["io"][loaded.scheme]["requests"] == rep.io[loaded.scheme]["requests"]


def test_migrate_bucket_to_bucket_local_to_bucket_and_bucket_to_local_then_verify(loaded, tmp_path):
  src, _, spec = example.example_paths()
  on_bucket = f"{loaded.url}/ex/source"
  # bucket -> bucket on both stores; local -> bucket on GCS and bucket -> local on S3 (each migration costs seconds)
  third = (src, f"{loaded.url}/out/lb") if loaded.scheme == "gs" else (on_bucket, str(tmp_path / "bl"))
  for source, dest in ((on_bucket, f"{loaded.url}/out/bb"), third):
    result = migrate(source, dest, spec)
    assert result.dest == (dest if "://" in dest else os.path.abspath(dest))
    rep = verify_migration(src, dest, spec)
    assert rep.passed, (source, dest, rep.text())
  keys = loaded.keys("out/bb/")
  assert f"out/bb/{MARKER}" in keys and "out/bb/state/_METADATA" in keys


def test_a_half_written_bucket_destination_is_refused_then_cleaned_with_overwrite(loaded):
  src, _, spec = example.example_paths()
  dest = f"{loaded.url}/half"
  loaded.put("half/state/_METADATA", b"{}")  # what an interrupted attempt leaves: objects, no marker
  loaded.put("half/_CHECKPOINT_METADATA", b"{}")
  with pytest.raises(UsageError) as e:
    migrate(src, dest, spec)
  msg = str(e.value)
  assert "\n" not in msg and "half-written" in msg and dest in msg and "--overwrite" in msg
  assert loaded.keys("half/") == ["half/_CHECKPOINT_METADATA", "half/state/_METADATA"]  # untouched
  migrate(src, dest, spec, overwrite=True)
  assert verify_migration(src, dest, spec).passed
  loaded.put("other/notes.txt", b"mine")  # never deleted: not something a checkpoint writes
  with pytest.raises(UsageError, match="not a checkpoint"):
    migrate(src, f"{loaded.url}/other", spec, overwrite=True)
  assert loaded.get("other/notes.txt") == b"mine"


def test_readahead_keeps_several_chunk_reads_of_one_bucket_leaf_in_flight(gcs_bucket, tmp_path, monkeypatch):
  """``readahead=N`` on a bucket: one leaf stored as 4 zstd chunks on one side and 4 raw chunks on the other,
  every response paced to 1 MiB/s at the proxy (so that a chunk's read lasts long enough to overlap others):
  without read-ahead each side has one chunk read in flight (2 at the proxy); with 3 rows ahead, and by default
  (rows ahead on a bucket side), more; the hashes are hashlib's."""
  from tests.helpers.http_proxy import DelayProxy

  x = np.random.default_rng(3).standard_normal(1 << 17).astype(np.float32)  # 512 KiB: 4 chunks of 128 KiB
  H.save_v0(tmp_path / "src", {"w": x})
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps({"rules": [{"match": "(.*)", "to": "\\1"}]}))
  migrate(tmp_path / "src", tmp_path / "a", spec, chunk_mb=1 / 8, compression="zstd")
  migrate(tmp_path / "src", tmp_path / "b", spec, chunk_mb=1 / 8)
  a, b = gcs_bucket.upload_tree(tmp_path / "a", "ra/a"), gcs_bucket.upload_tree(tmp_path / "b", "ra/b")
  peaks = {}
  with DelayProxy(gcs_bucket.emulator.url, 0.01, stream_bytes_s=1 << 20) as proxy:
    gcs_bucket.emulator.apply(monkeypatch, endpoint=proxy.url)
    for ahead in (0, 3, None):  # None: the default, rows ahead on a bucket side
      proxy.reset_stats()
      rep = verify_migration(a, b, spec, slab_mb=1 / 32, **({} if ahead is None else {"readahead": ahead}))
      peaks[ahead] = proxy.stats()["peak_in_flight"]
      (leaf,) = rep.leaves
      assert rep.passed and leaf.sha256 == leaf.source_sha256 == hashlib.sha256(x.tobytes()).hexdigest()
      assert "chunk rows of 128.0 KiB cached" in leaf.read_mode
  assert peaks[0] <= 2 and peaks[3] >= 4 and peaks[None] >= 4, peaks
