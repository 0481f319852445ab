"""What every store shares: the :class:`Store` interface, :class:`StoreError`, the bounds on waiting, reads in flight.

A :class:`Store` names one location -- a directory or an object -- on local
disk or in a bucket. It is an immutable value: equal when it names the same
place, hashable, ``str()`` is its URL. The bytes go through its methods
(``read_range``, ``write_bytes``, ``listdir``, ...) or, for tensorstore's
zarr/OCDBT drivers, through :meth:`Store.kvstore_spec` and
:meth:`Store.context_spec`.

Every failure is a :class:`StoreError`: one line naming the location and the
reason, with a ``kind`` a caller can act on (``not_found``, ``denied``,
``unreachable``, ``unavailable``, ``timeout``, ``out_of_range``, ``invalid``,
``io``). Nothing waits without bound: remote requests are retried with
exponential backoff a bounded number of times (:class:`Limits`), a stalled
connection is dropped, and every synchronous call has a deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import threading
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from parity_jax.errors import UsageError, first_line

__all__ = ["Limits", "Pending", "Store", "StoreError", "limits", "read_many", "set_limits"]

KINDS = ("invalid", "not_found", "denied", "unreachable", "unavailable", "timeout", "out_of_range", "io")


class StoreError(UsageError):
  """A storage operation failed; ``str(e)`` is one line naming the location, ``kind`` says what went wrong.

  Kinds: ``invalid`` (a malformed URL or setting), ``not_found`` (no such
  bucket, object or directory), ``denied`` (401/403: missing or wrong
  credentials), ``unreachable`` (the endpoint refused or dropped the
  connection, after the retries), ``unavailable`` (throttling or 5xx answers,
  after the retries), ``timeout`` (no answer within the deadline),
  ``out_of_range`` (a byte range past the end), ``io`` (anything else).
  """

  def __init__(self, message: str, kind: str = "io"):
    assert kind in KINDS, kind
    super().__init__(first_line(message))
    self.kind = kind


@dataclasses.dataclass(frozen=True)
class Limits:
  """How long remote storage is waited for before a :class:`StoreError`.

  ``max_retries`` attempts per request with exponential backoff from
  ``initial_delay_s`` up to ``max_delay_s`` (tensorstore's
  ``gcs_request_retries`` / ``s3_request_retries``; tensorstore's own default
  is 32 attempts up to 32 s apart, minutes in all); a connection that moves
  less than 1 byte/s for ``stall_s`` seconds is dropped and retried (curl's
  low-speed limit, ``TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS``, set when the
  first bucket store is opened unless already set); a synchronous call gives
  up after ``deadline_s`` plus one second per ``min_rate`` bytes it reads.
  ``concurrency`` is the number of requests in flight per bucket endpoint.
  The defaults put a refused connection or a persistent 503 at about 20 s.
  """

  max_retries: int = 5
  initial_delay_s: float = 1.0
  max_delay_s: float = 8.0
  stall_s: int = 10
  deadline_s: float = 60.0
  min_rate: float = float(1 << 20)
  concurrency: int = 32

  def retries_spec(self) -> dict:
    """tensorstore's retry resource (``*_request_retries``) for these limits."""
    return {
        "max_retries": int(self.max_retries),
        "initial_delay": f"{self.initial_delay_s:g}s",
        "max_delay": f"{max(self.max_delay_s, self.initial_delay_s):g}s",
    }

  def timeout(self, nbytes: int = 0) -> float:
    """The deadline of one synchronous call that moves ``nbytes``."""
    return self.deadline_s + max(0, nbytes) / self.min_rate


_LIMITS = Limits()
_LIMITS_LOCK = threading.Lock()


def limits() -> Limits:
  """The bounds in force for stores opened from now on."""
  return _LIMITS


def set_limits(**changes) -> Limits:
  """Changes the bounds (fields of :class:`Limits`) for stores opened from now on; returns the previous ones."""
  global _LIMITS
  with _LIMITS_LOCK:
    previous = _LIMITS
    try:
      _LIMITS = dataclasses.replace(_LIMITS, **changes)
    except TypeError as e:
      raise StoreError(f"set_limits: {e}", "invalid") from None
    return previous


class Pending:
  """One read in flight: :meth:`result` waits for its bytes (bounded) and raises :class:`StoreError` on failure."""

  __slots__ = ("_wait", "_done", "_value", "_error")

  def __init__(
      self, wait: Callable[[], bytes] | None = None, value: bytes | None = None, error: BaseException | None = None
  ):
    self._wait, self._done, self._value, self._error = wait, wait is None, value, error

  def result(self) -> bytes:
    if not self._done:
      try:
        self._value = self._wait()
      except BaseException as e:  # noqa: BLE001 -- kept and re-raised by every later result()
        self._error = e
      self._done, self._wait = True, None
    if self._error is not None:
      raise self._error
    return self._value


