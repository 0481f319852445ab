"""Migrates an Orbax checkpoint under a remap spec, streaming one leaf at a time, atomically.

  parity-migrate-checkpoint --source=DIR --dest=DIR --spec=FILE [--chunk_mb=64] [--overwrite]

(``python -m tools.migrate_checkpoint`` from the repository root is the same tool.)
Reads source metadata, validates the spec against it (every problem reported
at once, before any data is read), then restores one leaf (or a small batch of
small leaves) at a time, applies its squeeze/reshape and appends it with
``ocp.v1.partial.save``; ``finalize`` makes one v1 checkpoint. The result
appears at --dest only when complete. An existing --dest is replaced only with
--overwrite and only when it is an Orbax checkpoint or an empty directory.
Progress (leaves, bytes, rate, ETA) goes to stderr. Exit 0 on success, 2 on
bad input (one ``error:`` line, nothing written). Check the result with
``parity-verify-migration``.
"""

from __future__ import annotations

import sys

from absl import flags

from parity_jax.cli import app

_SOURCE = flags.DEFINE_string("source", None, "Source checkpoint (v0 PyTree dir, v1 checkpoint or a CheckpointManager step dir).")
_DEST = flags.DEFINE_string("dest", None, "Where the migrated v1 checkpoint appears (must not exist unless --overwrite).")
_SPEC = flags.DEFINE_string("spec", None, "Remap spec JSON.")
_CHUNK_MB = flags.DEFINE_float("chunk_mb", 64.0, "Storage chunk size in MiB for the written arrays.", lower_bound=1e-3)
_BATCH_MB = flags.DEFINE_float("batch_mb", None, "Small leaves are restored/saved together up to this many MiB (default: min(chunk_mb, largest leaf), >= 8).")
_COMPRESSION = flags.DEFINE_enum("compression", "none", ["none", "zstd"], "Chunk codec. 'none' writes straight from memory (peak ~1x the largest leaf); 'zstd' (orbax's default) saves a few % of disk on float weights but OCDBT buffers every compressed chunk of a leaf (~1 more leaf of memory) and every read must decode.")
_SPEC_ERRORS = flags.DEFINE_string("spec_errors", None, "If the spec is malformed or does not fit the source, write every problem here as JSON (the error line shows the first few).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing --dest (only if it is an Orbax checkpoint or empty) / --spec_errors.")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Progress on stderr (a bar on a terminal, a line every few seconds otherwise).")


def main(argv):
  del argv
  from parity_jax.checkpoint import SpecError, migrate
  from parity_jax.errors import UsageError
  from parity_jax.files import check_output_path

  app.require(_SOURCE, _DEST, _SPEC)
  if _SPEC_ERRORS.value:
    check_output_path(_SPEC_ERRORS.value, [_SOURCE.value, _DEST.value, _SPEC.value], "--spec_errors",
                      overwrite=_OVERWRITE.value)
  try:
    result = migrate(
        _SOURCE.value, _DEST.value, _SPEC.value, chunk_mb=_CHUNK_MB.value, overwrite=_OVERWRITE.value,
        progress=_PROGRESS.value, batch_mb=_BATCH_MB.value, compression=_COMPRESSION.value,
    )
  except SpecError as e:
    written = [e.write_json(_SPEC_ERRORS.value)] if _SPEC_ERRORS.value else []
    raise UsageError(e.line(written, hint="--spec_errors=FILE writes them all as JSON")) from None
  if result.dropped_empty_nodes:
    shown = ", ".join(result.dropped_empty_nodes[:10])
    print(f"note: {len(result.dropped_empty_nodes)} empty node(s) in the source hold no data and were not carried"
          f" over: {shown}", file=sys.stderr)
  print(result.text())
  return result.exit_code


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
