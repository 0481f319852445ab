"""The real tools, as subprocesses: exit codes, one-line errors, reports, atomicity under SIGKILL."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

from tests.helpers import ckpt as H
from parity_jax.checkpoint import migrate, verify_migration
from tests.helpers.files import hash_file_tree
from tests.helpers.tools import run_many
from parity_jax.checkpoint.formats.orbax_layout import resolve_item_dir
from parity_jax.errors import UsageError


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
  root = tmp_path_factory.mktemp("tools")
  src = H.generated_source()
  d = {"root": root, "src": H.save_v0(root / "src", src), "expected": H.expected_migrated(src)}
  d["spec"] = H.write_spec(root / "spec.json", H.GENERATED_SPEC)
  d["mig"] = str(root / "mig")
  migrate(d["src"], d["mig"], d["spec"], chunk_mb=256 / 2**20)
  bad = H.deepcopy(d["expected"])
  bad["params"]["block_0"]["kernel"].view(np.uint32)[1, 2] ^= 1
  d["bad"] = H.save_v1(root / "bad", bad)
  return d


def _one_error_line(proc, prog):
  lines = H.stderr_lines(proc)
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
  assert "Traceback" not in proc.stderr
  return lines[0]


def test_default_command_verifies_the_shipped_example():
  proc = H.run_tool("verify_migration")  # exactly the README's main-job command (progress on)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = proc.stdout.splitlines()
  assert "[PASS] components            12/12 leaves bit-identical" in out
  assert out[-1] == "VERDICT: PASS"
  assert sum(line.startswith("[PASS] ") for line in out) == 7
  assert "94/94 leaves" in proc.stderr and "B/s" in proc.stderr  # progress with rate on stderr
  assert "Traceback" not in proc.stderr


def test_verify_cli_pass_and_fail_exit_codes_and_report(ck, tmp_path):
  report = tmp_path / "ok.json"
  proc = H.run_tool(
      "verify_migration",
      f"--source={ck['src']}",
      f"--migrated={ck['mig']}",
      f"--spec={ck['spec']}",
      f"--report={report}",
      "--noprogress",
  )
  assert proc.returncode == 0 and proc.stdout.splitlines()[-2] == "VERDICT: PASS", proc.stdout + proc.stderr
  assert json.loads(report.read_text())["verdict"] == "PASS"

  report, page = tmp_path / "bad.json", tmp_path / "bad.html"
  proc = H.run_tool(
      "verify_migration",
      f"--source={ck['src']}",
      f"--migrated={ck['bad']}",
      f"--spec={ck['spec']}",
      f"--report={report}",
      f"--html={page}",
      "--noprogress",
      "--readahead=2",
      "--slab_mb=0.01",
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr
  out = proc.stdout
  assert "[FAIL] params  7/8 leaves bit-identical" in out
  assert "VALUE_MISMATCH  params/block_0/kernel <- params/blocks/0/w: 1/240 differ" in out
  assert "VERDICT: FAIL — 1 of 14 leaves differ" in out
  rep = json.loads(report.read_text())
  (entry,) = [e for e in rep["leaves"] if e["status"] != "PASS"]
  assert entry["migrated_path"] == "params/block_0/kernel" and entry["diff"]["n_diff"] == 1
  assert entry["diff"]["top_k"][0]["index"] == [1, 2]
  # the HTML page: per failing leaf its dtype, shape, both sha256 (hashlib of the arrays written here) and reason
  assert f"html:     {page}" in out
  html_text = page.read_text()
  bad = H.deepcopy(ck["expected"])["params"]["block_0"]["kernel"]
  bad.view(np.uint32)[1, 2] ^= 1
  good = ck["expected"]["params"]["block_0"]["kernel"]
  for want in (hashlib.sha256(bad.tobytes()).hexdigest(), hashlib.sha256(good.tobytes()).hexdigest()):
    assert want in html_text
  assert f"<code>{bad.dtype}</code>" in html_text and str(list(bad.shape)) in html_text
  assert "1/240 differ" in html_text and "VERDICT: FAIL — 1 of 14 leaves differ" in html_text


VERIFY_BAD = [
    "missing source",
    "missing migrated",
    "missing spec",
    "not a checkpoint",
    "malformed JSON",
    "rule matches nothing",
    "leaf matched twice",
    "partial flags",
    "report inside checkpoint",
    "unknown flag",
    "negative readahead",
]


def _verify_bad_case(ck, d, case):
  """(argv, needle) of one bad verify call; its files go in the fresh directory ``d``."""
  src, mig, spec = ck["src"], ck["mig"], ck["spec"]
  extra = []
  needle = ""
  if case == "missing source":
    src, needle = str(d / "nope"), "source checkpoint does not exist"
  elif case == "missing migrated":
    mig, needle = str(d / "nope"), "migrated checkpoint does not exist"
  elif case == "missing spec":
    spec, needle = str(d / "nope.json"), "spec file does not exist"
  elif case == "not a checkpoint":
    (d / "junk").mkdir()
    (d / "junk" / "weights.bin").write_bytes(b"\0" * 10)
    mig, needle = str(d / "junk"), "is not an Orbax checkpoint"
  elif case == "malformed JSON":
    spec = H.write_spec(d / "s.json", {})
    (d / "s.json").write_text('{"rules": [')
    needle = "is not valid JSON"
  elif case == "rule matches nothing":
    spec = H.write_spec(d / "s.json", {"rules": H.GENERATED_SPEC["rules"] + [{"match": "^ghost$", "to": "g"}]})
    needle = "rule #6 ('^ghost$') matches no source leaf"
  elif case == "leaf matched twice":
    spec = H.write_spec(d / "s.json", {"rules": H.GENERATED_SPEC["rules"] + [{"match": "^step$", "to": "step2"}]})
    needle = "source leaf 'step' matches 2 rules: #5, #6"
  elif case == "partial flags":
    spec, needle = None, "missing --spec"
  elif case == "report inside checkpoint":
    extra, needle = [f"--report={ck['mig']}/state/report.json"], "would overwrite or lie inside an input"
  elif case == "unknown flag":
    extra, needle = ["--frobnicate"], "frobnicate"
  elif case == "negative readahead":
    extra, needle = ["--readahead=-1"], "readahead"
  args = [f"--source={src}", f"--migrated={mig}", "--noprogress", *extra]
  if spec is not None:
    args.append(f"--spec={spec}")
  return args, needle


@pytest.fixture(scope="module")
def verify_bad(ck, tmp_path_factory):
  """Every bad verify call, through the real tool, in one process (tests.helpers.tools.run_many)."""
  before = hash_file_tree(ck["mig"])
  cases = {c: _verify_bad_case(ck, tmp_path_factory.mktemp("verify_bad"), c) for c in VERIFY_BAD}
  results = run_many("verify_migration", [args for args, _ in cases.values()])
  return {c: (res, needle) for (c, (_, needle)), res in zip(cases.items(), results)}, before


@pytest.mark.parametrize("case", VERIFY_BAD)
def test_verify_bad_input_exits_2_with_one_line(ck, verify_bad, case):
  results, before = verify_bad
  proc, needle = results[case]
  line = _one_error_line(proc, "verify_migration.py")
  assert needle in line
  assert proc.stdout == ""
  assert hash_file_tree(ck["mig"]) == before


MIGRATE_BAD = [
    "missing source",
    "not a checkpoint",
    "malformed JSON",
    "rule matches nothing",
    "leaf matched twice",
    "dest exists",
    "dest inside source",
    "missing flag",
]


def _migrate_bad_case(ck, d, case):
  """(argv, needle, dest) of one bad migrate call; its files go in the fresh directory ``d``."""
  src, spec, dest = ck["src"], ck["spec"], str(d / "out")
  needle = ""
  if case == "missing source":
    src, needle = str(d / "nope"), "source checkpoint does not exist"
  elif case == "not a checkpoint":
    (d / "junk").mkdir()
    src, needle = str(d / "junk"), "is not an Orbax checkpoint"
  elif case == "malformed JSON":
    (d / "s.json").write_text("{'rules': []}")
    spec, needle = str(d / "s.json"), "is not valid JSON"
  elif case == "rule matches nothing":
    spec = H.write_spec(d / "s.json", {"rules": H.GENERATED_SPEC["rules"] + [{"match": "^ghost$", "to": "g"}]})
    needle = "matches no source leaf"
  elif case == "leaf matched twice":
    spec = H.write_spec(d / "s.json", {"rules": H.GENERATED_SPEC["rules"] + [{"match": "^name$", "to": "n"}]})
    needle = "source leaf 'name' matches 2 rules"
  elif case == "dest exists":
    shutil.copytree(ck["mig"], dest)
    needle = "destination already exists"
  elif case == "dest inside source":
    dest, needle = os.path.join(ck["src"], "migrated"), "lies inside the source checkpoint"
  args = [f"--source={src}", f"--spec={spec}", "--noprogress"] + ([] if case == "missing flag" else [f"--dest={dest}"])
  return args, needle, dest


@pytest.fixture(scope="module")
def migrate_bad(ck, tmp_path_factory):
  """Every bad migrate call, through the real tool, in one process; each case's files and hashes before it."""
  before_src = hash_file_tree(ck["src"])
  cases = {}
  for c in MIGRATE_BAD:
    d = tmp_path_factory.mktemp("migrate_bad")
    args, needle, dest = _migrate_bad_case(ck, d, c)
    cases[c] = (args, needle, d, dest, hash_file_tree(dest) if os.path.exists(dest) else None)
  results = run_many("migrate_checkpoint", [v[0] for v in cases.values()])
  return {c: (res, *v[1:]) for (c, v), res in zip(cases.items(), results)}, before_src