class Store:
  """A location on local disk or in a bucket (see the module docstring); subclasses implement the I/O."""

  scheme: str = ""
  url: str = ""

  # ---- naming
  @property
  def name(self) -> str:
    """The last component of the path ("" for a bucket's root)."""
    raise NotImplementedError

  @property
  def local_path(self) -> str | None:
    """The absolute local path, or None for a bucket."""
    return None

  def child(self, *names: str) -> "Store":
    """The location ``names`` below this one (each name may hold ``/``; ``.`` and ``..`` are refused)."""
    raise NotImplementedError

  def parent(self) -> "Store":
    """The location one level up (a root is its own parent)."""
    raise NotImplementedError

  def is_inside(self, other: "Store") -> bool:
    """True when this location is ``other`` or lies below it, on the same disk or bucket and endpoint."""
    raise NotImplementedError

  # ---- tensorstore
  def kvstore_spec(self, as_dir: bool = True) -> dict:
    """A tensorstore kvstore spec for this location (a directory prefix ending in ``/`` when ``as_dir``)."""
    raise NotImplementedError

  def context_spec(self) -> dict:
    """The tensorstore context resources this store needs (retries, concurrency, credentials)."""
    return {}

  # ---- objects
  def exists(self) -> bool:
    return self.is_file() or self.is_dir()

  def is_file(self) -> bool:
    raise NotImplementedError

  def is_dir(self) -> bool:
    raise NotImplementedError

  def listdir(self) -> tuple[list[str], list[str]]:
    """(files, subdirectories) immediately below, each sorted; :class:`StoreError` if there is no such directory."""
    raise NotImplementedError

  def walk(self) -> list[str]:
    """Every object (file) below this directory, as sorted ``/``-separated relative keys (one listing on a bucket).

    A missing directory (or bucket prefix with nothing below it) gives ``[]``;
    a missing bucket or an unreachable store is a :class:`StoreError`.
    """
    raise NotImplementedError

  def size(self) -> int:
    raise NotImplementedError

  def read_bytes(self) -> bytes:
    """The whole object."""
    return self.read_bytes_async().result()

  def read_bytes_async(self) -> Pending:
    """Starts reading the whole object; many may be in flight at once."""
    raise NotImplementedError

  def read_range(self, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)``; a range past the end is a :class:`StoreError` of kind ``out_of_range``."""
    return self.read_range_async(start, stop).result()

  def read_range_async(self, start: int, stop: int) -> Pending:
    """Starts reading bytes ``[start, stop)``; many may be in flight at once."""
    raise NotImplementedError

  def write_bytes(self, data: bytes) -> None:
    """Writes the whole object: complete or not at all (local: temporary file and rename; bucket: one upload)."""
    raise NotImplementedError

  def delete(self, recursive: bool = False, missing_ok: bool = False) -> None:
    """Deletes the object, or the directory with everything below it when ``recursive``."""
    raise NotImplementedError

  def ping(self) -> "StoreError | None":
    """Whether the store answers now (one read at the smallest retry bound): the :class:`StoreError` of an endpoint
    that cannot be reached (``unreachable``, ``timeout``), else None. Local disk always answers."""
    return None

  def describe(self) -> dict:
    """Where this is and how it is reached, for reports: scheme, bucket, path, endpoint, credential source; never a secret."""
    raise NotImplementedError

  # ---- value semantics
  def _identity(self) -> tuple:
    raise NotImplementedError

  def __eq__(self, other) -> bool:
    return isinstance(other, Store) and self._identity() == other._identity()

  def __hash__(self) -> int:
    return hash(self._identity())

  def __str__(self) -> str:
    return self.url

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.url!r})"

  def _check_range(self, start: int, stop: int) -> tuple[int, int]:
    start, stop = int(start), int(stop)
    if start < 0 or stop < start:
      raise StoreError(f"{self.url}: invalid byte range [{start}, {stop})", "invalid")
    return start, stop


def redact(url: str) -> str:
  """``url`` without user:password and query (an endpoint URL may carry secrets there; reports never do)."""
  parts = urlsplit(url)
  if parts.username is None and parts.password is None and not parts.query:
    return url
  try:
    port = parts.port
  except ValueError:
    port = None
  netloc = (parts.hostname or "") + (f":{port}" if port else "")
  return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def split_path(path: str, what: str) -> list[str]:
  """The components of a ``/``-separated path (empty ones dropped); ``.`` and ``..`` are refused."""
  parts = [p for p in path.split("/") if p]
  for p in parts:
    if p in (".", ".."):
      raise StoreError(f"{what}: '{p}' is not allowed in a store path", "invalid")
  return parts


def read_many(requests: Iterable[tuple[Store, int, int] | Store], max_in_flight: int | None = None) -> list[bytes]:
  """The bytes of many ranges (``(store, start, stop)``) or whole objects (a :class:`Store`), in order.

  Up to ``max_in_flight`` requests are outstanding at once (default: twice
  the stores' request concurrency), so the latency of each is hidden behind
  the others while memory stays bounded by the window.
  """
  window = max(1, int(max_in_flight or 2 * limits().concurrency))
  out: list[bytes | None] = []
  pending: list[tuple[int, Pending]] = []

  def start(req) -> Pending:
    if isinstance(req, Store):
      return req.read_bytes_async()
    store, a, b = req
    return store.read_range_async(a, b)

  for req in requests:
    if len(pending) >= window:
      i, p = pending.pop(0)
      out[i] = p.result()
    out.append(None)
    pending.append((len(out) - 1, start(req)))
  for i, p in pending:
    out[i] = p.result()
  return out  # type: ignore[return-value]


# ---- native log lines on stderr
# tensorstore's Python module sets absl's stderr threshold to INFO, so its C++ code (credential discovery, the
# AWS SDK's profile parser) writes lines straight to file descriptor 2. A tool's stderr must hold one line on
# failure; the first request of each bucket (where those lines are written) runs with fd 2 captured.
_FD_LOCK = threading.Lock()


@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
  """Captures what is written to file descriptor 2 meanwhile; the list holds its lines once the block ends."""
  lines: list[str] = []
  with _FD_LOCK, tempfile.TemporaryFile() as tmp:
    with contextlib.suppress(Exception):
      sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    try:
      yield lines
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      lines.extend(tmp.read().decode("utf-8", "replace").splitlines())


def reemit(lines: Sequence[str], keep: Callable[[str], bool]) -> None:
  """Writes back to stderr the captured lines that ``keep`` does not claim."""
  rest = [line for line in lines if line.strip() and not keep(line)]
  if rest:
    os.write(2, ("\n".join(rest) + "\n").encode())
