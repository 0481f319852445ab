"""Progress on stderr: counts in 1024s shown as such, never past the total, 100% at a normal end (issue 16)."""

from __future__ import annotations

import io
import re

import pytest

from parity_jax.progress import progress

MIB = 1 << 20
# an amount or a rate as people read it: a number and a 1024-based unit (no SI "MB", "kB", "M")
_AMOUNT = r"\d+(\.\d)? (B|KiB|MiB|GiB|TiB)"


class _Terminal(io.StringIO):

  def isatty(self) -> bool:
    return True


def _lines(text: str) -> list[str]:
  return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def _percents(lines: list[str]) -> list[int]:
  return [int(m.group(1)) for line in lines for m in [re.search(r"(\d+)%", line)] if m]


def test_log_lines_never_pass_100_and_a_normal_end_is_100(capsys):
  with progress(100, "job", interval=0) as bar:
    bar.update(60)
    bar.update(60)  # counted twice: a caller's bug must not read 120%
  lines = _lines(capsys.readouterr().err)
  assert _percents(lines) == [60, 100, 100], lines
  assert lines[-1].startswith("job: 100% 100 B/100 B "), lines
  with progress(100, "job", interval=3600) as bar:
    bar.update(98)  # counted short: the finished job still reads 100%, not "98% ... ETA 0s"
  (last,) = _lines(capsys.readouterr().err)
  assert last.startswith("job: 100% 100 B/100 B ") and "ETA" not in last, last


def test_an_interrupted_job_keeps_its_count(capsys):
  with pytest.raises(KeyboardInterrupt):
    with progress(100, "job", interval=3600) as bar:
      bar.update(98)
      raise KeyboardInterrupt
  (last,) = _lines(capsys.readouterr().err)
  assert last.startswith("job: 98% 98 B/100 B "), last


def test_a_terminal_bar_counts_and_rates_in_1024s(monkeypatch):
  tty = _Terminal()
  monkeypatch.setattr("sys.stderr", tty)
  with progress(5 * MIB, "verify") as bar:
    bar.update(3 * MIB)
    bar.update(3 * MIB)  # past the total
    bar.set_postfix_str("2/3 leaves")
  lines = _lines(tty.getvalue())
  assert max(_percents(lines)) == 100 and _percents(lines)[-1] == 100, lines
  assert "5.0 MiB/5.0 MiB" in lines[-1], lines
  rates = [m.group(1) for line in lines for m in [re.search(r"<[^,]*, ([^,\]]+)", line)] if m]
  assert len(rates) == len(lines) and all(re.fullmatch(_AMOUNT + "/s|\\?/s", r) for r in rates), lines
  assert not re.search(r"\d(k|M|G)B?/s|\d\.\d+M/", tty.getvalue()), tty.getvalue()


def test_a_terminal_bar_ends_at_the_total():
  tty = _Terminal()
  import sys

  real, sys.stderr = sys.stderr, tty
  try:
    with progress(4 * MIB, "migrate") as bar:
      bar.update(MIB)
  finally:
    sys.stderr = real
  last = _lines(tty.getvalue())[-1]
  assert re.search(r"100%.*4\.0 MiB/4\.0 MiB", last), last


def test_human_bytes_in_1024s_up_to_tebibytes():
  from parity_jax.progress import human_bytes

  assert human_bytes(512) == "512 B"
  assert human_bytes(1536) == "1.5 KiB"
  assert human_bytes(3 * 2**30) == "3.0 GiB"
  assert human_bytes(5 * 2**40) == "5.0 TiB"
  assert human_bytes(2**50) == "1024.0 TiB"  # nothing bigger is named


def test_a_terminal_bar_counted_past_its_total_never_shows_more_than_the_total(monkeypatch):
  # interrupted, the bar is not completed: what it shows at close is what was counted, held at the total
  tty = _Terminal()
  monkeypatch.setattr("sys.stderr", tty)
  with pytest.raises(KeyboardInterrupt):
    with progress(5 * MIB, "verify") as bar:
      bar.update(3 * MIB)
      bar.update(3 * MIB)  # 6 MiB counted: a caller's double count
      raise KeyboardInterrupt
  last = _lines(tty.getvalue())[-1]
  assert re.search(r"100%.*5\.0 MiB/5\.0 MiB", last), last
  assert "6.0 MiB" not in tty.getvalue() and "120%" not in tty.getvalue(), tty.getvalue()
