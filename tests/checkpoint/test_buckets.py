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


# ---- a safetensors or a StandardCheckpointer destination in a bucket (hand-written HF source, 3 tensors)
HF_TENSORS = {  # sorted by name: a shard limit of 100 bytes gives [a.weight] and [b.bias, c.w], by hand
    "a.weight": np.arange(128, dtype=np.float32).reshape(8, 16) - 64,
    "b.bias": np.arange(-20, 20, dtype=np.int8),
    "c.w": np.linspace(-1, 1, 16, dtype=np.float16).reshape(4, 4),
}
HF_TENSORS["a.weight"].reshape(-1)[:2] = [np.uint32(0x7FC00001).view(np.float32), np.float32(-0.0)]  # payload, -0
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
  from tests.helpers import safetensors_files as W

  d = tmp_path_factory.mktemp("hf")
  (d / "src").mkdir()
  W.write_file(d / "src" / "model.safetensors", HF_TENSORS)
  (d / "config.json").write_text(json.dumps({"model_type": "test", "n": 3}))
  return str(d / "src"), str(d / "config.json")


def test_a_half_written_bucket_destination_is_refused_then_cleaned_with_overwrite(loaded, hf_source):
  src, _ = hf_source  # 3 tiny tensors: the destination is what counts here
  dest = f"{loaded.url}/half"
  loaded.put("half/state/_METADATA", b"{}")  # what an interrupted attempt leaves: objects, no marker
  loaded.put("half/_CHECKPOINT_METADATA", b"{}")
  loaded.put("half/ocdbt.process_1/manifest.ocdbt", b"")  # a process's database (the standard layout's place)
  with pytest.raises(UsageError) as e:
    migrate(src, dest, IDENTITY)
  msg = str(e.value)
  assert "\n" not in msg and "half-written attempt (3 objects" in msg and dest in msg and "--overwrite" in msg
  keys = ["half/_CHECKPOINT_METADATA", "half/ocdbt.process_1/manifest.ocdbt", "half/state/_METADATA"]
  assert loaded.keys("half/") == keys  # untouched
  migrate(src, dest, IDENTITY, overwrite=True)  # the standard layout (from safetensors): the item at the top
  assert verify_migration(src, dest, IDENTITY).passed
  assert not [k for k in loaded.keys("half/") if k.startswith(("half/state/", "half/ocdbt.process_1/"))]
  loaded.put("other/notes.txt", b"mine")  # never deleted: not something a checkpoint writes
  with pytest.raises(UsageError, match="not a checkpoint"):
    migrate(src, f"{loaded.url}/other", IDENTITY, overwrite=True)
  assert loaded.get("other/notes.txt") == b"mine"


def _written(trace, prefix: str) -> list[str]:
  """The objects under ``prefix`` uploaded through a proxy, in order (GCS: POST ...&name=<key>; S3: PUT /<b>/<key>)."""
  import urllib.parse

  out = []
  for _, _, method, path in sorted(trace):
    if method == "POST" and "uploadType=media" in path:
      out.append(urllib.parse.unquote(urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["name"][0]))
    elif method == "PUT":
      out.append(urllib.parse.unquote(urllib.parse.urlsplit(path).path).split("/", 2)[2])
  return [k[len(prefix) :] for k in out if k.startswith(prefix)]


