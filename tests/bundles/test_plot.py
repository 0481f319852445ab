"""Without matplotlib, a plot is one line that says how to get it, for a checkout and for an installed package."""

from __future__ import annotations

import re
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
