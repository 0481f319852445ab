"""What the tools print and render says what it means (issue 8, section 3: output wording and HTML reports).

Each test is built so that the wording it guards is the only way to pass: a ULP
count taken in the wider dtype, a byte count rounded to MiB, an HTML failure
list without its cap or a number cell that may wrap all fail here.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np

from parity_jax.bundles import compare_bundles
from parity_jax.checkpoint import MigrateResult
from parity_jax.checkpoint.verify import PASS, VALUE_MISMATCH, LeafResult, VerifyReport
from parity_jax.progress import human_bytes


def _bf16_rounded_pair():
  """An f32 golden and its bf16 rounding (0 ULPs apart in bf16, thousands in f32), one element 1 bf16 ULP off."""
  golden = (np.linspace(-3.0, 3.0, 255, dtype=np.float32) * np.float32(1.000123)).astype(np.float32)
  cand = golden.astype(ml_dtypes.bfloat16)
  bits = cand.view(np.uint16).copy()
  bits[100] += 1  # the next bf16 value: exactly one ULP in bf16
  return golden, bits.view(ml_dtypes.bfloat16)


def test_a_widened_comparison_counts_ulps_in_the_narrower_dtype():
  golden, cand = _bf16_rounded_pair()
  report = compare_bundles({"x": golden}, {"x": cand}, profile="bf16")
  row = report.row("x")
  assert row.stats.dtype == "float32" and row.stats.max_ulp > 10_000  # in float32 the rounding alone is huge
  assert row.max_ulp == 1 and row.ulp_dtype == "bfloat16"  # in bf16: the one planted ULP
  line = next(l for l in report.text().splitlines() if re.search(r"\sx\s", l))
  assert re.search(r"\s1 bf16\s", line), line
  assert "e+" not in line.split("1 bf16")[0][-12:]  # no 2.0e+09-style count in the ULP column


def test_bundle_html_keeps_every_number_on_one_line():
  golden, cand = _bf16_rounded_pair()
  html = compare_bundles({"x": golden, "y": golden * 2}, {"x": cand, "y": cand * 2}, profile="bf16")._repr_html_()
  cells = re.findall(r"<td style='([^']*)'>([^<]*)</td>", html)
  numeric = [(style, text) for style, text in cells if re.fullmatch(r"[-+x]?[0-9][0-9.e+-]*( bf16)?", text.strip())]
  assert len(numeric) >= 8, cells
  assert all("white-space:nowrap" in style for style, _ in numeric), numeric


def test_byte_counts_keep_their_unit():
  assert [human_bytes(n) for n in (0, 1023, 1024, 12_288, 5 * 2**20 + 2**19, 3 * 2**30, 2**41)] == [
      "0 B",
      "1023 B",
      "1.0 KiB",
      "12.0 KiB",
      "5.5 MiB",
      "3.0 GiB",
      "2.0 TiB",
  ]
  small = MigrateResult(
      source="s",
      dest="d",
      n_leaves=3,
      nbytes=12_288,
      n_batches=1,
      chunk_bytes=64 << 20,
      compression="none",
      elapsed_s=0.5,
      dropped_empty_nodes=(),
      row_major_chunks=True,
  )
  text = small.text()
  assert "12.0 KiB" in text and "24.0 KiB/s" in text and "0.0 MiB" not in text, text


def _failing_report(n_fail: int) -> VerifyReport:
  leaves = [
      LeafResult(f"p/w{i:02d}", f"q/w{i:02d}", "p", VALUE_MISMATCH, reason=f"1 of 16 elements differ (leaf {i})")
      for i in range(n_fail)
  ]
  leaves.append(LeafResult("p/ok", "q/ok", "p", PASS))
  return VerifyReport("src", "mig", "spec.json", "v0", "v1", leaves, {})


def test_a_failing_verify_report_in_html_lists_the_first_20_and_counts_the_rest():
  html = _failing_report(27)._repr_html_()
  listed = re.findall(r"<code>q/w(\d\d)</code>", html)
  assert listed == [f"{i:02d}" for i in range(20)]
  assert "Failing leaves (27)" in html and "... and 7 more" in html
  assert "VERDICT: FAIL" in html
  statuses = re.findall(r"<td style='([^']*)'>" + VALUE_MISMATCH, html)
  assert len(statuses) == 20 and all("white-space:nowrap" in s for s in statuses)
  counts = re.findall(r"<td style='([^']*)'>\d+/\d+ leaves bit-identical", html)
  assert counts and all("white-space:nowrap" in s for s in counts)
  # the terminal shows the same cap
  text = _failing_report(27).text()
  assert text.count(VALUE_MISMATCH) == 20 and "... and 7 more" in text
  # and nothing is cut when there are 20 or fewer
  html20 = _failing_report(20)._repr_html_()
  assert len(re.findall(r"<code>q/w\d\d</code>", html20)) == 20 and "more" not in html20


def test_a_library_message_names_the_argument_a_tool_names_the_flag():
  """The library speaks of its arguments; inside a tool the same message names the flags (see test_svf_parity)."""
  import pytest

  from parity_jax.errors import UsageError
  from parity_jax.svf import load_golden

  with pytest.raises(UsageError, match=r"^give exactly one of python_report and golden_dir$"):
    load_golden("r.json", "d")
