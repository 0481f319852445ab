"""parity_jax.checkpoint.migrate.destination: what the migrator refuses to replace, and what it leaves behind.

Every tree here is written by the test with tests/helpers/ckpt.py (orbax directly); nothing expected comes from
the migrator itself.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.helpers import ckpt as H
from parity_jax.checkpoint import migrate, verify_migration
from parity_jax.checkpoint.migrate import leftovers
from parity_jax.checkpoint.migrate.destination import COMMIT_MARKER, check_bucket_dest
from parity_jax.stores import open_store
from parity_jax.errors import UsageError


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
  root = tmp_path_factory.mktemp("dest")
  src = H.generated_source()
  return {
      "src": H.save_v0(root / "src", src),
      "spec": H.write_spec(root / "spec.json", H.GENERATED_SPEC),
      "other": H.save_v0(root / "other", src),  # a valid checkpoint a link may point at
  }


def _listing(path) -> list[str]:
  return sorted(os.listdir(path))


def test_a_symlinked_destination_is_never_replaced_nor_written_through(ck, tmp_path):
  link = tmp_path / "m"
  os.symlink(ck["other"], link)
  before = _listing(ck["other"])
  with pytest.raises(UsageError, match="destination already exists"):
    migrate(ck["src"], link, ck["spec"])
  # even with overwrite: a link is not a directory the migrator made, and what it points at is someone's data
  with pytest.raises(UsageError, match="is not a directory"):
    migrate(ck["src"], link, ck["spec"], overwrite=True)
  assert os.path.islink(link) and os.readlink(link) == ck["other"]
  assert _listing(ck["other"]) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left beside it
  # a dangling link is refused the same way
  dangling = tmp_path / "d"
  os.symlink(tmp_path / "nowhere", dangling)
  with pytest.raises(UsageError):
    migrate(ck["src"], dangling, ck["spec"], overwrite=True)
  assert not (tmp_path / "nowhere").exists()


def test_a_refused_source_leaves_no_temporary(ck, tmp_path):
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "notes.txt").write_text("not a checkpoint")
  with pytest.raises(UsageError):
    migrate(tmp_path / "junk", tmp_path / "m", ck["spec"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]
  assert leftovers(tmp_path / "m") == []


def test_a_stale_temporary_is_named_then_removed_by_the_next_migration(ck, tmp_path, capfd):
  dead = tmp_path / ".m.migrating-999999999-0a1b2c3d"  # a pid no process has
  (dead / "checkpoint").mkdir(parents=True)
  (dead / "checkpoint" / "x").write_bytes(b"\0" * (3 << 19))
  (left,) = leftovers(tmp_path / "m")
  assert left.path == str(dead) and left.pid == 999999999 and not left.alive
  assert (
      left.describe() == f"{dead} (1.5 MiB) is left over from an interrupted migration; remove it with: rm -rf {dead}"
  )
  migrate(ck["src"], tmp_path / "m", ck["spec"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
  err = capfd.readouterr().err
  assert f"removing {dead}" in err and "process 999999999 is gone" in err, err
  assert verify_migration(ck["src"], tmp_path / "m", ck["spec"]).passed


def _dest_with(tmp_path, *names: str):
  """A fresh directory under ``tmp_path`` holding the files ``names`` (a local stand-in for a bucket prefix)."""
  d = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
  for n in names:
    (d / n).parent.mkdir(parents=True, exist_ok=True)
    (d / n).write_bytes(b"x")
  return d, open_store(str(d))


def test_the_in_place_destination_checks_refuse_foreign_objects_and_need_overwrite_for_an_attempt(ck, tmp_path):
  """check_bucket_dest on a store with the bucket stores' interface (a local one here: the same walk and delete)."""
  logs: list[str] = []

  def dest_with(*names: str):
    return _dest_with(tmp_path, *names)

  d, store = dest_with("state/manifest.ocdbt", "notes.txt")  # someone's file beside an attempt: never deleted
  with pytest.raises(UsageError, match=r"holds objects that are not a checkpoint \(notes.txt\); refusing"):
    check_bucket_dest(ck["src"], store, True, logs.append)
  assert sorted(p.name for p in d.iterdir()) == ["notes.txt", "state"]
  d, store = dest_with("state/manifest.ocdbt", "_CHECKPOINT_METADATA")  # a half-written attempt: no marker
  with pytest.raises(UsageError, match=r"a half-written attempt \(2 objects, no commit_success.txt\); pass --over"):
    check_bucket_dest(ck["src"], store, False, logs.append)
  assert d.exists() and logs == []
  check_bucket_dest(ck["src"], store, True, logs.append)
  assert not d.exists() and logs == [
      f"deleting a half-written attempt (2 objects, no {COMMIT_MARKER}) at {store} (--overwrite)"
  ]
  d, store = dest_with("state/manifest.ocdbt", COMMIT_MARKER)  # a finished result
  with pytest.raises(UsageError, match="holds a checkpoint; pass --overwrite to replace it"):
    check_bucket_dest(ck["src"], store, False, logs.append)
  check_bucket_dest(ck["src"], open_store(str(tmp_path / "empty")), False, logs.append)  # nothing there: fine


