"""A pytest plugin that sums test time per file, slowest first: `pytest -p tests.helpers.durations`.

It prints the table at the end of the run (with xdist, the controller sees every
worker's reports). Its first lines are what ``SLOWEST_FIRST`` in tests/conftest.py
lists, so that xdist hands the slow files out first.
"""

from __future__ import annotations

import collections

_per_file: collections.Counter = collections.Counter()


def pytest_runtest_logreport(report):
  _per_file[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
  terminalreporter.section("seconds per test file, slowest first")
  for f, s in _per_file.most_common(25):
    terminalreporter.write_line(f"{s:7.1f}  {f}")
  terminalreporter.write_line(f"{sum(_per_file.values()):7.1f}  (all files)")
