"""The header of a bundle report names each side so that a person can tell them apart, in text and in HTML."""

from __future__ import annotations

import collections
import html
import re

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