def test_the_in_place_checks_know_the_standard_layout_and_a_safetensors_destination(ck, tmp_path):
  """The names the standard layout writes at the top count as a checkpoint's; a safetensors destination's commit is
  its index or its single file, and it may replace an Orbax checkpoint or an HF directory, nothing else."""
  logs: list[str] = []

  def dest_with(*names: str):
    return _dest_with(tmp_path, *names)

  shard = "model-00001-of-00002.safetensors"
  _, store = dest_with("manifest.ocdbt", "ocdbt.process_3/d/abc", "_METADATA", "d/x")  # standard, no marker
  with pytest.raises(UsageError, match=r"a half-written attempt \(4 objects, no commit_success.txt\)"):
    check_bucket_dest(ck["src"], store, False, logs.append)
  _, store = dest_with("config.json", shard)  # an HF attempt: to an Orbax destination, not a checkpoint
  with pytest.raises(UsageError, match=r"not a checkpoint \(config.json\); refusing"):
    check_bucket_dest(ck["src"], store, True, logs.append)
  with pytest.raises(
      UsageError,
      match=r"a half-written attempt \(2 objects, no model.safetensors.index.json or model.safetensors\); pass --over",
  ):
    check_bucket_dest(ck["src"], store, False, logs.append, safetensors=True)
  for commit in ("model.safetensors.index.json", "model.safetensors"):
    _, store = dest_with("config.json", shard, commit)
    with pytest.raises(UsageError, match="holds a checkpoint; pass --overwrite to replace it"):
      check_bucket_dest(ck["src"], store, False, logs.append, safetensors=True)
  d, store = dest_with("state/manifest.ocdbt", COMMIT_MARKER)  # an Orbax checkpoint: a safetensors dest replaces it
  check_bucket_dest(ck["src"], store, True, logs.append, safetensors=True)
  assert not d.exists() and logs[-1] == f"deleting a checkpoint at {store} (--overwrite)"
  for foreign in (("model.safetensors", "tokenizer.json"), ("model.safetensors", "sub/model.safetensors")):
    d, store = dest_with(*foreign)  # never deleted: not what the migrator writes
    with pytest.raises(UsageError, match="not a checkpoint"):
      check_bucket_dest(ck["src"], store, True, logs.append, safetensors=True)
    assert d.exists()


def test_sigterm_inside_interruptible_raises_interrupted_and_only_in_the_main_thread():
  from parity_jax.checkpoint.migrate.destination import Interrupted, interruptible

  errors = []

  def elsewhere():  # no signal handler can be set outside the main thread: a no-op there
    try:
      with interruptible():
        pass
    except Exception as e:  # noqa: BLE001 -- reported below
      errors.append(e)

  t = threading.Thread(target=elsewhere)
  t.start()
  t.join()
  assert errors == []
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(Interrupted) as e:
    with interruptible():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # the handler raises at once
  assert e.value.signum == signal.SIGTERM  # the tools exit with 128 + it
  assert signal.getsignal(signal.SIGTERM) is before  # restored
  note = Interrupted(signal.SIGINT, "removed the temporary")
  assert (note.signum, note.note, str(note)) == (
      2,
      "removed the temporary",
      "interrupted (SIGINT): removed the temporary",
  )


def test_a_bucket_destination_at_inside_or_around_a_bucket_source_is_refused(monkeypatch):
  """Decided from the URLs before any request: no bucket is reached (an endpoint that refuses every connection)."""
  for var in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS"):
    monkeypatch.setenv(var, "x")  # a gs:// store sets these for the process: put back afterwards
    monkeypatch.delenv(var)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
  src = "gs://bkt/ck/src"
  for dest, words in [
      ("gs://bkt/ck/src", "is the source checkpoint; migrate to a new location"),
      ("gs://bkt/ck/src/sub", "lies inside the source checkpoint gs://bkt/ck/src"),
      ("gs://bkt/ck", "is or contains the source checkpoint gs://bkt/ck/src"),
  ]:
    with pytest.raises(UsageError, match=f"^destination {dest} {words}"):
      check_bucket_dest(src, open_store(dest), False, lambda line: None)


def test_an_overwritten_checkpoint_is_swapped_out_and_removed(ck, tmp_path):
  dest = tmp_path / "m"
  migrate(ck["src"], dest, ck["spec"])
  (dest / "stale").write_text("from the first run")  # a file only the replaced checkpoint holds
  migrate(ck["src"], dest, ck["spec"], overwrite=True)
  assert _listing(tmp_path) == ["m"]  # no hidden .m.replaced-* left beside it
  assert "stale" not in _listing(dest)
  assert verify_migration(ck["src"], dest, ck["spec"]).passed


def test_every_destination_that_needs_no_data_to_refuse_is_refused_in_one_line(tmp_path):
  from parity_jax.checkpoint.migrate.destination import check_dest

  src = tmp_path / "src"
  (src / "inner").mkdir(parents=True)
  (tmp_path / "file").write_text("x")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "notes.txt").write_text("not a checkpoint")
  cases = [
      (tmp_path / "nowhere" / "m", False, f"destination's parent directory does not exist: {tmp_path / 'nowhere'}"),
      (src, True, f"destination {src} is the source checkpoint; migrate to a new directory"),
      (src / "inner" / "m", True, f"destination {src / 'inner' / 'm'} lies inside the source checkpoint {src}"),
      (tmp_path, True, f"destination {tmp_path} is or contains the source checkpoint {src}"),
      (tmp_path / "file", False, f"destination already exists: {tmp_path / 'file'} (pass --overwrite to replace it)"),
      (
          tmp_path / "file",
          True,
          f"destination exists and is not a directory: {tmp_path / 'file'}; refusing to replace it",
      ),
      (tmp_path / "full", True, f"destination {tmp_path / 'full'} exists and is not an Orbax checkpoint; refusing to"),
  ]
  for dest, overwrite, message in cases:
    with pytest.raises(UsageError) as e:
      check_dest(str(src), str(dest), overwrite)
    assert str(e.value).startswith(message), (str(e.value), message)
  check_dest(str(src), str(tmp_path / "new"), False)  # a new name beside the source: fine
  (tmp_path / "empty").mkdir()
  check_dest(str(src), str(tmp_path / "empty"), True)  # an empty directory may be replaced
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "full", "src"]  # nothing written
