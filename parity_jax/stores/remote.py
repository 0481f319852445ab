"""Buckets behind the :class:`~parity_jax.stores.base.Store` interface, over tensorstore's ``gcs`` and ``s3`` kvstores.

A bucket has objects, not directories: a "directory" is a key prefix ending
in ``/`` with at least one object below it, and listing a prefix lists every
object below it (tensorstore's list has no delimiter). One
``ts.KvStore`` per bucket and endpoint is opened at the bucket's root and
shared by every :class:`BucketStore` on it; its context carries the bounded
retries, the request concurrency and the credentials (:meth:`context_spec`).

The first request to each bucket checks that the bucket exists, with stderr
(file descriptor 2) captured: that is where tensorstore's native code writes
its one-time lines about how it found credentials. :meth:`describe` reports
that line; the others go back to stderr.

Object sizes: tensorstore's Python API returns no object size (its list
returns keys only, a read returns bytes and a generation), so :meth:`size`
asks for one byte far past the end and takes the size the server states in
its refusal (``Content-Range: bytes */N``, S3's ``<ActualObjectSize>``,
tensorstore's "total size N"), checked by two one-byte reads around it;
without such a hint it searches with one-byte range reads (a few round
trips of concurrent probes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import time
from typing import Any, Iterator

from parity_jax.stores.base import Pending, Store, StoreError, limits, native_stderr, reemit, split_path

__all__ = ["BucketStore", "Endpoint", "listing_snapshot"]

_HUGE = 1 << 62
# an absl log line written by tensorstore's native code: "E1207 06:50:20.669642   18409 common-io:5] message"
_NATIVE_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ")


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """How one scheme's buckets are reached: the spec and context members, and a secret-free description.

  ``key`` identifies the endpoint (two stores are on the same bucket only
  with equal keys); ``before_open`` is called, under a lock, right before
  tensorstore opens a kvstore with this endpoint (GCS: the process-wide
  endpoint variable tensorstore reads at open). ``check`` is the first request
  sent to a bucket: ``"list"`` (S3: a missing bucket is an error) or
  ``"read"`` (GCS: tensorstore's GCS list ignores non-retryable HTTP errors
  and returns an empty list for a missing or forbidden bucket, so a read is
  sent instead, and :attr:`bucket_url` -- the bucket's metadata URL, fetched
  through tensorstore's ``http`` driver -- tells a missing bucket from a
  missing object).
  """

  scheme: str
  key: tuple
  spec: dict
  context: dict
  about: dict
  before_open: Any = None
  credentials_log: str = ""  # a regex for tensorstore's log line that says which credentials it found
  check: str = "list"
  bucket_url: str = ""  # + bucket name: GET answers 404 when the bucket does not exist


_KV: dict[tuple, Any] = {}
_CHECKED: dict[tuple, str] = {}  # (endpoint key, bucket) -> credentials line tensorstore logged, if any
_OPEN_LOCK = threading.Lock()
_PROBE_KEY = ".parity-jax-probe"  # a key that is not expected to exist
_SNAPSHOT = threading.local()


@contextlib.contextmanager
def listing_snapshot() -> Iterator[None]:
  """Within the block (this thread), a bucket prefix listed once answers every later listing, ``is_dir`` and
  ``is_file`` of the same or a deeper prefix, without a request.

  Opening a checkpoint asks the same question of the same prefix several times
  (which format, which layout, the commit marker); each is a round trip to the
  store. Only for reads: nothing written inside the block is seen by it.
  """
  outer = getattr(_SNAPSHOT, "listings", None)
  if outer is None:
    _SNAPSHOT.listings = {}
  try:
    yield
  finally:
    if outer is None:
      _SNAPSHOT.listings = None


def _listed(key: tuple, path: str) -> list[str] | None:
  """Every full key below ``path`` (a prefix ending in "/", or "" for the root) from a snapshot's listing of it or
  of a shorter prefix; None when no listing covers it."""
  listings = getattr(_SNAPSHOT, "listings", None)
  if not listings:
    return None
  for (k, prefix), keys in listings.items():
    if k == key and path.startswith(prefix):
      return [n for n in keys if n.startswith(path)]
  return None


def _kvstore(endpoint: Endpoint, bucket: str, lim) -> Any:
  """The shared kvstore of one bucket (opened at its root); its first use checks the bucket, stderr captured."""
  key = (endpoint.key, bucket, lim)
  kv = _KV.get(key)
  if kv is not None:
    return kv
  import tensorstore as ts

  with _OPEN_LOCK:
    kv = _KV.get(key)
    if kv is not None:
      return kv
    if endpoint.before_open is not None:
      endpoint.before_open()
    error = None
    with native_stderr() as lines:
      try:
        ctx = ts.Context({**endpoint.context, **_limits_context(endpoint.scheme, lim)})
        try:
          kv = ts.KvStore.open({**endpoint.spec, "bucket": bucket}, context=ctx).result(timeout=lim.timeout())
        except Exception as e:  # noqa: BLE001 -- tensorstore raises ValueError with a status text
          raise StoreError(f"{endpoint.scheme}://{bucket}: {_strip(str(e))}", "invalid") from None
        _check_bucket(endpoint, bucket, kv, lim)
      except StoreError as e:
        error = e
    reemit(lines, _NATIVE_LOG.match)
    if error is not None:
      raise error
    pattern = endpoint.credentials_log
    found = [line for line in lines if pattern and _NATIVE_LOG.match(line) and re.search(pattern, line)]
    _CHECKED[(endpoint.key, bucket)] = _log_message(found[-1]) if found else ""
    _KV[key] = kv
  return kv


def _check_bucket(endpoint: Endpoint, bucket: str, kv, lim) -> None:
  """The first request to a bucket: a missing bucket, missing credentials or a dead endpoint fail here, once."""
  import tensorstore as ts

  t0 = time.monotonic()
  if endpoint.check == "list":
    fut = kv.list(ts.KvStore.KeyRange(_PROBE_KEY, _PROBE_KEY + "\x00"))
  else:
    fut = kv.read(_PROBE_KEY, byte_range=slice(0, 0))
  name, url = f"{endpoint.scheme}://{bucket}", endpoint.about.get("endpoint", "?")
  try:
    fut.result(timeout=lim.timeout())
    if bucket_exists(endpoint, bucket, lim) is False:
      raise StoreError(f"{name}: no such bucket (at {url})", "not_found")
  except TimeoutError:
    fut.cancel()
    raise StoreError(f"{name}: no answer from {url} within {time.monotonic() - t0:.1f} s", "timeout") from None
  except StoreError:
    raise
  except Exception as e:  # noqa: BLE001
    reason, kind = _reason(str(e), url, time.monotonic() - t0)
    if kind == "not_found":
      raise StoreError(f"{name}: no such bucket (at {url})", "not_found") from None
    if kind == "denied":
      reason = f"{reason[: reason.index(':')]} with credentials from {endpoint.about.get('credentials', '?')}"
    raise StoreError(f"{name}: {reason}", kind) from None


def bucket_exists(endpoint: Endpoint, bucket: str, lim) -> bool | None:
  """Whether the bucket exists, when the endpoint can tell (GCS: its metadata URL); None when it cannot."""
  if not endpoint.bucket_url:
    return None
  import tensorstore as ts

  try:
    kv = ts.KvStore.open({"driver": "http", "base_url": endpoint.bucket_url}).result(timeout=lim.timeout())
    r = kv.read(bucket).result(timeout=lim.timeout())
  except Exception:  # noqa: BLE001 -- only a diagnostic: no answer means "cannot tell"
    return None
  return r.state == "value" if r.state in ("value", "missing") else None


def _limits_context(scheme: str, lim) -> dict:
  prefix = {"gs": "gcs", "s3": "s3"}[scheme]
  return {f"{prefix}_request_retries": lim.retries_spec(), f"{prefix}_request_concurrency": {"limit": lim.concurrency}}


# ---- turning tensorstore's status texts into one line and a kind
_HTTP = re.compile(r"http_response_code='(\d+)'")
_CURL = re.compile(r"curl_code='(\d+)'")
_ATTEMPTS = re.compile(r"All (\d+) retry attempts failed")
_SIZE_HINTS = (
    re.compile(r"total size (\d+)"),
    re.compile(r"bytes \*/(\d+)"),
    re.compile(r"<ActualObjectSize>(\d+)</ActualObjectSize>"),
    re.compile(r"bytes \d+-\d+/(\d+)"),
)


def _size_hints(text: str) -> list[int]:
  """Object sizes a server or tensorstore stated in a refusal of a byte range (to be checked, never trusted)."""
  return [int(m.group(1)) for rx in _SIZE_HINTS for m in [rx.search(text)] if m]


def _strip(text: str) -> str:
  text = re.sub(
      r"\s*\[(http_response_body|tensorstore_spec|x-amzn?-[a-z-]+|source locations?)=.*?\](?=\s*\[|$)", "", text
  )
  return text.split("\n")[0].strip()


def _reason(text: str, endpoint_url: str, elapsed: float) -> tuple[str, str]:
  """(one-line reason, kind) of a failed tensorstore call."""
  http = [int(c) for c in _HTTP.findall(text)]
  curl = [int(c) for c in _CURL.findall(text)]
  attempts = _ATTEMPTS.search(text)
  after = f" after {attempts.group(1)} attempts in {elapsed:.1f} s" if attempts else ""
  code = http[-1] if http else None
  if code in (401, 403) or "PERMISSION_DENIED" in text or "UNAUTHENTICATED" in text:
    return f"access denied ({code or 403}): check the credentials", "denied"
  if code is not None and (code == 429 or code >= 500):
    what = "throttled (429)" if code == 429 else f"server error ({code})"
    return f"{what} from {endpoint_url}{after}", "unavailable"
  if curl:
    c = curl[-1]
    what = {
        6: "host not found",
        7: "connection refused",
        28: "timed out",
        52: "empty reply from server",
        55: "connection lost while sending",
        56: "connection lost while receiving",
    }.get(c, f"curl error {c}")
    return f"cannot reach {endpoint_url} ({what}){after}", "unreachable"
  if code == 404 or "NOT_FOUND" in text:
    return "not found", "not_found"
  if "OUT_OF_RANGE" in text or code == 416:
    return "byte range past the end", "out_of_range"
  return _strip(text) or "failed", "io"


class BucketStore(Store):
  """An object or prefix in a bucket, reached through tensorstore's ``gcs`` or ``s3`` kvstore driver."""

  def __init__(self, endpoint: Endpoint, bucket: str, path: str = ""):
    self._endpoint = endpoint
    self.scheme = endpoint.scheme
    self.bucket = bucket
    self.path = "/".join(split_path(path, f"{endpoint.scheme}://{bucket}/{path}"))
    self.url = f"{self.scheme}://{bucket}" + (f"/{self.path}" if self.path else "")
    self._limits = limits()

  # ---- naming
  @property
  def name(self) -> str:
    return self.path.rsplit("/", 1)[-1]

  def child(self, *names: str) -> BucketStore:
    parts = [p for n in names for p in split_path(str(n), f"{self.url} / {n!r}")]
    if not parts:
      raise StoreError(f"{self.url}: child() needs a name", "invalid")
    return self._at("/".join([self.path, *parts]) if self.path else "/".join(parts))

  def parent(self) -> BucketStore:
    return self._at(self.path.rsplit("/", 1)[0] if "/" in self.path else "")

  def _at(self, path: str) -> BucketStore:
    new = object.__new__(type(self))
    new.__dict__.update(self.__dict__)
    new.path = path
    new.url = f"{self.scheme}://{self.bucket}" + (f"/{path}" if path else "")
    return new

  def is_inside(self, other: Store) -> bool:
    if not isinstance(other, BucketStore) or other._identity()[:3] != self._identity()[:3]:
      return False
    return not other.path or self.path == other.path or self.path.startswith(other.path + "/")

  def _identity(self) -> tuple:
    return (self.scheme, self._endpoint.key, self.bucket, self.path)

  # ---- tensorstore
  def kvstore_spec(self, as_dir: bool = True) -> dict:
    path = self.path + "/" if as_dir and self.path else self.path
    return {**self._endpoint.spec, "bucket": self.bucket, "path": path}

  def context_spec(self) -> dict:
    return {**self._endpoint.context, **_limits_context(self.scheme, self._limits)}

  # ---- plumbing
  def _kv(self):
    return _kvstore(self._endpoint, self.bucket, self._limits)

  def _endpoint_url(self) -> str:
    return self._endpoint.about.get("endpoint", "?")

  def _timeout_message(self, op: str, t0: float) -> str:
    return f"{self.url}: no answer from {self._endpoint_url()} to a {op} within {time.monotonic() - t0:.1f} s"

  def _wait(self, fut, op: str, nbytes: int = 0) -> Any:
    """The result of a tensorstore future, within the deadline; failures become a StoreError."""
    t0 = time.monotonic()
    try:
      return fut.result(timeout=self._limits.timeout(nbytes))
    except TimeoutError:
      fut.cancel()
      raise StoreError(self._timeout_message(op, t0), "timeout") from None
    except Exception as e:  # noqa: BLE001 -- tensorstore raises ValueError with a status text
      raise self._error(str(e), op, time.monotonic() - t0) from None

  def _error(self, text: str, op: str, elapsed: float) -> StoreError:
    reason, kind = _reason(text, self._endpoint_url(), elapsed)
    if kind == "denied":
      cred = self._endpoint.about.get("credentials", "?")
      reason = f"access denied ({(_HTTP.findall(text) or ['403'])[-1]}) to {op} it with credentials from {cred}"
    return StoreError(f"{self.url}: {reason}", kind)

  def _missing(self) -> StoreError:
    if bucket_exists(self._endpoint, self.bucket, self._limits) is False:
      return StoreError(f"{self.scheme}://{self.bucket}: no such bucket (at {self._endpoint_url()})", "not_found")
    return StoreError(f"{self.url}: no such object", "not_found")

  def _key(self) -> str:
    if not self.path:
      raise StoreError(f"{self.url}: a bucket's root is not an object", "invalid")
    return self.path

  def _prefix(self) -> str:
    return self.path + "/" if self.path else ""

  def _list(self) -> list[str]:
    import tensorstore as ts

    p = self._prefix()
    names = _listed(self._identity()[:3], p)
    if names is None:
      rng = ts.KvStore.KeyRange(p, p[:-1] + "0") if p else ts.KvStore.KeyRange()
      keys = self._wait(self._kv().list(rng), "list")
      names = [k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in keys]
      listings = getattr(_SNAPSHOT, "listings", None)
      if listings is not None:
        listings[(self._identity()[:3], p)] = names
    return sorted(k[len(p) :] for k in names if k.startswith(p) and len(k) > len(p))

  # ---- objects
  def _bucket_ok(self) -> bool:
    """False when the bucket does not exist; other failures (denied, unreachable) raise."""
    try:
      self._kv()
    except StoreError as e:
      if e.kind == "not_found":
        return False
      raise
    return True

  def is_file(self) -> bool:
    if not self.path or not self._bucket_ok():
      return False
    parent = self.path.rsplit("/", 1)[0] + "/" if "/" in self.path else ""
    listed = _listed(self._identity()[:3], parent)
    if listed is not None:
      return self.path in listed
    r = self._wait(self._kv().read(self.path, byte_range=slice(0, 0)), "read")
    return r.state == "value"

  def is_dir(self) -> bool:
    if not self._bucket_ok():
      return False
    return True if not self.path else bool(self._list())

  def walk(self) -> list[str]:
    self._kv()  # a missing bucket, missing credentials or a dead endpoint: one StoreError
    return self._list()

  def listdir(self) -> tuple[list[str], list[str]]:
    rel = self._list()
    if not rel and self.path:
      if self.is_file():
        raise StoreError(f"{self.url}: is an object, not a directory", "invalid")
      if bucket_exists(self._endpoint, self.bucket, self._limits) is False:
        raise self._missing()
      raise StoreError(f"{self.url}: no such directory (no object below this prefix)", "not_found")
    files, dirs = set(), set()
    for k in rel:
      head, sep, _ = k.partition("/")
      (dirs if sep else files).add(head)
    return sorted(files), sorted(dirs)

  def _probe(self, start: int) -> Any:
    return self._kv().read(self._key(), byte_range=slice(start, start + 1))

  def _probe_result(self, fut) -> tuple[bool, str]:
    """(whether byte ``start`` exists, the error text if it does not); other failures raise."""
    t0 = time.monotonic()
    try:
      r = fut.result(timeout=self._limits.timeout())
    except TimeoutError:
      fut.cancel()
      raise StoreError(self._timeout_message("read", t0), "timeout") from None
    except Exception as e:  # noqa: BLE001
      text = str(e)
      if "OUT_OF_RANGE" in text or "Content-Range" in text or "416" in text:
        return False, text
      raise self._error(text, "read", time.monotonic() - t0) from None
    if r.state != "value":
      raise self._missing()
    return len(r.value) == 1, ""

  def size(self) -> int:
    exists, text = self._probe_result(self._probe(_HUGE))
    if exists:
      raise StoreError(f"{self.url}: the server served a byte at offset 2**62", "io")
    for n in _size_hints(text):
      if self._size_is(n):
        return n
    return self._search_size()

  def _size_is(self, n: int) -> bool:
    probes = [self._probe(n - 1)] if n > 0 else []
    past = self._probe(n)
    ok = all(self._probe_result(p)[0] for p in probes)
    return ok and not self._probe_result(past)[0]

  def _search_size(self) -> int:
    """The size by concurrent one-byte probes: powers of two at once, then 32-way narrowing.

    Once the end is known within 1 MiB, one read from the last byte known to
    exist lets tensorstore state the size (its "total size N" refusal of the
    short answer), checked by two probes.
    """
    lo, hi = -1, None  # byte lo exists (or -1), byte hi does not
    for exponents in (range(0, 21, 2), range(21, 63)):  # small objects first: 11 probes cover 1 MiB
      offs = [(1 << k) - 1 for k in exponents]
      found = [self._probe_result(f)[0] for f in [self._probe(o) for o in offs]]
      lo = max([lo] + [o for o, ok in zip(offs, found) if ok])
      missing = [o for o, ok in zip(offs, found) if not ok]
      if missing:
        hi = min(missing)
        break
    if hi is None:
      raise StoreError(f"{self.url}: the server served a byte at offset 2**62", "io")
    while hi - lo > 1:
      if lo >= 0 and hi - lo <= 1 << 20:
        fut = self._kv().read(self._key(), byte_range=slice(lo, hi + 1))
        t0 = time.monotonic()
        try:
          fut.result(timeout=self._limits.timeout(hi - lo))
        except TimeoutError:
          fut.cancel()
          raise StoreError(self._timeout_message("read", t0), "timeout") from None
        except Exception as e:  # noqa: BLE001
          for n in _size_hints(str(e)):
            if lo < n <= hi and self._size_is(n):
              return n
      step = max(1, (hi - lo) // 33)
      offs = list(range(lo + step, hi, step))[:32]
      found = [self._probe_result(f)[0] for f in [self._probe(o) for o in offs]]
      lo = max([lo] + [o for o, ok in zip(offs, found) if ok])
      hi = min([hi] + [o for o, ok in zip(offs, found) if not ok])
    return lo + 1

  def read_bytes_async(self) -> Pending:
    return self._read_async(None, None)

  def read_range_async(self, start: int, stop: int) -> Pending:
    start, stop = self._check_range(start, stop)
    return self._read_async(start, stop)

  def _read_async(self, start: int | None, stop: int | None) -> Pending:
    try:
      key, kv = self._key(), self._kv()
    except StoreError as e:
      return Pending(error=e)
    fut = kv.read(key) if start is None else kv.read(key, byte_range=slice(start, stop))
    t0 = time.monotonic()
    nbytes = 0 if stop is None else stop - start

    def wait() -> bytes:
      try:
        r = fut.result(timeout=self._limits.timeout(nbytes))
      except TimeoutError:
        fut.cancel()
        raise StoreError(self._timeout_message("read", t0), "timeout") from None
      except Exception as e:  # noqa: BLE001
        text = str(e)
        err = self._error(text, "read", time.monotonic() - t0)
        if err.kind == "out_of_range" or (start is not None and "Content-Range" in text):
          sizes = _size_hints(text)
          size = f" (size {sizes[0]})" if sizes else ""
          err = StoreError(f"{self.url}: bytes [{start}, {stop}) lie past its end{size}", "out_of_range")
        raise err from None
      if r.state != "value":
        raise self._missing()
      value = bytes(r.value)
      if start is not None and len(value) != stop - start:
        raise StoreError(f"{self.url}: bytes [{start}, {stop}) lie past its end", "out_of_range")
      return value

    return Pending(wait=wait)

  def write_bytes(self, data: bytes) -> None:
    data = data if isinstance(data, (bytes, bytearray)) else bytes(data)  # a bytearray is not copied here
    self._wait(self._kv().write(self._key(), data), "write", len(data))

  def delete(self, recursive: bool = False, missing_ok: bool = False) -> None:
    import tensorstore as ts

    kv = self._kv()
    below = self._list() if self.path or recursive else []
    if below and not recursive:
      raise StoreError(f"{self.url}: is a directory (not empty); pass recursive=True", "invalid")
    is_file = self.is_file()
    if not below and not is_file:
      if missing_ok:
        return
      raise StoreError(f"{self.url}: no such object or directory", "not_found")
    if below:
      p = self._prefix()
      rng = ts.KvStore.KeyRange(p, p[:-1] + "0") if p else ts.KvStore.KeyRange()
      self._wait(kv.delete_range(rng), "delete")
    if is_file:
      self._wait(kv.delete_range(ts.KvStore.KeyRange(self.path, self.path + "\x00")), "delete")

  def ping(self) -> StoreError | None:
    """One zero-byte read of an absent key at tensorstore's smallest retry bound (``max_retries=1``: at most two
    HTTP attempts, no backoff); the :class:`StoreError` if the endpoint cannot be reached now (kind
    ``unreachable`` or ``timeout``), else None (it answered, whatever the answer)."""
    lim = dataclasses.replace(self._limits, max_retries=1, initial_delay_s=0.0, max_delay_s=0.0)
    try:
      kv = _kvstore(self._endpoint, self.bucket, lim)
      fut = kv.read(_PROBE_KEY, byte_range=slice(0, 0))
      t0 = time.monotonic()
      try:
        fut.result(timeout=lim.timeout())
      except TimeoutError:
        fut.cancel()
        raise StoreError(f"{self.scheme}://{self.bucket}: {self._timeout_message('read', t0)}", "timeout") from None
      except Exception as e:  # noqa: BLE001 -- tensorstore raises ValueError with a status text
        reason, kind = _reason(str(e), self._endpoint_url(), 0.0)
        raise StoreError(f"{self.scheme}://{self.bucket}: {reason}", kind) from None
    except StoreError as e:
      if e.kind not in ("unreachable", "timeout"):
        return None
      return StoreError(re.sub(r" after \d+ attempts in [\d.]+ s$", "", str(e)), e.kind)  # one attempt: no count
    return None

  def describe(self) -> dict:
    out = {"scheme": self.scheme, "url": self.url, "bucket": self.bucket, "path": self.path, **self._endpoint.about}
    logged = _CHECKED.get((self._endpoint.key, self.bucket))
    if logged:
      out["credentials_found"] = logged
    return out


def _log_message(line: str) -> str:
  """The message of an absl log line (``I1207 06:50:13.37 18330 file.cc:136] message``)."""
  return line.split("] ", 1)[-1].strip()
