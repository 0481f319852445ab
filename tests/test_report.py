"""parity_jax.report: the result protocol every job's result follows (exit code, JSON, text, HTML)."""

import html.parser
import json
import os

import pytest

from parity_jax.report import Report


class _Result(Report):
  """A minimal result: what a job's report defines, and nothing else."""

  def __init__(self, passed: bool, text: str = 'a < b & "c"\nverdict: PASS'):
    self._passed, self._text = passed, text

  @property
  def passed(self) -> bool:
    return self._passed

  def to_dict(self):
    return {"passed": self._passed, "rel_l2": float("nan"), "max": float("inf"), "rows": [1, 2]}

  def text(self) -> str:
    return self._text


class _Page(html.parser.HTMLParser):
  """The tags, the title and the <pre> text of an HTML page, as a browser's parser sees them."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags, self.title, self.pre, self._in = [], "", "", None

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))
    self._in = tag

  def handle_endtag(self, tag):
    self._in = None

  def handle_data(self, data):
    if self._in == "title":
      self.title += data
    elif self._in == "pre":
      self.pre += data


def test_report_is_abstract():
  with pytest.raises(TypeError):
    Report()


@pytest.mark.parametrize("passed,code", [(True, 0), (False, 1)])
def test_exit_code_follows_passed(passed, code):
  assert _Result(passed).exit_code == code


def test_to_json_and_write_json_are_strict_json(tmp_path, monkeypatch):
  r = _Result(False)
  want = {"passed": False, "rel_l2": "nan", "max": "inf", "rows": [1, 2]}
  assert r.to_json() == json.dumps(want, indent=1)
  assert r.to_json(indent=None) == json.dumps(want)
  monkeypatch.chdir(tmp_path)
  path = r.write_json("out/r.json")
  assert path == str(tmp_path / "out" / "r.json")
  with open(path, encoding="utf-8") as f:
    assert f.read() == json.dumps(want, indent=1) + "\n"


def test_str_is_the_text():
  assert str(_Result(True, "hello")) == "hello"


def test_repr_html_escapes_the_text_in_a_pre():
  assert _Result(True)._repr_html_() == "<pre>a &lt; b &amp; &quot;c&quot;\nverdict: PASS</pre>"


def test_html_page_is_a_standalone_document():
  page = _Result(True).html_page()
  assert page.startswith("<!DOCTYPE html>\n") and page.endswith("</html>\n")
  parsed = _Page()
  parsed.feed(page)
  names = [t for t, _ in parsed.tags]
  assert names[:3] == ["html", "head", "meta"] and "body" in names and "style" in names
  assert dict(parsed.tags)["meta"] == {"charset": "utf-8"}
  assert parsed.title == "_Result"  # the class name when no title is given
  assert parsed.pre == 'a < b & "c"\nverdict: PASS'  # the text, unescaped by the browser as written
  assert _Result(True)._repr_html_() in page


def test_html_page_title_is_escaped():
  parsed = _Page()
  parsed.feed(_Result(True).html_page(title="<b>verify</b> & co"))
  assert parsed.title == "<b>verify</b> & co" and "b" not in [t for t, _ in parsed.tags]


def test_write_html_writes_the_page_atomically_and_returns_the_absolute_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  r = _Result(False)
  path = r.write_html("r.html", title="T")
  assert path == str(tmp_path / "r.html")
  with open(path, encoding="utf-8") as f:
    assert f.read() == r.html_page("T")
  path = r.write_html(tmp_path / "sub" / "d.html")
  with open(path, encoding="utf-8") as f:
    assert f.read() == r.html_page()
  assert os.listdir(tmp_path / "sub") == ["d.html"]
