"""Text and HTML renderings of a :class:`~parity_jax.bundles.BundleReport`.

The text table is ASCII only (CI logs, any terminal encoding): one row per
stage with rel-L2, cosine, max|diff| and where, max ULP, the growth over the
stage's input and a pass/FAIL mark; then the logits distribution figures, the
top divergences of the first divergent stage, the one-sided stages and the
verdict line. The HTML table (Jupyter) colours rel-L2 on a log scale and the
row by status.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

from parity_jax.bundles.verdict import fmt_growth

if TYPE_CHECKING:
  from parity_jax.bundles.bundle_report import BundleReport, StageRow

__all__ = ["fmt_cosine", "render_html", "render_text"]


def fmt_rel(x: float) -> str:
  if x == 0:
    return "0"
  if math.isnan(x):
    return "nan"
  if math.isinf(x):
    return "inf"
  return f"{x:.2e}"


def fmt_cosine(c: float) -> str:
  """``1`` for exactly 1, ``1-3.2e-11`` close to 1 (where digits would hide the difference), else 6 decimals."""
  if math.isnan(c):
    return "nan"
  if c == 1.0:
    return "1"
  if 1.0 - c < 1e-3 and c < 1.0:
    return f"1-{1.0 - c:.1e}"
  return f"{c:.6f}"


def _fmt_abs(x: float) -> str:
  if x == 0:
    return "0"
  return f"{x:.3g}"  # an infinite difference formats as "inf"


def _val(x) -> str:
  return f"{x:.9g}" if isinstance(x, float) else str(x)


def _where(r: "StageRow") -> str:
  idx = r.stats.max_abs_index
  return "-" if idx is None else "[" + ",".join(str(i) for i in idx) + "]"


def _ulp(r: "StageRow") -> str:
  """Max ULP in the row's ULP dtype, named when it is not the compared dtype (a widened comparison)."""
  u = r.stats.max_ulp if r.max_ulp is None else r.max_ulp
  if u is None:
    return "-"
  text = str(u) if u < 100000 else f"{u:.2e}"
  return text if r.ulp_dtype in (None, r.stats.dtype) else f"{text} {_SHORT.get(r.ulp_dtype, r.ulp_dtype)}"


_SHORT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "float64": "f64"}


def _mark(report: "BundleReport", r: "StageRow") -> str:
  if r.passed:
    m = "ok"
  else:
    m = "FAIL " + ",".join(b.metric for b in r.breaches)
  if r.name == report.first_divergent:
    m += "  <-- first divergent" + (" (jump)" if report.verdict.status == "jump" else " (drift onset)")
  elif r.name == report.first_breach:
    m += "  <-- first over tolerance (drift)"
  return m


def _describe_side(info) -> str:
  """One side for people: where it came from, its producer (when its provenance names one), stages and order."""
  prod = f"producer={info.producer}, " if info.producer else ""
  order = "stage_order metadata" if info.ordered else "no stage_order"
  return f"{info.source} ({prod}{info.n_stages} stages, {order})"


def _source_line(label: str, info) -> str:
  return f"{label}: {_describe_side(info)}"


_ORDER_TEXT = {
    "explicit": "explicit order",
    "golden_metadata": "golden's stage_order metadata",
    "candidate_metadata": "candidate's stage_order metadata",
    "inferred_qwen": "inferred from Qwen stage names",
    "inferred_qwen_then_source": "inferred: Qwen names in execution order, other names in file order",
}


def render_text(report: "BundleReport", failing_only: bool = False, show_top: bool = True) -> str:
  p = report.profile
  lines = [
      _source_line("golden   ", report.golden),
      _source_line("candidate", report.candidate),
      f"profile:   {p.name} (jump factor {p.jump_factor:g}, noise floor {p.noise_floor:.3g}"
      f"{', bf16/f16 widened exactly' if p.widen_dtypes else ''}); order: {_ORDER_TEXT.get(report.order_source, report.order_source)}"
      + (f"; stages matching {report.stage_filter!r}" if report.stage_filter else ""),
  ]
  used = {r.rule for r in report.rows}
  for rule in (r for r in p.rules if r in used):
    lines.append(f"tolerance: {rule.stages:<20} {rule.describe()}")
  lines.append("")
  rows = [r for r in report.rows if not (failing_only and r.passed and r.name != report.first_divergent)]
  w = max([len("stage")] + [len(r.name) for r in rows])
  header = (
      f"{'#':>4}  {'stage':<{w}}  {'rel-L2':>9}  {'cosine':>10}  {'max|diff|':>9}  {'at':<14}  {'max ULP':>13}"
      f"  {'growth':>8}  result"
  )
  lines.append(header)
  lines.append("-" * len(header))
  for r in rows:
    where = _where(r)
    if len(where) > 14:
      where = where[:13] + "]"
    lines.append(
        f"{r.index:>4}  {r.name:<{w}}  {fmt_rel(r.stats.rel_l2):>9}  {fmt_cosine(r.stats.cosine):>10}"
        f"  {_fmt_abs(r.stats.max_abs_diff):>9}  {where:<14}  {_ulp(r):>13}  {'x' + fmt_growth(r.growth) if r.growth is not None else '-':>8}"
        f"  {_mark(report, r)}"
    )
  if failing_only and len(rows) < len(report.rows):
    lines.append(f"     ({len(report.rows) - len(rows)} passing stages not shown)")
  if any(r.ulp_dtype not in (None, r.stats.dtype) for r in rows):
    lines.append("     (max ULP of a widened stage is counted in its narrower dtype: 0 = correctly rounded)")
  for r in report.rows:
    if r.logits is not None:
      lines.append("")
      lines.append(f"{r.name}: {r.logits.summary()}")
  fd = report.first_divergent
  if show_top and fd is not None:
    r = report.row(fd)
    if r.stats.top_k:
      lines.append("")
      lines.append(f"top {len(r.stats.top_k)} divergences in {fd} (golden vs candidate):")
      for d in r.stats.top_k:
        idx = "[" + ",".join(str(i) for i in d.index) + "]"
        lines.append(
            f"  {idx:<18} {_val(d.a):>15} vs {_val(d.b):<15} |diff| {_fmt_abs(d.abs_diff):<9}  bits {d.a_bits} vs {d.b_bits}"
        )
    for b in r.breaches:
      lines.append(f"  breach: {b.text()}")
  if report.only_golden:
    lines.append("")
    lines.append(f"only in golden ({len(report.only_golden)}): {', '.join(report.only_golden)}")
  if report.only_candidate:
    lines.append(
        ("" if report.only_golden else "\n")
        + f"only in candidate ({len(report.only_candidate)}): {', '.join(report.only_candidate)}"
    )
  lines.append("")
  lines.append(report.verdict_line())
  return "\n".join(lines)


