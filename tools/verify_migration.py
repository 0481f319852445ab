"""Verifies that a migrated Orbax checkpoint is value-exact, leaf by leaf and bit for bit.

  python -m tools.verify_migration                       # the shipped example in goldens/checkpoints/
  python -m tools.verify_migration --source=DIR --migrated=DIR --spec=FILE [--report=out.json]

Prints one line per group (``[PASS] components   12/12 leaves bit-identical``),
the failing leaves by name with their difference statistics, and a final
``VERDICT: PASS`` or ``VERDICT: FAIL — N of M leaves differ``. Exit code 0 for
PASS, 1 for FAIL, 2 for bad input (one ``error:`` line, nothing written).
Both checkpoints are opened read-only. Progress (bytes, rate, ETA) goes to stderr.
"""

from __future__ import annotations

import os
import pathlib

from absl import flags, logging

from tools import _cli

_SOURCE = flags.DEFINE_string("source", None, "Source checkpoint (v0 PyTree dir, v1 checkpoint or a CheckpointManager step dir).")
_MIGRATED = flags.DEFINE_string("migrated", None, "Migrated checkpoint (same layouts accepted).")
_SPEC = flags.DEFINE_string("spec", None, "Remap spec JSON used for the migration.")
_REPORT = flags.DEFINE_string("report", None, "Write the per-leaf JSON report here (never inside either checkpoint).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Divergences listed per differing leaf.", lower_bound=0)
_SLAB_MB = flags.DEFINE_float("slab_mb", 8.0, "Size of one compared piece in MiB (a few such buffers are allocated once; memory vs. number of reads).", lower_bound=0.004)
_SPILL_DIR = flags.DEFINE_string("spill_dir", None, "Where to spill a source leaf when both sides are stored as single big chunks (default: system temp dir).")
_READAHEAD = flags.DEFINE_integer("readahead", 0, "Storage chunk rows of a compressed leaf decoded ahead while the current row is compared (0: none, meets the chunked memory target). N > 0 is faster with free cores and costs about N more chunk rows plus their compressed bytes in memory.", lower_bound=0)
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show progress with rate and ETA on stderr.")

EXAMPLE_DIR = pathlib.Path(__file__).resolve().parents[1] / "goldens" / "checkpoints"


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs every step at INFO; keep stderr for progress and errors
    logging.set_verbosity(logging.ERROR)
  from parity_jax.errors import UsageError
  from parity_jax.paths import check_output_path

  given = [_SOURCE.value, _MIGRATED.value, _SPEC.value]
  if all(v is None for v in given):
    source, migrated, spec = (str(EXAMPLE_DIR / "source"), str(EXAMPLE_DIR / "migrated"), str(EXAMPLE_DIR / "spec.json"))
    print(f"verifying the shipped example in {EXAMPLE_DIR}")
  elif any(v is None for v in given):
    missing = [f"--{n}" for n, v in zip(("source", "migrated", "spec"), given) if v is None]
    raise UsageError(f"missing {', '.join(missing)}: give --source, --migrated and --spec together (or none for the shipped example)")
  else:
    source, migrated, spec = given
  if _REPORT.value:
    check_output_path(_REPORT.value, [source, migrated], "--report")

  from parity_jax.checkpoint import verify_migration

  report = verify_migration(
      source, migrated, spec, top_k=_TOP_K.value, slab_mb=_SLAB_MB.value, spill_dir=_SPILL_DIR.value,
      readahead=_READAHEAD.value, progress=_PROGRESS.value,
  )
  print(f"source:   {report.source} ({report.source_layout})")
  print(f"migrated: {report.migrated} ({report.migrated_layout})")
  print(f"spec:     {report.spec_source}")
  print(report.text())
  if _REPORT.value:
    report.write_json(_REPORT.value)
    print(f"report:   {os.path.abspath(_REPORT.value)}")
  return 0 if report.passed else 1


if __name__ == "__main__":
  _cli.run(main)
