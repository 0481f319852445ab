"""JAX against the torch goldens in goldens/svf: stage tolerances, explained mismatches, replay, chunking."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from parity_jax import bundles as stages, arraydiff
from parity_jax.errors import UsageError
from parity_jax.svf import STAGES, gate, ComponentStore, reconstruct, replay, safe_source_name, tensor_key
from parity_jax.svf.bounds import FormulaConstants, MismatchAccounting
from parity_jax.svf.io import find_component_files

from tests.helpers import svf as svf_testlib

GOLDENS = pathlib.Path(__file__).resolve().parents[2] / "goldens" / "svf"
BF16 = ml_dtypes.bfloat16


@pytest.fixture(scope="module")
def all_selected():
  return replay(golden_dir=str(GOLDENS), all_selected=True, row_block=32, chunk_mb=0.05)


def _store():
  return ComponentStore(*find_component_files(str(GOLDENS)))


def _golden_final(name):
  with stages.BundleReader(GOLDENS / "svf_all_selected_stage_debug.safetensors") as r:
    return r.get(tensor_key(name, "final_bf16"))


def test_manifest_lists_every_file_with_its_sha256():
  manifest = json.loads((GOLDENS / "MANIFEST.json").read_text())
  assert manifest["seed"] and manifest["versions"]["torch"]
  files = sorted(p.name for p in GOLDENS.iterdir() if p.name != "MANIFEST.json")
  assert sorted(manifest["files"]) == files
  for name, meta in manifest["files"].items():
    assert hashlib.sha256((GOLDENS / name).read_bytes()).hexdigest() == meta["sha256"], name
  assert sum(meta["bytes"] for meta in manifest["files"].values()) < 8 * 2**20


def test_sample_replay_passes_in_target_orientation():
  res = replay(golden_dir=str(GOLDENS))
  (t,) = res.report["tensors"]
  assert t["name"] == "model.layers.1.mlp.down_proj.weight" and t["orientation"] == "transpose"
  assert t["target_shape"] == [160, 80]
  assert res.passed and t["stages_pass"]
  # How many bf16 ties JAX and torch's MKL produce here depends on the machine
  # (25 over all tensors on AVX-512, none on AVX2); whatever they are, all are explained.
  assert t["explained"]["n_unexplained"] == 0
  assert t["final_bytes_equal"] == (t["explained"]["n_mismatch"] == 0)
  want = "FAIL" if t["explained"]["n_mismatch"] else "PASS"
  assert replay(golden_dir=str(GOLDENS), mode="bytes").report["verdict"] == want


def test_legitimate_ties_from_another_summation_order_are_all_explained():
  """Real ties on every machine: torch's blocked sgemm against a sequential float32 sum."""
  total = 0
  with _store() as st:
    for name in st.names:
      norm = stages.load_bundle(GOLDENS / "svf_all_selected_stage_debug.safetensors")[tensor_key(name, "normalization")]
      _, adapted = svf_testlib.sequential_order(st.u(name), st.s(name), st.v_nk(name), st.offsets(name), norm)
      acc = _accounting(name, adapted.astype(BF16))
      assert acc.n_unexplained == 0, (name, acc.to_dict()["unexplained_examples"])
      total += acc.n_mismatch
  assert total > 0  # the two orders do round differently (torch bytes and numpy are both fixed: same count everywhere)


def test_replay_against_another_summation_order_explains_every_tie(alt_svf_goldens):
  golden_dir, n_ties = alt_svf_goldens
  assert n_ties > 0
  res = replay(golden_dir=str(golden_dir), all_selected=True)
  s = res.report["summary"]
  assert res.passed and s["n_unexplained"] == 0 and s["n_mismatch"] == s["n_explained"] > 0, s
  assert replay(golden_dir=str(golden_dir), all_selected=True, mode="bytes").report["verdict"] == "FAIL"


