"""Every file parity_jax writes goes through here: output-path checks, the overwrite rule, atomic writes, file hashes.

The rules, the same for every tool and library call that writes:

* **Never on or inside an input.** An output that is an input, or lies inside
  an input directory, is refused before any work (:func:`check_output_path`).
* **One overwrite rule.** An existing output is refused unless the caller
  passes ``overwrite=True`` (the tools' ``--overwrite``). An existing *empty*
  directory counts as free for directory outputs: it holds nothing to lose.
* **Atomic.** A file appears at its path complete or not at all: it is written
  next to its destination and renamed into place (:func:`atomic_output`).
* **Buckets.** An output file may be a ``gs://`` or ``s3://`` URL
  (:func:`check_output_path`, :func:`write_text_atomic`): the same rules, and
  one upload of the whole object, which the store makes visible complete or
  not at all (a single-request upload; no partial object on failure).

Every refusal is a one-line :class:`~parity_jax.errors.UsageError` naming the
argument (``what``), which the tools turn into exit code 2. ``what`` is the
name the caller knows: a tool passes its flag (``"--out"``) and is told to pass
``--overwrite``; a library function passes its parameter (``"out"``), which
reads ``out`` and ``overwrite=True`` to a library caller and ``--out`` and
``--overwrite`` to the user of a tool with those flags (:func:`parity_jax.errors.arg`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import IO, Iterable, Iterator

from parity_jax.errors import UsageError, arg

__all__ = ["atomic_output", "check_output_dir", "check_output_path", "file_sha256", "is_inside", "write_text_atomic"]

PathLike = str | os.PathLike


def _remote(path: PathLike) -> bool:
  from parity_jax.stores import is_remote

  return is_remote(path)


def is_inside(child: PathLike, parent: PathLike) -> bool:
  """True when ``child`` is ``parent`` or lies below it (symlinks resolved; bucket URLs compared as such)."""
  if _remote(child) or _remote(parent):
    from parity_jax.stores import open_store

    return _remote(child) and _remote(parent) and open_store(child).is_inside(open_store(parent))
  child, parent = os.path.realpath(child), os.path.realpath(parent)
  return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _overwrite_hint(what: str) -> str:
  """How the caller that named its output ``what`` asks for a replacement: the tool's flag or the argument."""
  return "pass --overwrite" if what.startswith("--") else "pass overwrite=True"


def _check_not_input(path: str, inputs: Iterable[PathLike | None], what: str) -> None:
  for src in inputs:
    if src is not None and (_remote(src) or os.path.exists(src)) and is_inside(path, src):
      raise UsageError(
          f"{what}={path} would overwrite or lie inside an input ({os.fspath(src)}); inputs are never modified"
      )


def check_output_path(
    path: PathLike,
    inputs: Iterable[PathLike | None] = (),
    what: str = "out",
    suffix: str | None = None,
    overwrite: bool = False,
) -> str:
  """Validates an output *file* path before any work; returns it as ``str``.

  Refused: the wrong ``suffix``, a path on or inside an input, a directory, a
  missing parent directory, an existing file unless ``overwrite``.
  """
  path, what = os.fspath(path), arg(what)
  if not path:
    raise UsageError(f"{what} is empty")
  _check_not_input(path, inputs, what)
  if suffix is not None and not path.endswith(suffix):
    raise UsageError(f"{what} must name a {suffix} file, got {path!r}")
  if _remote(path):
    return _check_bucket_output(path, what, overwrite)
  if os.path.isdir(path):
    raise UsageError(f"{what}={path} is a directory")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise UsageError(f"{what}: directory {parent} does not exist")
  if os.path.lexists(path) and not overwrite:
    raise UsageError(f"{what}={path} exists; refusing to overwrite it ({_overwrite_hint(what)})")
  return path


def _check_bucket_output(url: str, what: str, overwrite: bool) -> str:
  """:func:`check_output_path` for a ``gs://`` / ``s3://`` object: an existing bucket, not a prefix holding
  objects (a bucket's "directory"), not an existing object unless ``overwrite``."""
  from parity_jax.stores import open_store

  store = open_store(url)
  if not store.name:
    raise UsageError(f"{what}={url} names a bucket, not an object")
  bucket = open_store(f"{store.scheme}://{store.bucket}")
  if not bucket.is_dir():  # a bucket's root: False only when the bucket does not exist
    raise UsageError(f"{what}: bucket {bucket.url} does not exist")
  if store.is_dir():
    raise UsageError(f"{what}={url} is a directory (objects lie below it)")
  if store.is_file() and not overwrite:
    raise UsageError(f"{what}={url} exists; refusing to overwrite it ({_overwrite_hint(what)})")
  return store.url


def check_output_dir(
    path: PathLike,
    inputs: Iterable[PathLike | None] = (),
    what: str = "out_dir",
    overwrite: bool = False,
    will_write: Iterable[str] = (),
) -> str:
  """Validates an output *directory* before any work; returns it as ``str``.

  Refused: a path on or inside an input, an existing non-directory, and an
  existing directory that already holds one of the files named in
  ``will_write`` (or, when ``will_write`` is empty, any file) unless
  ``overwrite``. A missing directory is fine (its parent is created on write);
  an existing empty directory is fine.
  """
  path, what = os.fspath(path), arg(what)
  if not path:
    raise UsageError(f"{what} is empty")
  _check_not_input(path, inputs, what)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UsageError(f"{what}={path} exists and is not a directory")
  if os.path.isdir(path) and not overwrite:
    names = list(will_write)
    clash = [n for n in names if os.path.lexists(os.path.join(path, n))] if names else sorted(os.listdir(path))[:1]
    if clash:
      raise UsageError(f"{what}={path} already holds {clash[0]}; refusing to overwrite it ({_overwrite_hint(what)})")
  return path


@contextlib.contextmanager
def atomic_output(path: PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
  """Opens a temporary file beside ``path``; renames it into place on success, removes it on error.

  The parent directory is created if missing. ``mode`` is ``"w"`` or ``"wb"``.
  """
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  kwargs = {"encoding": encoding} if "b" not in mode else {}
  try:
    with open(tmp, mode, **kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text_atomic(path: PathLike, text: str) -> str:
  """Writes ``text`` to ``path`` atomically; returns the absolute path (a bucket URL: one upload; the URL)."""
  if _remote(path):
    from parity_jax.stores import open_store

    store = open_store(path)
    store.write_bytes(text.encode("utf-8"))
    return store.url
  with atomic_output(path) as f:
    f.write(text)
  return os.path.abspath(path)


def file_sha256(path: PathLike) -> str:
  """sha256 of a file's bytes, read in 1 MiB blocks (bounded memory for any size)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