def test_a_safetensors_dest_in_a_bucket_is_committed_by_its_last_object(
    loaded, hf_source, tmp_path, monkeypatch, capfd
):
  """config.json first, the shards, the index last (the commit); the files are what HF's safetensors reads, and
  both tools verify them over a server that states no object sizes. Without the index: unfinished, one line."""
  from safetensors.numpy import load_file

  from tests.helpers.http_proxy import without_size_hints

  src, config = hf_source
  dest = f"{loaded.url}/hf/out"
  with loaded.emulator.proxy() as proxy:
    loaded.emulator.apply(monkeypatch, endpoint=proxy.url)
    proxy.trace = []
    result = migrate(src, dest, IDENTITY, dest_format="safetensors", max_shard_mb=100 / 2**20, hf_config=config)
    assert result.dest == dest and result.n_batches == 2
    proxy.rewrite = without_size_hints  # every shard's size found by the store's search
    rep = verify_migration(src, dest, IDENTITY)
    assert rep.passed, rep.text()
  # (read once the proxy is stopped: it records a request after answering it)
  assert _written(proxy.trace, "hf/out/") == ["config.json", *SHARDS, INDEX]
  assert loaded.keys("hf/out/") == [f"hf/out/{n}" for n in ["config.json", *SHARDS, INDEX]]
  got = tmp_path / "got"
  loaded.download_tree("hf/out", got)
  assert json.loads((got / "config.json").read_text()) == json.loads(open(config).read())
  index = json.loads((got / INDEX).read_text())
  assert index["weight_map"] == {"a.weight": SHARDS[0], "b.bias": SHARDS[1], "c.w": SHARDS[1]}
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in HF_TENSORS.values())
  read = {**load_file(str(got / SHARDS[0])), **load_file(str(got / SHARDS[1]))}
  assert {k: (v.dtype, v.shape, v.tobytes()) for k, v in read.items()} == {
      k: (v.dtype, v.shape, v.tobytes()) for k, v in HF_TENSORS.items()
  }
  # one flipped bit FAILs, naming the tensor (sizes again by search)
  flipped = bytearray((got / SHARDS[1]).read_bytes())
  flipped[-1] ^= 1  # the last byte of c.w
  for name in ["config.json", SHARDS[0], INDEX]:
    loaded.put(f"hf/bad/{name}", (got / name).read_bytes())
  loaded.put(f"hf/bad/{SHARDS[1]}", bytes(flipped))
  with loaded.emulator.proxy() as proxy:
    proxy.rewrite = without_size_hints
    loaded.emulator.apply(monkeypatch, endpoint=proxy.url)
    rep = verify_migration(src, f"{loaded.url}/hf/bad", IDENTITY)
  assert {r.migrated_path: r.status for r in rep.failures} == {"c.w": "VALUE_MISMATCH"}
  loaded.emulator.apply(monkeypatch)  # the emulator itself again
  # the commit gone: unfinished to both tools, named by the next migration, deleted only with overwrite
  loaded.emulator.delete_object(loaded.name, f"hf/out/{INDEX}")
  with pytest.raises(UsageError) as e:
    open_checkpoint(dest, "migrated checkpoint")
  assert "\n" not in str(e.value) and "is unfinished: 2 shards" in str(e.value) and INDEX in str(e.value)
  with pytest.raises(UsageError) as e:
    migrate(src, dest, IDENTITY, dest_format="safetensors")
  assert "\n" not in str(e.value) and f"{dest} holds a half-written attempt (3 objects" in str(e.value)
  assert loaded.keys("hf/out/") == [f"hf/out/{n}" for n in ["config.json", *SHARDS]]  # untouched
  migrate(src, dest, IDENTITY, dest_format="safetensors", overwrite=True)
  assert loaded.keys("hf/out/") == ["hf/out/model.safetensors"]  # one shard: the file itself is the commit
  assert verify_migration(src, dest, IDENTITY).passed
  # into a bucket a shard is held in memory: cut at the larger of the floor and the largest tensor (512 bytes)
  from parity_jax.checkpoint.migrate import to_safetensors

  monkeypatch.setattr(to_safetensors, "BUCKET_SHARD_FLOOR", 100)
  capped = migrate(src, f"{loaded.url}/hf/capped", IDENTITY, dest_format="safetensors")
  assert capped.n_batches == 2 and capped.chunk_bytes == 512
  assert f"shards of at most 512 B into {loaded.url}/hf/capped" in capfd.readouterr().err


def test_a_failed_bucket_migration_deletes_what_it_wrote(loaded, hf_source, fast_limits, monkeypatch):
  """Every upload of one object refused (503) after others were written: the orbax destination (before its commit
  marker) and the safetensors one (before its index) are deleted, one line, nothing left under the prefix."""
  src, _ = hf_source
  with loaded.emulator.proxy() as proxy:
    loaded.emulator.apply(monkeypatch, endpoint=proxy.url)
    style = "s3" if loaded.scheme == "s3" else "gcs"
    proxy.fail(503, methods=("PUT", "POST"), path_contains="_CHECKPOINT_METADATA", style=style)
    proxy.fail(503, methods=("PUT", "POST"), path_contains=SHARDS[1], style=style)
    for dest, kw in (
        ("failed/orbax", {"layout": "v1"}),
        ("failed/hf", {"dest_format": "safetensors", "max_shard_mb": 100 / 2**20}),
    ):
      with pytest.raises(UsageError) as e:
        migrate(src, f"{loaded.url}/{dest}", IDENTITY, **kw)
      assert "\n" not in str(e.value) and "server error (503)" in str(e.value), str(e.value)
  assert loaded.keys("failed/") == []


def test_the_standard_layout_into_a_bucket_restores_with_standard_checkpointer(loaded, hf_source, tmp_path):
  import jax
  import orbax.checkpoint as ocp

  src, _ = hf_source
  dest = f"{loaded.url}/std/out"
  migrate(src, dest, IDENTITY)  # layout auto: standard from a safetensors source
  keys = loaded.keys("std/out/")
  assert f"std/out/{MARKER}" in keys and "std/out/_METADATA" in keys and not [k for k in keys if "/state/" in k]
  assert verify_migration(src, dest, IDENTITY).passed
  loaded.download_tree("std/out", tmp_path / "std")
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in HF_TENSORS.items()}
  got = ocp.StandardCheckpointer().restore(tmp_path / "std", abstract)
  assert {k: (np.asarray(v).dtype, np.asarray(v).tobytes()) for k, v in got.items()} == {
      k: (v.dtype, v.tobytes()) for k, v in HF_TENSORS.items()
  }


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
