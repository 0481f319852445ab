"""A local HTTP proxy in front of an emulator: added latency per request, injected faults, requests in flight.

:class:`DelayProxy` listens on 127.0.0.1 and forwards every request to one
upstream server (an S3 or GCS emulator) after ``delay_s``; the client points
its endpoint variable at the proxy instead of the emulator. It records how
many requests were in flight at once (``peak_in_flight``, and the average
over the busy time), and it can stand in for the faults an emulator does not
produce: answer with a status (403, 429, 503...) for the next N requests or
all of them, drop the connection without an answer, stall, or stop listening
altogether (the server "going away"). The requests still reach the client's
HTTP stack for real: nothing is mocked on the client side.

``stream_bytes_s`` (optional) caps the throughput of every response body,
per request: a real store serves each stream at a bounded rate (tens to a
few hundred MiB/s), which is why parallel range reads ("sliced downloads")
pay off there; on loopback one stream moves bytes at memory speed. The cap
applies to every request alike (each connection paces its own body; there
is no cap on the total; an answer changed by a :data:`Rewrite` is not paced).

A :data:`Rewrite` (``proxy.rewrite``) changes every answer on its way back,
e.g. :func:`without_size_hints`: a server that never states an object's size.

Used by the tests (``tests/helpers/objectstores.py``) and the benchmarks
(``bench/latency_proxy.py``).
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import re
import socket
import threading
import time
from typing import Callable

__all__ = ["DelayProxy", "Fault"]

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
_GCS_ERROR = '{{"error": {{"code": {code}, "message": "{message}", "errors": [{{"message": "{message}"}}]}}}}'
_S3_ERROR = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{s3code}</Code><Message>{message}</Message></Error>'
_MESSAGES = {
    401: ("Unauthorized", "Anonymous caller does not have access"),
    403: ("AccessDenied", "Access denied by the fault proxy"),
    404: ("NoSuchKey", "Not found (fault proxy)"),
    429: ("SlowDown", "Too many requests (fault proxy)"),
    500: ("InternalError", "Internal error (fault proxy)"),
    503: ("SlowDown", "Service unavailable (fault proxy)"),
}


@dataclasses.dataclass
class Fault:
  """What to do instead of forwarding: answer ``status`` (0: drop the connection) after ``stall_s``, ``count`` times.

  ``count=None``: every matching request until cleared. ``methods`` / ``path_contains`` narrow the requests
  it applies to. The body is a GCS-style JSON error or an S3-style XML error (``style``).
  """

  status: int = 503
  count: int | None = None
  stall_s: float = 0.0
  methods: tuple[str, ...] | None = None
  path_contains: str | None = None
  style: str = "gcs"

  def matches(self, method: str, path: str) -> bool:
    return (self.methods is None or method in self.methods) and (
        self.path_contains is None or self.path_contains in path
    )

  def body(self) -> tuple[bytes, str]:
    s3code, message = _MESSAGES.get(self.status, ("Error", f"HTTP {self.status} (fault proxy)"))
    if self.style == "s3":
      return _S3_ERROR.format(s3code=s3code, message=message).encode(), "application/xml"
    return _GCS_ERROR.format(code=self.status, message=message).encode(), "application/json"


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  block_on_close = False  # server_close() must not wait for clients' idle keep-alive connections
  allow_reuse_address = True
  request_queue_size = 256


class DelayProxy:
  """Forwards ``127.0.0.1:<port>`` to ``upstream`` (``http://host:port``) with ``delay_s`` added to every request."""

  def __init__(self, upstream: str, delay_s: float = 0.0, port: int = 0, stream_bytes_s: float | None = None):
    self.upstream = upstream.rstrip("/")
    host_port = self.upstream.split("://", 1)[-1]
    self._up_host, _, up_port = host_port.partition(":")
    self._up_port = int(up_port or 80)
    self.delay_s = float(delay_s)
    self.stream_bytes_s = float(stream_bytes_s) if stream_bytes_s else None  # per-response throughput cap
    self._lock = threading.Lock()
    self._faults: list[Fault] = []
    self._in_flight = 0
    self.peak_in_flight = 0
    self.requests = 0
    self.bytes_out = 0
    self._spans: list[tuple[float, float]] = []
    self.trace: list[tuple[float, float, str, str]] | None = None  # (start, end, method, path) when a list
    self.rewrite: Rewrite | None = None  # when set, every upstream answer goes through it (see Rewrite)
    self._conns: set[socket.socket] = set()
    self._server = _Server(("127.0.0.1", port), self._handler_class())
    self.port = self._server.server_address[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self._thread: threading.Thread | None = None

  # ---- control
  def start(self) -> "DelayProxy":
    if self._thread is not None:
      return self
    self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    """The server goes away: stops listening (new connections are refused) and drops every open connection."""
    if self._thread is not None:
      self._server.shutdown()
      self._thread.join(5)
      self._thread = None
    self._server.server_close()
    with self._lock:
      conns, self._conns = list(self._conns), set()
    for c in conns:
      try:
        c.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass

  def __enter__(self) -> "DelayProxy":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def add_fault(self, fault: Fault) -> Fault:
    with self._lock:
      self._faults.append(fault)
    return fault

  def fail(self, status: int, count: int | None = None, **kw) -> Fault:
    """Answer ``status`` to the next ``count`` matching requests (None: all, until :meth:`clear`)."""
    return self.add_fault(Fault(status=status, count=count, **kw))

  def clear(self) -> None:
    with self._lock:
      self._faults.clear()

  def reset_stats(self) -> None:
    with self._lock:
      self.peak_in_flight, self.requests, self.bytes_out = self._in_flight, 0, 0
      self._spans.clear()

  def stats(self, since: float | None = None, until: float | None = None) -> dict:
    """Requests, peak in flight, and the average in flight over the time any request was in flight.

    ``since``/``until`` (``time.monotonic()`` values, which are system-wide: a client in another process can
    report its own) keep only the requests that began and ended within that window; then ``requests`` and
    ``peak_in_flight`` are counted from those requests, and ``bytes_out`` is not given.
    """
    with self._lock:
      spans = list(self._spans)
      out = {"requests": self.requests, "peak_in_flight": self.peak_in_flight, "bytes_out": self.bytes_out}
    if since is not None or until is not None:
      lo, hi = -float("inf") if since is None else since, float("inf") if until is None else until
      spans = [(a, b) for a, b in spans if a >= lo and b <= hi]
      out = {"requests": len(spans), "peak_in_flight": _peak(spans)}
    busy = _union_length(spans)
    out["busy_s"] = busy
    out["mean_in_flight"] = sum(b - a for a, b in spans) / busy if busy > 0 else 0.0
    return out

  # ---- serving
  def _take_fault(self, method: str, path: str) -> Fault | None:
    with self._lock:
      for f in self._faults:
        if f.matches(method, path) and (f.count is None or f.count > 0):
          if f.count is not None:
            f.count -= 1
          return f
    return None

  def _handler_class(self):
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"
      disable_nagle_algorithm = True

      def log_message(self, *args) -> None:  # quiet
        pass

      def setup(self) -> None:
        super().setup()
        with proxy._lock:
          proxy._conns.add(self.connection)

      def finish(self) -> None:
        with proxy._lock:
          proxy._conns.discard(self.connection)
        try:
          super().finish()
        except OSError:
          pass

      def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
          out = bytearray()
          while True:
            size = int(self.rfile.readline().strip().split(b";")[0] or b"0", 16)
            if size == 0:
              while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
              return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

      def _serve(self) -> None:
        t0 = time.monotonic()
        with proxy._lock:
          proxy._in_flight += 1
          proxy.requests += 1
          proxy.peak_in_flight = max(proxy.peak_in_flight, proxy._in_flight)
        try:
          body = self._body()
          if proxy.delay_s:
            time.sleep(proxy.delay_s)
          fault = proxy._take_fault(self.command, self.path)
          if fault is not None:
            if fault.stall_s:
              time.sleep(fault.stall_s)
            if fault.status == 0:
              self.close_connection = True
              self.connection.shutdown(socket.SHUT_RDWR)
              return
            payload, ctype = fault.body()
            self.send_response(fault.status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
              self.wfile.write(payload)
            return
          self._forward(body)
        except (ConnectionError, OSError):
          self.close_connection = True
        finally:
          t1 = time.monotonic()
          with proxy._lock:
            proxy._in_flight -= 1
            proxy._spans.append((t0, t1))
            if proxy.trace is not None:
              proxy.trace.append((t0, t1, self.command, self.path))

      def _forward(self, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body or self.command in ("POST", "PUT", "PATCH"):
          headers["Content-Length"] = str(len(body))
        try:
          conn = http.client.HTTPConnection(proxy._up_host, proxy._up_port, timeout=600)
          conn.request(self.command, self.path, body=body, headers=headers)
          resp = conn.getresponse()
        except OSError:
          self.send_error(502, "upstream unreachable")
          return
        if proxy.rewrite is not None:
          return self._send_rewritten(conn, resp)
        try:
          length = resp.getheader("Content-Length")
          # capped: the whole body is taken from the upstream at once, then paced to the client (an emulator
          # that serves one request at a time must not be held by the pace of one stream)
          stream = length is not None and self.command != "HEAD" and not proxy.stream_bytes_s
          data = None if stream else resp.read()
          self.send_response(resp.status, resp.reason)
          for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
              self.send_header(k, v)
          n = int(length) if length is not None else len(data or b"")
          self.send_header("Content-Length", str(n if self.command != "HEAD" else int(length or 0)))
          self.end_headers()
          if self.command == "HEAD":
            return
          cap = proxy.stream_bytes_s
          if data is not None and not cap:
            self.wfile.write(data)
            sent = len(data)
          else:
            sent, t_body = 0, time.monotonic()
            step = (1 << 20) if not cap else max(16 << 10, min(1 << 20, int(cap / 50)))  # ~20 ms of bytes per write
            source = resp if data is None else _Chunks(data)
            while chunk := source.read(step):
              if cap:  # pace this body: byte k leaves no earlier than k / cap seconds after the first
                ahead = t_body + sent / cap - time.monotonic()
                if ahead > 0:
                  time.sleep(ahead)
              self.wfile.write(chunk)
              sent += len(chunk)
          with proxy._lock:
            proxy.bytes_out += sent
        finally:
          conn.close()

      def _send_rewritten(self, conn, resp) -> None:
        try:
          status, headers, data = proxy.rewrite(self.command, resp.status, resp.getheaders(), resp.read())
        finally:
          conn.close()
        self.send_response(status)
        for k, v in headers:
          if k.lower() not in _HOP and k.lower() != "content-length":
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
          self.wfile.write(data)
          with proxy._lock:
            proxy.bytes_out += len(data)

      do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _serve

    return Handler


class _Chunks:
  """``read(n)`` over bytes already in memory (a body whose length the upstream did not state)."""

  def __init__(self, data: bytes):
    self._view, self._pos = memoryview(data), 0

  def read(self, n: int) -> bytes:
    out = bytes(self._view[self._pos : self._pos + n])
    self._pos += len(out)
    return out


def _peak(spans: list[tuple[float, float]]) -> int:
  events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
  peak = now = 0
  for _, d in events:
    now += d
    peak = max(peak, now)
  return peak


def _union_length(spans: list[tuple[float, float]]) -> float:
  total, end = 0.0, None
  for a, b in sorted(spans):
    if end is None or a > end:
      total += b - a
      end = b
    elif b > end:
      total += b - end
      end = b
  return total


# (method, status, headers, body) of an upstream answer -> the (status, headers, body) the client gets instead
Rewrite = Callable[[str, int, list[tuple[str, str]], bytes], tuple[int, list[tuple[str, str]], bytes]]
_TOTAL = re.compile(r"(bytes (?:\d+-\d+|\*))/\d+")


def without_size_hints(method: str, status: int, headers: list[tuple[str, str]], body: bytes):
  """A :data:`Rewrite`: the answer without anything that states an object's size, as a server that gives no size
  hint answers (the complete length of ``Content-Range`` becomes ``*``; S3's ``<ActualObjectSize>`` and a
  ``bytes */N`` in an error body are dropped). Content-Length (the length of this answer) stays."""
  headers = [(k, _TOTAL.sub(r"\1/*", v) if k.lower() == "content-range" else v) for k, v in headers]
  if status >= 400:
    body = re.sub(rb"<ActualObjectSize>\d+</ActualObjectSize>", b"", body)
    body = re.sub(rb"bytes \*/\d+", b"bytes */*", body)
  return status, headers, body
