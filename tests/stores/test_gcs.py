"""How a ``gs://`` store finds its endpoint and credential source: google-cloud-storage's and tensorstore's rules.

Each case sets the environment by hand; the expected endpoint and source are the rules of the module docstring
applied by hand. No request is sent.
"""

from __future__ import annotations

import os

import pytest

from parity_jax.stores.base import StoreError
from parity_jax.stores.gcs import DEFAULT_URL, GcsStore, endpoint

_VARS = (
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "CLOUDSDK_CONFIG",
    "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS",
)


@pytest.fixture
def gcs_env(tmp_path, monkeypatch):
  """No GCS settings and a home without gcloud's files (every variable put back afterwards)."""
  for k in _VARS:
    monkeypatch.setenv(k, "x")  # recorded, so that the test's own settings are undone
    monkeypatch.delenv(k)
  monkeypatch.setenv("HOME", str(tmp_path))
  return tmp_path


def test_nothing_set_is_google_with_the_metadata_server_or_anonymous(gcs_env):
  ep = endpoint()
  assert (ep.scheme, ep.spec, ep.context, ep.check) == ("gs", {"driver": "gcs"}, {}, "read")
  assert ep.about == {
      "endpoint": DEFAULT_URL,
      "endpoint_from": "default",
      "credentials": "the GCE metadata server if there is one, else none (anonymous)",
  }
  assert ep.bucket_url == "https://storage.googleapis.com/storage/v1/b/"
  assert ep.key == ("gs", DEFAULT_URL, False)


def test_an_emulator_host_wins_and_gets_a_dummy_token_on_open(gcs_env, monkeypatch):
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://tensorstores-own:1/")
  ep = endpoint()
  assert (ep.about["endpoint"], ep.about["endpoint_from"]) == ("http://tensorstores-own:1", "TENSORSTORE_GCS_HTTP_URL")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost:4443")  # host:port, http assumed
  ep = endpoint()
  assert ep.about == {
      "endpoint": "http://localhost:4443",
      "endpoint_from": "STORAGE_EMULATOR_HOST",
      "credentials": "none (emulator: a dummy token)",
  }
  assert ep.key == ("gs", "http://localhost:4443", True)
  assert ep.bucket_url == "http://localhost:4443/storage/v1/b/"
  ep.before_open()  # what tensorstore reads when it opens a gcs kvstore
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://localhost:4443"
  assert os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING")
  assert int(os.environ["TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS"]) > 0
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")  # our own setting of the variable is not the user's
  monkeypatch.delenv("GOOGLE_AUTH_TOKEN_FOR_TESTING")
  ep = endpoint()
  assert (ep.about["endpoint"], ep.about["endpoint_from"]) == (DEFAULT_URL, "default")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "https://emu.example/")
  assert endpoint().about["endpoint"] == "https://emu.example"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http:///nohost")
  with pytest.raises(StoreError, match="STORAGE_EMULATOR_HOST=.*: not an http\\(s\\) URL or host:port"):
    endpoint()


def test_credentials_in_google_order(gcs_env, monkeypatch):
  adc = gcs_env / "gcloud" / "application_default_credentials.json"
  adc.parent.mkdir()
  adc.write_text("{}")
  monkeypatch.setenv("CLOUDSDK_CONFIG", str(adc.parent))
  assert endpoint().about["credentials"] == f"application default credentials ({adc})"
  key = gcs_env / "sa.json"
  key.write_text("{}")
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
  assert endpoint().about["credentials"] == f"GOOGLE_APPLICATION_CREDENTIALS ({key})"
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "t0ken")
  assert endpoint().about["credentials"] == "GOOGLE_AUTH_TOKEN_FOR_TESTING (a fixed token)"
  monkeypatch.delenv("GOOGLE_AUTH_TOKEN_FOR_TESTING")
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(gcs_env / "missing.json"))
  with pytest.raises(StoreError, match="GOOGLE_APPLICATION_CREDENTIALS=.*missing.json: no such file"):
    endpoint()


@pytest.mark.parametrize("name", ["ab", "Upper", "-abc", "abc.", "a/b"])
def test_bad_bucket_names_are_refused(gcs_env, name):
  with pytest.raises(StoreError, match=f"gs://{name}: not a valid GCS bucket name"):
    GcsStore(name)
