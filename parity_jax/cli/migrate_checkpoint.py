"""Migrates an Orbax checkpoint under a remap spec, streaming one leaf at a time, atomically.

  parity-migrate-checkpoint --source=DIR --dest=DIR --spec=FILE [--chunk_mb=64] [--overwrite] [--report=out.json]
  parity-migrate-checkpoint --source=HF_DIR --dest=DIR --preset=hf-to-tunix [--preset_cast=float32] [--layout=v1]
  parity-migrate-checkpoint --source=TUNIX_DIR --dest=HF_OUT --preset=tunix-to-hf --hf_config=HF_DIR/config.json [--max_shard_mb=5000]

(``python -m tools.migrate_checkpoint`` from the repository root is the same tool.)
Reads source metadata, validates the spec against it (every problem reported
at once, before any data is read), then restores one leaf (or a small batch of
small leaves) at a time, applies its squeeze/reshape and appends it with
``ocp.v1.partial.save``; ``finalize`` makes one v1 checkpoint. The result
appears at --dest only when complete (a gs:// or s3:// --dest is written in place, with no local staging,
and is a checkpoint only once its commit_success.txt, written last, is there; a safetensors one once its
model.safetensors.index.json or model.safetensors, written last, is there). An existing --dest is replaced only
with --overwrite and only when it is an Orbax checkpoint, an empty directory, or (a safetensors --dest) an HF
safetensors directory.
Conversions (--preset, or spec rules with transpose/ops/stack/cast) are performed with the verifier's own
evaluation, one destination chunk at a time; from HF safetensors the result is, by default, in the layout
``ocp.StandardCheckpointer().save`` writes (--layout). Progress (leaves, bytes, rate, ETA) goes to stderr. Exit 0 on success, 2 on
bad input (one ``error:`` line, nothing written). Check the result with
``parity-verify-migration``.

As one job of N processes on the JAX runtime (each restores and writes only its share of the leaves and of
big leaves; process 0 assembles the one checkpoint and installs it at --dest once every share is committed;
--dest must be on storage every process sees):

  parity-migrate-checkpoint --source=... --dest=... --spec=... --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  parity-migrate-checkpoint --source=... --dest=... --spec=... --distributed   # SLURM, TPU, k8s, MPI

A process that dies or hangs makes the others exit 2 within --peer_timeout seconds; nothing appears at --dest.
"""

from __future__ import annotations

import sys

from absl import flags

from parity_jax.cli import app

_SOURCE = flags.DEFINE_string(
    "source", None, "Source checkpoint (v0 PyTree dir, v1 checkpoint or a CheckpointManager step dir)."
)
_DEST = flags.DEFINE_string(
    "dest", None, "Where the migrated v1 checkpoint appears (must not exist unless --overwrite)."
)
_SPEC = flags.DEFINE_string("spec", None, "Remap spec JSON.")
_CHUNK_MB = flags.DEFINE_float("chunk_mb", 64.0, "Storage chunk size in MiB for the written arrays.", lower_bound=1e-3)
_BATCH_MB = flags.DEFINE_float(
    "batch_mb",
    None,
    "Small leaves are restored/saved together up to this many MiB (default: min(chunk_mb, largest leaf), >= 8).",
    lower_bound=1e-6,
)
_COMPRESSION = flags.DEFINE_enum(
    "compression",
    "none",
    ["none", "zstd"],
    "Chunk codec. 'none' writes straight from memory (peak ~1x the largest leaf); 'zstd' (orbax's default) saves a few % of disk on float weights but OCDBT buffers every compressed chunk of a leaf (~1 more leaf of memory) and every read must decode.",
)
_LAYOUT = flags.DEFINE_enum(
    "layout",
    "auto",
    ["auto", "standard", "v1"],
    "Destination layout. 'standard': what ocp.StandardCheckpointer().save writes (the item at --dest; restore with"
    " ocp.StandardCheckpointer().restore(DEST, abstract_tree)); 'v1': the item in DEST/state/ (ocp.v1.save; a"
    " CheckpointManager step with item 'state'); 'auto': standard from HF safetensors, else v1.",
)
_DEST_FORMAT = flags.DEFINE_enum(
    "dest_format",
    "auto",
    ["auto", "orbax", "safetensors"],
    "What --dest is: an Orbax checkpoint, or a Hugging Face safetensors directory (shards of --max_shard_mb,"
    " model.safetensors.index.json, config.json from --hf_config). 'auto': safetensors for a '*-to-hf' --preset.",
)
_MAX_SHARD_MB = flags.DEFINE_float(
    "max_shard_mb",
    5000.0,
    "With a safetensors --dest: the most MiB per shard file (into a bucket also at most max(256 MiB, the largest"
    " tensor): a shard is held in memory for its one upload).",
    lower_bound=1e-6,
)
_SPEC_ERRORS = flags.DEFINE_string(
    "spec_errors",
    None,
    "If the spec is malformed or does not fit the source, write every problem here as JSON (the error line shows the first few).",
)
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite",
    False,
    "Replace an existing --dest (only if it is an Orbax checkpoint or empty), --report and --spec_errors.",
)
_REPORT = flags.DEFINE_string(
    "report",
    None,
    "Also write the result as JSON here (in a job: by process 0, with every process's figures); never inside either checkpoint.",
)
_PROGRESS = flags.DEFINE_boolean(
    "progress", True, "Progress on stderr (a bar on a terminal, a line every few seconds otherwise)."
)
_STORAGE = app.storage_flags(__name__)  # --storage_retries, --storage_backoff_s
_DIST = app.distributed_flags(__name__)
_PRESETS = app.preset_flags(__name__)  # --preset, --list_presets, --print_spec (issue 17)


