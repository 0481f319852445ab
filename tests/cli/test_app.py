"""parity_jax.cli.app in-process: the shared flag helpers of the tools, without starting a tool.

The tools' end-to-end behaviour (exit codes, supervised jobs) is in tests/tools/;
here each helper is called directly with hand-written inputs and expectations.
Flags are defined on absl's global FLAGS (as every tool does) and unparsed after.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from absl import flags

from parity_jax.cli import app
from parity_jax.errors import UsageError
from parity_jax.runtime import DEFAULT_TIMEOUT_S
from parity_jax.stores import limits, set_limits


@pytest.fixture
def parsed():
  """``parsed(*argv)`` parses tool flags into absl's FLAGS; every flag back to its default afterwards."""

  def parse(*argv: str) -> None:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["tool", *argv])

  yield parse
  flags.FLAGS.unparse_flags()


def test_parse_int_rows_reads_rows_and_refuses_bad_ones():
  a = app.parse_int_rows(" 1, -2 ,+3 ", "tokens")
  assert a.dtype == np.int64 and a.tolist() == [[1, -2, 3]]
  assert app.parse_int_rows("1,2;3,4", "tokens").tolist() == [[1, 2], [3, 4]]
  assert app.parse_int_rows("7", "t").shape == (1, 1)
  for text, words in [
      ("  ", "--tokens is empty"),
      ("1,x", "--tokens: row 0 has non-integer entries ['x']"),
      ("1,2;3,", "--tokens: row 1 has non-integer entries ['']"),
      ("1.5", "non-integer"),
      ("1,2;3", "--tokens: rows have different lengths [1, 2]"),
  ]:
    with pytest.raises(UsageError, match=words.replace("[", r"\[").replace("]", r"\]")):
      app.parse_int_rows(text, "tokens")


def test_require_names_every_missing_flag():
  holder = lambda name, value: types.SimpleNamespace(name=name, value=value)  # noqa: E731
  app.require(holder("a", "x"), holder("b", 0))  # 0 is a value
  with pytest.raises(UsageError) as e:
    app.require(holder("a", None), holder("b", "y"))
  assert str(e.value) == "missing required flag --a (see --help)"
  with pytest.raises(UsageError) as e:
    app.require(holder("a", ""), holder("b", None), holder("c", 1))
  assert str(e.value) == "missing required flags --a, --b (see --help)"