def test_all_selected_replay_against_torch(all_selected):
  rep = all_selected.report
  assert rep["verdict"] == "PASS" and rep["scope"] == "all_selected"
  names = [t["name"] for t in rep["tensors"]]
  assert len(names) == 16 and "lm_head.weight" in names and "model.embed_tokens.weight" in names
  for t in rep["tensors"]:
    st = t["stages"]
    # torch-order sums: the normalization is torch's to the bit, for every tensor
    for exact in ("source_f32", "offsets_f32", "scaled_s", "normalization", "u_scaled"):
      assert st[exact]["bit_equal"], (t["name"], exact)
    for bounded in ("matmul_pre_norm", "zero_source_f32", "adapted_source_f32", "final_f32"):
      assert st[bounded]["tolerance"]["n_out_of_tolerance"] == 0 and st[bounded]["tolerance"]["max_ratio"] < 0.1
    assert t["explained"]["n_unexplained"] == 0
    if t["final_bytes_equal"]:
      assert t["final_bf16_sha256"] == t["golden_final_bf16_sha256"]
    assert t["components_reproduce_source"]["rel_l2"] < 1e-5
  s = rep["summary"]
  assert s["n_mismatch"] == s["n_explained"] and s["n_unexplained"] == 0
  assert s["final_bytes_equal"] == sum(t["explained"]["n_mismatch"] == 0 for t in rep["tensors"])
  # our combined hash of the golden bytes equals the one the oracle computed independently
  assert rep["golden_combined_sha256"] == rep["golden_report_combined_sha256"]
  assert s["torch_self_flips"] == 0  # torch against itself at 1 vs 2 threads, on the same tensors
  assert any(t["chunking"]["n_chunks"] > 1 for t in rep["tensors"])
  line = all_selected.verdict_line()
  assert line.startswith("SVF parity PASS") and f"mismatched elements {s['n_mismatch']}" in line


def test_stage_stats_are_the_numpy_summary_of_the_stage(all_selected):
  """Each stage's "stats": count, NaN and inf counts, then min, max, mean and RMS over the finite values, computed
  here in numpy from the golden stage (bit-equal stages only: there ours is the golden, byte for byte)."""
  n_checked = 0
  with stages.BundleReader(GOLDENS / "svf_all_selected_stage_debug.safetensors") as r:
    for t in all_selected.report["tensors"]:
      for stage, st in t["stages"].items():
        key = tensor_key(t["name"], stage)
        if not st["bit_equal"] or key not in r.names:
          continue
        x = np.asarray(r.get(key)).astype(np.float64).ravel()
        f = x[np.isfinite(x)]
        got = st["stats"]
        assert (got["count"], got["n_nan"], got["n_inf"]) == (x.size, np.isnan(x).sum(), np.isinf(x).sum())
        assert (got["min"], got["max"]) == (f.min(), f.max()), (t["name"], stage)
        assert got["mean"] == pytest.approx(f.mean(), rel=1e-9, abs=1e-300), (t["name"], stage)
        assert got["rms"] == pytest.approx(np.sqrt(np.mean(f * f)), rel=1e-9), (t["name"], stage)
        n_checked += 1
  assert n_checked >= 16 * 5  # the five exact stages of every tensor at least


def _accounting(name, ours_final):
  with _store() as st:
    fc = FormulaConstants.from_components(st.s(name), st.offsets(name))
    acc = MismatchAccounting(fc)
    acc.update(_golden_final(name).view(np.uint16), np.asarray(ours_final).view(np.uint16), st.u(name), st.v_nk(name))
    return acc


@pytest.mark.parametrize(
    "bug", ["offset_off_by_one", "transposed_v", "no_normalization", "inverted_normalization", "one_offset_perturbed"]
)
def test_real_bugs_are_never_explained(bug):
  name = "model.embed_tokens.weight"  # [320, 80]: V is square, so a transposed V still fits
  with _store() as st:
    u, s, v, o = st.u(name), st.s(name), st.v(name), st.offsets(name)
  if bug == "offset_off_by_one":
    final = reconstruct(u, s, v, np.roll(o, 1))
  elif bug == "one_offset_perturbed":
    o2 = o.copy()
    o2[0] += np.float32(0.01)
    final = reconstruct(u, s, v, o2)
  elif bug == "transposed_v":
    final = reconstruct(u, s, v, o, layout="vh")
  else:
    stg = reconstruct(u, s, v, o, capture=True)
    pre, nrm = np.asarray(stg["matmul_pre_norm"]), np.asarray(stg["normalization"])
    final = (pre if bug == "no_normalization" else pre * (np.float32(1) / nrm / nrm)).astype(BF16)
  acc = _accounting(name, final)
  assert acc.n_unexplained > 0.5 * acc.n_mismatch > 0, acc.to_dict()
  # the same check on the correct rebuild explains everything (real ties included:
  # test_legitimate_ties_from_another_summation_order_are_all_explained)
  good = _accounting(name, reconstruct(u, s, v, o))
  assert good.n_unexplained == 0