@pytest.mark.parametrize("case", MIGRATE_BAD)
def test_migrate_bad_input_exits_2_with_one_line_and_writes_nothing(ck, migrate_bad, case):
  results, before_src = migrate_bad
  proc, needle, d, dest, before_dest = results[case]
  line = _one_error_line(proc, "migrate_checkpoint.py")
  assert needle in line
  assert hash_file_tree(ck["src"]) == before_src
  if before_dest is None:
    assert not os.path.exists(dest)
  else:
    assert hash_file_tree(dest) == before_dest
  assert not [p for p in os.listdir(d) if ".migrating-" in p]
  assert not [p for p in os.listdir(os.path.dirname(ck["src"])) if ".migrating-" in p]


def test_migrate_cli_progress_then_verify(ck, tmp_path):
  dest = tmp_path / "m"
  proc = H.run_tool(
      "migrate_checkpoint", f"--source={ck['src']}", f"--dest={dest}", f"--spec={ck['spec']}", "--chunk_mb=0.001"
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("migrated 14 leaves")
  assert "14/14 leaves" in proc.stderr and "B/s" in proc.stderr and "Traceback" not in proc.stderr
  assert verify_migration(ck["src"], dest, ck["spec"]).passed


def test_overwrite_semantics(ck, tmp_path):
  dest = tmp_path / "m"
  shutil.copytree(H.EXAMPLE / "migrated", dest)  # some other checkpoint is in the way
  proc = H.run_tool(
      "migrate_checkpoint",
      f"--source={ck['src']}",
      f"--dest={dest}",
      f"--spec={ck['spec']}",
      "--overwrite",
      "--noprogress",
  )
  assert proc.returncode == 0, proc.stderr
  assert verify_migration(ck["src"], dest, ck["spec"]).passed
  assert [p for p in os.listdir(tmp_path)] == ["m"]  # no temporaries or replaced copies left behind

  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "notes.txt").write_text("precious")
  with pytest.raises(UsageError, match="is not an Orbax checkpoint; refusing to replace it"):
    migrate(ck["src"], junk, ck["spec"], overwrite=True)
  assert (junk / "notes.txt").read_text() == "precious"
  with pytest.raises(UsageError, match="is or contains the source checkpoint"):
    migrate(ck["src"], ck["root"], ck["spec"], overwrite=True)
  with pytest.raises(UsageError, match="is the source checkpoint"):
    migrate(ck["src"], ck["src"], ck["spec"], overwrite=True)


