"""parity_jax.files: the output rules' messages name what their reader typed (a tool's flag and --overwrite, or a library argument)."""

from __future__ import annotations

import re

import pytest

from parity_jax.errors import UsageError, arg, named_as_flags
from parity_jax.files import check_output_dir, check_output_path


@pytest.fixture
def taken(tmp_path):
  f = tmp_path / "r.json"
  f.write_text("{}")
  d = tmp_path / "d"
  d.mkdir()
  (d / "bundle.safetensors").write_bytes(b"x")
  return f, d


def _refusal(fn, *args, **kwargs) -> str:
  with pytest.raises(UsageError) as e:
    fn(*args, **kwargs)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_a_library_caller_is_told_its_argument(taken):
  f, d = taken
  assert (
      _refusal(check_output_path, f, (), "report")
      == f"report={f} exists; refusing to overwrite it (pass overwrite=True)"
  )
  assert _refusal(check_output_dir, d, (), "stage_dir", will_write=["bundle.safetensors"]) == (
      f"stage_dir={d} already holds bundle.safetensors; refusing to overwrite it (pass overwrite=True)"
  )
  assert _refusal(check_output_path, d, (), "out") == f"out={d} is a directory"


def test_a_tool_user_is_told_the_flags(taken):
  f, d = taken
  assert (
      _refusal(check_output_path, f, (), "--report")
      == f"--report={f} exists; refusing to overwrite it (pass --overwrite)"
  )
  with named_as_flags(["out", "stage_dir", "overwrite"]):  # a tool whose flags carry the library's argument names
    assert _refusal(check_output_path, f, (), "out") == f"--out={f} exists; refusing to overwrite it (pass --overwrite)"
    assert _refusal(check_output_dir, d, (), "stage_dir", will_write=["bundle.safetensors"]).startswith(
        f"--stage_dir={d} already holds bundle.safetensors; refusing to overwrite it (pass --overwrite)"
    )
    assert _refusal(check_output_path, f, [f.parent], "report").startswith(
        f"report={f} would overwrite"
    )  # no such flag
    assert arg("out") == "--out" and arg("report") == "report"
  assert arg("out") == "out"  # only within the tool's run
  assert re.fullmatch(r"out=.* exists; .*\(pass overwrite=True\)", _refusal(check_output_path, f, (), "out"))


def test_the_output_checks_pass_what_they_should(taken, tmp_path):
  f, d = taken
  assert check_output_path(f, (), "out", overwrite=True) == str(f)
  assert check_output_dir(d, (), "out_dir", will_write=["other.json"]) == str(d)
  assert check_output_dir(tmp_path / "new", (), "out_dir") == str(tmp_path / "new")
