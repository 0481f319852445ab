"""The header of a bundle report names each side so that a person can tell them apart, in text and in HTML."""

from __future__ import annotations

import collections
import html
import re

import ml_dtypes
import numpy as np

from parity_jax.bundles import StageBundle, compare_bundles


def _report():
  rng = np.random.default_rng(0)
  golden = collections.OrderedDict((f"s{i}", rng.standard_normal(8).astype(np.float32)) for i in range(3))
  candidate = StageBundle(golden, provenance={"producer": "my-port 1.2"})
  return compare_bundles(golden, candidate, profile="f32")


def test_in_memory_sides_are_described_in_the_text_header():
  text = _report().text()
  g, c = text.splitlines()[:2]
  assert g == "golden   : in-memory dict (3 stages, no stage_order)", g
  assert c == "candidate: in-memory StageBundle (producer=my-port 1.2, 3 stages, stage_order metadata)", c


def test_in_memory_sides_are_described_in_the_html_header():
  page = _report()._repr_html_()
  header = html.unescape(re.search(r"<div style='font-size:smaller'>(golden: .*?)</div>", page).group(1))
  assert "OrderedDict" not in header and "<" not in header, header
  assert header.startswith(
      "golden: in-memory dict (3 stages, no stage_order) · candidate: in-memory StageBundle"
  ), header
  assert "(producer=my-port 1.2, 3 stages, stage_order metadata)" in header, header


def test_html_marks_only_what_happened():
  """A passing report marks no row; a stage only in the candidate is listed as such (in HTML as in text)."""
  rng = np.random.default_rng(1)
  golden = collections.OrderedDict((f"s{i}", rng.standard_normal(8).astype(np.float32)) for i in range(3))
  page = compare_bundles(golden, dict(golden), profile="f32")._repr_html_()
  assert "first over tolerance" not in page and "first divergent" not in page and "only in" not in page
  extra = dict(golden, extra=np.zeros(2, np.float32))
  rep = compare_bundles(golden, extra, profile="f32", allow_missing=True)
  assert "only in candidate: extra" in rep._repr_html_() and "only in golden" not in rep._repr_html_()
  bad = dict(golden, s1=golden["s1"] + 1.0)
  page = compare_bundles(golden, bad, profile="f32")._repr_html_()
  assert page.count("&larr; first divergent") == 1 and "first over tolerance" not in page  # the one row, marked once


def test_html_elements_are_closed():
  rng = np.random.default_rng(2)
  golden = collections.OrderedDict((f"s{i}", rng.standard_normal(8).astype(np.float32)) for i in range(3))
  for candidate in (dict(golden), dict(golden, extra=np.zeros(2, np.float32))):
    page = compare_bundles(golden, candidate, profile="f32", allow_missing=True)._repr_html_()
    for tag in ("div", "table", "tr", "td"):
      assert page.count(f"<{tag}") == page.count(f"</{tag}>"), tag


def test_rel_l2_is_written_in_three_significant_digits_or_a_word():
  from parity_jax.bundles.render import fmt_rel

  assert [fmt_rel(x) for x in (0.0, 1.5e-3, 2.0, float("nan"), float("inf"))] == [
      "0",
      "1.50e-03",
      "2.00e+00",
      "nan",
      "inf",
  ]


def test_html_sets_only_the_first_divergent_row_in_bold_and_names_ulps():
  rng = np.random.default_rng(2)
  golden = collections.OrderedDict((f"s{i}", rng.standard_normal(8).astype(np.float32)) for i in range(3))
  bad = dict(golden, s1=golden["s1"] + 1.0)
  page = compare_bundles(golden, bad, profile="f32")._repr_html_()
  rows = re.findall(r"<tr[^>]*>.*?</tr>", page, flags=re.S)
  bold = [r for r in rows if "font-weight:bold" in r]
  assert len(bold) == 1 and ">s1<" in bold[0], bold
  # the "max ULP" column: 0 for an identical stage (a known count, not "-")
  heads = [re.sub(r"<[^>]*>", "", h) for h in re.findall(r"<th[^>]*>(.*?)</th>", page, flags=re.S)]
  s0 = next(r for r in rows if ">s0<" in r)
  cells = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", s0, flags=re.S)]
  assert cells[heads.index("max ULP")] == "0", (heads, cells)


