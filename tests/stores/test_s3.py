"""How an ``s3://`` store finds its endpoint, region and credential source: boto3's and the AWS CLI's rules.

Each case sets the environment and writes the config and credentials files by hand; the expected endpoint, region
and source are those rules applied by hand (the module docstring, after boto3's documentation). No request is sent.
"""

from __future__ import annotations

import os

import pytest

from parity_jax.stores.base import StoreError
from parity_jax.stores.s3 import S3Store, endpoint


@pytest.fixture
def aws(tmp_path, monkeypatch):
  """An environment with no AWS settings, a home without ~/.aws; returns a writer of the two files."""
  for k in list(os.environ):
    if k.startswith("AWS_"):
      monkeypatch.delenv(k)
  monkeypatch.setenv("HOME", str(tmp_path))

  def write(config: str = "", credentials: str = ""):
    (tmp_path / ".aws").mkdir(exist_ok=True)
    if config:
      (tmp_path / ".aws" / "config").write_text(config)
    if credentials:
      (tmp_path / ".aws" / "credentials").write_text(credentials)
    return str(tmp_path / ".aws" / "config"), str(tmp_path / ".aws" / "credentials")

  return write


def test_nothing_set_is_aws_itself_asked_for_the_region_with_the_default_chain(aws):
  ep = endpoint()
  assert ep.scheme == "s3" and ep.spec == {"driver": "s3"}
  assert ep.context == {"aws_credentials": {"type": "default"}}
  assert ep.about == {
      "endpoint": "AWS",
      "endpoint_from": "AWS (the bucket's region)",
      "credentials": "the AWS default chain (container or instance metadata), else none (anonymous)",
      "region_from": "asked of AWS for each bucket",
  }


def test_endpoint_variables_in_order_then_the_profile_and_a_custom_endpoint_defaults_to_us_east_1(aws, monkeypatch):
  config, _ = aws(config="[default]\nendpoint_url = http://from-config:9000/\n")
  ep = endpoint()
  assert ep.spec == {"driver": "s3", "endpoint": "http://from-config:9000", "aws_region": "us-east-1"}
  assert ep.about["endpoint_from"] == f"endpoint_url in {config}"
  assert (ep.about["region"], ep.about["region_from"]) == ("us-east-1", "default for a custom endpoint")
  monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
  assert (endpoint().spec["endpoint"], endpoint().about["endpoint_from"]) == ("http://general:1", "AWS_ENDPOINT_URL")
  monkeypatch.setenv("AWS_ENDPOINT_URL_S3", " http://s3-only:2/ ")
  ep = endpoint()
  assert (ep.spec["endpoint"], ep.about["endpoint_from"]) == ("http://s3-only:2", "AWS_ENDPOINT_URL_S3")
  monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "True")  # every configured endpoint ignored
  assert endpoint().spec == {"driver": "s3"} and endpoint().about["endpoint"] == "AWS"


def test_region_variables_in_order_then_the_profile(aws, monkeypatch):
  config, _ = aws(config="[default]\nregion = eu-west-3\n[profile p]\nregion = ap-south-1\n")
  assert (endpoint().spec, endpoint().about["region_from"]) == (
      {"driver": "s3", "aws_region": "eu-west-3"},
      f"region in {config}",
  )
  monkeypatch.setenv("AWS_PROFILE", "p")  # a named profile is "[profile p]" in the config file
  assert endpoint().spec["aws_region"] == "ap-south-1"
  monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
  assert (endpoint().spec["aws_region"], endpoint().about["region_from"]) == ("us-west-2", "AWS_DEFAULT_REGION")
  monkeypatch.setenv("AWS_REGION", "sa-east-1")
  ep = endpoint()
  assert (ep.spec["aws_region"], ep.about["region"], ep.about["region_from"]) == (
      "sa-east-1",
      "sa-east-1",
      "AWS_REGION",
  )


def test_credentials_from_the_environment_or_a_profile_never_their_values(aws, monkeypatch):
  config, creds = aws(config="[profile onlyconfig]\nregion = x\n", credentials="[named]\naws_access_key_id = K\n")
  monkeypatch.setenv("AWS_PROFILE", "named")
  ep = endpoint()
  assert ep.context == {"aws_credentials": {"type": "default", "profile": "named"}}
  assert ep.about["credentials"] == f"profile named ({creds})"
  monkeypatch.setenv("AWS_PROFILE", "onlyconfig")
  assert endpoint().about["credentials"] == f"profile onlyconfig ({config})"
  monkeypatch.setenv("AWS_PROFILE", "ghost")
  with pytest.raises(StoreError, match=f"AWS_PROFILE=ghost: no such profile in {creds} or {config}"):
    endpoint()
  monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE")
  with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"):
    endpoint()
  monkeypatch.delenv("AWS_ACCESS_KEY_ID")
  monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
  with pytest.raises(StoreError, match="AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not"):
    endpoint()
  monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE")  # both keys: the environment wins over the profile
  ep = endpoint()
  assert ep.context == {"aws_credentials": {"type": "environment"}}
  assert ep.about["credentials"] == "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
  monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
  assert endpoint().about["credentials"] == "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)"
  assert "AKIDSECRETVALUE" not in repr(endpoint().about) and "AKIDSECRETVALUE" not in repr(endpoint().key)


def test_default_profile_in_the_files_and_the_endpoint_key(aws, monkeypatch):
  _, creds = aws(credentials="[default]\naws_access_key_id = K\n")
  assert endpoint().about["credentials"] == f"profile default ({creds})"
  a = endpoint()
  monkeypatch.setenv("AWS_REGION", "eu-north-1")
  b = endpoint()
  assert a.key != b.key and b.key == endpoint().key  # another region is another endpoint; the same is the same


def test_bad_settings_are_one_line_invalid_errors(aws, monkeypatch):
  monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://x")
  with pytest.raises(StoreError, match="AWS_ENDPOINT_URL=ftp://x: not an http\\(s\\) URL") as e:
    endpoint()
  assert e.value.kind == "invalid"
  monkeypatch.delenv("AWS_ENDPOINT_URL")
  aws(config="not an ini file\n")
  with pytest.raises(StoreError, match="not a valid AWS config file"):
    endpoint()


@pytest.mark.parametrize("name", ["ab", "-abc", "abc-", "a" * 256, "a/b"])
def test_bad_bucket_names_are_refused(aws, name):
  with pytest.raises(StoreError, match=f"s3://{name}: not a valid S3 bucket name"):
    S3Store(name)
