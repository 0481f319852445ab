"""The picture of a :class:`~parity_jax.bundles.BundleReport` (matplotlib, optional).

Three panels sharing one colour scale (log10 rel-L2):

* a heatmap, one row per layer and one column per per-layer stage in
  execution order (``attn_norm`` ... ``output``);
* a strip with the stages outside the layers (``embedding``, ``final_norm``,
  ``logits``, any other name) in execution order;
* the rel-L2 of every stage along the execution order on a log axis, with
  the tolerance as a dashed line, so that a jump (a cliff) and drift (a ramp)
  look different at a glance.

Bit-identical stages are white ("="); stages over tolerance carry an "x"; the
first divergent stage is framed in red and named in the title together with
the verdict. matplotlib is imported here only (``pip install -e '.[plot]'``);
without it :func:`plot_report` raises a one-line UsageError.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from parity_jax.bundles.verdict import fmt_growth
from parity_jax.errors import UsageError
from parity_jax.files import atomic_output
from parity_jax.bundles.qwen_graph import LAYER_STAGES

if TYPE_CHECKING:
  from parity_jax.bundles.report import BundleReport

__all__ = ["plot_report", "require_matplotlib"]


def require_matplotlib() -> None:
  """One-line UsageError unless matplotlib imports (call before any work that ends in a plot)."""
  try:
    import matplotlib  # noqa: F401
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
  except ImportError as e:
    raise UsageError(f"plotting needs matplotlib (pip install -e '.[plot]'): {e}") from None


def _log10(x: float) -> float:
  if x == 0:
    return -math.inf
  if not math.isfinite(x):
    return math.inf
  return math.log10(x)


def plot_report(report: "BundleReport", path: str | os.PathLike | None = None, dpi: int = 110):
  require_matplotlib()
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle
  import matplotlib as mpl

  rows = report.rows
  layer_rows = [r for r in rows if r.layer is not None]
  other_rows = [r for r in rows if r.layer is None]
  layers = sorted({r.layer for r in layer_rows})
  cols: list[str] = [s for s in LAYER_STAGES if any(r.stage == s for r in layer_rows)]
  for r in layer_rows:  # per-layer names outside the Qwen table, in first-seen order
    if r.stage not in cols:
      cols.append(r.stage)

  logs = np.array([_log10(r.stats.rel_l2) for r in rows])
  finite = logs[np.isfinite(logs)]
  tols = [r.rule.max_rel_l2 for r in rows if r.rule.max_rel_l2]
  lo = math.floor(min(finite.min() if finite.size else -8.0, math.log10(min(tols)) - 1 if tols else 0.0))
  hi = math.ceil(max(finite.max() if finite.size else 0.0, math.log10(max(tols)) + 1 if tols else -8.0))
  lo = max(lo, -16)
  if hi <= lo:
    hi = lo + 1
  cmap = mpl.colormaps["viridis"]
  norm = mpl.colors.Normalize(vmin=lo, vmax=hi)

  n_l = len(layers)
  n_cells = max(len(cols), len(other_rows), 1)
  width = max(9.0, 0.5 * n_cells + 3.5)
  # Vertical layout in inches, top to bottom: title, strip labels, strip, gap, heatmap, its labels, line plot, labels.
  strip_h = 0.5 if other_rows else 0.0
  heat_h = 0.3 * n_l + 0.1 if n_l else 0.0
  line_h = 2.6
  blocks = [("title", 0.45)]
  if other_rows:
    blocks += [("strip_labels", 0.85), ("strip", strip_h), ("gap", 0.2 if n_l else 0.3)]
  if n_l:
    blocks += [("heat", heat_h), ("heat_labels", 1.15)]
  blocks += [("line_title", 0.3), ("line", line_h), ("line_labels", 0.85)]
  total_h = sum(h for _, h in blocks)
  fig = Figure(figsize=(width, total_h), dpi=dpi)
  FigureCanvasAgg(fig)
  pos: dict[str, tuple[float, float]] = {}  # block -> (bottom, height) in figure fractions
  y = total_h
  for key, h in blocks:
    y -= h
    pos[key] = (y / total_h, h / total_h)
  left, right = 1.7 / width, 1.0 - 1.0 / width

  def axes_at(key: str):
    bottom, h = pos[key]
    return fig.add_axes((left, bottom, right - left, h))

  def cbar_at(key: str):
    bottom, h = pos[key]
    return fig.add_axes((right + 0.15 / width, bottom, 0.18 / width, max(h, 1.2 / total_h)))

  fd = report.first_divergent
  fb = report.first_breach

  def paint(ax, grid_rows: list[list], xlabels: list[str], ylabels: list[str], n_x: int, top_labels: bool = False):
    """grid_rows: rows of StageRow-or-None, drawn as unit cells."""
    for yi, grow in enumerate(grid_rows):
      for xi, r in enumerate(grow):
        if r is None:
          ax.add_patch(Rectangle((xi - 0.5, yi - 0.5), 1, 1, facecolor="#dddddd", edgecolor="#bbbbbb", hatch="//", lw=0))
          continue
        lv = _log10(r.stats.rel_l2)
        if lv == -math.inf:
          ax.add_patch(Rectangle((xi - 0.5, yi - 0.5), 1, 1, facecolor="white", edgecolor="#cccccc", lw=0.3))
          ax.text(xi, yi, "=", ha="center", va="center", fontsize=7, color="#888888")
          continue
        level = norm(min(max(lv, lo), hi))
        ax.add_patch(Rectangle((xi - 0.5, yi - 0.5), 1, 1, facecolor=cmap(level), edgecolor="white", lw=0.3))
        if not r.passed:
          ax.text(xi, yi, "x", ha="center", va="center", fontsize=8, fontweight="bold",
                  color="white" if level < 0.6 else "black")
        if r.name == fd:
          ax.add_patch(Rectangle((xi - 0.5, yi - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.8, zorder=5))
        elif r.name == fb:
          ax.add_patch(Rectangle((xi - 0.5, yi - 0.5), 1, 1, fill=False, edgecolor="#e08000", lw=2.2, ls="--", zorder=5))
    ax.set_xlim(-0.5, n_x - 0.5)
    ax.set_ylim(len(grid_rows) - 0.5, -0.5)
    ax.set_xticks(range(len(xlabels)))
    if top_labels:
      ax.xaxis.tick_top()
      ax.set_xticklabels(xlabels, rotation=40, ha="left", fontsize=8)
    else:
      ax.set_xticklabels(xlabels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(ylabels)))
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.tick_params(length=0)
    for s in ax.spines.values():
      s.set_visible(False)

  by_name = {r.name: r for r in rows}
  cax = None
  if other_rows:  # stages outside the layers, above the heatmap (labels on top), same cell size
    ax = axes_at("strip")
    paint(ax, [other_rows], [r.name for r in other_rows], ["model"], n_cells, top_labels=True)
    if not n_l:
      cax = cbar_at("strip")
  if n_l:
    ax = axes_at("heat")
    grid = [[next((r for r in layer_rows if r.layer == L and r.stage == c), None) for c in cols] for L in layers]
    paint(ax, grid, cols, [f"layer {L}" for L in layers], n_cells)
    cax = cbar_at("heat")
  cb = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
  cb.set_label("log10 rel-L2", fontsize=8)
  cb.ax.tick_params(labelsize=7)
  for t in sorted(set(tols)):
    if lo <= math.log10(t) <= hi:
      cb.ax.axhline(math.log10(t), color="red", lw=1.2)

  # Error along the execution order.
  ax = axes_at("line")
  x = np.arange(len(rows))
  y = np.array([r.stats.rel_l2 for r in rows], dtype=float)
  floor = 10.0 ** lo
  shown = np.where(y > 0, np.minimum(y, 10.0 ** hi), np.nan)
  ax.plot(x, shown, "-", color="#4060a0", lw=1.0, zorder=2)
  ok = np.array([r.passed for r in rows])
  ax.scatter(x[ok & (y > 0)], shown[ok & (y > 0)], s=10, color="#4060a0", zorder=3, label="within tolerance")
  ax.scatter(x[~ok], np.where(np.isnan(shown[~ok]), floor, shown[~ok]), s=22, color="#d02020", marker="x", zorder=4,
             label="over tolerance")
  zero = y == 0
  if zero.any():
    ax.scatter(x[zero], np.full(zero.sum(), floor), s=12, facecolors="none", edgecolors="#999999", marker="o", zorder=3,
               label="bit-identical")
  tol_y = np.array([r.rule.max_rel_l2 if r.rule.max_rel_l2 else np.nan for r in rows], dtype=float)
  if np.isfinite(tol_y).any():
    ax.step(x, tol_y, where="mid", color="#d02020", ls="--", lw=0.9, label="rel-L2 tolerance")
  for i in range(1, len(rows)):  # layer boundaries
    if rows[i].layer != rows[i - 1].layer:
      ax.axvline(i - 0.5, color="#cccccc", lw=0.6, zorder=1)
  box = dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85)
  if fd is not None:
    i = by_name[fd].index
    late = i > 0.6 * len(rows)
    ax.axvline(i, color="red", lw=1.6, zorder=1)
    label = f"drift onset (first divergent): {fd}" if report.verdict.status == "drift" else f"first divergent: {fd}"
    ax.annotate(label, (i, 0.04), xycoords=("data", "axes fraction"), xytext=(-4 if late else 4, 0),
                textcoords="offset points", fontsize=8, color="red", va="bottom", ha="right" if late else "left",
                bbox=box, zorder=6)
  if fb is not None and fb != fd:
    j = by_name[fb].index
    late = j > 0.6 * len(rows)
    ax.axvline(j, color="#e08000", lw=1.2, ls=":", zorder=1)
    ax.annotate(f"first over tolerance: {fb}", (j, 0.14), xycoords=("data", "axes fraction"), xytext=(-4 if late else 4, 0),
                textcoords="offset points", fontsize=8, color="#e08000", va="bottom", ha="right" if late else "left",
                bbox=box, zorder=6)
  ax.set_yscale("log")
  ax.set_ylim(floor / 2, 10.0 ** hi * 2)
  ax.set_xlim(-0.5, len(rows) - 0.5)
  ticks, labels = [], []
  i = 0
  while i < len(rows):  # one tick per non-layer stage, one per layer at the middle of its stages
    j = i
    while j + 1 < len(rows) and rows[i].layer is not None and rows[j + 1].layer == rows[i].layer:
      j += 1
    ticks.append((i + j) / 2)
    labels.append(rows[i].name if rows[i].layer is None else f"L{rows[i].layer}")
    i = j + 1
  ax.set_xticks(ticks)
  ax.set_xticklabels(labels, rotation=40 if len(other_rows) else 0, ha="right" if len(other_rows) else "center", fontsize=7)
  ax.set_ylabel("rel-L2", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.set_title("rel-L2 along the execution order", fontsize=9, loc="left")
  # Above the panel, right of its title: never over the data.
  ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, frameon=False, borderaxespad=0.2)

  v = report.verdict
  if v.status == "pass":
    title = f"PASS -- all {len(rows)} stages within the {report.profile.name} profile"
  elif v.status == "jump":
    title = f"FAIL (jump) -- first divergent: {fd}  (rel-L2 {by_name[fd].stats.rel_l2:.2e}, x{fmt_growth(v.growth)} over {v.ref_stage or 'nothing'})"
  else:
    title = f"FAIL (drift) -- onset {fd}, first over tolerance {v.first_breach} (x{fmt_growth(v.growth)}, below jump factor {report.profile.jump_factor:g})"
  fig.suptitle(title, fontsize=10, color={"pass": "#1b7f3b", "jump": "#b00020", "drift": "#b36b00"}[v.status], x=0.02,
               y=1 - 0.12 / total_h, ha="left", va="top")
  if path is not None:
    try:
      with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    except OSError as e:
      raise UsageError(f"cannot write plot {os.fspath(path)}: {e}") from None
  return fig
