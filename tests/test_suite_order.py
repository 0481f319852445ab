"""The suite's schedule (tests/conftest.py): the files it puts first exist, and the hook puts them first."""

from __future__ import annotations

import pathlib

from tests import conftest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_file_named_slowest_first_exists_once():
  assert len(set(conftest.SLOWEST_FIRST)) == len(conftest.SLOWEST_FIRST)
  assert [f for f in conftest.SLOWEST_FIRST if not (ROOT / f).is_file()] == []


class _Item:

  def __init__(self, nodeid):
    self.nodeid = nodeid


def test_the_named_files_come_first_in_their_order_then_the_rest_by_size_each_file_in_its_own_order():
  first, second = conftest.SLOWEST_FIRST[:2]
  names = ["tests/a.py::t1", f"{second}::x", "tests/b.py::t1", "tests/b.py::t2", f"{first}::y", "tests/a.py::t0"]
  items = [_Item(n) for n in names]
  conftest.pytest_collection_modifyitems(None, None, items)
  assert [i.nodeid for i in items] == [
      f"{first}::y",
      f"{second}::x",
      "tests/a.py::t1",  # two tests each: by name, and in collection order inside a file
      "tests/a.py::t0",
      "tests/b.py::t1",
      "tests/b.py::t2",
  ]
