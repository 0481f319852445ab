"""``s3://bucket/path``: Amazon S3 and S3-compatible stores through tensorstore's ``s3`` driver.

Read the way boto3 and the AWS CLI read them:

**Endpoint.** ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else the
profile's ``endpoint_url`` in the config file; none of them (or
``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true``): AWS itself. A custom endpoint
(MinIO, R2, an emulator) goes into the spec's ``endpoint``, and tensorstore
then addresses buckets path-style (``{endpoint}/{bucket}/{key}``).

**Region.** ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else the profile's
``region``; none and no custom endpoint: tensorstore asks AWS where the bucket
is; none with a custom endpoint: ``us-east-1`` (what S3-compatible servers
expect in the signature).

**Credentials.** ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+
``AWS_SESSION_TOKEN``) from the environment; else the profile ``AWS_PROFILE``
(or ``default``) of ``AWS_SHARED_CREDENTIALS_FILE`` (``~/.aws/credentials``)
and ``AWS_CONFIG_FILE`` (``~/.aws/config``), through tensorstore's default
chain, which goes on to container and instance metadata and ends with
anonymous requests. A profile named by ``AWS_PROFILE`` that neither file
holds, or only one of the two key variables, is refused with one line.

The config and credentials files are read only for the endpoint, the region
and whether a profile exists; no key ever leaves tensorstore, and
:meth:`~parity_jax.stores.base.Store.describe` says where credentials come
from, never what they are.
"""

from __future__ import annotations

import configparser
import os
import re

from parity_jax.stores.base import StoreError, limits, redact
from parity_jax.stores.remote import BucketStore, Endpoint

__all__ = ["S3Store", "endpoint"]

_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")


def _read_ini(path: str) -> configparser.RawConfigParser | None:
  if not os.path.isfile(path):
    return None
  cp = configparser.RawConfigParser()
  try:
    cp.read(path, encoding="utf-8")
  except (configparser.Error, UnicodeDecodeError) as e:
    raise StoreError(f"{path}: not a valid AWS config file ({type(e).__name__})", "invalid") from None
  return cp


def _section(cp: configparser.RawConfigParser | None, *names: str) -> dict | None:
  if cp is None:
    return None
  for n in names:
    if cp.has_section(n):
      return dict(cp.items(n))
  return None


def _files() -> tuple[str, str]:
  home = os.path.expanduser("~")
  config = os.environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")
  creds = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials")
  return config, creds


def endpoint() -> Endpoint:
  """The S3 endpoint, region and credential source as the environment says now (see the module docstring)."""
  env = os.environ
  config_file, creds_file = _files()
  profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or ""
  config = _read_ini(config_file)
  prof_cfg = _section(config, f"profile {profile or 'default'}", profile or "default") or {}

  ep, ep_from = "", "AWS (the bucket's region)"
  if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() != "true":
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
      if env.get(var, "").strip():
        ep, ep_from = env[var].strip().rstrip("/"), var
        break
    else:
      if prof_cfg.get("endpoint_url"):
        ep, ep_from = prof_cfg["endpoint_url"].strip().rstrip("/"), f"endpoint_url in {config_file}"
  if ep and not re.match(r"^https?://[^/]+", ep):
    raise StoreError(f"{ep_from}={redact(ep)}: not an http(s) URL", "invalid")

  region, region_from = "", ""
  for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
    if env.get(var, "").strip():
      region, region_from = env[var].strip(), var
      break
  else:
    if prof_cfg.get("region"):
      region, region_from = prof_cfg["region"].strip(), f"region in {config_file}"
    elif ep:
      region, region_from = "us-east-1", "default for a custom endpoint"
    else:
      region_from = "asked of AWS for each bucket"

  key_id, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
  if bool(key_id) != bool(secret):
    have, lack = (
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if key_id else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
    )
    raise StoreError(f"{have} is set but {lack} is not", "invalid")
  if key_id:
    creds = {"type": "environment"}
    names = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] + (
        ["AWS_SESSION_TOKEN"] if env.get("AWS_SESSION_TOKEN") else []
    )
    cred = f"environment ({', '.join(names)})"
  else:
    name = profile or "default"
    in_creds = _section(_read_ini(creds_file), name) is not None
    in_config = _section(config, f"profile {name}", name) is not None
    if profile and not (in_creds or in_config):
      raise StoreError(f"AWS_PROFILE={profile}: no such profile in {creds_file} or {config_file}", "invalid")
    creds = {"type": "default", **({"profile": profile} if profile else {})}
    if in_creds or in_config:
      cred = f"profile {name} ({creds_file if in_creds else config_file})"
    else:
      cred = "the AWS default chain (container or instance metadata), else none (anonymous)"

  spec = {"driver": "s3"}
  if ep:
    spec["endpoint"] = ep
  if region:
    spec["aws_region"] = region
  about = {"endpoint": redact(ep) if ep else "AWS", "endpoint_from": ep_from, "credentials": cred}
  if region:
    about["region"] = region
  about["region_from"] = region_from

  def before_open() -> None:
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(int(limits().stall_s)))

  return Endpoint(
      scheme="s3",
      key=("s3", ep, region, tuple(sorted(creds.items()))),
      spec=spec,
      context={"aws_credentials": creds},
      about=about,
      before_open=before_open,
  )


class S3Store(BucketStore):
  """An object or prefix in an S3 bucket (``s3://bucket/path``)."""

  def __init__(self, bucket: str, path: str = "", ep: Endpoint | None = None):
    if not _BUCKET.match(bucket):
      raise StoreError(f"s3://{bucket}: not a valid S3 bucket name", "invalid")
    super().__init__(ep or endpoint(), bucket, path)