def _heat(x: float) -> str:
  """Background colour for a rel-L2 value: white at 0, green (1e-9) -> yellow -> red (>= 1e-1)."""
  if x == 0:
    return "#f4f4f4"
  if not math.isfinite(x):
    return "#b00020"
  t = min(1.0, max(0.0, (math.log10(x) + 9.0) / 8.0))
  # green (120) -> red (0) in HSL
  hue = int(120 * (1.0 - t))
  return f"hsl({hue}, 75%, 78%)"


def render_html(report: "BundleReport") -> str:
  esc = html.escape
  v = report.verdict
  colour = {"pass": "#1b7f3b", "jump": "#b00020", "drift": "#b36b00"}[v.status]
  out = [
      "<div class='parity-jax-report'>",
      f"<div style='font-weight:bold;color:{colour};margin:4px 0'>{esc(report.verdict_line())}</div>",
      f"<div style='font-size:smaller'>golden: {esc(_describe_side(report.golden))}"
      f" &middot; candidate: {esc(_describe_side(report.candidate))}"
      f" &middot; profile {esc(report.profile.name)} (jump factor {report.profile.jump_factor:g})</div>",
      "<table style='border-collapse:collapse;font-family:monospace;font-size:12px'>",
      "<thead><tr>"
      + "".join(
          f"<th style='text-align:{a};padding:2px 6px;border-bottom:1px solid #999'>{h}</th>"
          for h, a in (
              ("#", "right"),
              ("stage", "left"),
              ("rel-L2", "right"),
              ("cosine", "right"),
              ("max|diff|", "right"),
              ("at", "left"),
              ("max ULP", "right"),
              ("growth", "right"),
              ("tolerance", "left"),
              ("result", "left"),
          )
      )
      + "</tr></thead><tbody>",
  ]
  for r in report.rows:
    if r.name == report.first_divergent:
      row_bg = "#ffd6d6"
    elif not r.passed:
      row_bg = "#fff0e0"
    else:
      row_bg = "#ffffff"
    bold = "font-weight:bold;" if r.name == report.first_divergent else ""
    mark = "&#10003;" if r.passed else "&#10007; " + esc(", ".join(b.text() for b in r.breaches))
    if r.name == report.first_divergent:
      mark += " &larr; first divergent" + (" (jump)" if v.status == "jump" else " (drift onset)")
    elif r.name == report.first_breach:
      mark += " &larr; first over tolerance"
    cells = [
        (str(r.index), "right", ""),
        (esc(r.name), "left", ""),
        (fmt_rel(r.stats.rel_l2), "right", f"background:{_heat(r.stats.rel_l2)};"),
        (fmt_cosine(r.stats.cosine), "right", ""),
        (_fmt_abs(r.stats.max_abs_diff), "right", ""),
        (esc(_where(r)), "left", ""),
        (_ulp(r), "right", ""),
        (
            "x" + fmt_growth(r.growth) if r.growth is not None else "-",
            "right",
            "color:#b00020;" if r.jump and not r.passed else "",
        ),
        (esc(r.rule.describe()), "left", "color:#666;"),
        (mark, "left", ""),
    ]
    out.append(
        f"<tr style='background:{row_bg};{bold}'>"
        + "".join(
            f"<td style='text-align:{a};padding:1px 6px;{wrap}{extra}'>{c}</td>"
            for i, (c, a, extra) in enumerate(cells)
            for wrap in ["" if i >= len(cells) - 2 else "white-space:nowrap;"]  # numbers never wrap mid-value
        )
        + "</tr>"
    )
  out.append("</tbody></table>")
  for r in report.rows:
    if r.logits is not None:
      out.append(
          f"<div style='font-family:monospace;font-size:12px;margin-top:4px'>{esc(r.name)}: {esc(r.logits.summary())}</div>"
      )
  if report.only_golden:
    out.append(f"<div style='font-size:smaller'>only in golden: {esc(', '.join(report.only_golden))}</div>")
  if report.only_candidate:
    out.append(f"<div style='font-size:smaller'>only in candidate: {esc(', '.join(report.only_candidate))}</div>")
  out.append("</div>")
  return "\n".join(out)