def test_cosine_is_1_exactly_1_minus_a_small_gap_or_six_decimals():
  from parity_jax.bundles.render import fmt_cosine

  cases = {1.0: "1", 1.0 - 2.0**-20: "1-9.5e-07", 0.999: "0.999000", 0.5: "0.500000", 1.0 + 2.0**-40: "1.000000"}
  assert {c: fmt_cosine(c) for c in cases} == cases
  assert fmt_cosine(float("nan")) == "nan"


def _text_rows(text):
  """stage name -> the whitespace-split cells of its row in the text table."""
  return {m.group(1): line.split() for line in text.splitlines() if (m := re.match(r"^\s+\d+  (\S+) ", line))}


def test_text_rows_marks_and_notes_of_a_drift():
  """Four stages of 2.0s; s1..s3 off by a growing amount in one element: s3 is over tolerance, s1 the onset."""
  golden = collections.OrderedDict((f"s{i}", np.full(4, 2, np.float32)) for i in range(4))
  cand = {k: v.copy() for k, v in golden.items()}
  for k, d in (("s1", 4e-6), ("s2", 2e-5), ("s3", 8e-5)):
    cand[k][0] += np.float32(d)
  report = compare_bundles(golden, cand, profile="f32")
  text = report.text()
  rows = _text_rows(text)
  assert list(rows) == ["s0", "s1", "s2", "s3"]
  for name, g in golden.items():
    c = cand[name]
    rel = np.linalg.norm(c.astype(np.float64) - g) / np.linalg.norm(g.astype(np.float64))
    diff = float(c[0]) - 2.0
    ulp = int(c.view(np.uint32)[0]) - int(g.view(np.uint32)[0])  # float32 steps from 2.0 up
    i, n, rel_t, cos_t, diff_t, at, ulp_t = rows[name][:7]
    assert (n, rel_t, diff_t, at, ulp_t) == (
        (name, "0", "0", "-", "0") if name == "s0" else (name, f"{rel:.2e}", f"{diff:.3g}", "[0]", str(ulp))
    ), rows[name]
    assert cos_t == "1" if name == "s0" else cos_t.startswith("1-"), rows[name]
  marks = {n: " ".join(r[8:]) for n, r in rows.items()}
  assert marks == {
      "s0": "ok",
      "s1": "ok <-- first divergent (drift onset)",
      "s2": "ok",
      "s3": "FAIL rel_l2 <-- first over tolerance (drift)",
  }
  assert text.splitlines()[-1] == report.verdict_line() and "only in" not in text and "widened" not in text
  # the first divergent stage's largest differences, with both sides' bits
  lines = text.splitlines()
  k = lines.index("top 1 divergences in s1 (golden vs candidate):")
  c1 = cand["s1"][0]
  assert lines[k + 1].split() == [
      "[0]",
      "2",
      "vs",
      f"{float(c1):.9g}",
      "|diff|",
      f"{float(c1) - 2.0:.3g}",
      "bits",
      "0x40000000",
      "vs",
      f"0x{int(c1.view(np.uint32)):08x}",
  ]
  short = report.text(failing_only=True)
  assert list(_text_rows(short)) == ["s1", "s3"]  # the onset stays, though it passes
  assert "\n     (2 passing stages not shown)\n" in short and "not shown" not in text


