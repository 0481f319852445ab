"""Without matplotlib, a plot is one line that says how to get it, for a checkout and for an installed package."""

from __future__ import annotations

import re

import numpy as np
import sys

import pytest

from parity_jax.bundles.plot import require_matplotlib
from parity_jax.errors import UsageError
from tests.helpers.tools import ROOT


def test_the_missing_matplotlib_hint_names_the_plot_extra_and_no_editable_install(monkeypatch):
  for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError, as when it is absent
  with pytest.raises(UsageError) as e:
    require_matplotlib()
  line = str(e.value)
  assert "\n" not in line and "-e" not in line.split() and ".[" not in line, line
  assert "pip install 'parity_jax[plot]'" in line and "pip install matplotlib" in line, line
  plot_extra = re.search(r"^plot = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M)
  assert plot_extra and re.fullmatch(r'"matplotlib>=[0-9.]+"', plot_extra.group(1)), plot_extra


def test_plot_report_without_matplotlib_is_the_same_one_line(monkeypatch):
  from parity_jax.bundles import compare_bundles
  from parity_jax.bundles.plot import plot_report
  from tests.helpers import stages as synth

  golden = synth.golden_stages(num_layers=1)
  report = compare_bundles(golden, golden)
  for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  with pytest.raises(UsageError, match=re.escape("pip install 'parity_jax[plot]'")):
    plot_report(report)


@pytest.fixture(scope="module")
def jump_figure():
  """One layer; the first stages bit-identical, then tiny noise, then a 1e-3 jump at layers.0.v_proj onwards."""
  pytest.importorskip("matplotlib")
  from parity_jax.bundles import compare_bundles
  from parity_jax.bundles.plot import plot_report
  from tests.helpers import stages as synth

  golden = synth.golden_stages(num_layers=1)
  names = list(golden)
  jump = names.index("layers.0.v_proj")
  rel = [0.0 if i < 2 else 1e-7 if i < jump else 1e-3 for i in range(len(names))]
  cand = synth.candidate(golden, lambda i, n: rel[i])
  report = compare_bundles(golden, cand)
  fig = plot_report(report)
  measured = [synth.rel_l2(golden[n], cand[n]) for n in names]
  return {"fig": fig, "names": names, "jump": jump, "rel": measured}


def _to_rgba(c):
  from matplotlib.colors import to_rgba

  return tuple(np.round(to_rgba(c), 6))


def test_the_plot_marks_identical_breaching_and_first_divergent_stages(jump_figure):
  from matplotlib.patches import Rectangle

  fig, names, jump = jump_figure["fig"], jump_figure["names"], jump_figure["jump"]
  texts = [t for ax in fig.axes for t in ax.texts]
  assert sum(t.get_text() == "=" for t in texts) == 2  # the two bit-identical stages
  assert sum(t.get_text() == "x" for t in texts) == len(names) - jump  # every stage from the jump on breaches
  frames = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
  (red,) = [p for p in frames if _to_rgba(p.get_edgecolor()) == _to_rgba("red")]  # only the first divergent stage
  heat = red.axes
  layer_cols = [n.split(".", 2)[2] for n in names if n.startswith("layers.0.")]
  assert red.get_xy() == (layer_cols.index("v_proj") - 0.5, -0.5)  # its heatmap cell: column v_proj, row layer 0
  assert [t.get_text() for t in heat.get_yticklabels()] == ["layer 0"]
  assert [t.get_text() for t in heat.get_xticklabels()] == layer_cols
  title = fig._suptitle
  assert title.get_text().startswith("FAIL (jump) -- first divergent: layers.0.v_proj")
  assert _to_rgba(title.get_color()) == _to_rgba("#b00020")


def test_the_line_panel_plots_every_stage_where_it_is(jump_figure):
  fig, names, jump, rel = jump_figure["fig"], jump_figure["names"], jump_figure["jump"], jump_figure["rel"]
  (ax,) = [a for a in fig.axes if a.get_title(loc="left") == "rel-L2 along the execution order"]
  by_label = {c.get_label(): c for c in ax.collections}
  within, over, same = by_label["within tolerance"], by_label["over tolerance"], by_label["bit-identical"]
  xs = lambda c: [int(round(x)) for x in c.get_offsets()[:, 0]]  # noqa: E731
  assert xs(same) == [0, 1] and xs(within) == list(range(2, jump)) and xs(over) == list(range(jump, len(names)))
  np.testing.assert_allclose(within.get_offsets()[:, 1], rel[2:jump], rtol=1e-4)
  np.testing.assert_allclose(over.get_offsets()[:, 1], rel[jump:], rtol=1e-4)
  floor = same.get_offsets()[0, 1]
  assert list(same.get_offsets()[:, 1]) == [floor, floor]  # at the bottom of the scale: a whole decade below the rest
  assert 0 < floor <= min(rel[2:]) and float(np.log10(floor)).is_integer()
  assert ax.get_xlim() == (-0.5, len(names) - 0.5)  # half a stage of margin on either side, no empty slot
  assert _to_rgba(within.get_facecolor()[0]) == _to_rgba("#4060a0")
  assert _to_rgba(over.get_facecolor()[0]) == _to_rgba("#d02020")
  # the first divergent stage: a red line at its index and a label in a white box, on the side with room
  (ann,) = ax.texts
  assert ann.get_text() == "first divergent: layers.0.v_proj" and _to_rgba(ann.get_color()) == _to_rgba("red")
  assert ann.xy[0] == jump and ann.get_ha() == ("right" if jump > 0.6 * len(names) else "left")
  assert _to_rgba(ann.get_bbox_patch().get_facecolor())[:3] == (1, 1, 1)  # white (translucent) behind the text
  vlines = [ln for ln in ax.lines if list(ln.get_xdata()) == [jump, jump]]
  assert len(vlines) == 1 and _to_rgba(vlines[0].get_color()) == _to_rgba("red")
  # ticks: each stage outside the layers by name, the layer once, at the middle of its stages
  n_layer = sum(n.startswith("layers.0.") for n in names)
  first_layer = names.index(next(n for n in names if n.startswith("layers.0.")))
  want = {n: float(i) for i, n in enumerate(names) if not n.startswith("layers.")}
  want["L0"] = first_layer + (n_layer - 1) / 2
  got = dict(zip([t.get_text() for t in ax.get_xticklabels()], ax.get_xticks()))
  assert got == want


def test_each_cell_has_the_colour_of_its_rel_l2_on_the_colour_bar(jump_figure):
  import matplotlib as mpl
  from matplotlib.patches import Rectangle

  fig, rel = jump_figure["fig"], jump_figure["rel"]
  (cbar,) = [a for a in fig.axes if a.get_ylabel() == "log10 rel-L2"]
  lo, hi = sorted(cbar.get_ylim())
  viridis = mpl.colormaps["viridis"]
  want = sorted(
      _to_rgba(viridis((min(max(np.log10(r), lo), hi) - lo) / (hi - lo))) for r in rel if r > 0
  )  # one coloured cell per stage that differs, none for the bit-identical ones
  cells = [
      p
      for ax in fig.axes
      for p in ax.patches
      if isinstance(p, Rectangle) and p.get_fill() and _to_rgba(p.get_edgecolor()) == _to_rgba("white")
  ]
  assert len(cells) == len(want)
  got = sorted(_to_rgba(p.get_facecolor()) for p in cells)
  np.testing.assert_allclose(got, want, atol=0.01)  # within a step of the 256-colour map


def test_the_breach_marks_are_white_on_dark_cells_and_black_on_light_ones(jump_figure):
  """The "x" of a breaching cell is white where the cell is in the darker 60% of viridis, black above."""
  fig, rel, jump = jump_figure["fig"], jump_figure["rel"], jump_figure["jump"]
  (cbar,) = [a for a in fig.axes if a.get_ylabel() == "log10 rel-L2"]
  lo, hi = sorted(cbar.get_ylim())
  levels = [(min(max(np.log10(r), lo), hi) - lo) / (hi - lo) for r in rel[jump:]]
  want = sorted(_to_rgba("white" if level < 0.6 else "black") for level in levels)
  got = sorted(_to_rgba(t.get_color()) for ax in fig.axes for t in ax.texts if t.get_text() == "x")
  assert got == want and len(got) == len(rel) - jump


def test_the_colour_bar_and_an_unwritable_plot_path(jump_figure, tmp_path):
  """The colour bar's ticks are small (7 pt) beside the 8 pt label; a path that cannot be written is one UsageError."""
  from parity_jax.bundles import compare_bundles
  from parity_jax.bundles.plot import plot_report
  from tests.helpers import stages as synth

  (cbar,) = [a for a in jump_figure["fig"].axes if a.get_ylabel() == "log10 rel-L2"]
  assert {t.get_fontsize() for t in cbar.get_yticklabels()} == {7.0} and cbar.yaxis.label.get_fontsize() == 8.0
  golden = synth.golden_stages(num_layers=1)
  report = compare_bundles(golden, synth.candidate(golden, lambda i, n: 1e-7))
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(UsageError, match="^cannot write plot .*a_file/plot.png: "):
    plot_report(report, path=tmp_path / "a_file" / "plot.png")  # under a file: no directory to write in
  assert (tmp_path / "a_file").read_text() == "x"


def test_the_line_panel_separates_the_layer_from_the_stages_around_it(jump_figure):
  fig, names = jump_figure["fig"], jump_figure["names"]
  (ax,) = [a for a in fig.axes if a.get_title(loc="left") == "rel-L2 along the execution order"]
  in_layer = [i for i, n in enumerate(names) if n.startswith("layers.0.")]
  grey = sorted(ln.get_xdata()[0] for ln in ax.lines if _to_rgba(ln.get_color()) == _to_rgba("#cccccc"))
  assert grey == [in_layer[0] - 0.5, in_layer[-1] + 0.5]  # between embedding and layer 0, layer 0 and final_norm


def test_the_title_of_a_drift_and_of_a_pass():
  """Four stages of 2.0s, s1..s3 off by 1e-6, 5e-6, 2e-5 relative (x5, x4: below the jump factor 10)."""
  pytest.importorskip("matplotlib")
  import matplotlib.pyplot as plt

  from parity_jax.bundles import compare_bundles
  from parity_jax.bundles.plot import plot_report

  golden = {f"s{i}": np.full(4, 2, np.float32) for i in range(4)}
  cand = {k: v.copy() for k, v in golden.items()}
  for k, d in (("s1", 4e-6), ("s2", 2e-5), ("s3", 8e-5)):
    cand[k][0] += np.float32(d)
  for c, text, colour in (
      (cand, "FAIL (drift) -- onset s1, first over tolerance s3 (x4, below jump factor 10)", "#b36b00"),
      (golden, "PASS -- all 4 stages within the f32 profile", "#1b7f3b"),
  ):
    fig = plot_report(compare_bundles(golden, c, profile="f32"))
    assert (fig._suptitle.get_text(), _to_rgba(fig._suptitle.get_color())) == (text, _to_rgba(colour))
    plt.close(fig)


def test_a_drift_frames_its_onset_in_red_and_its_first_breach_in_dashed_orange():
  """s1..s3 drift below the jump factor (as above): the onset s1 and the first stage over tolerance s3 are framed,
  each once; no other stage is."""
  pytest.importorskip("matplotlib")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  from parity_jax.bundles import compare_bundles
  from parity_jax.bundles.plot import plot_report

  golden = {f"s{i}": np.full(4, 2, np.float32) for i in range(4)}
  cand = {k: v.copy() for k, v in golden.items()}
  for k, d in (("s1", 4e-6), ("s2", 2e-5), ("s3", 8e-5)):
    cand[k][0] += np.float32(d)
  fig = plot_report(compare_bundles(golden, cand, profile="f32"))
  frames = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
  red = [p for p in frames if _to_rgba(p.get_edgecolor()) == _to_rgba("red")]
  orange = [p for p in frames if _to_rgba(p.get_edgecolor()) == _to_rgba("#e08000")]
  assert len(red) == len(orange) == 1 and len(frames) == 2
  assert orange[0].get_linestyle() == "--"
  assert red[0].get_x() + 2 == orange[0].get_x()  # s1 and s3: two cells apart in one row
  plt.close(fig)
