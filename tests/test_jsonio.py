"""parity_jax.jsonio: non-finite floats as "nan"/"inf"/"-inf", numpy scalars as plain JSON, atomic writes."""

import json
import math
import os

import numpy as np
import pytest

from parity_jax import jsonio


@pytest.mark.parametrize(
    "value,want",
    [
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        (np.float32("nan"), "nan"),
        (np.float64("-inf"), "-inf"),
        (np.float16("inf"), "inf"),
    ],
    ids=repr,
)
def test_num_encodes_non_finite_floats_as_strings(value, want):
  assert jsonio.num(value) == want


def test_num_turns_numpy_scalars_into_python_ones():
  for value, want, kind in [
      (np.float32(1.5), 1.5, float),
      (np.float64(-2.25), -2.25, float),
      (np.int64(7), 7, int),
      (np.uint8(255), 255, int),
      (np.bool_(True), True, bool),
      (np.bool_(False), False, bool),
  ]:
    got = jsonio.num(value)
    assert got == want and type(got) is kind, (value, got)
  neg_zero = jsonio.num(np.float32(-0.0))
  assert type(neg_zero) is float and math.copysign(1.0, neg_zero) == -1.0  # -0.0 keeps its sign


def test_num_leaves_everything_else_alone():
  for value in [3, 2.5, -0.0, "nan?", "text", None, True, [1.0]]:
    assert jsonio.num(value) is value


def test_jsonable_recurses_through_dicts_lists_and_tuples():
  obj = {"a": [1.0, float("nan"), (np.float32("inf"), {"b": np.int32(2)})], "c": (), "d": {"e": None}}
  assert jsonio.jsonable(obj) == {"a": [1.0, "nan", ["inf", {"b": 2}]], "c": [], "d": {"e": None}}
  assert jsonio.jsonable(float("-inf")) == "-inf"


def test_from_jsonable_inverts_num():
  for s in ("nan", "inf", "-inf"):
    back = jsonio.from_jsonable(s)
    assert type(back) is float and (math.isnan(back) if s == "nan" else back == float(s))
  for value in ["NaN", "Infinity", "infinite", "x", 1, 1.5, None]:
    assert jsonio.from_jsonable(value) is value


def test_dumps_is_strict_json_with_the_encoding():
  obj = {"z": float("nan"), "a": [float("inf"), np.float32(0.5)], "m": {"k": np.int64(3)}}
  text = jsonio.dumps(obj)
  plain = {"z": "nan", "a": ["inf", 0.5], "m": {"k": 3}}
  assert text == json.dumps(plain, indent=1)  # default: indent 1, keys in insertion order
  assert "NaN" not in text and "Infinity" not in text
  json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
  assert jsonio.dumps(obj, indent=None, sort_keys=True) == json.dumps(plain, sort_keys=True)
  with pytest.raises(TypeError):
    jsonio.dumps({"x": object()})  # what JSON cannot hold is an error, not silently a string


def test_write_json_is_dumps_plus_a_newline_and_returns_the_absolute_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  obj = {"b": float("-inf"), "a": 1}
  got = jsonio.write_json("sub/r.json", obj, sort_keys=True)
  assert got == os.path.join(str(tmp_path), "sub", "r.json")
  with open(got, encoding="utf-8") as f:
    assert f.read() == json.dumps({"a": 1, "b": "-inf"}, indent=1, sort_keys=True) + "\n"
  assert os.listdir(tmp_path / "sub") == ["r.json"]  # no temporary file left beside it