def _copy_goldens(tmp_path) -> pathlib.Path:
  dst = tmp_path / "golden"
  shutil.copytree(GOLDENS, dst)
  return dst


def test_wrong_offsets_file_fails_the_replay(tmp_path):
  g = _copy_goldens(tmp_path)
  name = "model.layers.0.mlp.up_proj.weight"
  offs = dict(stages.load_bundle(g / "svf_scale_offsets.safetensors"))
  offs[name] = np.roll(offs[name], 1)
  (g / "svf_scale_offsets.safetensors").unlink()
  stages.save_bundle(g / "svf_scale_offsets.safetensors", offs)
  res = replay(golden_dir=str(g), all_selected=True, selected_source_filter="layers.0.mlp")
  bad = {t["name"]: t for t in res.report["tensors"]}
  assert res.report["verdict"] == "FAIL"
  assert not bad[name]["pass"] and bad[name]["explained"]["n_unexplained"] > 0
  assert bad[name]["stages"]["offsets_f32"]["pass"] is False
  assert all(t["pass"] for n, t in bad.items() if n != name)


def test_filter_selects_by_source_or_safe_name():
  res = replay(golden_dir=str(GOLDENS), all_selected=True, selected_source_filter="model.layers.1.")
  names = [t["name"] for t in res.report["tensors"]]
  assert len(names) == 7 and all(n.startswith("model.layers.1.") for n in names)
  res = replay(golden_dir=str(GOLDENS), all_selected=True, selected_source_filter="layers_0_mlp_down")
  assert [t["name"] for t in res.report["tensors"]] == ["model.layers.0.mlp.down_proj.weight"]
  with pytest.raises(UsageError, match="selects no tensor"):
    replay(golden_dir=str(GOLDENS), all_selected=True, selected_source_filter="model.layers.7.")


