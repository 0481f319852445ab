"""Bucket stores against the real emulators (moto's S3 server, the GCS emulator): every method, tensorstore's
zarr3 and OCDBT drivers on kvstore_spec/context_spec, concurrent reads, and every fault class as one line.

Bucket contents are set up and checked with the emulator helpers (boto3 / plain HTTP), never through the
store under test. Faults the emulators cannot produce (403 on GCS, throttling, 5xx, a stalled or vanished
server) come from a DelayProxy in front of the real emulator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from parity_jax import stores
from parity_jax.stores import StoreError, open_store
from tests.helpers.tools import ROOT


@pytest.fixture
def fast_limits():
  """Short retries and deadlines, so that fault tests take a second, not the product's ~20 s."""
  previous = stores.set_limits(max_retries=3, initial_delay_s=0.05, max_delay_s=0.2, deadline_s=3.0)
  yield stores.limits()
  stores.set_limits(**previous.__dict__)


def _one_line(e: StoreError, kind: str, *words: str) -> str:
  text = str(e)
  assert e.kind == kind, (e.kind, text)
  assert "\n" not in text and len(text) <= 300, text
  for w in words:
    assert w in text, (w, text)
  return text


def test_objects_roundtrip(bucket):
  root = open_store(bucket.url).child("ck")
  data = bytes(range(256)) * 40 + b"tail"
  root.child("a", "x.bin").write_bytes(data)
  root.child("a/b/y.bin").write_bytes(b"y")
  root.child("orbax.checkpoint").write_bytes(b"")  # an empty marker object
  bucket.put("ck/c/z.bin", b"from the emulator side")
  # what the server holds, seen without the store
  assert bucket.keys("ck/") == ["ck/a/b/y.bin", "ck/a/x.bin", "ck/c/z.bin", "ck/orbax.checkpoint"]
  assert bucket.get("ck/a/x.bin") == data and bucket.get("ck/orbax.checkpoint") == b""
  x = root.child("a/x.bin")
  assert x.read_bytes() == data and root.child("c/z.bin").read_bytes() == b"from the emulator side"
  assert [x.read_range(a, b) for a, b in [(0, 1), (7, 4000), (10000, 10244)]] == [
      data[0:1],
      data[7:4000],
      data[10000:10244],
  ]
  assert x.read_range(5, 5) == b""
  assert x.size() == len(data) and root.child("orbax.checkpoint").size() == 0
  assert root.child("a/b/y.bin").size() == 1
  assert root.listdir() == (["orbax.checkpoint"], ["a", "c"]) and root.child("a").listdir() == (["x.bin"], ["b"])
  assert open_store(bucket.url).listdir() == ([], ["ck"])
  assert (x.is_file(), x.is_dir(), x.exists()) == (True, False, True)
  assert (root.is_file(), root.is_dir(), root.exists()) == (False, True, True)
  assert not root.child("a/x").exists() and not root.child("zz").exists()
  assert open_store(bucket.url).is_dir()


def test_missing_things_and_ranges_past_the_end(bucket):
  root = open_store(bucket.url)
  bucket.put("f", b"0123456789")
  with pytest.raises(StoreError) as e:
    root.child("f").read_range(8, 12)
  _one_line(e.value, "out_of_range", f"{bucket.url}/f: bytes [8, 12) lie past its end (size 10)")
  with pytest.raises(StoreError) as e:
    root.child("nope").read_bytes()
  _one_line(e.value, "not_found", f"{bucket.url}/nope: no such object")
  with pytest.raises(StoreError) as e:
    root.child("nope").size()
  _one_line(e.value, "not_found", "no such object")
  with pytest.raises(StoreError) as e:
    root.child("nope").listdir()
  _one_line(e.value, "not_found", "no such directory")
  with pytest.raises(StoreError) as e:
    root.child("f").listdir()
  _one_line(e.value, "invalid", "is an object, not a directory")
  with pytest.raises(StoreError) as e:
    root.read_bytes()
  _one_line(e.value, "invalid", "a bucket's root is not an object")


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_missing_bucket(scheme, _emulators, monkeypatch):
  from tests.helpers.objectstores import running

  running(scheme).apply(monkeypatch)
  calls = (
      lambda s: s.child("x").read_bytes(),
      lambda s: s.child("x").size(),  # a probe of a byte range: the same answer
      lambda s: s.listdir(),
      lambda s: s.child("x").write_bytes(b"1"),
  )
  for call in calls:
    with pytest.raises(StoreError) as e:
      call(open_store(f"{scheme}://no-such-bucket-here"))
    _one_line(e.value, "not_found", f"{scheme}://no-such-bucket-here: no such bucket")
  assert not open_store(f"{scheme}://no-such-bucket-here").is_dir()
  assert open_store(f"{scheme}://no-such-bucket-here").ping() is None  # the endpoint answered ("no such bucket")


