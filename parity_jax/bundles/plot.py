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
the verdict. matplotlib is imported here only (the ``[plot]`` extra);
without it :func:`plot_report` raises a one-line UsageError.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING

import numpy as np

from parity_jax.bundles.qwen_graph import LAYER_STAGES
from parity_jax.bundles.verdict import fmt_growth
from parity_jax.errors import UsageError
from parity_jax.files import atomic_output

if TYPE_CHECKING:
  from parity_jax.bundles.bundle_report import BundleReport, StageRow

__all__ = ["plot_report", "require_matplotlib"]


def require_matplotlib() -> None:
  """One-line UsageError unless matplotlib imports (call before any work that ends in a plot)."""
  try:
    import matplotlib  # noqa: F401
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
  except ImportError as e:
    raise UsageError(
        f"plotting needs matplotlib: pip install 'parity_jax[plot]' or pip install matplotlib ({e})"
    ) from None


def _log10(x: float) -> float:
  if x == 0:
    return -math.inf
  if not math.isfinite(x):
    return math.inf
  return math.log10(x)


@dataclasses.dataclass(frozen=True)
class _Scale:
  """The shared colour scale: log10 rel-L2 from ``lo`` to ``hi``, and the tolerances to mark on it."""

  lo: int
  hi: int
  tols: tuple[float, ...]

  @classmethod
  def of(cls, rows: list["StageRow"]) -> "_Scale":
    logs = np.array([_log10(r.stats.rel_l2) for r in rows])
    finite = logs[np.isfinite(logs)]
    tols = tuple(r.rule.max_rel_l2 for r in rows if r.rule.max_rel_l2)
    lo = math.floor(min(finite.min() if finite.size else -8.0, math.log10(min(tols)) - 1 if tols else 0.0))
    hi = math.ceil(max(finite.max() if finite.size else 0.0, math.log10(max(tols)) + 1 if tols else -8.0))
    lo = max(lo, -16)
    return cls(lo, max(hi, lo + 1), tols)

  def level(self, lv: float) -> float:
    """0..1 position of a log10 value on the scale, clipped."""
    return (min(max(lv, self.lo), self.hi) - self.lo) / (self.hi - self.lo)


