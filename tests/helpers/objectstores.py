"""Real object-store servers for the tests: moto's S3 server and the GCS emulator on 127.0.0.1, and their helpers.

Both come from PyPI (the ``[test]`` extra): ``moto[server]`` (``python -m
moto.server``) for S3 and ``gcp-storage-emulator`` for GCS, started by
:mod:`tests.helpers.gcs_emulator`, which fixes the emulator's handling of the
requests tensorstore makes (empty uploads, generations, suffix ranges, key
ranges; see that module). Each runs in its own process on a free port, in
memory.

Fixtures (registered for every test module by ``tests/conftest.py``):

* ``s3_emulator`` / ``gcs_emulator``: the running :class:`Emulator` of this
  test process (pytest-xdist: one per worker), started at first use and
  stopped at the end of the session; started again if a test killed it.
* ``bucket`` (parametrized over ``gs`` and ``s3``), ``s3_bucket``,
  ``gcs_bucket``: a fresh empty :class:`Bucket`, with this process's
  environment pointed at its emulator (endpoint variables, fake
  credentials) for the test's duration.

Helpers on :class:`Emulator` and :class:`Bucket` talk to the emulator
directly -- boto3 for S3 (moto refuses unsigned object reads), plain HTTP for
GCS -- never through ``parity_jax.stores``, so a test can set up and check
bucket contents independently of the code under test:
``put``/``get``/``keys``, ``upload_tree``/``download_tree``; ``env()`` is the
environment for a tool subprocess; ``stop()``/``kill()`` end the server (for
"the server goes away mid-run"). A :class:`~tests.helpers.http_proxy.DelayProxy`
in front of an emulator (:meth:`Emulator.proxy`) adds latency and faults.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

from tests.helpers.http_proxy import DelayProxy
from tests.helpers.jobs import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
FAKE_KEY_ID = "parity-test-key-id"
FAKE_SECRET = "parity-test-secret-value"  # moto accepts any key unless auth is switched on
REGION = "us-east-1"
# variables that would send a subprocess elsewhere, or make it pick other credentials
_S3_CLEAR = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")
_GCS_CLEAR = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def _http(method: str, url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30):
  req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


@dataclasses.dataclass(eq=False)
class Emulator:
  """One emulator server process: ``kind`` is ``"s3"`` or ``"gs"``; ``url`` is its endpoint."""

  kind: str
  port: int
  proc: subprocess.Popen

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  # ---- life
  @classmethod
  def start(cls, kind: str, timeout: float = 60) -> "Emulator":
    """Starts a fresh server of ``kind`` on a free port and waits until it answers."""
    last = ""
    for _ in range(3):  # a port taken between free_port() and the bind: try another
      port = free_port()
      if kind == "s3":
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
      else:
        cmd = [sys.executable, "-m", "tests.helpers.gcs_emulator", "-H", "127.0.0.1", "--port", str(port)]
      # stderr to a file, never an unread pipe: moto logs every request there, and a full pipe (64 KiB, some
      # 400 requests) blocks the server for good
      log = tempfile.TemporaryFile()
      proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
      proc._log = log
      emu = cls(kind, port, proc)
      deadline = time.monotonic() + timeout
      while time.monotonic() < deadline and proc.poll() is None:
        try:
          status, _ = _http("GET", emu.url + ("/moto-api/" if kind == "s3" else "/"), timeout=2)
          if status < 500:
            return emu
        except OSError:
          time.sleep(0.05)
      log.seek(0)
      last = log.read().decode(errors="replace")[-2000:] if proc.poll() is not None else "timeout"
      emu.kill()
    raise RuntimeError(f"could not start the {kind} emulator: {last}")

  def alive(self) -> bool:
    return self.proc.poll() is None

  def stop(self) -> None:
    """Ends the server (SIGTERM, then SIGKILL): connections to it are refused from now on."""
    if self.alive():
      self.proc.terminate()
      try:
        self.proc.wait(5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(5)
    self._close()

  def kill(self) -> None:
    """Ends the server at once (SIGKILL)."""
    if self.alive():
      self.proc.kill()
      self.proc.wait(5)
    self._close()

  def pause(self) -> None:
    """Freezes the server (SIGSTOP): connections are accepted by the kernel but never answered."""
    os.kill(self.proc.pid, signal.SIGSTOP)

  def resume(self) -> None:
    os.kill(self.proc.pid, signal.SIGCONT)

  def _close(self) -> None:
    log = getattr(self.proc, "_log", None)
    if log is not None and not log.closed:
      log.close()

  def proxy(self, delay_s: float = 0.0) -> DelayProxy:
    """A started :class:`DelayProxy` in front of this server (stop it when done, or use ``with``)."""
    return DelayProxy(self.url, delay_s).start()

  # ---- environment
  def env_vars(self, endpoint: str | None = None) -> dict[str, str]:
    """The variables that point a client at this server (or at ``endpoint``, e.g. a proxy in front of it)."""
    endpoint = endpoint or self.url
    if self.kind == "s3":
      return {
          "AWS_ENDPOINT_URL_S3": endpoint,
          "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
          "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
          "AWS_REGION": REGION,
      }
    return {"STORAGE_EMULATOR_HOST": endpoint}

  def env(self, base: dict | None = None, endpoint: str | None = None) -> dict[str, str]:
    """A whole environment for a tool subprocess: ``base`` (default ``os.environ``) pointed at this server."""
    out = dict(os.environ if base is None else base)
    for k in _S3_CLEAR if self.kind == "s3" else _GCS_CLEAR:
      out.pop(k, None)
    out.update(self.env_vars(endpoint))
    return out

  def apply(self, monkeypatch, endpoint: str | None = None) -> None:
    """Points this process at the server for one test (``monkeypatch`` undoes it)."""
    for k in _S3_CLEAR if self.kind == "s3" else _GCS_CLEAR:
      monkeypatch.delenv(k, raising=False)
    for k, v in self.env_vars(endpoint).items():
      monkeypatch.setenv(k, v)

  # ---- buckets and objects: boto3 (S3) or plain HTTP (GCS)
  def _s3(self):
    client = getattr(self, "_client", None)
    if client is None:
      import boto3
      from botocore.config import Config

      client = self._client = boto3.client(
          "s3",
          endpoint_url=self.url,
          aws_access_key_id=FAKE_KEY_ID,
          aws_secret_access_key=FAKE_SECRET,
          region_name=REGION,
          config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
      )
    return client

  def create_bucket(self, name: str | None = None) -> str:
    name = name or f"t-{uuid.uuid4().hex[:20]}"
    if self.kind == "s3":
      self._s3().create_bucket(Bucket=name)
      return name
    else:
      status, body = _http(
          "POST",
          f"{self.url}/storage/v1/b?project=test",
          json.dumps({"name": name}).encode(),
          {"Content-Type": "application/json"},
      )
    if status >= 300:
      raise RuntimeError(f"create bucket {name}: HTTP {status} {body[:200]!r}")
    return name

  def _object_url(self, bucket: str, key: str, media: bool = True) -> str:
    return f"{self.url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}" + ("?alt=media" if media else "")

  def put(self, bucket: str, key: str, data: bytes) -> None:
    if self.kind == "s3":
      self._s3().put_object(Bucket=bucket, Key=key, Body=data)
      return
    url = f"{self.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={urllib.parse.quote(key, safe='')}"
    status, body = _http("POST", url, data, {"Content-Type": "application/octet-stream"})
    if status >= 300:
      raise RuntimeError(f"put {bucket}/{key}: HTTP {status} {body[:200]!r}")

  def get(self, bucket: str, key: str) -> bytes | None:
    """The object's bytes, or None when it does not exist."""
    if self.kind == "s3":
      try:
        return self._s3().get_object(Bucket=bucket, Key=key)["Body"].read()
      except self._s3().exceptions.NoSuchKey:
        return None
    status, body = _http("GET", self._object_url(bucket, key))
    if status == 404:
      return None
    if status >= 300:
      raise RuntimeError(f"get {bucket}/{key}: HTTP {status} {body[:200]!r}")
    return body

  def keys(self, bucket: str, prefix: str = "") -> list[str]:
    """Every key in the bucket under ``prefix``, sorted."""
    out: list[str] = []
    token = ""
    while True:
      if self.kind == "s3":
        kw = {"ContinuationToken": token} if token else {}
        page = self._s3().list_objects_v2(Bucket=bucket, Prefix=prefix, **kw)
        out += [c["Key"] for c in page.get("Contents") or []]
        token = page.get("NextContinuationToken") or ""
      else:
        q = {"prefix": prefix, **({"pageToken": token} if token else {})}
        status, body = _http("GET", f"{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(q)}")
        if status >= 300:
          raise RuntimeError(f"list {bucket}: HTTP {status} {body[:200]!r}")
        doc = json.loads(body)
        out += [i["name"] for i in doc.get("items") or []]
        token = doc.get("nextPageToken") or ""
      if not token:
        return sorted(out)

  def delete_object(self, bucket: str, key: str) -> None:
    if self.kind == "s3":
      self._s3().delete_object(Bucket=bucket, Key=key)
      return
    status, body = _http("DELETE", self._object_url(bucket, key, media=False))
    if status >= 300 and status != 404:
      raise RuntimeError(f"delete {bucket}/{key}: HTTP {status} {body[:200]!r}")

  def upload_tree(self, local_dir: str | os.PathLike, bucket: str, prefix: str = "") -> list[str]:
    """Uploads every file below ``local_dir`` to ``bucket`` under ``prefix``; returns the keys written."""
    root = pathlib.Path(local_dir)
    todo = [
        ("/".join(filter(None, [prefix.strip("/"), f.relative_to(root).as_posix()])), f)
        for f in sorted(p for p in root.rglob("*") if p.is_file())
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # small objects: the round trips dominate
      list(pool.map(lambda kf: self.put(bucket, kf[0], kf[1].read_bytes()), todo))
    return [k for k, _ in todo]

  def download_tree(self, bucket: str, prefix: str, local_dir: str | os.PathLike) -> list[str]:
    """Downloads every object under ``prefix/`` into ``local_dir`` (keys relative to the prefix); returns them."""
    p = prefix.strip("/") + "/" if prefix.strip("/") else ""
    rel = []
    for key in self.keys(bucket, p):
      dest = pathlib.Path(local_dir, key[len(p) :])
      dest.parent.mkdir(parents=True, exist_ok=True)
      dest.write_bytes(self.get(bucket, key) or b"")
      rel.append(key[len(p) :])
    return rel

  def enforce_auth(self, on: bool = True) -> None:
    """S3 only: moto checks signatures and keys from now on (unknown keys get 403), or stops checking."""
    assert self.kind == "s3"
    status, body = _http(
        "POST", f"{self.url}/moto-api/reset-auth", b"0" if on else b"inf", {"Content-Type": "text/plain"}
    )
    if status >= 300:
      raise RuntimeError(f"reset-auth: HTTP {status} {body[:200]!r}")


@dataclasses.dataclass
class Bucket:
  """A fresh bucket on an emulator: ``name``, ``url`` (``gs://name`` or ``s3://name``), and the emulator."""

  emulator: Emulator
  name: str

  @property
  def scheme(self) -> str:
    return self.emulator.kind

  @property
  def url(self) -> str:
    return f"{self.scheme}://{self.name}"

  def put(self, key: str, data: bytes) -> None:
    self.emulator.put(self.name, key, data)

  def get(self, key: str) -> bytes | None:
    return self.emulator.get(self.name, key)

  def keys(self, prefix: str = "") -> list[str]:
    return self.emulator.keys(self.name, prefix)

  def upload_tree(self, local_dir, prefix: str = "") -> str:
    """Uploads a local tree; returns its URL in the bucket."""
    self.emulator.upload_tree(local_dir, self.name, prefix)
    return "/".join(filter(None, [self.url, prefix.strip("/")]))

  def download_tree(self, prefix: str, local_dir) -> list[str]:
    return self.emulator.download_tree(self.name, prefix, local_dir)


# ---- pytest fixtures
_RUNNING: dict[str, Emulator] = {}


def running(kind: str) -> Emulator:
  """This process's server of ``kind``, started now if it is not running (or was killed by a test)."""
  emu = _RUNNING.get(kind)
  if emu is None or not emu.alive():
    emu = _RUNNING[kind] = Emulator.start(kind)
  return emu


@pytest.fixture(scope="session")
def _emulators():
  yield _RUNNING
  for emu in _RUNNING.values():
    emu.stop()
  _RUNNING.clear()


@pytest.fixture
def s3_emulator(_emulators) -> Emulator:
  return running("s3")


@pytest.fixture
def gcs_emulator(_emulators) -> Emulator:
  return running("gs")


def _bucket(kind: str, monkeypatch) -> Bucket:
  emu = running(kind)
  emu.apply(monkeypatch)
  return Bucket(emu, emu.create_bucket())


@pytest.fixture
def s3_bucket(_emulators, monkeypatch) -> Bucket:
  return _bucket("s3", monkeypatch)


@pytest.fixture
def gcs_bucket(_emulators, monkeypatch) -> Bucket:
  return _bucket("gs", monkeypatch)


@pytest.fixture(params=["gs", "s3"])
def bucket(request, _emulators, monkeypatch) -> Bucket:
  return _bucket(request.param, monkeypatch)
