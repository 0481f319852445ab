"""Every numeric flag of every tool has a range, and a value outside it is one line, exit 2, before any work.

The ranges below are written out by hand (what each flag means), not read from
the flag definitions: a bound that goes missing or moves fails here. ``--help``
is read only to find every numeric flag a tool has, so that a new one without a
row here fails too.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers.tools import one_line_error, run_many

_JOB = {  # the launch flags of the three job tools (parity_jax/cli/app.py)
    "num_processes": (["0", "-2"], ["1"]),
    "process_id": (["-1"], ["0"]),
    "peer_timeout": (["0", "0.05", "-1", "nan", "inf", "86401"], ["0.1", "86400"]),
}
# tool -> flag -> (refused values, accepted edge values)
RANGES = {
    "capture_stages": {},
    "compare_stages": {"top_k": (["-1"], ["0"])},
    "convert_svd_weights": {},
    "forward_parity": {"top_k": (["-1"], ["0"]), "decode_steps": (["0", "-1"], ["1"])},
    "make_example_checkpoint": {"seed": (["-1"], ["0"])},
    "migrate_checkpoint": {
        "chunk_mb": (["0", "-1", "0.0009", "nan", "inf", "-inf"], ["0.001", "1e6"]),
        "batch_mb": (["-1", "0", "5e-7", "nan", "inf", "-inf"], ["1e-6", "0.0005", "1e6"]),  # from ~1 byte
        "max_shard_mb": (["0", "-1", "5e-7", "nan", "inf"], ["1e-6", "5000"]),
        "storage_retries": (["0", "-1"], ["1"]),  # attempts per request: at least the one
        "storage_backoff_s": (["-1", "-0.5", "nan", "inf"], ["0", "2.5"]),
        **_JOB,
    },
    "regen_goldens": {},
    "svf_parity": {
        "chunk_mb": (["-1", "-0.5", "nan", "inf"], ["0", "0.5"]),
        "row_block": (["0", "-8"], ["1"]),
        "devices": (["-1"], ["0"]),
        **_JOB,
    },
    "verify_migration": {
        "top_k": (["-1"], ["0"]),
        "slab_mb": (["0", "0.003", "-1", "nan", "inf"], ["0.004", "1e6"]),
        "readahead": (["-1"], ["0", "3"]),
        "storage_retries": (["0", "-1"], ["1"]),  # attempts per request: at least the one
        "storage_backoff_s": (["-1", "-0.5", "nan", "inf"], ["0", "2.5"]),
        **_JOB,
    },
}
_NUMERIC = re.compile(r"^\s+\((an? )?(positive |non-negative |negative )?(integer|number)\b[^)]*\)$")


def _numeric_flags(help_text: str) -> dict[str, str]:
  """flag -> absl's type line (``(a non-negative integer)``, ``(number >= 0.001)``) from a tool's --help."""
  found, flag = {}, None
  for line in help_text.splitlines():
    m = re.match(r"^\s+--(?:\[no\])?(\w+):", line)
    if m:
      flag = m.group(1)
    elif flag and _NUMERIC.match(line):
      found[flag] = line.strip()
  return found


@pytest.mark.parametrize("tool", sorted(RANGES))
def test_numeric_flags_are_refused_outside_their_range(tool, tmp_path):
  out = tmp_path / "out"
  where = {  # an output each run would write if it ran: it must not appear
      "make_example_checkpoint": [f"--out={out}"],
      "migrate_checkpoint": ["--source=/nonexistent", f"--dest={out}", "--spec=/nonexistent.json"],
      "compare_stages": ["--golden=/nonexistent.safetensors", "--candidate=/nonexistent.safetensors"],
  }.get(tool, [])
  bad = [(flag, v) for flag, (values, _) in RANGES[tool].items() for v in values]
  good = [(flag, v) for flag, (_, values) in RANGES[tool].items() for v in values]
  results = run_many(
      tool,
      [["--help"]] + [where + [f"--{flag}={v}"] for flag, v in bad]
      # a stray argument stops an accepted value right after the flag checks, before any work
      + [[f"--{flag}={v}", "stray"] for flag, v in good],
  )
  numeric = _numeric_flags(results[0].stdout)
  assert sorted(numeric) == sorted(RANGES[tool]), f"{tool}: numeric flags {numeric} vs the table here"
  unbounded = {f: t for f, t in numeric.items() if t in ("(a number)", "(an integer)")}
  assert not unbounded, f"{tool}: numeric flags without a range: {unbounded}"
  for (flag, v), r in zip(bad, results[1 : 1 + len(bad)]):
    one_line_error(r, f"flag --{flag}={v}:")
  for (flag, v), r in zip(good, results[1 + len(bad) :]):
    one_line_error(r, "unexpected positional arguments: stray")  # the value passed
  assert not out.exists()
