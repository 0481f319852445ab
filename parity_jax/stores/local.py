"""Local disk behind the :class:`~parity_jax.stores.base.Store` interface: plain os calls, atomic writes."""

from __future__ import annotations

import errno
import os
import shutil

from parity_jax import files
from parity_jax.stores.base import Pending, Store, StoreError, split_path
from parity_jax.stores.stats import count_local

__all__ = ["LocalStore"]


def _error(path: str, e: OSError) -> StoreError:
  kind = {
      errno.ENOENT: "not_found",
      errno.ENOTDIR: "not_found",
      errno.EACCES: "denied",
      errno.EPERM: "denied",
      errno.EISDIR: "invalid",
      errno.ENOTEMPTY: "invalid",
      errno.EEXIST: "invalid",
  }.get(e.errno, "io")
  return StoreError(f"{path}: {e.strerror or e}", kind)


class LocalStore(Store):
  """A path on local disk; ``url`` is the absolute path (symlinks kept; :meth:`is_inside` resolves them)."""

  scheme = "file"

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if not path:
      raise StoreError("empty local path", "invalid")
    self.url = os.path.abspath(path)

  @property
  def name(self) -> str:
    return os.path.basename(self.url)

  @property
  def local_path(self) -> str:
    return self.url

  def child(self, *names: str) -> LocalStore:
    parts = [p for n in names for p in split_path(str(n), f"{self.url} / {n!r}")]
    if not parts:
      raise StoreError(f"{self.url}: child() needs a name", "invalid")
    return LocalStore(os.path.join(self.url, *parts))

  def parent(self) -> LocalStore:
    return LocalStore(os.path.dirname(self.url))

  def is_inside(self, other: Store) -> bool:
    return isinstance(other, LocalStore) and files.is_inside(self.url, other.url)

  def kvstore_spec(self, as_dir: bool = True) -> dict:
    return {"driver": "file", "path": self.url.rstrip("/") + "/" if as_dir else self.url}

  def is_file(self) -> bool:
    return os.path.isfile(self.url)

  def is_dir(self) -> bool:
    return os.path.isdir(self.url)

  def exists(self) -> bool:
    return os.path.exists(self.url)

  def listdir(self) -> tuple[list[str], list[str]]:
    try:
      with os.scandir(self.url) as it:
        entries = list(it)
    except OSError as e:
      raise _error(self.url, e) from None
    count_local(lists=1)
    subdirs = sorted(e.name for e in entries if e.is_dir())
    return sorted(e.name for e in entries if not e.is_dir()), subdirs

  def walk(self) -> list[str]:
    out = []
    for root, dirs, names in os.walk(self.url):
      count_local(lists=1)
      rel = os.path.relpath(root, self.url)
      out += [n if rel == "." else f"{rel}/{n}".replace(os.sep, "/") for n in names]
    return sorted(out)

  def size(self) -> int:
    try:
      if os.path.isdir(self.url):
        raise StoreError(f"{self.url}: is a directory", "invalid")
      return os.stat(self.url).st_size
    except OSError as e:
      raise _error(self.url, e) from None

  def _read(self, start: int, stop: int | None) -> bytes:
    try:
      with open(self.url, "rb") as f:
        if stop is None:
          data = f.read()
        else:
          f.seek(start)
          data = f.read(stop - start)
          if len(data) != stop - start:
            raise StoreError(
                f"{self.url}: bytes [{start}, {stop}) lie past its end (size {start + len(data)})", "out_of_range"
            )
    except OSError as e:
      raise _error(self.url, e) from None
    count_local(reads=1, bytes_read=len(data))
    return data

  def read_bytes_async(self) -> Pending:
    try:
      return Pending(value=self._read(0, None))
    except StoreError as e:
      return Pending(error=e)

  def read_range_async(self, start: int, stop: int) -> Pending:
    start, stop = self._check_range(start, stop)
    try:
      return Pending(value=self._read(start, stop))
    except StoreError as e:
      return Pending(error=e)

  def write_bytes(self, data: bytes) -> None:
    data = bytes(data)
    if os.path.isdir(self.url):
      raise StoreError(f"{self.url}: is a directory", "invalid")
    try:
      with files.atomic_output(self.url, "wb") as f:
        f.write(data)
    except OSError as e:
      raise _error(self.url, e) from None
    count_local(writes=1, bytes_written=len(data))

  def delete(self, recursive: bool = False, missing_ok: bool = False) -> None:
    try:
      if os.path.isdir(self.url) and not os.path.islink(self.url):
        if recursive:
          shutil.rmtree(self.url)
        else:
          os.rmdir(self.url)
      else:
        os.remove(self.url)
    except FileNotFoundError:
      if not missing_ok:
        raise StoreError(f"{self.url}: no such file or directory", "not_found") from None
      return
    except OSError as e:
      raise _error(self.url, e) from None
    count_local(deletes=1)

  def describe(self) -> dict:
    return {"scheme": "file", "url": self.url, "path": self.url}

  def _identity(self) -> tuple:
    return ("file", self.url)