def test_text_names_one_sided_stages_and_widened_ulps():
  deep = np.ones((2,) * 8, np.float32)  # the largest difference at [1,1,1,1,1,1,1,1]: 17 characters
  golden = {"x": np.array([1.0, 2.0, 3.0], np.float32), "deep": deep, "g_only": np.zeros(1, np.float32)}
  cand = {"x": np.array([1.0, 2.0, 3.5], ml_dtypes.bfloat16), "deep": deep.copy(), "c_only": np.zeros(1, np.float32)}
  cand["deep"][(1,) * 8] = 2.0
  lines = compare_bundles(golden, cand, profile="bf16", allow_missing=True).text().splitlines()
  assert _text_rows("\n".join(lines))["deep"][5] == "[1,1,1,1,1,1,]"  # cut to the column's 14 characters
  steps = int(cand["x"].view(np.uint16)[2]) - int(np.array(3.0, ml_dtypes.bfloat16).view(np.uint16))  # bf16 ULPs
  assert _text_rows("\n".join(lines))["x"][6:8] == [str(steps), "bf16"]  # counted in the narrower dtype, named
  i = lines.index("     (max ULP of a widened stage is counted in its narrower dtype: 0 = correctly rounded)")
  assert i - 1 == max(k for k, line in enumerate(lines) if re.match(r"^\s+\d+  \S+ ", line))  # right below the table
  j = lines.index("only in golden (1): g_only")
  assert lines[j - 1 : j + 2] == ["", "only in golden (1): g_only", "only in candidate (1): c_only"]
  del golden["g_only"]
  lines = compare_bundles(golden, cand, profile="bf16", allow_missing=True).text().splitlines()
  j = lines.index("only in candidate (1): c_only")
  assert lines[j - 1] == "" and not any(line.startswith("only in golden") for line in lines)


def test_html_of_a_drift_and_the_logits_summary_in_both_renderings():
  """The drift of test_text_rows_marks_and_notes_of_a_drift in HTML: the onset row red and bold, the breaching row
  orange and marked first over tolerance; a logits stage's summary line below the table in text and HTML; a stage
  only in golden listed; an infinite difference written "inf"."""
  golden = collections.OrderedDict((f"s{i}", np.full(4, 2, np.float32)) for i in range(4))
  cand = {k: v.copy() for k, v in golden.items()}
  for k, d in (("s1", 4e-6), ("s2", 2e-5), ("s3", 8e-5)):
    cand[k][0] += np.float32(d)
  golden["logits"] = np.arange(12, dtype=np.float32).reshape(1, 2, 6)
  cand["logits"] = golden["logits"].copy()
  golden["gone"] = np.zeros(1, np.float32)
  report = compare_bundles(golden, cand, profile="f32", allow_missing=True)
  page = report._repr_html_()
  row = {
      m.group(2): m.group(1)
      for m in re.finditer(r"<tr style='background:([^;]*);[^']*'><td[^>]*>\d+</td><td[^>]*>(\w+)<", page)
  }
  assert row == {"s0": "#ffffff", "s1": "#ffd6d6", "s2": "#ffffff", "s3": "#fff0e0", "logits": "#ffffff"}, row
  assert page.count("&larr; first over tolerance") == 1 and "&larr; first divergent (drift onset)" in page
  summary = report.row("logits").logits.summary()
  assert f"logits: {html.escape(summary)}</div>" in page and "only in golden: gone</div>" in page
  lines = report.text().splitlines()
  assert lines[lines.index(f"logits: {summary}") - 1] == ""
  inf = compare_bundles({"a": np.ones(2, np.float32)}, {"a": np.array([1, np.inf], np.float32)}, profile="f32")
  assert _text_rows(inf.text())["a"][4] == "inf"
  # the rel-L2 cell's heat colour: grey for 0, the failure red for a non-finite value
  assert "<td style='text-align:right;padding:1px 6px;white-space:nowrap;background:#b00020;'>inf</td>" in (
      inf._repr_html_()
  )
  assert "background:#f4f4f4;'>0</td>" in page  # s0 is bit-identical