def test_delete(bucket):
  root = open_store(bucket.url)
  for k in ("ck/a/1", "ck/a/2", "ck/b", "ck2/keep", "ck"):
    bucket.put(k, k.encode())
  with pytest.raises(StoreError) as e:
    root.child("ck").delete()
  _one_line(e.value, "invalid", "is a directory")
  root.child("ck/b").delete()
  assert bucket.keys() == ["ck", "ck/a/1", "ck/a/2", "ck2/keep"]
  root.child("ck").delete(recursive=True)  # the prefix and the object of the same name; not ck2/
  assert bucket.keys() == ["ck2/keep"]
  with pytest.raises(StoreError) as e:
    root.child("ck").delete(recursive=True)
  _one_line(e.value, "not_found", "no such object or directory")
  root.child("ck").delete(recursive=True, missing_ok=True)


def test_tensorstore_zarr3_and_ocdbt_read_and_write_through_the_spec(bucket):
  import tensorstore as ts

  root = open_store(bucket.url).child("arrays")
  ctx = ts.Context(root.context_spec())
  a = np.arange(40 * 13, dtype=np.float32).reshape(40, 13) * np.float32(0.5) - 7
  layout = ts.ChunkLayout(chunk_shape=[16, 13])
  z3 = {"driver": "zarr3", "kvstore": root.child("z3").kvstore_spec()}
  ts.open(z3, create=True, dtype=ts.float32, shape=a.shape, chunk_layout=layout, context=ctx).result().write(a).result()
  # orbax's layout: zarr3 arrays inside one OCDBT database
  oc = {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": root.child("oc").kvstore_spec(), "path": "w/"}}
  ts.open(oc, create=True, dtype=ts.float32, shape=a.shape, chunk_layout=layout, context=ctx).result().write(a).result()
  ctx2 = ts.Context(root.context_spec())
  for spec in (z3, oc):
    got = ts.open(spec, context=ctx2).result().read().result()
    assert got.dtype == a.dtype and got.tobytes() == a.tobytes()
  keys = bucket.keys("arrays/")
  assert "arrays/z3/zarr.json" in keys and "arrays/z3/c/2/0" in keys
  assert "arrays/oc/manifest.ocdbt" in keys and any(k.startswith("arrays/oc/d/") for k in keys)
  assert root.child("oc").listdir()[1] == ["d"]


def test_many_reads_are_in_flight_at_once(bucket, monkeypatch):
  n, size = 48, 4096
  blobs = [bytes([i]) * size for i in range(n)]
  for i, b in enumerate(blobs):
    bucket.put(f"leaves/{i:03d}", b)
  with bucket.emulator.proxy(delay_s=0.05) as proxy:
    bucket.emulator.apply(monkeypatch, endpoint=proxy.url)
    root = open_store(bucket.url).child("leaves")
    root.child("000").read_range(0, 1)  # first use of the bucket through the proxy
    proxy.reset_stats()
    out = stores.read_many([(root.child(f"{i:03d}"), 100, 356) for i in range(n)])
    stats = proxy.stats()
  assert out == [b[100:356] for b in blobs]
  assert stats["requests"] == n
  assert stats["peak_in_flight"] >= 8 and stats["mean_in_flight"] >= 4, stats


def test_io_stats_count_requests_and_bytes(bucket):
  bucket.put("d/f", bytes(5000))
  f = open_store(bucket.url).child("d/f")
  f.read_range(0, 1)  # the bucket check happens once, before the counted reads
  before = stores.io_stats()
  f.read_range(0, 1000)
  f.read_range(1000, 3000)
  open_store(bucket.url).child("d/g").write_bytes(b"x" * 300)
  # tensorstore's bytes_written metric was seen at 0 right after an S3 write had returned (a loaded machine, once
  # in a few runs): the counts are read once that metric holds the write (waiting at most a second)
  deadline = time.monotonic() + 1.0
  while (d := stores.io_stats(since=before))[bucket.scheme]["bytes_written"] < 300 and time.monotonic() < deadline:
    time.sleep(0.01)
  row = d[bucket.scheme]
  assert row["reads"] == 2 and row["bytes_read"] == 3000 and row["writes"] == 1 and row["bytes_written"] == 300
  assert row["requests"] == 3 and d["requests"] == 3 and d["http"]["requests"] >= 3


def test_describe_names_the_endpoint_and_the_credentials_tensorstore_logged(gcs_bucket):
  """tensorstore logs the GCS credentials it picked once per process (its auth provider is shared): a fresh one."""
  gcs_bucket.put("d/f", b"1")
  code = (
      "import json, sys; from parity_jax.stores import open_store; f = open_store(sys.argv[1]); "
      "assert f.read_bytes() == b'1'; print(json.dumps(f.describe()))"
  )
  p = subprocess.run(
      [sys.executable, "-c", code, gcs_bucket.url + "/d/f"], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert p.returncode == 0, p.stderr
  d = json.loads(p.stdout)
  assert (d["scheme"], d["url"], d["bucket"], d["path"]) == ("gs", gcs_bucket.url + "/d/f", gcs_bucket.name, "d/f")
  assert d["credentials"] == "none (emulator: a dummy token)"
  # google_auth_provider.cc logs "Using GOOGLE_AUTH_TOKEN_FOR_TESTING": its message, without the absl prefix
  # ("I1207 06:50:13.370 18330 google_auth_provider.cc:136]")
  assert d["credentials_found"] == "Using GOOGLE_AUTH_TOKEN_FOR_TESTING"


# ---- faults: one line, a kind, bounded time
def test_denied_is_one_line_naming_the_credentials_source(bucket, monkeypatch, fast_limits):
  with bucket.emulator.proxy() as proxy:
    proxy.fail(403, style="s3" if bucket.scheme == "s3" else "gcs")
    bucket.emulator.apply(monkeypatch, endpoint=proxy.url)
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
      open_store(bucket.url).child("x").read_bytes()
    elapsed = time.monotonic() - t0
  text = _one_line(e.value, "denied", bucket.url, "access denied (403)", "with credentials from")
  assert elapsed < 2.0  # a 403 is not retried
  assert "parity-test-secret-value" not in text


def test_a_size_probe_refused_is_one_line(bucket, monkeypatch, fast_limits):
  """size() asks for a byte range (no request states a size on every server): its refusal is the read's line."""
  bucket.put("f", b"payload")
  with bucket.emulator.proxy() as proxy:
    bucket.emulator.apply(monkeypatch, endpoint=proxy.url)
    f = open_store(bucket.url).child("f")
    assert f.size() == 7  # the bucket checked, the size found
    proxy.fail(403, style="s3" if bucket.scheme == "s3" else "gcs")
    with pytest.raises(StoreError) as e:
      f.size()
  _one_line(e.value, "denied", f"{bucket.url}/f: access denied (403) to read it with credentials from")


def test_s3_wrong_credentials_are_refused_by_moto(s3_bucket, monkeypatch, fast_limits):
  open_store(s3_bucket.url).child("x").write_bytes(b"1")  # the bucket is fine with auth off
  monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEYWRONGKEY")
  s3_bucket.emulator.enforce_auth(True)
  try:
    with pytest.raises(StoreError) as e:
      open_store(s3_bucket.url).child("x").read_bytes()
  finally:
    s3_bucket.emulator.enforce_auth(False)
  _one_line(e.value, "denied", "access denied (403)", "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")


def test_transient_errors_are_retried(bucket, monkeypatch, fast_limits):
  bucket.put("f", b"payload")
  with bucket.emulator.proxy() as proxy:
    bucket.emulator.apply(monkeypatch, endpoint=proxy.url)
    f = open_store(bucket.url).child("f")
    assert f.read_bytes() == b"payload"
    before = stores.io_stats()
    proxy.fail(503, count=1)
    proxy.fail(429, count=1)
    assert f.read_bytes() == b"payload"
  assert stores.io_stats(since=before)[bucket.scheme]["retries"] == 2


@pytest.mark.parametrize("status, words", [(503, "server error (503)"), (429, "throttled (429)")])
def test_persistent_throttling_ends_in_one_line(bucket, monkeypatch, fast_limits, status, words):
  bucket.put("f", b"payload")
  with bucket.emulator.proxy() as proxy:
    bucket.emulator.apply(monkeypatch, endpoint=proxy.url)
    f = open_store(bucket.url).child("f")
    f.read_range(0, 1)
    proxy.fail(status, style="s3" if bucket.scheme == "s3" else "gcs")
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
      f.read_bytes()
    elapsed = time.monotonic() - t0
  _one_line(e.value, "unavailable", f"{bucket.url}/f", words, "after 3 attempts")
  assert elapsed < 3.0  # 3 attempts, 0.05 + 0.1 s apart plus jitter


def test_server_gone_is_one_line(bucket, monkeypatch, fast_limits):
  bucket.put("f", b"payload")
  proxy = bucket.emulator.proxy()
  bucket.emulator.apply(monkeypatch, endpoint=proxy.url)
  f = open_store(bucket.url).child("f")
  assert f.read_bytes() == b"payload"
  assert f.ping() is None  # it answers
  proxy.stop()  # the server goes away mid-run: connections are refused
  t0 = time.monotonic()
  with pytest.raises(StoreError) as e:
    f.read_bytes()
  _one_line(e.value, "unreachable", f"cannot reach {proxy.url} (connection refused)", "after 3 attempts")
  assert time.monotonic() - t0 < 3.0
  # ping: one read at tensorstore's smallest retry bound, the same one-line reason without a count of attempts
  before = stores.io_stats()
  gone = f.ping()
  _one_line(gone, "unreachable", f"{bucket.url}: cannot reach {proxy.url} (connection refused)")
  io = stores.io_stats(since=before)
  assert "attempts" not in str(gone)
  assert io[bucket.scheme]["reads"] == 1 and io["http"]["requests"] <= 2, io  # tensorstore's least retrying
  with pytest.raises(StoreError) as e:
    open_store(bucket.url).child("g").write_bytes(b"1")
  _one_line(e.value, "unreachable", "connection refused")


def test_a_stalled_server_hits_the_deadline(bucket, monkeypatch, fast_limits):
  bucket.put("f", b"payload")
  stores.set_limits(deadline_s=0.5)  # a store takes the limits in force when it is made
  with bucket.emulator.proxy() as proxy:
    bucket.emulator.apply(monkeypatch, endpoint=proxy.url)
    f = open_store(bucket.url).child("f")
    f.read_range(0, 1)
    proxy.fail(503, stall_s=5, count=1)
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
      f.read_bytes()
    elapsed = time.monotonic() - t0
    assert f.ping() is None  # its first call checks the bucket (that check's own deadline); then one read
    proxy.fail(503, stall_s=5, count=2)  # ping: at most two attempts, each stalled past the deadline
    t0 = time.monotonic()
    stalled = f.ping()
    pinged = time.monotonic() - t0
  _one_line(e.value, "timeout", f"{bucket.url}/f: no answer from {proxy.url} to a read within")
  assert 0.4 < elapsed < 2.0
  _one_line(stalled, "timeout", f"{bucket.url}: {bucket.url}/f: no answer from {proxy.url} to a read within")
  assert 0.4 < pinged < 2.0


def test_the_kvstore_path_of_a_bucket_root_a_directory_and_an_object():
  # no server needed: the spec is built from the URL alone
  for scheme in ("gs", "s3"):
    root, d = open_store(f"{scheme}://bkt"), open_store(f"{scheme}://bkt/a/b")
    assert (root.kvstore_spec()["bucket"], root.kvstore_spec()["path"]) == ("bkt", "")  # the bucket itself, no "/"
    assert root.kvstore_spec(as_dir=False)["path"] == ""
    assert d.kvstore_spec()["path"] == "a/b/" and d.kvstore_spec(as_dir=False)["path"] == "a/b"


def test_sizes_found_by_search_when_the_server_states_none(bucket, monkeypatch):
  """A server whose answers never state an object's size (a proxy strips Content-Range's complete length and S3's
  <ActualObjectSize>): size() finds it with one-byte range reads, for sizes around the search's powers of two and
  past the 1 MiB where it stops probing powers of four."""
  from tests.helpers.http_proxy import without_size_hints

  sizes = [0, 1, 15, 16, 17, (1 << 20) + 3]
  for n in sizes:
    bucket.put(f"s/{n}", bytes([n % 251]) * n)
  with bucket.emulator.proxy() as proxy:
    bucket.emulator.apply(monkeypatch, endpoint=proxy.url)
    root = open_store(bucket.url).child("s")
    root.child("0").read_range(0, 0)  # the bucket check, before the counted requests
    proxy.reset_stats()
    assert root.child("17").size() == 17
    hinted = proxy.stats()["requests"]  # the server's own hint, checked: a few requests
    proxy.rewrite = without_size_hints
    found, requests = {}, {}
    for n in sizes:
      proxy.reset_stats()
      found[n] = root.child(str(n)).size()
      requests[n] = proxy.stats()["requests"]
  assert found == {n: n for n in sizes}
  assert min(requests.values()) > 4, requests  # the sizes came from the search, not from a hint
  # moto states the size (checked by two reads); tensorstore's gcs driver drops the GCS emulator's Content-Range
  # from its error, so on gs:// the search runs with or without the proxy's rewrite
  assert hinted <= 4 if bucket.scheme == "s3" else hinted > 4, hinted
