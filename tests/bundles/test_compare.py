"""compare_bundles: inputs, execution order, fail-fast errors, the JSON schema, text/HTML/PNG output."""

import json
import pathlib
import random
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from parity_jax.provenance import default_provenance
from parity_jax import bundles as stages, arraydiff
from parity_jax.bundles import REPORT_SCHEMA, BundleReport, compare_bundles, load_report
from parity_jax.errors import UsageError
from tests.helpers import stages as synth

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def _pair(tmp_path, num_layers=2, planted="layers.1.v_proj"):
  golden = synth.golden_stages(num_layers=num_layers)
  names = list(golden)
  cand = synth.candidate(golden, lambda i, n: 1e-3 if planted and i >= names.index(planted) else 1e-7)
  g, c = tmp_path / "golden.safetensors", tmp_path / "cand.safetensors"
  stages.save_bundle(g, golden, default_provenance("test-golden"))
  stages.save_bundle(c, cand, default_provenance("test-candidate"))
  return golden, cand, g, c


def test_every_stage_gets_the_core_diff_stats(tmp_path):
  golden, cand, g, c = _pair(tmp_path)
  report = compare_bundles(g, c, top_k=3)
  assert report.names == list(golden)
  for row in report.rows:
    ref = arraydiff.diff_stats(golden[row.name], cand[row.name], top_k=3)
    assert row.stats == ref and row.rel_l2 == ref.rel_l2, row.name
  assert report.golden.producer == "test-golden" and report.order_source == "golden_metadata"
  assert report.row("logits").logits is not None and report.row("embedding").logits is None


def test_inputs_path_bundle_dict_npz_agree(tmp_path):
  golden, cand, g, c = _pair(tmp_path)
  np.savez(tmp_path / "cand.npz", **cand)
  by_path = compare_bundles(g, c)
  for other in (
      compare_bundles(stages.load_bundle(g), stages.load_bundle(c)),
      compare_bundles(golden, cand),
      compare_bundles(str(g), tmp_path / "cand.npz"),
  ):
    assert [r.stats for r in other.rows] == [r.stats for r in by_path.rows]
    assert other.first_divergent == by_path.first_divergent == "layers.1.v_proj"


def test_order_is_execution_order_never_alphabetical(tmp_path):
  golden = synth.golden_stages(num_layers=11, hidden=2, vocab=3, tokens=1)
  names = list(golden)
  shuffled = names[:]
  random.Random(0).shuffle(shuffled)
  plain = {n: golden[n] for n in shuffled}
  safetensors.numpy.save_file(plain, str(tmp_path / "plain.safetensors"))  # no stage_order metadata
  report = compare_bundles(tmp_path / "plain.safetensors", plain)
  assert report.names == names and report.order_source == "inferred_qwen"
  assert sorted(names) != names
  # metadata order wins, even when it is not the Qwen order
  custom = names[::-1]
  stages.save_bundle(tmp_path / "rev.safetensors", {n: golden[n] for n in custom})
  assert compare_bundles(tmp_path / "rev.safetensors", plain).names == custom
  # only the candidate has an order: it is taken from the candidate
  from_candidate = compare_bundles(plain, tmp_path / "rev.safetensors")
  assert (from_candidate.names, from_candidate.order_source) == (custom, "candidate_metadata")
  # unknown names keep the source order
  other = {"zeta": np.ones(2, np.float32), "alpha": np.ones(2, np.float32), "mid.10": np.ones(2, np.float32)}
  assert compare_bundles(other, dict(other)).names == ["zeta", "alpha", "mid.10"]
  assert compare_bundles(other, dict(other), order=["alpha", "mid.10", "zeta"]).names == ["alpha", "mid.10", "zeta"]


def test_one_sided_stages_error_by_default_and_are_listed_when_allowed(tmp_path):
  golden = synth.golden_stages(num_layers=2)
  cand = dict(golden)
  del cand["layers.1.ffn_up"]
  cand["extra_stage"] = np.zeros(3, np.float32)
  with pytest.raises(UsageError, match=r"only in golden: layers\.1\.ffn_up; only in candidate: extra_stage"):
    compare_bundles(golden, cand)
  report = compare_bundles(golden, cand, allow_missing=True)
  assert report.only_golden == ["layers.1.ffn_up"] and report.only_candidate == ["extra_stage"]
  assert report.passed and "layers.1.ffn_up" not in report.names
  text = report.text()
  assert "only in golden (1): layers.1.ffn_up" in text and "only in candidate (1): extra_stage" in text


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda c: c.__setitem__("layers.0.k_proj", np.zeros((1, 4, 8), np.float32)),
            r"stage 'layers\.0\.k_proj': shape mismatch: golden \(1, 4, 16\) vs candidate \(1, 4, 8\)",
        ),
        (
            lambda c: c.__setitem__("layers.1.output", c["layers.1.output"].astype(np.float64)),
            r"stage 'layers\.1\.output': dtype mismatch: golden float32 vs candidate float64",
        ),
        (
            lambda c: c.__setitem__("final_norm", c["final_norm"].astype(np.int32)),
            r"stage 'final_norm': dtype mismatch",
        ),
    ],
)
def test_shape_and_dtype_mismatch_fail_fast_naming_the_stage(edit, message):
  golden = synth.golden_stages(num_layers=2)
  cand = dict(golden)
  edit(cand)
  with pytest.raises(UsageError, match=message) as e:
    compare_bundles(golden, cand, profile="f32")
  assert "\n" not in str(e.value)