@contextlib.contextmanager
def _stalled_migration(ck, dest, point):
  """The migrate tool, started with ``PARITY_JAX_STALL=point`` and yielded once it stalls there (killed after
  90 s whatever happens)."""
  proc = subprocess.Popen(
      [
          sys.executable,
          "-m",
          "tools.migrate_checkpoint",
          f"--source={ck['src']}",
          f"--dest={dest}",
          f"--spec={ck['spec']}",
          "--batch_mb=0.0005",
          "--noprogress",
      ],
      cwd=H.REPO,
      env=dict(os.environ, PARITY_JAX_STALL=point),
      stderr=subprocess.PIPE,
      text=True,
      # SIGINT as from a terminal: a shell starts background jobs with SIGINT ignored, which Python then keeps
      # (no KeyboardInterrupt), so a suite run in the background would see the tool ignore the test's SIGINT
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  watchdog = threading.Timer(90, proc.kill)
  watchdog.start()
  try:
    for line in proc.stderr:
      if "stalling at" in line:
        break
    yield proc
  finally:
    watchdog.cancel()
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.parametrize("point", ["migrate.group.2", "migrate.group.3", "migrate.install"])
def test_sigkill_leaves_nothing_that_looks_like_a_checkpoint(ck, tmp_path, point):
  dest = tmp_path / "m"
  with _stalled_migration(ck, dest, point) as proc:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not dest.exists()
  with pytest.raises(UsageError):
    resolve_item_dir(dest)
  leftovers = [p for p in tmp_path.iterdir() if p.name != "m"]
  assert leftovers and all(p.name.startswith(".m.migrating-") for p in leftovers)
  for p in leftovers:  # the half-written temporary is not mistaken for a checkpoint either
    with pytest.raises(UsageError):
      resolve_item_dir(p)
  # a rerun cleans up the dead run's temporary and succeeds
  migrate(ck["src"], dest, ck["spec"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
  assert verify_migration(ck["src"], dest, ck["spec"]).passed


def test_corrupted_migrated_checkpoint_via_cli_is_a_clean_fail(ck, tmp_path):
  mig = tmp_path / "mig"
  shutil.copytree(ck["mig"], mig)
  for f in (mig / "state" / "d").iterdir():
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  proc = H.run_tool(
      "verify_migration",
      f"--source={ck['src']}",
      f"--migrated={mig}",
      f"--spec={ck['spec']}",
      "--noprogress",
      timeout=120,
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr and "UNREADABLE" in proc.stdout
  # nothing is known of an unreadable leaf's values: the verdict says so, never "differ"
  assert proc.stdout.splitlines()[-1] == "VERDICT: FAIL — 13 of 14 leaves fail: 13 unreadable"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_migration_removes_its_temporary_and_says_so_in_one_line(ck, tmp_path, sig):
  dest = tmp_path / "m"
  with _stalled_migration(ck, dest, "migrate.group.2=60") as proc:
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.migrating-")]  # mid-write, as intended
    proc.send_signal(sig)
    rest = proc.stderr.read()
    proc.wait()
  assert proc.returncode == 128 + sig, (proc.returncode, rest)
  lines = [ln for ln in rest.splitlines() if ln.strip()]
  assert len(lines) == 1 and f"interrupted ({signal.Signals(sig).name})" in lines[0], rest
  assert "Traceback" not in rest
  assert list(tmp_path.iterdir()) == []  # neither the destination nor the hidden temporary


def test_after_a_sigkill_the_verifier_names_the_leftover_and_how_to_remove_it(ck):
  tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="lo"))  # short paths: the error line holds two of them
  dest = tmp_path / "m"
  with _stalled_migration(ck, dest, "migrate.group.2=60") as proc:
    proc.kill()
    proc.wait()
  (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".m.migrating-")]
  # the destination is missing: the error line says why, and what to remove
  proc = H.run_tool(
      "verify_migration", f"--source={ck['src']}", f"--migrated={dest}", f"--spec={ck['spec']}", "--noprogress"
  )
  line = _one_error_line(proc, "verify_migration.py")
  assert f"{left} (" in line and f"rm -rf {left}" in line and "interrupted migration" in line
  # a finished checkpoint at the destination, the leftover still beside it: the verdict, then a note
  shutil.copytree(ck["mig"], dest)
  proc = H.run_tool(
      "verify_migration", f"--source={ck['src']}", f"--migrated={dest}", f"--spec={ck['spec']}", "--noprogress"
  )
  assert proc.returncode == 0 and "VERDICT: PASS" in proc.stdout, proc.stdout + proc.stderr
  notes = H.stderr_lines(proc)
  assert len(notes) == 1 and notes[0].startswith(f"note: {left} (") and f"rm -rf {left}" in notes[0]
  assert left.is_dir()  # named, never removed by the verifier
  shutil.rmtree(tmp_path)
