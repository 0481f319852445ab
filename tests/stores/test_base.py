"""open_store's URL rules, store naming (child/parent/is_inside), read_many, Limits and StoreError (no server needed)."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import pytest

from parity_jax import stores
from parity_jax.errors import UsageError
from parity_jax.stores import StoreError, open_store


@pytest.fixture(autouse=True)
def _endpoints(monkeypatch):
  # resolution reads these; point both schemes at closed local ports (nothing here sends a request)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
  monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
  monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
  monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")


@pytest.mark.parametrize(
    "url, scheme, canonical, name",
    [
        ("gs://bkt/a/b", "gs", "gs://bkt/a/b", "b"),
        ("gs://bkt/a//b/", "gs", "gs://bkt/a/b", "b"),
        ("gs://bkt", "gs", "gs://bkt", ""),
        ("gs://bkt/", "gs", "gs://bkt", ""),
        ("GS://bkt/x", "gs", "gs://bkt/x", "x"),
        ("s3://My.Bucket-1/x/y.bin", "s3", "s3://My.Bucket-1/x/y.bin", "y.bin"),
        ("file:///tmp/a/b", "file", "/tmp/a/b", "b"),
        ("file://localhost/tmp/a", "file", "/tmp/a", "a"),
        ("/tmp/a/../b", "file", "/tmp/b", "b"),
    ],
)
def test_open_store_canonical_urls(url, scheme, canonical, name):
  s = open_store(url)
  assert (s.scheme, s.url, s.name) == (scheme, canonical, name)
  assert str(s) == canonical and stores.is_remote(url) == (scheme != "file")
  assert (s.local_path is None) == (scheme != "file")
  assert open_store(s) is s and stores.is_remote(s) == (scheme != "file")  # a store is taken as it is


def test_relative_and_pathlike_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert open_store("a/b").url == str(tmp_path / "a" / "b")
  assert open_store(pathlib.Path("c")).url == str(tmp_path / "c")
  assert not stores.is_remote(pathlib.Path("c")) and not stores.is_remote("file:///x")
  s = open_store("gs://b1x/k")
  assert open_store(s) is s and stores.is_remote(s)


@pytest.mark.parametrize(
    "url, words",
    [
        ("", "empty local path"),
        ("gs://", "no bucket name"),
        ("s3:///key", "no bucket name"),
        ("gs://Bad_Bucket/x", "not a valid GCS bucket name"),
        ("gs://ab/x", "not a valid GCS bucket name"),
        ("s3://a/x", "not a valid S3 bucket name"),
        ("gs://bkt/a/../x", "'..' is not allowed"),
        ("s3://bkt/./x", "'.' is not allowed"),
        ("ftp://host/x", "unsupported scheme ftp://"),
        ("file://host/x", "needs an absolute path"),
    ],
)
def test_bad_urls_are_one_line_invalid_errors(url, words):
  with pytest.raises(StoreError) as e:
    open_store(url)
  assert e.value.kind == "invalid" and words in str(e.value) and "\n" not in str(e.value)
  assert isinstance(e.value, UsageError)  # the tools turn it into exit 2


@pytest.mark.parametrize("root", ["gs://bkt", "s3://bkt", "/data"])
def test_child_parent_and_is_inside(root):
  base = open_store(root)
  ckpt = base.child("run", "step_10")
  assert ckpt == base.child("run/step_10") == open_store(root + "/run/step_10")
  assert hash(ckpt) == hash(open_store(root + "/run/step_10"))
  assert ckpt.name == "step_10" and ckpt.parent() == base.child("run") and ckpt.parent().parent() == base
  root_store = base if base.scheme != "file" else open_store("/")
  assert root_store.parent() == root_store  # a root is its own parent
  assert ckpt.is_inside(base) and ckpt.is_inside(ckpt) and not base.is_inside(ckpt)
  assert not base.child("run2").is_inside(base.child("run"))  # a sibling with a common name prefix
  for bad in ("..", "a/../b", ""):
    with pytest.raises(StoreError, match="not allowed|needs a name"):
      base.child(bad)


def test_is_inside_needs_the_same_kind_bucket_and_endpoint(monkeypatch):
  assert not open_store("gs://bkt/a").is_inside(open_store("s3://bkt"))
  assert not open_store("gs://bkt/a").is_inside(open_store("gs://other"))
  assert not open_store("/bkt/a").is_inside(open_store("gs://bkt"))
  before = open_store("s3://bkt")
  monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
  after = open_store("s3://bkt/a")
  assert after.parent() != before and not after.is_inside(before)


def test_local_is_inside_resolves_symlinks(tmp_path):
  (tmp_path / "real" / "sub").mkdir(parents=True)
  os.symlink(tmp_path / "real", tmp_path / "link")
  assert open_store(tmp_path / "link" / "sub").is_inside(open_store(tmp_path / "real"))
  assert open_store(tmp_path / "link").url == str(tmp_path / "link")  # the URL keeps the name given


def test_kvstore_specs_name_the_location():
  assert open_store("/d/ck").kvstore_spec() == {"driver": "file", "path": "/d/ck/"}
  assert open_store("/d/ck").kvstore_spec(as_dir=False) == {"driver": "file", "path": "/d/ck"}
  assert open_store("gs://bkt/ck").kvstore_spec() == {"driver": "gcs", "bucket": "bkt", "path": "ck/"}
  assert open_store("gs://bkt").kvstore_spec() == {"driver": "gcs", "bucket": "bkt", "path": ""}
  s3 = open_store("s3://bkt/ck/x").kvstore_spec(as_dir=False)
  assert s3 == {
      "driver": "s3",
      "bucket": "bkt",
      "path": "ck/x",
      "endpoint": "http://127.0.0.1:9",
      "aws_region": "us-east-1",
  }


def test_limits_shape_the_retry_context_and_deadlines():
  previous = stores.set_limits(max_retries=3, initial_delay_s=0.25, max_delay_s=2, deadline_s=10, min_rate=100)
  try:
    lim = stores.limits()
    assert lim.retries_spec() == {"max_retries": 3, "initial_delay": "0.25s", "max_delay": "2s"}
    assert lim.timeout(0) == 10 and lim.timeout(500) == 15
    ctx = open_store("gs://bkt/x").context_spec()
    assert ctx["gcs_request_retries"] == lim.retries_spec() and ctx["gcs_request_concurrency"] == {"limit": 32}
    ctx = open_store("s3://bkt/x").context_spec()
    assert ctx["s3_request_retries"] == lim.retries_spec() and ctx["aws_credentials"] == {"type": "environment"}
    with pytest.raises(StoreError, match="set_limits"):
      stores.set_limits(no_such_limit=1)
  finally:
    stores.set_limits(**previous.__dict__)
  assert stores.limits() == previous


def test_the_default_limits_are_the_documented_ones():
  """BUILD.md ("Faults"): 5 attempts, 1 s first delay doubling up to 8 s, a stalled connection dropped after 10 s."""
  lim = stores.Limits()
  assert lim.retries_spec() == {"max_retries": 5, "initial_delay": "1s", "max_delay": "8s"}
  assert (lim.stall_s, lim.concurrency) == (10, 32)
  assert lim.timeout(0) == 60 and lim.timeout(3 << 20) == 63  # a minute, plus a second per MiB read
  with pytest.raises(dataclasses.FrozenInstanceError):
    stores.limits().max_retries = 1  # the bounds in force change only through set_limits


def test_read_many_keeps_order_and_bounds_what_is_in_flight(tmp_path):
  data = bytes(range(256)) * 4
  (tmp_path / "f").write_bytes(data)
  (tmp_path / "g").write_bytes(b"whole")
  f = open_store(tmp_path / "f")
  ranges = [(f, a, a + 7) for a in range(0, 1000, 37)]
  out = stores.read_many([*ranges, open_store(tmp_path / "g")], max_in_flight=3)
  assert out[:-1] == [data[a:b] for _, a, b in ranges] and out[-1] == b"whole"


class _Counting(stores.Store):
  """A store whose reads stay pending until collected: shows how many read_many keeps open."""

  def __init__(self):
    self.open, self.peak = 0, 0

  def read_range_async(self, start, stop):
    self.open += 1
    self.peak = max(self.peak, self.open)

    def wait():
      self.open -= 1
      return bytes([start % 256])

    return stores.Pending(wait=wait)


def test_read_many_window():
  s = _Counting()
  out = stores.read_many([(s, i, i + 1) for i in range(50)], max_in_flight=7)
  assert out == [bytes([i]) for i in range(50)] and s.peak == 7
  for below_one in (-3, 0.5):  # a window below one request is one request
    s = _Counting()
    assert stores.read_many([(s, i, i + 1) for i in range(5)], max_in_flight=below_one) == [
        bytes([i]) for i in range(5)
    ]
    assert s.peak == 1


def test_pending_reraises_the_same_error():
  calls = []

  def boom():
    calls.append(1)
    raise StoreError("x: no such object", "not_found")

  p = stores.Pending(wait=boom)
  for _ in range(2):
    with pytest.raises(StoreError, match="no such object"):
      p.result()
  assert calls == [1]


def test_store_error_is_one_line_with_a_kind():
  e = StoreError("gs://b/x: first line\nsecond line [tensorstore_spec='{...}']", "unreachable")
  assert str(e) == "gs://b/x: first line" and e.kind == "unreachable"
  with pytest.raises(AssertionError):
    StoreError("x", "no_such_kind")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors in /proc")
def test_native_stderr_captures_descriptor_2_and_gives_it_back():
  from parity_jax.stores.base import native_stderr

  before, fd2 = sorted(os.listdir("/proc/self/fd")), os.fstat(2)
  with native_stderr() as lines:
    os.write(2, b"I1207 written by C++ code\nsecond line\n")
  assert lines == ["I1207 written by C++ code", "second line"]
  assert sorted(os.listdir("/proc/self/fd")) == before  # the saved descriptor is closed
  assert (os.fstat(2).st_dev, os.fstat(2).st_ino) == (fd2.st_dev, fd2.st_ino)  # fd 2 is the same file again


class _Bare(stores.Store):
  """A store that implements nothing of its own."""

  url = "mem://bucket/x"


def test_a_store_that_implements_nothing_refuses_every_operation_and_keeps_the_shared_defaults():
  bare = _Bare()
  calls = {
      "name": lambda: bare.name,
      "child": lambda: bare.child("a"),
      "parent": bare.parent,
      "is_inside": lambda: bare.is_inside(bare),
      "kvstore_spec": bare.kvstore_spec,
      "is_file": bare.is_file,
      "is_dir": bare.is_dir,
      "exists": bare.exists,
      "listdir": bare.listdir,
      "walk": bare.walk,
      "size": bare.size,
      "read_bytes": bare.read_bytes,
      "read_range": lambda: bare.read_range(0, 1),
      "write_bytes": lambda: bare.write_bytes(b"x"),
      "delete": bare.delete,
      "describe": bare.describe,
      "==": lambda: bare == _Bare(),
      "hash": lambda: hash(bare),
  }
  for what, call in calls.items():
    with pytest.raises(NotImplementedError):
      call()
      pytest.fail(what)
  assert (bare.local_path, bare.context_spec(), bare.ping()) == (None, {}, None)
  assert (str(bare), repr(bare)) == ("mem://bucket/x", "_Bare('mem://bucket/x')")


@pytest.mark.parametrize("is_file, is_dir", [(True, False), (False, True), (False, False)])
def test_a_store_exists_when_it_is_a_file_or_a_directory(is_file, is_dir):
  class Half(_Bare):

    def is_file(self):
      return is_file

    def is_dir(self):
      return is_dir

  assert Half().exists() is (is_file or is_dir)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://127.0.0.1:9000/path", "http://127.0.0.1:9000/path"),  # nothing secret: as given
        ("http://user:secret@127.0.0.1:9000/path?sig=abc", "http://127.0.0.1:9000/path"),
        ("https://user@host.example/p", "https://host.example/p"),
        ("http://127.0.0.1/p?X-Amz-Signature=abc", "http://127.0.0.1/p"),
        ("http://user:secret@host:99999/p", "http://host/p"),  # a port out of range: left out, not an error
    ],
)
def test_an_endpoint_url_is_shown_without_credentials_or_query(url, shown):
  from parity_jax.stores.base import redact

  assert redact(url) == shown


def test_captured_native_lines_are_written_back_unless_claimed(capfd):
  from parity_jax.stores.base import reemit

  reemit(
      ["I1207 credentials found", "  ", "warning: something else", "E tensorstore: claimed"],
      lambda s: "I1207" in s or "claimed" in s,
  )
  reemit(["I1207 credentials found"], lambda s: "I1207" in s)  # everything claimed: nothing written
  assert capfd.readouterr().err == "warning: something else\n"