def test_bad_inputs(tmp_path):
  golden = synth.golden_stages(num_layers=1)
  with pytest.raises(UsageError, match="golden bundle in-memory dict has no stages"):
    compare_bundles({}, golden)
  safetensors.numpy.save_file({}, str(tmp_path / "empty.safetensors"))
  with pytest.raises(UsageError, match="candidate bundle .*empty.safetensors has no stages"):
    compare_bundles(golden, tmp_path / "empty.safetensors")
  with pytest.raises(UsageError, match="no such file"):
    compare_bundles(tmp_path / "nope.safetensors", golden)
  (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
  with pytest.raises(UsageError, match="cannot read .*junk.safetensors as safetensors"):
    compare_bundles(golden, tmp_path / "junk.safetensors")
  with pytest.raises(UsageError, match="no common stages"):
    compare_bundles({"a": np.ones(2)}, {"b": np.ones(2)}, allow_missing=True)
  with pytest.raises(UsageError, match=r"golden has nothing, candidate has b$"):  # the filter leaves golden none
    compare_bundles({"a": np.ones(2)}, {"b": np.ones(2)}, stages="^b$")
  with pytest.raises(UsageError, match=r"explicit order does not list b$"):
    compare_bundles({"a": np.ones(2), "b": np.ones(2)}, {"a": np.ones(2), "b": np.ones(2)}, order=["a"])
  with pytest.raises(UsageError, match="candidate: stage names must be non-empty strings, got ''"):
    compare_bundles({"a": np.ones(2)}, {"": np.ones(2)})
  # a logits stage without a vocabulary axis: its logits statistics are skipped, unless a rule asks for them
  scalar = {"logits": np.float32(1.0)}
  assert compare_bundles(scalar, scalar, profile="exact").rows[0].logits is None
  kl = {"schema": "parity_jax.tolerance_profile/1", "rules": [{"stages": ".*", "max_kl": 1.0}]}
  with pytest.raises(UsageError, match=r"stage 'logits': logits thresholds need a vocabulary axis, shape is \(\)"):
    compare_bundles(scalar, scalar, profile=kl)
  six = {k: np.ones(2) for k in "abcdef"}
  with pytest.raises(UsageError, match=r"golden has a, b, c, d \(\+2 more\), candidate has w, x, y, z$"):
    compare_bundles(six, {k: np.ones(2) for k in "wxyz"})  # four names are listed whole
  with pytest.raises(UsageError, match="matches no stage"):
    compare_bundles(golden, golden, stages="^nothing$")
  with pytest.raises(UsageError, match="must be a path, a StageBundle or a dict"):
    compare_bundles(42, golden)


def test_stage_filter(tmp_path):
  golden, cand, g, c = _pair(tmp_path)
  report = compare_bundles(g, c, stages=r"^layers\.1\.")
  assert report.names and all(n.startswith("layers.1.") for n in report.names)
  assert report.first_divergent == "layers.1.v_proj"


def test_chunked_large_stage_matches_diff_stats(monkeypatch):
  from parity_jax.bundles import diff as bundle_diff

  rng = np.random.default_rng(5)
  a = rng.standard_normal((3, 5, 7)).astype(np.float32)
  b = a.copy()
  b[1, 2, 3] += 1.0
  b[2, 4, 6] -= 2.0
  b[0, 0, 0] = np.nan
  monkeypatch.setattr(bundle_diff, "CHUNK_ELEMENTS", 4)  # forces boxes smaller than a row
  st = bundle_diff.stage_stats(a, b, 5, "x")
  ref = arraydiff.diff_stats(a, b, 5)
  assert st.max_abs_index == ref.max_abs_index and st.n_diff == ref.n_diff
  assert [d.to_dict() for d in st.top_k] == [d.to_dict() for d in ref.top_k]  # (NaN != NaN as a dataclass field)
  assert st.rel_l2 == ref.rel_l2 and st.cosine == pytest.approx(ref.cosine, rel=1e-14)
  assert sum(1 for _ in bundle_diff.boxes((3, 5, 7), 4)) == 3 * 5 * 2


def test_nan_on_one_side_is_always_a_breach():
  golden = synth.golden_stages(num_layers=1)
  cand = {k: v.copy() for k, v in golden.items()}
  cand["layers.0.ffn_out"][0, 1, 2] = np.nan
  report = compare_bundles(golden, cand)
  assert report.first_divergent == "layers.0.ffn_out"
  assert [b.metric for b in report.row("layers.0.ffn_out").breaches][0] == "nan_mismatch"
  assert json.loads(report.to_json())["stages"][report.row("layers.0.ffn_out").index]["stats"]["rel_l2"] == "inf"


def test_json_round_trip_is_lossless(tmp_path):
  golden, cand, g, c = _pair(tmp_path)
  report = compare_bundles(g, c)
  text = report.to_json()
  json.loads(text, parse_constant=lambda s: pytest.fail(f"non-strict JSON constant {s}"))
  back = BundleReport.from_json(text)
  assert back.to_json() == text
  assert back.rows == report.rows and back.verdict == report.verdict and back.profile == report.profile
  report.write_json(tmp_path / "r.json")
  assert load_report(tmp_path / "r.json").first_divergent == "layers.1.v_proj"
  assert repr(report) == (
      f"BundleReport({len(report.rows)} stages, profile='f32', {report.verdict.status}, first_divergent='layers.1.v_proj')"
  )
  with pytest.raises(KeyError):
    report.row("no.such.stage")
  with pytest.raises(UsageError, match="^bundle report is not valid JSON: "):
    BundleReport.from_json("{not json")
  with pytest.raises(UsageError, match="^no such report: "):
    load_report(tmp_path / "gone.json")


def _approx_equal(a, b, path=""):
  if isinstance(a, dict):
    assert isinstance(b, dict), path
    for k in a:
      assert k in b, f"{path}.{k} missing from the live report"
      _approx_equal(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _approx_equal(x, y, f"{path}[{i}]")
  elif isinstance(a, float) and not isinstance(b, bool):
    assert b == pytest.approx(a, rel=1e-12), path
  else:
    assert a == b, path


def test_saved_report_schema_v1_loads_and_matches_a_live_comparison(tmp_path):
  """tests/data/bundle_report_v1.json was written by hand (values from their definitions, see its _comment)."""
  fixture = json.loads((DATA / "bundle_report_v1.json").read_text())
  report = load_report(DATA / "bundle_report_v1.json")
  assert fixture["schema"] == REPORT_SCHEMA == "parity_jax.bundle_report/1"
  assert report.first_divergent == "embedding" and report.verdict.status == "jump" and not report.passed
  assert report.row("logits").logits.kl_max == pytest.approx(1.150420765208883)
  assert report.row("embedding").stats.max_abs_index == (3,)
  assert report.row("embedding").stats.top_k[0].b_bits == "0x40a00000"
  assert "first divergent" in report.text() and "<table" in report._repr_html_()
  # the same inputs, compared now: every field of the fixture is present with the same value
  gd = {"embedding": np.array([1, 2, 3, 4], np.float32), "logits": np.array([[1, 2, 3], [3, 2, 1]], np.float32)}
  cd = {"embedding": np.array([1, 2, 3, 5], np.float32), "logits": np.array([[1, 2, 3], [1, 2, 3]], np.float32)}
  stages.save_bundle(tmp_path / "golden.safetensors", gd, {"producer": "hand"})
  stages.save_bundle(tmp_path / "candidate.safetensors", cd, {"producer": "hand"})
  live = json.loads(compare_bundles(tmp_path / "golden.safetensors", tmp_path / "candidate.safetensors").to_json())
  for side in ("golden", "candidate"):
    live[side]["source"] = pathlib.Path(live[side]["source"]).name
  skip = {"_comment", "verdict_line"}
  live["profile"]["description"] = fixture["profile"]["description"]
  _approx_equal({k: v for k, v in fixture.items() if k not in skip}, live)


def test_other_schema_versions_are_refused():
  d = json.loads((DATA / "bundle_report_v1.json").read_text())
  d["schema"] = "parity_jax.bundle_report/2"
  with pytest.raises(UsageError, match="unsupported bundle report schema"):
    BundleReport.from_dict(d)
  with pytest.raises(UsageError, match="not a bundle report"):
    BundleReport.from_dict({"schema": "something/1"})
  del d["stages"]
  d["schema"] = REPORT_SCHEMA
  with pytest.raises(UsageError, match="malformed bundle report"):
    BundleReport.from_dict(d)


def test_text_and_html_renderings(tmp_path):
  golden, cand, g, c = _pair(tmp_path)
  report = compare_bundles(g, c)
  text = report.text()
  line = next(l for l in text.splitlines() if " layers.1.v_proj " in l)
  assert "FAIL rel_l2" in line and "<-- first divergent (jump)" in line
  assert next(l for l in text.splitlines() if " layers.1.k_proj " in l).rstrip().endswith("ok")
  assert text.splitlines()[-1] == report.verdict_line()
  assert "top 5 divergences in layers.1.v_proj" in text
  assert all(ord(ch) < 128 for ch in text)
  short = report.text(failing_only=True)
  assert " layers.1.k_proj " not in short and " layers.1.v_proj " in short
  html = report._repr_html_()
  assert html.count("<tr") == len(report.rows) + 1
  assert "#ffd6d6" in html and "first divergent" in html and "hsl(" in html


def _png_size(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("num_layers,qk_norm", [(2, False), (0, False)])
def test_plot_writes_a_png(tmp_path, num_layers, qk_norm):
  pytest.importorskip("matplotlib")
  golden = synth.golden_stages(num_layers=num_layers, qk_norm=qk_norm)
  planted = "layers.1.ffn_gate" if num_layers else "final_norm"
  names = list(golden)
  cand = synth.candidate(golden, lambda i, n: 1e-3 if i >= names.index(planted) else 1e-7)
  report = compare_bundles(golden, cand)
  fig = report.plot(tmp_path / "p.png")
  w, h = _png_size(tmp_path / "p.png")
  fw, fh = fig.get_size_inches()
  assert abs(w - fw * 110) <= 1 and abs(h - fh * 110) <= 1
  assert w >= 900 and h >= 300
  assert not list(tmp_path.glob("*.tmp-*"))


def test_widening_is_exact_and_only_under_widen_profiles():
  g = {"x": np.array([1.0, 2.0, 3.0], np.float32)}
  c = {"x": np.array([1.0, 2.0, 3.0], ml_dtypes.bfloat16)}
  assert compare_bundles(g, c, profile="bf16").row("x").stats.n_diff == 0
  with pytest.raises(UsageError, match="compares dtypes strictly"):
    compare_bundles(g, c, profile="exact")
  h = {"x": np.array([1.0, 2.0, 3.0], np.float16)}
  assert compare_bundles(h, c, profile="bf16").row("x").stats.dtype == "float32"  # both widen to f32


@pytest.mark.parametrize("top_k", [-1, 2.0, True, "3"])
def test_top_k_must_be_a_non_negative_integer(tmp_path, top_k):
  _, _, g, c = _pair(tmp_path)
  with pytest.raises(UsageError, match="top_k must be a non-negative integer"):
    compare_bundles(g, c, top_k=top_k)


def test_ulps_are_counted_in_the_narrower_float_dtype():
  from parity_jax.bundles.diff import ulp_dtype

  bf16, f32, f16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.float16)
  # mantissa bits: bf16 7 < f16 10 < f32 23; the fewer, the coarser the ULP the comparison is judged in
  assert ulp_dtype(f32, bf16) == bf16 and ulp_dtype(bf16, f32) == bf16
  assert ulp_dtype(f16, bf16) == bf16 and ulp_dtype(f32, f16) == f16
  assert ulp_dtype(f32, f32) == f32 and ulp_dtype(bf16, bf16) == bf16
  assert ulp_dtype(np.dtype(np.int32), f32) == np.int32  # not two floats: the golden's own dtype
  assert ulp_dtype(f32, np.dtype(np.int8)) == f32


def test_the_largest_ulp_distance_is_zero_for_equal_arrays_and_counts_steps_otherwise():
  from parity_jax.bundles.diff import max_ulp_in

  a = np.linspace(1, 2, 24, dtype=np.float32).reshape(2, 3, 4)
  assert max_ulp_in(a, a.copy(), np.dtype(np.float32)) == 0
  b = a.copy()
  b[1, 2, 3] = np.nextafter(np.nextafter(b[1, 2, 3], np.float32(3)), np.float32(3))  # two float32 steps up
  b[0, 0, 0] = np.nextafter(b[0, 0, 0], np.float32(0))  # one step down
  assert max_ulp_in(a, b, np.dtype(np.float32)) == 2
  # in bfloat16 the same two arrays round alike (a float32 step is far below a bf16 ULP): 0
  assert max_ulp_in(a, b, np.dtype(ml_dtypes.bfloat16)) == 0


def test_a_stage_filter_that_is_no_regular_expression_is_one_usage_error():
  golden = synth.golden_stages(num_layers=1)
  with pytest.raises(UsageError, match=r"stage filter is not a valid regular expression .*: '\(layers'"):
    compare_bundles(golden, golden, stages="(layers")