def main(argv):
  del argv
  from parity_jax.checkpoint import SpecError, migrate
  from parity_jax.errors import UsageError
  from parity_jax.files import check_output_path
  from parity_jax.progress import human_bytes

  _STORAGE()
  early = _PRESETS.handle_early(_SPEC.value, _SOURCE.value, _OVERWRITE.value)
  if early is not None:
    return early
  app.require(_SOURCE, _DEST, *([] if _PRESETS.preset else [_SPEC]))  # --spec, or --preset
  spec = _PRESETS.resolve(_SPEC.value, _SOURCE.value)
  dist = _DIST()
  fmt = _DEST_FORMAT.value
  if fmt == "auto":
    fmt = "safetensors" if (_PRESETS.preset or "").endswith("-to-hf") else "orbax"
  # every process checks the outputs before joining: a refusal is then the same one line everywhere
  for out, name in ((_REPORT.value, "--report"), (_SPEC_ERRORS.value, "--spec_errors")):
    if out:
      check_output_path(out, [_SOURCE.value, _DEST.value, _SPEC.value], name, overwrite=_OVERWRITE.value)
  if dist.requested:
    from parity_jax import runtime

    runtime.initialize(dist)
  try:
    result = migrate(
        _SOURCE.value,
        _DEST.value,
        spec,
        chunk_mb=_CHUNK_MB.value,
        overwrite=_OVERWRITE.value,
        progress=_PROGRESS.value,
        batch_mb=_BATCH_MB.value,
        compression=_COMPRESSION.value,
        distributed=dist.requested,
        peer_timeout_s=dist.timeout_s,
        layout=_LAYOUT.value,
        dest_format=fmt,
        max_shard_mb=_MAX_SHARD_MB.value,
        hf_config=flags.FLAGS["hf_config"].value if fmt == "safetensors" else None,
    )
  except SpecError as e:
    lead = True
    if dist.requested:
      from parity_jax import runtime

      lead = runtime.process_index() == 0
    written = [e.write_json(_SPEC_ERRORS.value)] if _SPEC_ERRORS.value and lead else []
    raise UsageError(e.line(written, hint="--spec_errors=FILE writes them all as JSON")) from None
  if result.distributed is not None:
    from parity_jax import runtime

    me = runtime.process_index()
    if me != 0:
      mine = next(p for p in result.distributed["per_process"] if p["process"] == me)
      print(
          f"process {me} of {result.distributed['num_processes']}: wrote {human_bytes(mine['bytes_written'])}"
          f" ({len(mine['whole_leaves'])} leaves, {len(mine['split_ranges'])} ranges of split leaves);"
          f" process 0 installed {result.dest}"
      )
      return result.exit_code
  if result.dropped_empty_nodes:
    shown = ", ".join(result.dropped_empty_nodes[:10])
    print(
        f"note: {len(result.dropped_empty_nodes)} empty node(s) in the source hold no data and were not carried"
        f" over: {shown}",
        file=sys.stderr,
    )
  if fmt == "safetensors" and flags.FLAGS["hf_config"].value is None:
    print(
        "note: no --hf_config: no config.json was written (transformers needs one to load the model)", file=sys.stderr
    )
  print(result.text())
  if _REPORT.value:
    print(f"report: {result.write_json(_REPORT.value)}")
  return result.exit_code


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
