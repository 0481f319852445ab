"""The verify tool on gs:// and s3:// checkpoints, end to end: real tool processes against the two emulators.

Bad requests run as one battery in one process (tests/helpers/tools.run_many); expected values are the
shipped example's own committed report of bit-identical leaves (every leaf PASS) and hand-written messages.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from parity_jax.checkpoint import example
from parity_jax.checkpoint.spec import RemapSpec
from tests.helpers.jobs import finish, start, wait_for_line
from tests.helpers.objectstores import FAKE_SECRET, Bucket, running
from tests.helpers.tools import ROOT, one_line_error, run, run_many

MARKER = "commit_success.txt"


@pytest.fixture(scope="module")
def both(_emulators):  # _emulators: the servers are stopped at the end of the session (none left running)
  """The example on both stores (``ex/source``, ``ex/migrated``; ``nomarker/source`` without its commit marker)."""
  src, mig, _ = example.example_paths()
  out = {}
  for kind in ("gs", "s3"):
    emu = running(kind)
    b = Bucket(emu, emu.create_bucket())
    b.upload_tree(src, "ex/source")
    b.upload_tree(mig, "ex/migrated")
    b.upload_tree(src, "nomarker/source")
    emu.delete_object(b.name, f"nomarker/source/{MARKER}")
    out[kind] = b
  env = out["s3"].emulator.env(base=out["gs"].emulator.env())
  return out, env


def test_verify_across_gs_and_s3_passes_and_reports_io_and_endpoints(both):
  """Checkpoints, the spec, the JSON report and the HTML page all in buckets."""
  b, env = both
  _, _, spec = example.example_paths()
  spec_bytes = open(spec, "rb").read()
  b["s3"].put("specs/spec.json", spec_bytes)
  r = run(
      "verify_migration",
      f"--source={b['gs'].url}/ex/source",
      f"--migrated={b['s3'].url}/ex/migrated",
      f"--spec={b['s3'].url}/specs/spec.json",
      f"--report={b['gs'].url}/out/r.json",
      f"--html={b['s3'].url}/out/r.html",
      "--noprogress",
      env=env,
  )
  assert r.returncode == 0, r.stderr
  assert "VERDICT: PASS" in r.stdout and "Traceback" not in r.stderr
  for kind in ("gs", "s3"):
    assert f"{kind}:// I/O:" in r.stdout
    assert f"at {b[kind].emulator.url}" in r.stdout
  assert f"report:   {b['gs'].url}/out/r.json" in r.stdout and f"html:     {b['s3'].url}/out/r.html" in r.stdout
  text = b["gs"].get("out/r.json").decode()
  rep = json.loads(text)
  assert rep["verdict"] == "PASS" and rep["n_failed"] == 0 and rep["n_leaves"] == 94
  # the spec read from the bucket is the one used: as the same file read from local disk
  assert rep["spec"] == {"path": f"{b['s3'].url}/specs/spec.json", **RemapSpec.from_json(spec).to_dict()}
  page = b["s3"].get("out/r.html").decode()
  assert page.startswith("<!DOCTYPE html>") and "PASS" in page and page.rstrip().endswith("</html>")
  stored = {
      k: sum(len(b[k].get(key)) for key in b[k].keys(p)) for k, p in (("gs", "ex/source/"), ("s3", "ex/migrated/"))
  }
  for kind in ("gs", "s3"):
    assert 0 < rep["io"][kind]["bytes_read"] <= 1.05 * stored[kind], (kind, rep["io"][kind], stored[kind])
  assert FAKE_SECRET not in text + page + r.stdout + r.stderr


def test_bad_bucket_requests_are_one_line_exit_2(both, tmp_path):
  b, env = both
  src, mig, spec = example.example_paths()
  s3, gs = b["s3"].url, b["gs"].url
  cases = [
      (["--source=s3://no-such-bucket-parity/x", f"--migrated={s3}/ex/migrated"], "no such bucket"),
      (["--source=gs://no-such-bucket-parity/x", f"--migrated={gs}/ex/migrated"], "no such bucket"),
      ([f"--source={s3}/nomarker/source", f"--migrated={s3}/ex/migrated"], "unfinished: no commit_success.txt"),
      ([f"--source={gs}/nomarker/source", f"--migrated={gs}/ex/migrated"], "unfinished: no commit_success.txt"),
      ([f"--source={gs}/not/there", f"--migrated={gs}/ex/migrated"], "does not exist"),
      ([f"--source={s3}/ex/source", f"--migrated={s3}/ex/migrated", f"--report={s3}/ex/migrated/r.json"], "input"),
      ([f"--source={src}", f"--migrated={mig}", "--report=gs://no-such-bucket-parity/r.json"], "does not exist"),
      ([f"--source={src}", f"--migrated={mig}", f"--report={s3}/ex"], "--report=" + f"{s3}/ex is a directory"),
      ([f"--source={src}", f"--migrated={mig}", f"--html={gs}/out/old.html"], "exists; refusing to overwrite"),
      ([f"--source={src}", f"--migrated={mig}", f"--html={gs}"], "names a bucket, not an object"),
      (
          [f"--source={src}", f"--migrated={mig}", f"--spec={gs}/specs/bad.json", f"--spec_errors={s3}/e.json"],
          f"2 problems (all 2 in {s3}/e.json)",
      ),
      ([f"--source={src}", f"--migrated={mig}", f"--spec={gs}/specs/none.json"], "spec file does not exist"),
      ([f"--source={src}", f"--migrated={mig}", f"--spec={gs}/ex"], "got a directory"),
      (["--source=s3://Bad_Bucket!/x", f"--migrated={s3}/ex/migrated"], "not a valid S3 bucket name"),
      # a safetensors migration into a bucket cut short before its commit (the index, or model.safetensors)
      ([f"--source={src}", f"--migrated={gs}/hfhalf"], "is unfinished: 1 shard (model-00001-of-00002.safetensors)"),
      ([f"--source={s3}/hfhalf", f"--migrated={mig}"], "is unfinished: only config.json but neither"),
  ]
  b["gs"].put("hfhalf/config.json", b"{}")
  b["gs"].put("hfhalf/model-00001-of-00002.safetensors", b"\0" * 16)
  b["s3"].put("hfhalf/config.json", b"{}")
  b["gs"].put("out/old.html", b"old")
  b["gs"].put("specs/bad.json", json.dumps({"rules": [], "bogus": 1}).encode())
  argvs = [[f"--spec={spec}", *args, "--noprogress"] for args, _ in cases]
  # last: a report whose upload fails (every PUT of it dropped by a proxy in front of the S3 emulator)
  argvs.append([f"--source={src}", f"--migrated={mig}", f"--spec={spec}", f"--report={s3}/dropped.json"])
  argvs[-1] += ["--noprogress", "--storage_retries=2", "--storage_backoff_s=0.01"]
  with b["s3"].emulator.proxy() as proxy:
    proxy.fail(0, methods=("PUT",), path_contains="dropped.json")
    results = run_many("verify_migration", argvs, env=b["s3"].emulator.env(base=env, endpoint=proxy.url))
  for (args, words), res in zip(cases, results):
    one_line_error(res, words)
    assert not res.stdout.count("VERDICT"), (args, res.stdout)
  one_line_error(results[-1], f"{s3}/dropped.json: cannot reach")
  assert b["s3"].get("dropped.json") is None  # no partial object
  assert b["gs"].get("out/old.html") == b"old"
  for kind in ("gs", "s3"):  # nothing written beside or inside the checkpoints
    assert all(k.startswith(("ex/source/", "ex/migrated/")) for k in b[kind].keys("ex")), b[kind].keys("ex")
  assert not [k for k in b["s3"].keys() if k.endswith("r.json")]
  problems = json.loads(b["s3"].get("e.json"))  # the spec read from gs://, its problems written to s3://
  assert len(problems["problems"]) == 2 and "bogus" in json.dumps(problems), problems


def test_migrate_spec_and_outputs_as_bucket_urls(both, tmp_path):
  """The migrate tool reads --spec from a bucket and writes --print_spec there; a --report in a missing bucket is
  refused before any work; its --storage_retries bounds the attempts per request (as the verifier's)."""
  b, env = both
  src, _, spec = example.example_paths()
  s3, gs = b["s3"].url, b["gs"].url
  b["s3"].put("specs/spec.json", open(spec, "rb").read())
  printed = [f"--spec={s3}/specs/spec.json", f"--print_spec={gs}/out/printed.json"]
  dest = tmp_path / "dest"
  argvs = [
      printed,
      printed,  # again: it exists now
      [f"--source={src}", f"--dest={dest}", f"--spec={s3}/specs/spec.json", "--report=gs://no-such-bucket-parity/r"],
  ]
  # --storage_retries is the number of attempts a dropped connection gets (every request under nowhere/ dropped)
  argvs += [
      [f"--source={s3}/nowhere/ckpt", f"--dest={dest}", f"--spec={spec}", f"--storage_retries={n}"]
      + ["--storage_backoff_s=0.01"]
      for n in (2, 3)
  ]
  # a safetensors --dest holding an attempt cut short before its commit: named, untouched without --overwrite
  argvs.append([f"--source={src}", f"--dest={gs}/hfcut", f"--spec={spec}", "--dest_format=safetensors"])
  b["gs"].put("hfcut/config.json", b"{}")
  b["gs"].put("hfcut/model-00001-of-00002.safetensors", b"\0" * 16)
  with b["s3"].emulator.proxy() as proxy:
    proxy.fail(0, path_contains="nowhere")
    first, again, missing, *dropped, half = run_many(
        "migrate_checkpoint", argvs, env=b["s3"].emulator.env(base=env, endpoint=proxy.url)
    )
  one_line_error(half, f"destination {gs}/hfcut holds a half-written attempt (2 objects, no model.safetensors")
  assert b["gs"].keys("hfcut/") == ["hfcut/config.json", "hfcut/model-00001-of-00002.safetensors"]
  for n, r in zip((2, 3), dropped):
    one_line_error(r, f"(empty reply from server) after {n} attempts")
  assert first.returncode == 0, first.stderr
  n = len(RemapSpec.from_json(spec).rules)
  assert first.stdout.strip() == f"spec: {gs}/out/printed.json ({n} rules)"
  assert b["gs"].get("out/printed.json").decode() == RemapSpec.from_json(spec).to_json() + "\n"
  one_line_error(again, f"--print_spec={gs}/out/printed.json exists; refusing to overwrite it (pass --overwrite)")
  one_line_error(missing, "--report: bucket gs://no-such-bucket-parity does not exist")
  assert not dest.exists()


def test_server_gone_mid_verify_stops_trying_the_remaining_leaves(both, tmp_path):
  """The endpoint goes away after the metadata is read (the proxy in front of the S3 emulator stops listening):
  one leaf uses up its retries, then the store is down for the run and every later leaf on it is UNREADABLE at
  once, with one reason, without requests of its own."""
  b, env = both
  src, _, spec = example.example_paths()
  emu = b["s3"].emulator
  report = tmp_path / "r.json"
  proxy = emu.proxy().start()
  argv = [f"--source={src}", f"--migrated={b['s3'].url}/ex/migrated", f"--spec={spec}", f"--report={report}"]
  argv += ["--noprogress", "--storage_retries=3", "--storage_backoff_s=0.05"]
  proc = subprocess.Popen(
      [sys.executable, "-m", "tools.verify_migration", *argv],
      cwd=ROOT,
      env=dict(emu.env(base=env, endpoint=proxy.url), PARITY_JAX_STALL="verify.share=3"),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    wait_for_line(proc, "stalling at verify.share")  # metadata read; no leaf compared yet
    proxy.stop()
    out, err = proc.communicate(timeout=300)
  finally:
    proxy.stop()
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 1, (out, err)
  assert "Traceback" not in err and "VERDICT: FAIL" in out
  rep = json.loads(report.read_text())
  reasons = [leaf["reason"] for leaf in rep["leaves"] if leaf["status"] == "UNREADABLE"]
  gone = f"not tried: {b['s3'].url}: cannot reach {proxy.url} (connection refused); the store stopped answering"
  skipped = [r for r in reasons if r.startswith(gone)]
  tried = [r for r in reasons if not r.startswith(gone)]
  assert len(set(skipped)) == 1 and len(skipped) >= 40, (len(skipped), reasons[:3])  # one reason, many leaves
  assert 1 <= len(tried) <= 2, tried  # the leaf (or pair of a batch) whose reads used up the retries
  assert all(r.startswith("cannot read leaf") for r in tried), tried
  # retries: those of the tried leaf and of the small-leaf reads in flight with it, not one budget per leaf
  assert rep["io"]["s3"]["retries"] <= 4 * 2 * (3 - 1), rep["io"]["s3"]


def _comparable(rep: dict) -> dict:
  rep = dict(rep)
  for k in ("elapsed_s", "provenance", "distributed", "io"):  # measured per process
    rep.pop(k, None)
  rep["leaves"] = [
      dict(leaf, read_mode=re.sub(r"a batch of \d+ pairs", "a batch", leaf["read_mode"] or ""))
      for leaf in rep["leaves"]
  ]
  return rep


def test_two_process_verify_on_s3_equals_the_one_process_report(both, tmp_path):
  b, env = both
  _, _, spec = example.example_paths()
  args = [
      f"--source={b['s3'].url}/ex/source",
      f"--migrated={b['s3'].url}/ex/migrated",
      f"--spec={spec}",
      "--noprogress",
  ]
  one = run("verify_migration", *args, f"--report={tmp_path / 'one.json'}", env=env)
  assert one.returncode == 0, one.stderr
  procs = start("verify_migration", [*args, f"--report={tmp_path / 'two.json'}"], n=2, env=env)
  results = finish(procs, timeout=180)
  assert [rc for rc, _, _ in results] == [0, 0], results
  rep1 = json.loads((tmp_path / "one.json").read_text())
  rep2 = json.loads((tmp_path / "two.json").read_text())
  assert rep2["distributed"]["num_processes"] == 2
  per = rep2["distributed"]["per_process"]
  assert all(p["bytes_read"] > 0 for p in per)  # each process read its own share straight from the bucket
  assert _comparable(rep1) == _comparable(rep2)


def test_migrator_killed_mid_write_leaves_nothing_accepted_and_is_named_next_time(both, monkeypatch, tmp_path):
  """SIGKILL after the data is in the bucket (written there in place, no local staging), before the merged index,
  the metadata and the commit marker: our tools and orbax's own load refuse the result."""
  b, env = both
  src, _, spec = example.example_paths()
  gs = b["gs"]
  dest = f"{gs.url}/killed"
  proc = subprocess.Popen(
      [sys.executable, "-m", "tools.migrate_checkpoint", f"--source={src}", f"--dest={dest}", f"--spec={spec}"],
      cwd=ROOT,
      env=dict(env, PARITY_JAX_STALL="migrate.merge=120", TMPDIR=str(tmp_path)),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    wait_for_line(proc, "stalling at migrate.merge")
    assert not list(tmp_path.iterdir())  # every share written, and nothing staged on local disk
  finally:
    proc.kill()
    proc.wait(10)
    proc.stderr.close()
  keys = gs.keys("killed/")
  assert any("/d/" in k for k in keys) and f"killed/{MARKER}" not in keys
  assert "killed/state/_METADATA" not in keys and "killed/state/manifest.ocdbt" not in keys
  # the verifier: one line, exit 2
  r = run("verify_migration", f"--source={src}", f"--migrated={dest}", f"--spec={spec}", env=env)
  one_line_error(r, "unfinished: no commit_success.txt")
  # orbax itself
  import orbax.checkpoint as ocp

  gs.emulator.apply(monkeypatch)
  # orbax reads gs:// through tensorstore's own gcs driver: its endpoint variable, a dummy token (an emulator)
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", gs.emulator.url)
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  with pytest.raises(Exception):
    ocp.v1.load_pytree(dest)
  # the next migration names the leftover, then --overwrite replaces it
  argv = [f"--source={src}", f"--dest={dest}", f"--spec={spec}", "--noprogress"]
  again, replaced = run_many("migrate_checkpoint", [argv, [*argv, "--overwrite"]], env=env)
  one_line_error(again, f"destination {dest} holds a half-written attempt")
  assert replaced.returncode == 0, replaced.stderr
  assert f"killed/{MARKER}" in gs.keys("killed/")
  assert ocp.v1.load_pytree(dest)  # orbax accepts the committed result
