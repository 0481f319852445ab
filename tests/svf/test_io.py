"""parity_jax.svf.io, called directly: finding the component files, the component store's checks, golden reports.

Tiny hand-built bundles; every refusal is one UsageError naming what is wrong (the replay tests in
test_gate_goldens.py exercise the happy paths on the committed goldens).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity_jax import bundles
from parity_jax.errors import UsageError
from parity_jax.svf import ComponentStore, load_golden, write_components
from parity_jax.svf.io import COMPONENTS_SUFFIX, OFFSETS_SUFFIX, find_component_files, read_columns


def _parts(m=3, n=5, k=2):
  u = np.arange(m * k, dtype=np.float32).reshape(m, k)
  return u, np.ones(k, np.float32), np.arange(n * k, dtype=np.float32).reshape(n, k)  # torch_v: V [n, k]


def _store(tmp_path, components, offsets, layout="torch_v"):
  d = tmp_path / "c"
  d.mkdir(exist_ok=True)
  bundles.save_bundle(d / COMPONENTS_SUFFIX, components)
  bundles.save_bundle(d / OFFSETS_SUFFIX, offsets)
  return ComponentStore(*find_component_files(str(d)), layout=layout)


def test_find_component_files_wants_exactly_one_of_each(tmp_path):
  with pytest.raises(UsageError, match="no such directory"):
    find_component_files(str(tmp_path / "nope"))
  u, s, v = _parts()
  written = write_components(str(tmp_path), {"w": (u, s, v)}, {"w": np.zeros(2, np.float32)}, prefix="a_")
  assert written == [str(tmp_path / ("a_" + COMPONENTS_SUFFIX)), str(tmp_path / ("a_" + OFFSETS_SUFFIX))]
  assert find_component_files(str(tmp_path)) == (
      str(tmp_path / ("a_" + COMPONENTS_SUFFIX)),
      str(tmp_path / ("a_" + OFFSETS_SUFFIX)),
  )
  with pytest.raises(UsageError, match="refusing to overwrite"):
    write_components(str(tmp_path), {"w": (u, s, v)}, prefix="a_")
  write_components(str(tmp_path), {"w": (u, s, v)}, prefix="b_")  # a second components file, no offsets
  with pytest.raises(UsageError, match=f"more than one components file in .*: a_{COMPONENTS_SUFFIX}, b_"):
    find_component_files(str(tmp_path))
  only = tmp_path / "only"
  write_components(str(only), {"w": (u, s, v)})
  with pytest.raises(UsageError, match=rf"no scale offsets file \(\*{OFFSETS_SUFFIX}\) in "):
    find_component_files(str(only))


def test_the_component_store_checks_every_name_on_open(tmp_path):
  u, s, v = _parts()
  off = np.zeros(2, np.float32)
  with _store(tmp_path, {"w.U": u, "w.S": s, "w.V": v}, {"w": off}) as store:
    assert store.names == ["w"] and store.dims("w") == (3, 5, 2)
    with pytest.raises(UsageError, match="no components for 'x'"):
      store.dims("x")
  with pytest.raises(UsageError, match="unknown layout 'bogus'"):
    _store(tmp_path, {"w.U": u, "w.S": s, "w.V": v}, {"w": off}, layout="bogus")
  for comps, offsets, words in [
      ({"w.S": s, "w.V": v}, {"w": off}, "no '<name>.U' tensors"),
      ({"w.U": u, "w.V": v}, {"w": off}, "w.U has no w.S"),
      ({"w.U": u, "w.S": s}, {"w": off}, "w.U has no w.V"),
      ({"w.U": u, "w.S": s, "w.V": v}, {"z": off}, "no scale offsets for w"),
      (
          {"a.b.U": u, "a.b.S": s, "a.b.V": v, "a_b.U": u, "a_b.S": s, "a_b.V": v},
          {"a.b": off, "a_b": off},
          "source names 'a.b' and 'a_b' collide as 'a_b'",
      ),
  ]:
    with pytest.raises(UsageError, match=words):
      _store(tmp_path, comps, offsets)


def test_read_columns_reads_only_the_columns_asked(tmp_path):
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  bundles.save_bundle(tmp_path / "x.safetensors", {"a": a})
  got = read_columns(str(tmp_path / "x.safetensors"), "a", 1, 3)
  assert got.flags.c_contiguous and got.tolist() == [[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]


def test_load_golden_resolves_the_report_paths(tmp_path):
  report = {
      "stage_debug": {"stage_tensor_file": "s.safetensors", "all_selected_stage_tensor_file": "/abs/a.safetensors"},
      "components": {"directory": "comps"},
      "layout": "vh",
      "sample": {"source_name": "w"},
  }
  (tmp_path / "svf_report.json").write_text(json.dumps(report))
  run = load_golden(golden_dir=str(tmp_path))
  assert run.report == report and run.layout == "vh" and run.sample == {"source_name": "w"}
  assert run.sample_bundle == str(tmp_path / "s.safetensors") and run.all_selected_bundle == "/abs/a.safetensors"
  assert run.components_dir == str(tmp_path / "comps") and run.base_dir == str(tmp_path)
  bare = tmp_path / "bare.json"
  bare.write_text(json.dumps({"tensors": []}))
  run = load_golden(python_report=str(bare))
  assert (run.sample_bundle, run.all_selected_bundle, run.components_dir, run.layout, run.sample) == (None,) * 5
  for text, words in [
      ("[1]", "report must be a JSON object"),
      ("{oops", "cannot read report"),
      (json.dumps({"format": "x"}), "is not an SVF run report \\(format 'x'; it has none of"),
  ]:
    bare.write_text(text)
    with pytest.raises(UsageError, match=words):
      load_golden(python_report=str(bare))
  for kwargs, words in [
      ({}, "give exactly one of"),
      (dict(python_report=str(bare), golden_dir=str(tmp_path)), "give exactly one of"),
      (dict(golden_dir=str(tmp_path / "nope")), "no such directory"),
      (dict(python_report=str(tmp_path / "nope.json")), "no such report"),
  ]:
    with pytest.raises(UsageError, match=words):
      load_golden(**kwargs)