class _Canvas:
  """A figure cut into named horizontal blocks of fixed height (inches), top to bottom."""

  def __init__(self, blocks: list[tuple[str, float]], width: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    self.width, self.height = width, sum(h for _, h in blocks)
    self.fig = Figure(figsize=(width, self.height), dpi=dpi)
    FigureCanvasAgg(self.fig)
    self.pos: dict[str, tuple[float, float]] = {}  # block -> (bottom, height) in figure fractions
    y = self.height
    for key, h in blocks:
      y -= h
      self.pos[key] = (y / self.height, h / self.height)
    self.left, self.right = 1.7 / width, 1.0 - 1.0 / width

  def axes(self, key: str):
    bottom, h = self.pos[key]
    return self.fig.add_axes((self.left, bottom, self.right - self.left, h))

  def colorbar_axes(self, key: str):
    bottom, h = self.pos[key]
    return self.fig.add_axes((self.right + 0.15 / self.width, bottom, 0.18 / self.width, max(h, 1.2 / self.height)))


def plot_report(report: "BundleReport", path: str | os.PathLike | None = None, dpi: int = 110):
  """The figure of ``report`` (see the module docstring); written as a PNG to ``path`` when given."""
  require_matplotlib()
  rows = report.rows
  layer_rows = [r for r in rows if r.layer is not None]
  other_rows = [r for r in rows if r.layer is None]
  layers = sorted({r.layer for r in layer_rows})
  cols: list[str] = [s for s in LAYER_STAGES if any(r.stage == s for r in layer_rows)]
  cols += list(dict.fromkeys(r.stage for r in layer_rows if r.stage not in cols))  # names outside the Qwen table
  scale = _Scale.of(rows)
  n_cells = max(len(cols), len(other_rows), 1)
  blocks = [("title", 0.45)]
  if other_rows:
    blocks += [("strip_labels", 0.85), ("strip", 0.5), ("gap", 0.2 if layers else 0.3)]
  if layers:
    blocks += [("heat", 0.3 * len(layers) + 0.1), ("heat_labels", 1.15)]
  blocks += [("line_title", 0.3), ("line", 2.6), ("line_labels", 0.85)]
  canvas = _Canvas(blocks, max(9.0, 0.5 * n_cells + 3.5), dpi)

  cbar_block = None
  if other_rows:  # stages outside the layers, above the heatmap (labels on top), same cell size
    _paint(
        canvas.axes("strip"),
        [other_rows],
        [r.name for r in other_rows],
        ["model"],
        n_cells,
        scale,
        report,
        top_labels=True,
    )
    cbar_block = "strip"
  if layers:
    grid = [[next((r for r in layer_rows if r.layer == L and r.stage == c), None) for c in cols] for L in layers]
    _paint(canvas.axes("heat"), grid, cols, [f"layer {L}" for L in layers], n_cells, scale, report)
    cbar_block = "heat"
  _colorbar(canvas, cbar_block, scale)
  _line_panel(canvas.axes("line"), report, scale, has_strip=bool(other_rows))
  v = report.verdict
  canvas.fig.suptitle(
      _title(report),
      fontsize=10,
      color={"pass": "#1b7f3b", "jump": "#b00020", "drift": "#b36b00"}[v.status],
      x=0.02,
      y=1 - 0.12 / canvas.height,
      ha="left",
      va="top",
  )
  if path is not None:
    try:
      with atomic_output(path, "wb") as f:
        canvas.fig.savefig(f, format="png", dpi=dpi)
    except OSError as e:
      raise UsageError(f"cannot write plot {os.fspath(path)}: {e}") from None
  return canvas.fig


def _paint(
    ax,
    grid_rows: list[list],
    xlabels: list[str],
    ylabels: list[str],
    n_x: int,
    scale: _Scale,
    report: "BundleReport",
    top_labels: bool = False,
) -> None:
  """Rows of StageRow-or-None as unit cells: colour by rel-L2, '=' bit-identical, 'x' over tolerance, frames."""
  import matplotlib as mpl
  from matplotlib.patches import Rectangle

  cmap = mpl.colormaps["viridis"]
  for yi, grow in enumerate(grid_rows):
    for xi, r in enumerate(grow):
      cell = (xi - 0.5, yi - 0.5)
      if r is None:
        ax.add_patch(Rectangle(cell, 1, 1, facecolor="#dddddd", edgecolor="#bbbbbb", hatch="//", lw=0))
        continue
      lv = _log10(r.stats.rel_l2)
      if lv == -math.inf:
        ax.add_patch(Rectangle(cell, 1, 1, facecolor="white", edgecolor="#cccccc", lw=0.3))
        ax.text(xi, yi, "=", ha="center", va="center", fontsize=7, color="#888888")
        continue
      level = scale.level(lv)
      ax.add_patch(Rectangle(cell, 1, 1, facecolor=cmap(level), edgecolor="white", lw=0.3))
      if not r.passed:
        ax.text(
            xi,
            yi,
            "x",
            ha="center",
            va="center",
            fontsize=8,
            fontweight="bold",
            color="white" if level < 0.6 else "black",
        )
      if r.name == report.first_divergent:
        ax.add_patch(Rectangle(cell, 1, 1, fill=False, edgecolor="red", lw=2.8, zorder=5))
      elif r.name == report.first_breach:
        ax.add_patch(Rectangle(cell, 1, 1, fill=False, edgecolor="#e08000", lw=2.2, ls="--", zorder=5))
  ax.set_xlim(-0.5, n_x - 0.5)
  ax.set_ylim(len(grid_rows) - 0.5, -0.5)
  ax.set_xticks(range(len(xlabels)))
  if top_labels:
    ax.xaxis.tick_top()
  ax.set_xticklabels(xlabels, rotation=40, ha="left" if top_labels else "right", fontsize=8)
  ax.set_yticks(range(len(ylabels)))
  ax.set_yticklabels(ylabels, fontsize=8)
  ax.tick_params(length=0)
  for spine in ax.spines.values():
    spine.set_visible(False)


def _colorbar(canvas: _Canvas, block: str | None, scale: _Scale) -> None:
  import matplotlib as mpl

  norm = mpl.colors.Normalize(vmin=scale.lo, vmax=scale.hi)
  cax = canvas.colorbar_axes(block) if block else None
  cb = canvas.fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=mpl.colormaps["viridis"]), cax=cax)
  cb.set_label("log10 rel-L2", fontsize=8)
  cb.ax.tick_params(labelsize=7)
  for t in sorted(set(scale.tols)):
    if math.log10(t) >= scale.lo:  # the top is always above: _Scale.of puts hi a decade over the largest tolerance
      cb.ax.axhline(math.log10(t), color="red", lw=1.2)


