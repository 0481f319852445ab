"""The storage seam: every byte a checkpoint side reads or writes, on local disk, in GCS or in S3.

:func:`open_store` turns a path or URL into a :class:`Store`:

* ``"a/b"``, ``"/a/b"``, ``"file:///a/b"``, a ``pathlib.Path``: local disk
  (:class:`~parity_jax.stores.local.LocalStore`, plain os calls);
* ``"gs://bucket/a/b"``: Google Cloud Storage
  (:class:`~parity_jax.stores.gcs.GcsStore`; endpoint and credentials as
  google-cloud-storage finds them, see :mod:`parity_jax.stores.gcs`);
* ``"s3://bucket/a/b"``: S3 and S3-compatible stores
  (:class:`~parity_jax.stores.s3.S3Store`; as boto3 finds them, see
  :mod:`parity_jax.stores.s3`).

A store reads and writes objects itself (``read_range``, ``read_bytes``,
``write_bytes``, ``listdir``, ``delete``...), starts reads that run
concurrently (``read_range_async``, :func:`read_many`), and hands
tensorstore's zarr/OCDBT drivers the same location
(``kvstore_spec`` + ``context_spec``). Failures are one-line
:class:`StoreError`\\ s with a ``kind``; waits are bounded (:class:`Limits`).
:func:`io_stats` counts requests and bytes per scheme for reports; within
:func:`listing_snapshot` a bucket prefix is listed once for every question
asked of it (opening a checkpoint asks several).
"""

from __future__ import annotations

import os
import re

from parity_jax.stores.base import Limits, Pending, Store, StoreError, limits, read_many, set_limits
from parity_jax.stores.remote import listing_snapshot
from parity_jax.stores.stats import io_stats

__all__ = [
    "Limits",
    "Pending",
    "Store",
    "StoreError",
    "io_stats",
    "is_remote",
    "limits",
    "listing_snapshot",
    "open_store",
    "read_many",
    "set_limits",
]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)


def _split(url: str | os.PathLike) -> tuple[str, str]:
  if isinstance(url, Store):
    return url.scheme, url.url
  if isinstance(url, os.PathLike):
    return "file", os.fspath(url)
  if not isinstance(url, str):
    raise StoreError(f"not a path or URL: {url!r}", "invalid")
  m = _URL.match(url.strip())
  if not m:
    return "file", url
  return m.group(1).lower(), m.group(2)


def is_remote(url: str | os.PathLike | Store) -> bool:
  """True for ``gs://`` and ``s3://`` URLs (and stores), False for local paths and ``file://``."""
  return _split(url)[0] in ("gs", "s3")


def open_store(url: str | os.PathLike | Store) -> Store:
  """The :class:`Store` for a local path, ``file://``, ``gs://`` or ``s3://`` URL; endpoints resolved now."""
  if isinstance(url, Store):
    return url
  scheme, rest = _split(url)
  if scheme == "file":
    from parity_jax.stores.local import LocalStore

    if isinstance(url, str) and _URL.match(url.strip()):
      if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
      if not rest.startswith("/"):
        raise StoreError(f"{url}: a file:// URL needs an absolute path (file:///a/b)", "invalid")
    return LocalStore(rest)
  if scheme in ("gs", "s3"):
    bucket, _, path = rest.partition("/")
    if not bucket:
      raise StoreError(f"{url}: no bucket name", "invalid")
    if scheme == "gs":
      from parity_jax.stores.gcs import GcsStore

      return GcsStore(bucket, path)
    from parity_jax.stores.s3 import S3Store

    return S3Store(bucket, path)
  raise StoreError(f"{url}: unsupported scheme {scheme}:// (gs://, s3://, file:// or a local path)", "invalid")
