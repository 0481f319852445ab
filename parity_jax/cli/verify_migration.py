"""Verifies that a migrated Orbax checkpoint is value-exact, leaf by leaf and bit for bit.

  parity-verify-migration                                 # the shipped example (package data)
  parity-verify-migration --source=DIR --migrated=DIR --spec=FILE [--report=out.json]
  parity-verify-migration --source=gs://bucket/ckpt --migrated=s3://bucket/ckpt --spec=FILE   # buckets

(``python -m tools.verify_migration`` from the repository root is the same tool.)
Prints one line per group (``[PASS] components   12/12 leaves bit-identical``),
the failing leaves by name with their difference statistics, and a final
``VERDICT: PASS`` or ``VERDICT: FAIL — N of M leaves differ``. Exit code 0 for
PASS, 1 for FAIL, 2 for bad input (one ``error:`` line, nothing written).
Both checkpoints are opened read-only; either may be a local directory, a gs:// or an s3:// URL
(endpoints and credentials as google-cloud-storage and boto3 find them, see BUILD.md). Progress (bytes, rate, ETA) goes to stderr.

As one job of N processes on the JAX runtime (each reads only its share of the bytes;
process 0 prints the table and writes the report; every process exits with the same code):

  parity-verify-migration --source=... --migrated=... --spec=... --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  parity-verify-migration --source=... --migrated=... --spec=... --distributed   # SLURM, TPU, k8s, MPI

A process that dies or hangs makes the others exit 2 within --peer_timeout seconds.
"""

from __future__ import annotations

from absl import flags

from parity_jax.cli import app

_SOURCE = flags.DEFINE_string(
    "source", None, "Source checkpoint (v0 PyTree dir, v1 checkpoint or a CheckpointManager step dir)."
)
_MIGRATED = flags.DEFINE_string("migrated", None, "Migrated checkpoint (same layouts accepted).")
_SPEC = flags.DEFINE_string("spec", None, "Remap spec JSON used for the migration.")
_REPORT = flags.DEFINE_string("report", None, "Write the per-leaf JSON report here (never inside either checkpoint).")
_SPEC_ERRORS = flags.DEFINE_string(
    "spec_errors",
    None,
    "If the spec is malformed or does not fit the checkpoints, write every problem here as JSON (the error line shows the first few); --report gets them too.",
)
_HTML = flags.DEFINE_string(
    "html",
    None,
    "Also write the report as a standalone HTML page: groups, and per failing leaf its status, dtype, shape, both "
    "sha256 and the reason (never inside either checkpoint).",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --report / --html / --spec_errors.")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Divergences listed per differing leaf.", lower_bound=0)
_SLAB_MB = flags.DEFINE_float(
    "slab_mb",
    8.0,
    "Size of one compared piece in MiB (a few such buffers are allocated once; memory vs. number of reads).",
    lower_bound=0.004,
)
_SPILL_DIR = flags.DEFINE_string(
    "spill_dir",
    None,
    "Where to spill a source leaf when both sides are stored as single big chunks (default: system temp dir).",
)
_READAHEAD = flags.DEFINE_integer(
    "readahead",
    None,
    "Storage chunk rows of a compressed leaf decoded ahead while the current row is compared. Unset: 0 on local disk (meets the chunked memory target); with a checkpoint in a bucket, up to 4 rows within about 1 GiB, since each stored chunk is one request there (1 row for a leaf whose big chunks are fetched as many range requests). 0: none. N > 0 is faster with free cores and costs about N more chunk rows plus their compressed bytes in memory.",
    lower_bound=0,
)
_PROGRESS = flags.DEFINE_boolean(
    "progress", True, "Progress on stderr (a bar on a terminal, a line every few seconds otherwise)."
)
_STORAGE = app.storage_flags(__name__)  # --storage_retries, --storage_backoff_s
_DIST = app.distributed_flags(__name__)
_PRESETS = app.preset_flags(__name__)  # --preset, --list_presets, --print_spec (issue 17)


def main(argv):
  del argv
  import sys

  from parity_jax.checkpoint import SpecError, example, verify_migration
  from parity_jax.checkpoint.migrate import leftovers
  from parity_jax.errors import UsageError
  from parity_jax.files import check_output_path

  _STORAGE()
  early = _PRESETS.handle_early(_SPEC.value, _SOURCE.value, _OVERWRITE.value)
  if early is not None:
    return early
  given = [_SOURCE.value, _MIGRATED.value, _PRESETS.spec_given(_SPEC.value)]
  if all(v is None for v in given):
    source, migrated, spec = example.example_paths()
    print(f"verifying the shipped example in {example.example_dir()}")
  elif any(v is None for v in given):
    missing = [f"--{n}" for n, v in zip(("source", "migrated", "spec"), given) if v is None]
    raise UsageError(
        f"missing {', '.join(missing)}: give --source, --migrated and --spec together (or none for the shipped example)"
    )
  else:
    source, migrated = given[:2]
    spec = _PRESETS.resolve(_SPEC.value, source, migrated)
  dist = _DIST()
  if dist.requested:
    from parity_jax import runtime

    runtime.initialize(dist)
    lead = runtime.process_index() == 0
  else:
    lead = True
  if lead:
    for out, name in ((_REPORT.value, "--report"), (_HTML.value, "--html"), (_SPEC_ERRORS.value, "--spec_errors")):
      if out:
        check_output_path(out, [source, migrated, _SPEC.value], name, overwrite=_OVERWRITE.value)

  # the temporaries of killed migrations to the migrated path: named, with how to remove them
  notes = [left.describe() for left in leftovers(migrated) if not left.alive] if lead else []
  try:
    report = verify_migration(
        source,
        migrated,
        spec,
        top_k=_TOP_K.value,
        slab_mb=_SLAB_MB.value,
        spill_dir=_SPILL_DIR.value,
        readahead=_READAHEAD.value,
        progress=_PROGRESS.value,
        distributed=dist.requested,
        peer_timeout_s=dist.timeout_s,
    )
  except UsageError as e:
    if notes and not isinstance(e, SpecError):  # e.g. the migrated checkpoint is missing: a killed migration?
      raise UsageError(f"{e}; note: {notes[0]}") from None
    if not isinstance(e, SpecError):
      raise
    written = [e.write_json(out) for out in (_SPEC_ERRORS.value, _REPORT.value) if out] if lead else []
    raise UsageError(e.line(written, hint="--spec_errors=FILE writes them all as JSON")) from None
  if not lead:
    me = next(p for p in report.distributed["per_process"] if p["process"] == report.distributed["process"])
    print(
        f"process {me['process']} of {report.distributed['num_processes']}: compared {me['bytes_read']} bytes;"
        f" {report.verdict_line()} (process 0 prints the table and writes the report)"
    )
    return report.exit_code
  print(f"source:   {report.source} ({report.source_layout})")
  print(f"migrated: {report.migrated} ({report.migrated_layout})")
  print(f"spec:     {report.spec_source}")
  print(report.text())
  if _REPORT.value:
    print(f"report:   {report.write_json(_REPORT.value)}")
  if _HTML.value:
    print(f"html:     {report.write_html(_HTML.value, title='parity_jax verify-migration')}")
  for note in notes:
    print(f"note: {note}", file=sys.stderr)
  return report.exit_code


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