def _line_panel(ax, report: "BundleReport", scale: _Scale, has_strip: bool) -> None:
  """rel-L2 of every stage along the execution order (log axis), the tolerance, and the verdict's stages."""
  rows = report.rows
  x = np.arange(len(rows))
  y = np.array([r.stats.rel_l2 for r in rows], dtype=float)
  floor = 10.0**scale.lo
  shown = np.where(y > 0, np.minimum(y, 10.0**scale.hi), np.nan)
  ax.plot(x, shown, "-", color="#4060a0", lw=1.0, zorder=2)
  ok = np.array([r.passed for r in rows])
  ax.scatter(x[ok & (y > 0)], shown[ok & (y > 0)], s=10, color="#4060a0", zorder=3, label="within tolerance")
  ax.scatter(
      x[~ok],
      np.where(np.isnan(shown[~ok]), floor, shown[~ok]),
      s=22,
      color="#d02020",
      marker="x",
      zorder=4,
      label="over tolerance",
  )
  zero = y == 0
  if zero.any():
    ax.scatter(
        x[zero],
        np.full(zero.sum(), floor),
        s=12,
        facecolors="none",
        edgecolors="#999999",
        marker="o",
        zorder=3,
        label="bit-identical",
    )
  tol_y = np.array([r.rule.max_rel_l2 if r.rule.max_rel_l2 else np.nan for r in rows], dtype=float)
  if np.isfinite(tol_y).any():
    ax.step(x, tol_y, where="mid", color="#d02020", ls="--", lw=0.9, label="rel-L2 tolerance")
  for i in range(1, len(rows)):  # layer boundaries
    if rows[i].layer != rows[i - 1].layer:
      ax.axvline(i - 0.5, color="#cccccc", lw=0.6, zorder=1)
  index = {r.name: r.index for r in rows}
  fd, fb = report.first_divergent, report.first_breach
  if fd is not None:
    label = f"drift onset (first divergent): {fd}" if report.verdict.status == "drift" else f"first divergent: {fd}"
    _mark_stage(ax, index[fd], len(rows), label, "red", 0.04, dict(lw=1.6))
  if fb is not None and fb != fd:
    _mark_stage(ax, index[fb], len(rows), f"first over tolerance: {fb}", "#e08000", 0.14, dict(lw=1.2, ls=":"))
  ax.set_yscale("log")
  ax.set_ylim(floor / 2, 10.0**scale.hi * 2)
  ax.set_xlim(-0.5, len(rows) - 0.5)
  ticks, labels = _stage_ticks(rows)
  ax.set_xticks(ticks)
  ax.set_xticklabels(labels, rotation=40 if has_strip else 0, ha="right" if has_strip else "center", fontsize=7)
  ax.set_ylabel("rel-L2", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.set_title("rel-L2 along the execution order", fontsize=9, loc="left")
  # Above the panel, right of its title: never over the data.
  ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, frameon=False, borderaxespad=0.2)


def _mark_stage(ax, i: int, n: int, label: str, color: str, height: float, line: dict) -> None:
  """A vertical line at stage ``i`` and its label, on the side with room."""
  late = i > 0.6 * n
  ax.axvline(i, color=color, zorder=1, **line)
  box = dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85)
  ax.annotate(
      label,
      (i, height),
      xycoords=("data", "axes fraction"),
      xytext=(-4 if late else 4, 0),  # no mutate: a label offset in points (cosmetic)
      textcoords="offset points",
      fontsize=8,
      color=color,
      va="bottom",
      ha="right" if late else "left",
      bbox=box,
      zorder=6,
  )


def _stage_ticks(rows: list["StageRow"]) -> tuple[list[float], list[str]]:
  """One tick per non-layer stage, one per layer at the middle of its stages."""
  ticks, labels = [], []
  i = 0
  while i < len(rows):
    j = i
    while j + 1 < len(rows) and rows[i].layer is not None and rows[j + 1].layer == rows[i].layer:
      j += 1
    ticks.append((i + j) / 2)
    labels.append(rows[i].name if rows[i].layer is None else f"L{rows[i].layer}")
    i = j + 1
  return ticks, labels


def _title(report: "BundleReport") -> str:
  v, fd = report.verdict, report.first_divergent
  if v.status == "pass":
    return f"PASS -- all {len(report.rows)} stages within the {report.profile.name} profile"
  if v.status == "jump":
    rel = report.row(fd).stats.rel_l2
    return f"FAIL (jump) -- first divergent: {fd}  (rel-L2 {rel:.2e}, x{fmt_growth(v.growth)} over {v.ref_stage or 'nothing'})"
  return (
      f"FAIL (drift) -- onset {fd}, first over tolerance {v.first_breach} (x{fmt_growth(v.growth)},"
      f" below jump factor {report.profile.jump_factor:g})"
  )
