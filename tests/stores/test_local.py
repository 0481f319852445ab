"""LocalStore: every method on real files, atomic writes, one-line errors with kinds."""

from __future__ import annotations

import errno
import os

import pytest

from parity_jax import stores
from parity_jax.stores import StoreError, open_store


def test_write_read_list_size_delete(tmp_path):
  root = open_store(tmp_path / "ck")
  data = bytes(range(256)) * 3
  root.child("a", "x.bin").write_bytes(data)  # parents are created
  root.child("a/b/y.bin").write_bytes(b"y")
  root.child("empty").write_bytes(b"")
  assert (tmp_path / "ck" / "a" / "x.bin").read_bytes() == data  # what the OS sees
  assert root.listdir() == (["empty"], ["a"]) and root.child("a").listdir() == (["x.bin"], ["b"])
  x = root.child("a/x.bin")
  assert x.size() == 768 and root.child("empty").size() == 0
  assert x.read_bytes() == data and root.child("empty").read_bytes() == b""
  assert x.read_range(5, 300) == data[5:300] and x.read_range(768, 768) == b""
  assert x.read_range_async(1, 4).result() == data[1:4]
  assert (x.is_file(), x.is_dir(), root.is_dir(), root.is_file(), root.exists()) == (True, False, True, False, True)
  assert not root.child("nope").exists()
  with pytest.raises(StoreError, match="Directory not empty") as e:
    root.child("a").delete()
  assert e.value.kind == "invalid"
  x.delete()
  assert not (tmp_path / "ck" / "a" / "x.bin").exists()
  root.delete(recursive=True)
  assert not (tmp_path / "ck").exists()
  root.delete(recursive=True, missing_ok=True)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
  f = open_store(tmp_path / "m.json")
  f.write_bytes(b"old")
  f.write_bytes(b"new")
  assert os.listdir(tmp_path) == ["m.json"] and f.read_bytes() == b"new"
  with pytest.raises(StoreError, match="is a directory"):
    open_store(tmp_path).write_bytes(b"x")


@pytest.mark.parametrize(
    "call, kind, words",
    [
        (lambda r: r.child("nope").read_bytes(), "not_found", "No such file"),
        (lambda r: r.child("nope").size(), "not_found", "No such file"),
        (lambda r: r.child("nope").listdir(), "not_found", "No such file"),
        (lambda r: r.child("f").listdir(), "not_found", "Not a directory"),
        (lambda r: r.child("f").read_range(3, 9), "out_of_range", "bytes [3, 9) lie past its end (size 4)"),
        (lambda r: r.child("f").read_range(5, 2), "invalid", "invalid byte range [5, 2)"),
        (lambda r: r.child("f").read_range(-1, 2), "invalid", "invalid byte range"),
        (lambda r: r.size(), "invalid", "is a directory"),
        (lambda r: r.child("nope").delete(), "not_found", "no such file or directory"),
        (lambda r: r.child("f", "g").write_bytes(b""), "invalid", "File exists"),
        (lambda r: r.child("nope").read_bytes_async().result(), "not_found", "No such file"),  # raised by result()
        (lambda r: r.child("f").read_range_async(3, 9).result(), "out_of_range", "bytes [3, 9) lie past its end"),
    ],
)
def test_errors_are_one_line_with_a_kind(tmp_path, call, kind, words):
  (tmp_path / "f").write_bytes(b"abcd")
  with pytest.raises(StoreError) as e:
    call(open_store(tmp_path))
  assert e.value.kind == kind and words in str(e.value) and str(tmp_path) in str(e.value)
  assert "\n" not in str(e.value)


def test_unreadable_file_is_denied(tmp_path, monkeypatch):
  (tmp_path / "f").write_bytes(b"x")
  os.chmod(tmp_path / "f", 0)
  if os.geteuid() == 0:  # root reads any file: the refusal the kernel would give anyone else, from open()
    real_open = open

    def denied(path, *args, **kwargs):
      if os.fspath(path) == str(tmp_path / "f"):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
      return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
  with pytest.raises(StoreError) as e:
    open_store(tmp_path / "f").read_bytes()
  assert e.value.kind == "denied" and "Permission denied" in str(e.value) and "\n" not in str(e.value)


def test_local_io_is_counted(tmp_path):
  before = stores.io_stats()
  f = open_store(tmp_path / "f")
  f.write_bytes(b"x" * 1000)
  f.read_range(10, 110)
  f.read_bytes()
  d = stores.io_stats(since=before)["file"]
  assert (d["writes"], d["bytes_written"], d["reads"], d["bytes_read"]) == (1, 1000, 2, 1100)
  assert d["requests"] == 3


def test_describe_is_the_path(tmp_path):
  assert open_store(tmp_path).describe() == {"scheme": "file", "url": str(tmp_path), "path": str(tmp_path)}


def test_parent_is_one_level_up_and_a_root_is_its_own(tmp_path):
  child = open_store(tmp_path).child("a", "b")
  assert child.parent().url == str(tmp_path / "a")
  assert child.parent().parent() == open_store(tmp_path)
  assert open_store("/").parent().url == "/"


def test_naming_paths_specs_and_a_walk_of_a_local_store(tmp_path):
  from parity_jax.stores.local import LocalStore

  with pytest.raises(StoreError, match="^empty local path$") as e:
    LocalStore("")
  assert e.value.kind == "invalid"
  s = open_store(tmp_path).child("d")
  assert (s.name, s.local_path, s.url) == ("d", str(tmp_path / "d"), str(tmp_path / "d"))
  with pytest.raises(StoreError, match="child\\(\\) needs a name") as e:
    s.child()
  assert s.is_inside(open_store(tmp_path)) and s.is_inside(s) and not open_store(tmp_path).is_inside(s)
  assert s.kvstore_spec() == {"driver": "file", "path": str(tmp_path / "d") + "/"}
  assert s.kvstore_spec(as_dir=False) == {"driver": "file", "path": str(tmp_path / "d")}
  for rel in ("b", "a/y", "a/x", "a/deep/z"):
    (tmp_path / "d" / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "d" / rel).write_bytes(b"1")
  assert s.walk() == ["a/deep/z", "a/x", "a/y", "b"]
  assert s.child("a").walk() == ["deep/z", "x", "y"]


def test_a_walk_counts_one_listing_per_directory(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  for rel in ("x", "a/y", "a/b/z"):
    (tmp_path / rel).write_bytes(b"1")
  before = stores.io_stats()["file"]["lists"]
  assert open_store(str(tmp_path)).walk() == ["a/b/z", "a/y", "x"]
  assert stores.io_stats()["file"]["lists"] - before == 3  # ., a, a/b
