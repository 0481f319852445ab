"""The migrator's destination: the checks before any work, the hidden temporary beside it, the atomic install,
leftovers of interrupted runs, and interruption by SIGINT or SIGTERM.

Everything is written under a hidden sibling ``.<dest>.migrating-<pid>-<token>/``
and renamed to ``dest`` only when complete: a crash or SIGKILL leaves nothing
at ``dest``. On SIGINT or SIGTERM the migrator removes its temporary before it
ends (:func:`interruptible`); after a SIGKILL the temporary stays until the next
run: the migrator removes temporaries whose process is gone (:func:`remove_stale`,
one line each), and the verifier names them (:func:`leftovers`). An existing
``dest`` is refused unless ``overwrite``, and even then only if it is an Orbax
checkpoint or an empty directory, never the source or anything that contains it.

A bucket (``gs://``, ``s3://``) has no rename: the migrator writes there in place
(:mod:`.schedule`, :mod:`.to_safetensors`) and the commit last (``commit_success.txt``; for safetensors the
index or the single file);
:func:`check_bucket_dest` refuses (or with ``overwrite`` deletes) an earlier result
or a half-written attempt first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import signal
import threading
from typing import Callable, Iterator

from parity_jax.checkpoint.formats import safetensors as hf_format
from parity_jax.checkpoint.formats.orbax_layout import resolve_item_dir
from parity_jax.errors import UsageError
from parity_jax.files import is_inside

__all__ = [
    "Interrupted",
    "Leftover",
    "check_dest",
    "install",
    "interruptible",
    "leftovers",
    "remove_stale",
    "temporary_path",
]

_MIB = 1 << 20


class Interrupted(KeyboardInterrupt):
  """The migration was stopped by a signal after its temporary was removed; ``str()`` says so in one line."""

  def __init__(self, signum: int, note: str = ""):
    self.signum = signum
    self.note = note
    super().__init__(f"interrupted ({signal.Signals(signum).name}){': ' + note if note else ''}")


def temporary_path(dest: str) -> str:
  """A fresh hidden sibling of ``dest`` for this process's unfinished migration."""
  parent, name = os.path.dirname(dest), os.path.basename(dest)
  return os.path.join(parent, f".{name}.migrating-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _tree_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.lstat(os.path.join(root, f)).st_size
      except OSError:
        pass
  return total


@dataclasses.dataclass(frozen=True)
class Leftover:
  """A temporary of an earlier migration to the same destination."""

  path: str
  pid: int
  alive: bool  # its process still runs (on this host): a migration in progress, not a leftover to remove

  def describe(self) -> str:
    size = _tree_bytes(self.path) / _MIB
    return (
        f"{self.path} ({size:.1f} MiB) is left over from an interrupted migration; remove it with: rm -rf {self.path}"
    )


def leftovers(dest: str | os.PathLike) -> list[Leftover]:
  """Temporaries of earlier migrations to ``dest`` (``.<name>.migrating-<pid>-<token>`` beside it)."""
  dest = os.path.abspath(os.fspath(dest)).rstrip(os.sep)
  parent, name = os.path.dirname(dest), os.path.basename(dest)
  pat = re.compile(rf"^\.{re.escape(name)}\.(?:migrating|replaced)-(\d+)-[0-9a-f]+$")
  try:
    entries = sorted(os.listdir(parent))
  except OSError:
    return []
  out = []
  for entry in entries:
    m = pat.match(entry)
    if m:
      pid = int(m.group(1))
      out.append(Leftover(os.path.join(parent, entry), pid, _pid_alive(pid)))
  return out


def remove_stale(dest: str, log: Callable[[str], None]) -> None:
  """Removes the leftovers of ``dest`` whose process is gone, one ``log`` line each."""
  for left in leftovers(dest):
    if not left.alive:
      log(f"removing {left.path}, left over from an interrupted migration (process {left.pid} is gone)")
      shutil.rmtree(left.path, ignore_errors=True)


def check_dest(src_path: str, dest: str, overwrite: bool) -> None:
  """Every check of the destination that needs no data; a one-line UsageError."""
  parent = os.path.dirname(dest)
  if not os.path.isdir(parent):
    raise UsageError(f"destination's parent directory does not exist: {parent}")
  if os.path.realpath(dest) == os.path.realpath(src_path):
    raise UsageError(f"destination {dest} is the source checkpoint; migrate to a new directory")
  if is_inside(dest, src_path):
    raise UsageError(f"destination {dest} lies inside the source checkpoint {src_path}")
  if is_inside(src_path, dest):
    raise UsageError(f"destination {dest} is or contains the source checkpoint {src_path}")
  if not os.path.lexists(dest):
    return
  if not overwrite:
    raise UsageError(f"destination already exists: {dest} (pass --overwrite to replace it)")
  if not os.path.isdir(dest) or os.path.islink(dest):
    raise UsageError(f"destination exists and is not a directory: {dest}; refusing to replace it")
  if os.listdir(dest):
    try:
      resolve_item_dir(dest, "destination")
    except UsageError:
      raise UsageError(f"destination {dest} exists and is not an Orbax checkpoint; refusing to replace it") from None


def install(target: str, dest: str) -> None:
  """Renames the finished checkpoint to ``dest``; an existing ``dest`` (overwrite) is swapped out, then removed."""
  if os.path.lexists(dest):
    parent, name = os.path.dirname(dest), os.path.basename(dest)
    old = os.path.join(parent, f".{name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(dest, old)
    os.rename(target, dest)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(target, dest)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
  """SIGTERM raises :class:`Interrupted` (as SIGINT raises KeyboardInterrupt), so the caller's clean-up runs.

  Only in the main thread (signal handlers can be set nowhere else); the old handler is restored after.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def on_term(signum, _frame):
    raise Interrupted(signum)

  old = signal.signal(signal.SIGTERM, on_term)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


# ---- a bucket destination (gs://, s3://): no rename, so it is written in place and the commit marker last -----

COMMIT_MARKER = "commit_success.txt"
# the top-level names a migration (ours, or an orbax save) writes; a half-written attempt holds nothing else:
# layout v1 (the item in state/) and layout standard (the item at the top: its OCDBT databases and metadata)
_ATTEMPT_NAMES = {"state", "_CHECKPOINT_METADATA", "orbax.checkpoint", COMMIT_MARKER}
_ATTEMPT_NAMES |= {"_METADATA", "_strings.json", "_sharding", "manifest.ocdbt", "d", "array_metadatas"}
_ATTEMPT_PATTERN = re.compile(r"ocdbt\.process_\d+")
# a Hugging Face safetensors destination: what the migrator writes there (config.json first, the shards, then the
# object that makes the directory loadable last: model.safetensors.index.json, or model.safetensors alone)
_HF_NAMES = {hf_format.SINGLE, hf_format.INDEX, hf_format.CONFIG}


def _orbax_name(top: str) -> bool:
  return top in _ATTEMPT_NAMES or bool(_ATTEMPT_PATTERN.fullmatch(top))


def _hf_name(top: str) -> bool:
  return top in _HF_NAMES or hf_format.is_shard_name(top)


def check_bucket_dest(
    src_path: str, dest, overwrite: bool, log: Callable[[str], None], safetensors: bool = False
) -> None:
  """The checks of a bucket destination before any work; with ``overwrite`` an earlier result or a half-written
  attempt (objects but no commit) is deleted now, one ``log`` line. A one-line UsageError otherwise.

  A half-written attempt is refused without ``overwrite``, naming it: a bucket has no rename, so an interrupted
  migration (or orbax save) leaves its objects in place, and only the missing commit says it is unfinished: for
  an Orbax checkpoint the marker ``commit_success.txt``; for a safetensors directory (``safetensors``: the
  destination is one) ``model.safetensors.index.json`` or ``model.safetensors``, the last object written. A
  safetensors destination may replace an Orbax checkpoint or an HF directory (as on local disk), an Orbax
  destination an Orbax checkpoint only. Anything holding other objects than those is never deleted.
  """
  from parity_jax import stores

  if stores.is_remote(src_path) and stores.open_store(src_path) == dest:
    raise UsageError(f"destination {dest} is the source checkpoint; migrate to a new location")
  if stores.is_remote(src_path):
    src = stores.open_store(src_path)
    if dest.is_inside(src):
      raise UsageError(f"destination {dest} lies inside the source checkpoint {src}")
    if src.is_inside(dest):
      raise UsageError(f"destination {dest} is or contains the source checkpoint {src}")
  keys = dest.walk()
  if not keys:
    return
  tops = {k.split("/", 1)[0] for k in keys}
  orbax = all(_orbax_name(t) for t in tops)
  hf = safetensors and all(_hf_name(t) for t in keys)  # an HF directory is flat
  if not (orbax or hf):
    foreign = sorted(t for t in tops if not (_orbax_name(t) or (safetensors and _hf_name(t))))
    what = foreign[0] if foreign else sorted(tops)[0]
    raise UsageError(f"destination {dest} holds objects that are not a checkpoint ({what}); refusing")
  if orbax:
    committed, commit = COMMIT_MARKER in keys, COMMIT_MARKER
  else:
    committed, commit = hf_format.INDEX in keys or hf_format.SINGLE in keys, f"{hf_format.INDEX} or {hf_format.SINGLE}"
  what = "a checkpoint" if committed else f"a half-written attempt ({len(keys)} objects, no {commit})"
  if not overwrite:
    hint = "pass --overwrite to replace it" if committed else "pass --overwrite to delete it and migrate again"
    raise UsageError(f"destination {dest} holds {what}; {hint}")
  log(f"deleting {what} at {dest} (--overwrite)")
  dest.delete(recursive=True, missing_ok=True)