def test_a_missing_stage_of_a_selected_tensor_is_a_setup_error(tmp_path):
  g = _copy_goldens(tmp_path)
  path = g / "svf_all_selected_stage_debug.safetensors"
  b = stages.load_bundle(path)
  missing = tensor_key("model.layers.1.mlp.up_proj.weight", "zero_source_f32")
  kept = {k: v for k, v in b.items() if k != missing}
  path.unlink()
  stages.save_bundle(path, kept, b.provenance)
  with pytest.raises(UsageError, match="setup error.*zero_source_f32"):
    replay(golden_dir=str(g), all_selected=True, stage_dir=str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()  # nothing written
  # a filter that leaves the damaged tensor out is fine
  assert replay(golden_dir=str(g), all_selected=True, selected_source_filter="layers.0.self_attn.q").passed
  # the stage present with the wrong shape, then with the wrong dtype
  for bad, words in [
      (b[missing].reshape(-1), r"has shape \[\d+\], expected \[\d+, \d+\]"),
      (b[missing].astype(np.float64), "has dtype float64, expected float32"),
  ]:
    path.unlink()
    stages.save_bundle(path, {**kept, missing: bad}, b.provenance)
    with pytest.raises(
        UsageError,
        match=f"golden {missing} {words} for model.layers.1.mlp.up_proj.weight"
        if "shape" in words
        else f"golden {missing} {words}",
    ):
      replay(golden_dir=str(g), all_selected=True)
  path.unlink()
  with pytest.raises(UsageError, match="setup error: golden stage bundle .* does not exist"):
    replay(golden_dir=str(g), all_selected=True)


def test_report_and_bundle_that_do_not_belong_together_are_refused(tmp_path):
  g = _copy_goldens(tmp_path)
  rep = json.loads((g / "svf_report.json").read_text())
  rep["sample"]["final_bf16_sha256"] = "0" * 64
  (g / "svf_report.json").write_text(json.dumps(rep))
  with pytest.raises(UsageError, match="records final_bf16 sha256"):
    replay(golden_dir=str(g), stage_dir=str(tmp_path / "out"))
  assert not list((tmp_path / "out").glob("*.safetensors"))
  rep.pop("stage_debug")
  (g / "svf_report.json").write_text(json.dumps(rep))
  with pytest.raises(UsageError, match="all-selected replay needs"):
    replay(golden_dir=str(g), all_selected=True)
  rep = json.loads((GOLDENS / "svf_report.json").read_text())
  for source_name, words in [(None, "the report names no sample tensor"), ("no.such.weight", "has no components")]:
    rep["sample"]["source_name"] = source_name
    (g / "svf_report.json").write_text(json.dumps(rep))
    with pytest.raises(UsageError, match=words):
      replay(golden_dir=str(g))


def test_chunked_replay_is_bit_identical_to_unchunked_and_to_reconstruct(tmp_path, monkeypatch):
  kw = dict(golden_dir=str(GOLDENS), all_selected=True, row_block=16, selected_source_filter="embed_tokens")
  a = replay(stage_dir=str(tmp_path / "chunked"), chunk_mb=0.02, **kw)
  b = replay(stage_dir=str(tmp_path / "whole"), chunk_mb=0, **kw)
  monkeypatch.setattr(gate, "COMPARE_ELEMS", 1000)  # comparison sub-blocks of 12 rows, across chunk edges
  c = replay(stage_dir=str(tmp_path / "sub"), chunk_mb=0.02, **kw)
  (ta,), (tb,), (tc,) = a.report["tensors"], b.report["tensors"], c.report["tensors"]
  assert ta["chunking"]["n_chunks"] > 4 and tb["chunking"]["n_chunks"] == 1
  for t in (tb, tc):
    assert {s: r["sha256"] for s, r in ta["stages"].items()} == {s: r["sha256"] for s, r in t["stages"].items()}
    for stage, r in ta["stages"].items():
      d1, d2 = r["diff"], t["stages"][stage]["diff"]
      for exact in ("n_diff", "max_abs_diff", "max_abs_index", "max_ulp", "n_nan_mismatch"):
        assert d1[exact] == d2[exact], (stage, exact)
      # (which of several equal |diff| make the top-k list depends on DiffAccumulator's chunks)
      assert [e["abs_diff"] for e in d1["top_k"]] == [e["abs_diff"] for e in d2["top_k"]], stage
      for summed in ("rms_diff", "cosine", "rel_l2"):  # float64 sums grouped by chunk: last bits may move
        assert d1[summed] == pytest.approx(d2[summed], rel=1e-12, abs=1e-300), (stage, summed)
    assert ta["explained"] == t["explained"]
  fa = (tmp_path / "chunked" / "svf_all_selected_stage_debug.safetensors").read_bytes()
  assert fa == (tmp_path / "whole" / "svf_all_selected_stage_debug.safetensors").read_bytes()
  assert fa == (tmp_path / "sub" / "svf_all_selected_stage_debug.safetensors").read_bytes()
  name = "model.embed_tokens.weight"
  with _store() as st:
    full = reconstruct(st.u(name), st.s(name), st.v(name), st.offsets(name), capture=True, row_block=16)
  ours = stages.load_bundle(tmp_path / "chunked" / "svf_all_selected_stage_debug.safetensors")
  for stage in STAGES:
    if stage != "source_f32":
      assert arraydiff.bit_equal(
          ours[tensor_key(name, stage)], np.asarray(full[stage]).reshape(ours[tensor_key(name, stage)].shape)
      ), stage
  assert ours.names[0] == f"tensor.{safe_source_name(name)}.source_f32"


def test_chunked_sample_in_target_orientation_matches_unchunked(tmp_path):
  a = replay(golden_dir=str(GOLDENS), stage_dir=str(tmp_path / "a"), row_block=16, chunk_mb=0.02)
  b = replay(golden_dir=str(GOLDENS), stage_dir=str(tmp_path / "b"), row_block=16, chunk_mb=0)
  (ta,), (tb,) = a.report["tensors"], b.report["tensors"]
  assert ta["chunking"]["n_chunks"] == 5 and ta["orientation"] == "transpose"
  assert (
      ta["final_bf16_sha256"] == tb["final_bf16_sha256"]
      and ta["explained"]["n_mismatch"] == tb["explained"]["n_mismatch"]
  )
  assert (tmp_path / "a" / "svf_stage_debug.safetensors").read_bytes() == (
      tmp_path / "b" / "svf_stage_debug.safetensors"
  ).read_bytes()
  ours = stages.load_bundle(tmp_path / "a" / "svf_stage_debug.safetensors")
  assert ours["stage.final_bf16"].shape == (160, 80)
  assert a.passed and b.passed


def test_bad_replay_settings_are_refused_before_any_work():
  for kwargs, words in [
      (dict(row_block=0), "row_block must be >= 1, got 0"),
      (dict(chunk_mb=-1), "chunk_mb must be >= 0, got -1"),
      (dict(mode="bogus"), "unknown mode 'bogus'"),
      (dict(explain_rule="bogus"), "unknown explain rule 'bogus'"),
      (dict(compute_dtype=np.float16), "compute_dtype must be float32 or bfloat16, got float16"),
      (dict(devices=-1), r"devices must lie in \[0, \d+\] \(0: all\), got -1"),
      (dict(devices=1 + len(jax.devices())), "devices must lie in"),
  ]:
    with pytest.raises(UsageError, match=words):
      replay(golden_dir=str(GOLDENS), **kwargs)


def test_the_text_report_renders_every_tensor_row_and_the_verdict_line():
  """ReplayResult.text() on a hand-built report: one row per tensor (both orientations, a failing stage, differing
  bytes) and the verdict line with and without torch's self-flip reference."""
  summary = dict(
      passed=1,
      tensors=2,
      final_bytes_equal=1,
      n_mismatch=7,
      n_explained=5,
      n_explained_tie=4,
      n_explained_multi_ulp=1,
      n_unexplained=2,
      combined_equal=False,
  )
  ok = dict(
      name="a.weight",
      shape=[4, 8],
      orientation="transpose",
      stages={"adapted": {"pass": True}, "final_bf16": {"pass": None}},
      final_bytes_equal=True,
      explained=dict(n_mismatch=0, n_explained=0, n_unexplained=0),
      **{"pass": True},
  )
  bad = dict(
      name="bb.weight",
      shape=[16, 2],
      orientation="identity",
      stages={"adapted": {"pass": False}, "u_scaled": {"pass": True}, "final_bf16": {"pass": False}},
      final_bytes_equal=False,
      explained=dict(n_mismatch=7, n_explained=5, n_unexplained=2),
      **{"pass": False},
  )
  report = dict(verdict="FAIL", mode="bit_exact", scope="all_selected", summary=summary, tensors=[ok, bad])
  table = [
      "tensor     shape  orient  stages                   final bytes  mismatch (expl/unexpl)  verdict",
      "a.weight   4x8    T       ok                       identical    0 (0/0)                 PASS",
      "bb.weight  16x2   I       FAIL:adapted,final_bf16  differ       7 (5/2)                 FAIL",
  ]
  line = (
      "SVF parity FAIL (mode=bit_exact, all_selected): 1/2 tensors pass; final bf16 identical 1/2; mismatched elements"
      " 7 (explained 5: 4 1-ULP ties, 1 multi-ULP within bound; unexplained 2); combined sha256 differs"
  )
  result = gate.ReplayResult(report)
  assert result.text() == "\n".join(table + [line]) and not result.passed
  summary.update(torch_self_flips=3, combined_equal=True)
  assert result.verdict_line() == line.replace(
      "unexplained 2); combined sha256 differs",
      "unexplained 2); torch 1-thread vs default flips 3; combined sha256 equal",
  )


def test_chunk_rows_are_multiples_of_the_row_block_within_budget():
  """Moved here from test_core.py: chunk_rows lives in svf/gate.py."""
  assert gate.chunk_rows(151936, 1024, 1024, 0) == 151936
  rows = gate.chunk_rows(151936, 1024, 1024, 256, row_block=1024)
  assert rows % 1024 == 0 and rows >= 1024
  assert rows * (16 * 1024 + 32 * 1024) <= 256 * 2**20 < (rows + 1024) * (16 * 1024 + 32 * 1024)  # the most that fit
  assert gate.chunk_rows(151936, 1024, 1024, 512) == 8192  # the default block: 384 MiB
  assert gate.chunk_rows(151936, 1024, 1024, 0.001) == 8192  # never below one block
  assert gate.chunk_rows(900, 64, 64, 0.001, row_block=1024) == 900  # one block holds it all
  assert gate.chunk_rows(100, 8, 8, 0.001, row_block=16) == 16
