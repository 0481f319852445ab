"""``gs://bucket/path``: Google Cloud Storage through tensorstore's ``gcs`` driver; endpoint and credentials.

**Endpoint.** ``STORAGE_EMULATOR_HOST`` (as google-cloud-storage reads it:
``host:port`` or a URL; ``http://`` is assumed without a scheme) names an
emulator; otherwise tensorstore's own ``TENSORSTORE_GCS_HTTP_URL``; otherwise
``https://storage.googleapis.com``. The ``gcs`` spec has no endpoint member:
tensorstore reads ``TENSORSTORE_GCS_HTTP_URL`` from the environment each
time it *opens* a ``gcs`` kvstore, so a store sets that variable (to the
endpoint it resolved) right before it opens one, and when it is created; a
``ts.open`` of :meth:`~GcsStore.kvstore_spec` elsewhere in the process, and any
child process, then reach the same endpoint. One GCS endpoint per process at
a time.

**Credentials** are found by tensorstore, in Google's order:
``GOOGLE_APPLICATION_CREDENTIALS`` (a service-account or authorized-user JSON
file), then application default credentials
(``$CLOUDSDK_CONFIG`` or ``~/.config/gcloud/application_default_credentials.json``,
from ``gcloud auth application-default login``), then the GCE metadata server;
none of them: anonymous requests. With an emulator, as google-cloud-storage
does, no credentials are used: the requests carry a fixed dummy token
(tensorstore's ``GOOGLE_AUTH_TOKEN_FOR_TESTING``, set for this process unless
already set), so no OAuth refresh or metadata-server probe is attempted.
tensorstore chooses once per process, at the first request.
"""

from __future__ import annotations

import os
import re

from parity_jax.stores.base import StoreError, limits, redact
from parity_jax.stores.remote import BucketStore, Endpoint

__all__ = ["DEFAULT_URL", "GcsStore", "endpoint"]

DEFAULT_URL = "https://storage.googleapis.com"
_TS_VAR = "TENSORSTORE_GCS_HTTP_URL"
_TOKEN_VAR = "GOOGLE_AUTH_TOKEN_FOR_TESTING"
_EMULATOR_TOKEN = "parity-jax-emulator-anonymous"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_set_by_us: str | None = None  # the TENSORSTORE_GCS_HTTP_URL value this module last set


def _apply(url: str, emulator: bool) -> None:
  global _set_by_us
  os.environ[_TS_VAR] = url
  _set_by_us = url
  os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(int(limits().stall_s)))
  if emulator:
    os.environ.setdefault(_TOKEN_VAR, _EMULATOR_TOKEN)


def endpoint() -> Endpoint:
  """The GCS endpoint and credential source as the environment says now (see the module docstring)."""
  env = os.environ
  emulator_host = env.get("STORAGE_EMULATOR_HOST", "").strip()
  ts_url = env.get(_TS_VAR, "").strip()
  if ts_url and ts_url == _set_by_us:
    ts_url = ""  # our own mapping of an earlier setting, not the user's
  if emulator_host:
    url, source = (emulator_host if "://" in emulator_host else "http://" + emulator_host), "STORAGE_EMULATOR_HOST"
  elif ts_url:
    url, source = ts_url, _TS_VAR
  else:
    url, source = DEFAULT_URL, "default"
  url = url.rstrip("/")
  if not re.match(r"^https?://[^/]+", url):
    raise StoreError(f"{source}={redact(url)}: not an http(s) URL or host:port", "invalid")
  emulator = source == "STORAGE_EMULATOR_HOST"
  token = env.get(_TOKEN_VAR)
  gac = env.get("GOOGLE_APPLICATION_CREDENTIALS", "").strip()
  adc = os.path.join(
      env.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud"),
      "application_default_credentials.json",
  )
  if token and token != _EMULATOR_TOKEN:
    cred = f"{_TOKEN_VAR} (a fixed token)"
  elif emulator:
    cred = "none (emulator: a dummy token)"
  elif gac:
    if not os.path.isfile(gac):
      raise StoreError(f"GOOGLE_APPLICATION_CREDENTIALS={gac}: no such file", "invalid")
    cred = f"GOOGLE_APPLICATION_CREDENTIALS ({gac})"
  elif os.path.isfile(adc):
    cred = f"application default credentials ({adc})"
  else:
    cred = "the GCE metadata server if there is one, else none (anonymous)"
  about = {"endpoint": redact(url), "endpoint_from": source, "credentials": cred}
  return Endpoint(
      scheme="gs",
      key=("gs", url, emulator),
      spec={"driver": "gcs"},
      context={},
      about=about,
      before_open=lambda: _apply(url, emulator),
      credentials_log=r"google_auth_provider\.cc",
      check="read",
      bucket_url=url + "/storage/v1/b/",
  )


class GcsStore(BucketStore):
  """An object or prefix in a GCS bucket (``gs://bucket/path``)."""

  def __init__(self, bucket: str, path: str = "", ep: Endpoint | None = None):
    if not _BUCKET.match(bucket):
      raise StoreError(f"gs://{bucket}: not a valid GCS bucket name", "invalid")
    ep = ep or endpoint()
    super().__init__(ep, bucket, path)
    ep.before_open()
