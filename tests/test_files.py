"""parity_jax.files: the output-path rules, atomic writes and file hashes."""

import hashlib
import os
import re

import pytest

from parity_jax import files
from parity_jax.errors import UsageError

# ------------------------------------------------------------------------------------------------------------------
# Unit tests of the rules (never on or inside an input, the one overwrite rule, atomic writes, hashes). Wording of
# the messages is not asserted here beyond the argument's name.
# ------------------------------------------------------------------------------------------------------------------


def _refused(fn, *args, what="out", **kwargs) -> str:
  with pytest.raises(UsageError) as e:
    fn(*args, what=what, **kwargs)
  msg = str(e.value)
  assert "\n" not in msg and what in msg, msg
  return msg


def test_is_inside(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  (tmp_path / "ab").mkdir()
  assert files.is_inside(tmp_path / "a", tmp_path / "a")  # the same path counts
  assert files.is_inside(tmp_path / "a" / "b" / "f.json", tmp_path / "a")
  assert files.is_inside(tmp_path / "a" / "b", str(tmp_path / "a") + os.sep)  # a trailing separator
  assert not files.is_inside(tmp_path / "ab", tmp_path / "a")  # a shared name prefix is not inside
  assert not files.is_inside(tmp_path / "a", tmp_path / "a" / "b")
  os.symlink(tmp_path / "a" / "b", tmp_path / "link")
  assert files.is_inside(tmp_path / "link" / "f.json", tmp_path / "a")  # symlinks resolved


def test_check_output_path_accepts_a_free_path_and_returns_a_str(tmp_path):
  out = tmp_path / "r.json"
  got = files.check_output_path(out, inputs=[tmp_path / "in.safetensors", None], suffix=".json")
  assert got == str(out) and type(got) is str
  assert not out.exists()  # a check writes nothing


def test_check_output_path_refusals(tmp_path):
  src = tmp_path / "ckpt"
  src.mkdir()
  (src / "x").write_text("x")
  existing = tmp_path / "old.json"
  existing.write_text("{}")
  _refused(files.check_output_path, "")
  _refused(files.check_output_path, src / "r.json", inputs=[src])  # inside an input directory
  _refused(files.check_output_path, src / "x", inputs=[tmp_path / "other", src], overwrite=True)  # an input's file
  _refused(files.check_output_path, existing, inputs=[existing], overwrite=True)  # the input itself
  _refused(files.check_output_path, tmp_path / "r.txt", suffix=".json")
  _refused(files.check_output_path, src, what="plot")  # a directory
  _refused(files.check_output_path, tmp_path / "missing" / "r.json")  # no parent directory
  _refused(files.check_output_path, existing)  # exists, no overwrite
  assert files.check_output_path(existing, overwrite=True) == str(existing)
  assert existing.read_text() == "{}"


def test_an_input_that_does_not_exist_is_no_reason_to_refuse(tmp_path):
  # an input that is absent holds nothing an output could overwrite
  out = tmp_path / "r.json"
  assert files.check_output_path(out, inputs=[out.with_suffix(".gone"), tmp_path / "r.json.d"]) == str(out)
  assert files.check_output_path(out, inputs=[out]) == str(out)
  assert files.check_output_dir(tmp_path / "o", inputs=[tmp_path / "o"]) == str(tmp_path / "o")


def test_a_dangling_symlink_as_an_output_path_is_an_existing_output(tmp_path):
  target = tmp_path / "elsewhere" / "target.json"  # its directory does not even exist
  link = tmp_path / "r.json"
  os.symlink(target, link)
  assert not os.path.exists(link) and os.path.lexists(link)
  _refused(files.check_output_path, link)  # refused without overwrite, like any existing file
  assert files.check_output_path(link, overwrite=True) == str(link)
  # with overwrite, the write replaces the link itself and never writes through it
  assert files.write_text_atomic(link, "new") == str(link)
  assert not os.path.islink(link) and link.read_text() == "new"
  assert not os.path.lexists(target) and not (tmp_path / "elsewhere").exists()


def test_a_dangling_symlink_as_an_output_directory_is_refused(tmp_path):
  link = tmp_path / "out"
  os.symlink(tmp_path / "nowhere", link)
  _refused(files.check_output_dir, link, what="out_dir")
  _refused(files.check_output_dir, link, what="out_dir", overwrite=True)  # not a directory, whatever overwrite says
  # a dangling symlink inside an output directory is a file the tool would overwrite
  d = tmp_path / "d"
  d.mkdir()
  os.symlink(tmp_path / "nowhere", d / "stages.safetensors")
  _refused(files.check_output_dir, d, what="out_dir", will_write=["stages.safetensors"])
  assert files.check_output_dir(d, what="out_dir", will_write=["report.json"]) == str(d)


def test_check_output_dir(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  full = tmp_path / "full"
  full.mkdir()
  (full / "a.json").write_text("{}")
  (tmp_path / "empty").mkdir()
  (tmp_path / "file").write_text("x")
  assert files.check_output_dir(tmp_path / "new") == str(tmp_path / "new")  # missing: fine, nothing created
  assert not (tmp_path / "new").exists()
  assert files.check_output_dir(tmp_path / "empty") == str(tmp_path / "empty")  # empty: holds nothing to lose
  _refused(files.check_output_dir, "", what="out_dir")
  _refused(files.check_output_dir, src / "o", inputs=[src], what="out_dir")
  _refused(files.check_output_dir, src, inputs=[src], what="out_dir", overwrite=True)
  _refused(files.check_output_dir, tmp_path / "file", what="out_dir")  # exists, not a directory
  msg = _refused(files.check_output_dir, full, what="out_dir")  # holds a file
  assert "a.json" in msg
  assert files.check_output_dir(full, what="out_dir", overwrite=True) == str(full)
  # with will_write, only the files the caller would write count
  assert files.check_output_dir(full, will_write=["b.json", "c.png"]) == str(full)
  msg = _refused(files.check_output_dir, full, what="out_dir", will_write=["b.json", "a.json"])
  assert "a.json" in msg and "b.json" not in msg
  assert files.check_output_dir(full, will_write=["a.json"], overwrite=True) == str(full)
  assert (full / "a.json").read_text() == "{}"


def test_atomic_output_writes_text_and_bytes_and_creates_the_parent(tmp_path):
  p = tmp_path / "a" / "b" / "f.txt"
  with files.atomic_output(p) as f:
    f.write("héllo")
  assert p.read_bytes() == "héllo".encode("utf-8")
  with files.atomic_output(tmp_path / "f.bin", "wb") as f:
    f.write(b"\x00\xff")
  assert (tmp_path / "f.bin").read_bytes() == b"\x00\xff"
  assert sorted(os.listdir(tmp_path)) == ["a", "f.bin"] and os.listdir(tmp_path / "a" / "b") == ["f.txt"]


def test_atomic_output_replaces_only_when_complete(tmp_path):
  p = tmp_path / "f.txt"
  p.write_text("old")
  with files.atomic_output(p) as f:
    f.write("new")
    f.flush()
    assert p.read_text() == "old"  # the target is untouched while the new content is written
  assert p.read_text() == "new"


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_atomic_output_on_error_leaves_the_target_and_no_temporary_file(tmp_path, exc):
  p = tmp_path / "f.txt"
  p.write_text("old")
  with pytest.raises(exc):
    with files.atomic_output(p) as f:
      f.write("partial")
      raise exc("stop")
  assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
  with pytest.raises(exc):
    with files.atomic_output(tmp_path / "g.txt") as f:
      raise exc("stop")
  assert os.listdir(tmp_path) == ["f.txt"]


def test_write_text_atomic_returns_the_absolute_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert files.write_text_atomic("t.txt", "x\n") == str(tmp_path / "t.txt")
  assert (tmp_path / "t.txt").read_text() == "x\n"


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (5 << 19) + 3])  # up to 2.5 MiB: several blocks
def test_file_sha256(tmp_path, size, test_seed):
  import numpy as np

  data = np.random.default_rng(test_seed + size).integers(0, 256, size, dtype=np.uint8).tobytes()
  p = tmp_path / "blob"
  p.write_bytes(data)
  assert files.file_sha256(p) == hashlib.sha256(data).hexdigest()
  assert files.file_sha256(str(p)) == hashlib.sha256(data).hexdigest()


def test_check_output_path_in_a_bucket(gcs_bucket):
  gcs_bucket.put("reports/old.json", b"{}")
  gcs_bucket.put("runs/a/x.bin", b"x")
  url = gcs_bucket.url
  assert files.check_output_path(f"{url}/reports/new.json") == f"{url}/reports/new.json"
  assert files.check_output_path(f"{url}/reports/old.json", overwrite=True) == f"{url}/reports/old.json"
  for bad, words in (
      (url, "names a bucket, not an object"),
      ("gs://no-such-bucket-here/r.json", "bucket gs://no-such-bucket-here does not exist"),
      (f"{url}/runs", "is a directory (objects lie below it)"),
      (f"{url}/reports/old.json", "exists; refusing to overwrite it"),
  ):
    with pytest.raises(UsageError, match=re.escape(words)):
      files.check_output_path(bad)
  assert gcs_bucket.get("reports/old.json") == b"{}"  # a check writes nothing