def test_print_written_lists_absolute_paths_on_stdout_or_stderr(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  app.print_written([("report", "r.json"), ("plot", None), ("bundle", "/x/b.safetensors")])
  out, err = capsys.readouterr()
  assert out == f"report: {tmp_path / 'r.json'}\nbundle: /x/b.safetensors\n" and err == ""
  app.print_written([("report", "r.json")], json_mode=True)
  out, err = capsys.readouterr()
  assert out == "" and err == f"report: {tmp_path / 'r.json'}\n"


def test_fail_usage_prints_one_line_and_exits_2(capsys, monkeypatch):
  monkeypatch.setattr("sys.argv", ["/bin/mytool"])
  with pytest.raises(SystemExit) as e:
    app.fail_usage("first\nsecond")
  assert e.value.code == 2 == app.EXIT_USAGE and (app.EXIT_OK, app.EXIT_FAIL) == (0, 1)
  assert capsys.readouterr().err == "mytool: error: first\n"
  with pytest.raises(SystemExit):
    app.fail_usage("   ")
  assert capsys.readouterr().err == "mytool: error: bad input\n"


def test_distributed_flags_read_as_launch_options(parsed):
  options = app.distributed_flags(__name__)
  assert app.distributed_flags(__name__) is options  # defining twice is harmless
  parsed()
  o = options()
  assert not o.requested and o.timeout_s == DEFAULT_TIMEOUT_S and o.auto is False
  parsed("--coordinator_address=h:1", "--num_processes=2", "--process_id=1", "--peer_timeout=3")
  o = options()
  assert (o.coordinator_address, o.num_processes, o.process_id, o.timeout_s) == ("h:1", 2, 1, 3.0) and o.requested
  parsed("--distributed")
  assert options().auto is True and options().requested
  with pytest.raises(flags.IllegalFlagValueError):
    parsed("--peer_timeout=0.01")  # below the flag's lower bound


def test_storage_flags_put_the_bounds_in_force(parsed):
  before = limits()
  apply = app.storage_flags(__name__)
  try:
    parsed("--storage_retries=3", "--storage_backoff_s=0.25")
    apply()
    assert (limits().max_retries, limits().initial_delay_s, limits().max_delay_s) == (3, 0.25, 2.0)
    parsed("--storage_backoff_s=0")
    apply()
    assert (limits().max_retries, limits().initial_delay_s, limits().max_delay_s) == (5, 0.0, 0.001)
  finally:
    set_limits(**{f: getattr(before, f) for f in ("max_retries", "initial_delay_s", "max_delay_s")})


def test_preset_flags_refuse_misuse_and_list_presets(parsed, capsys, tmp_path):
  spec_flags = app.preset_flags(__name__)
  parsed()
  assert spec_flags.preset is None and spec_flags.resolve("s.json", "src") == "s.json"
  assert spec_flags.spec_given("s.json") == "s.json" and spec_flags.spec_given(None) is None
  assert spec_flags.handle_early("s.json", "src", False) is None
  parsed("--preset_cast=bfloat16")
  with pytest.raises(UsageError, match="--preset_cast applies to --preset only"):
    spec_flags.resolve(None, "src")
  parsed("--preset=anything")
  assert spec_flags.preset == "anything" and spec_flags.spec_given(None) == "anything"
  with pytest.raises(UsageError, match="give --spec or --preset, not both"):
    spec_flags.resolve("s.json", "src")
  with pytest.raises(UsageError, match="give --source"):
    spec_flags.resolve(None, "")
  parsed("--print_spec=" + str(tmp_path / "out.json"))
  with pytest.raises(UsageError, match="--print_spec needs --preset"):
    spec_flags.handle_early(None, None, False)
  assert not (tmp_path / "out.json").exists()
  parsed("--list_presets")
  capsys.readouterr()
  assert spec_flags.handle_early(None, None, False) == 0
  from parity_jax.checkpoint.presets import PRESETS

  lines = capsys.readouterr().out.splitlines()
  assert sorted(line.split()[0] for line in lines) == sorted(PRESETS) and len(lines) == len(PRESETS)


def _exit_of(run, argv, monkeypatch, capsys):
  """``run()`` of a tool entry with ``argv``: (exit code, stdout, stderr); absl's FLAGS unparsed after."""
  monkeypatch.setattr("sys.argv", ["/bin/mytool", *argv])
  try:
    with pytest.raises(SystemExit) as e:
      run()
  finally:
    flags.FLAGS.unparse_flags()
  out, err = capsys.readouterr()
  return e.value.code, out, err


def test_entry_maps_results_and_errors_to_exit_codes_and_one_line(monkeypatch, capsys):
  """A tool's run(): its main's result is the exit code; a UsageError, a bad flag, a positional argument or a
  non-finite float flag is one ``<prog>: error:`` line and exit 2; an interrupt exits 128 + the signal."""
  import signal

  from absl import logging as absl_logging

  import logging

  app.distributed_flags(__name__)  # --peer_timeout: a float flag with a lower bound only
  for name in ("jax._src.xla_bridge", "absl", "orbax"):  # the tool quiets these: as they were, after the test
    monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
  seen = []

  def main(argv):
    seen.append((list(argv), absl_logging.get_verbosity()))
    what = flags.FLAGS["peer_timeout"].value
    if what == 1:
      return 1
    if what == 2:
      raise UsageError("no such thing\nsecond line")
    if what == 3:
      raise KeyboardInterrupt()
    if what == 4:
      e = KeyboardInterrupt("terminated")
      e.signum = signal.SIGTERM
      raise e
    if what == 5:
      raise BrokenPipeError()
    return None

  run = app.entry(main, "My tool: does things.\n\n  Usage: mytool", __name__)
  assert _exit_of(run, [], monkeypatch, capsys) == (0, "", "")
  assert seen == [(["/bin/mytool"], absl_logging.ERROR)]  # start-up chatter off without --verbosity
  assert _exit_of(run, ["--peer_timeout=1"], monkeypatch, capsys) == (1, "", "")
  assert _exit_of(run, ["--peer_timeout=2"], monkeypatch, capsys) == (2, "", "mytool: error: no such thing\n")
  assert _exit_of(run, ["--peer_timeout=3"], monkeypatch, capsys) == (130, "", "mytool: interrupted\n")
  assert _exit_of(run, ["--peer_timeout=4"], monkeypatch, capsys) == (128 + 15, "", "mytool: terminated\n")
  n = len(seen)
  code, out, err = _exit_of(run, ["--peer_timeout=nan"], monkeypatch, capsys)
  assert code == 2 and out == "" and err == "mytool: error: flag --peer_timeout=nan: not a finite number\n"
  code, _, err = _exit_of(run, ["--no_such_flag=1"], monkeypatch, capsys)
  assert code == 2 and err.startswith("mytool: error: ") and "no_such_flag" in err and err.count("\n") == 1
  code, _, err = _exit_of(run, ["a", "b"], monkeypatch, capsys)
  assert code == 2 and err == "mytool: error: unexpected positional arguments: a b\n"
  assert len(seen) == n  # none of these reached main
  code, out, _ = _exit_of(run, ["--help"], monkeypatch, capsys)
  assert code == 0 and out.startswith("My tool: does things.\n\n  Usage: mytool\n\n") and "--peer_timeout" in out
  assert out.rstrip().endswith("absl's own flags (logging, flag files): --helpfull") and len(seen) == n
  with open("/dev/null", "w") as sink:  # the BrokenPipe path points stdout's descriptor at /dev/null
    monkeypatch.setattr("sys.stdout", sink)  # last: stdout stays this file
    code = _exit_of(run, ["--peer_timeout=5"], monkeypatch, capsys)[0]
  assert code == 128 + 13  # SIGPIPE's code, quietly
