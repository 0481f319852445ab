"""Replays a Python SVF run in JAX and judges parity, stage by stage and element by element.

  parity-svf-parity --golden_dir=goldens/svf                        # the sample tensor
  parity-svf-parity --golden_dir=goldens/svf --all_selected_tensors \\
      --selected_source_filter=model.layers.1. --stage_dir=out/svf_stages --out=out/svf_report.json
  parity-svf-parity --python_report=tmp/sakana_parity/python_sample_trace.json \\
      --components_dir=tmp/sakana_parity/python_components --mode=bytes
  parity-svf-parity --golden_dir=DIR --all_selected_tensors --devices=8   # tensors spread over 8 devices

(``python -m tools.svf_parity`` from the repository root is the same tool.)

Modes: ``stage_tolerances`` (every stage within its stated tolerance and every
differing final bf16 element an explained rounding tie; a different final hash
is reported, not failed) and ``bytes`` (additionally, identical final bf16
bytes). Unexplained elements fail in every mode. Prints a per-tensor table and
a verdict line; exit 0 PASS, 1 FAIL, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import os

from absl import flags

from parity_jax.cli import app

_COMPONENTS = flags.DEFINE_string(
    "components_dir",
    None,
    "Directory with *svf_components.safetensors and *svf_scale_offsets.safetensors (default: where the report says, else the report's directory).",
)
_REPORT = flags.DEFINE_string("python_report", None, "The Python run's report JSON (names its stage bundles).")
_GOLDEN = flags.DEFINE_string(
    "golden_dir", None, "A directory holding svf_report.json and its bundles (instead of --python_report)."
)
_STAGE_DIR = flags.DEFINE_string(
    "stage_dir",
    None,
    "Where to write our stage bundle (svf_stage_debug.safetensors or svf_all_selected_stage_debug.safetensors).",
)
_OUT = flags.DEFINE_string("out", None, "Where to write our report JSON.")
_ALL = flags.DEFINE_bool(
    "all_selected_tensors", False, "Replay every tensor of the components file against the all-selected bundle."
)
_FILTER = flags.DEFINE_string(
    "selected_source_filter", None, "Only tensors whose source (or safe) name contains this string."
)
_LAYOUT = flags.DEFINE_enum(
    "layout",
    None,
    ["torch_v", "vh"],
    "How V is stored: torch_v (torch.svd's V, [n, k]) or vh ([k, n]). Default: the report's.",
)
_CHUNK_MB = flags.DEFINE_float(
    "chunk_mb", 512.0, "Memory budget (MiB) per row chunk of U; 0 rebuilds every tensor whole.", lower_bound=0
)
_MODE = flags.DEFINE_enum("mode", "stage_tolerances", ["stage_tolerances", "bytes"], "Verdict mode.")
_ROW_BLOCK = flags.DEFINE_integer(
    "row_block", 8192, "Rows of U per matmul block; chunks are multiples of it.", lower_bound=1  # no mutate: a speed default (goldens pass at 16 and 32)
)
_COMPUTE = flags.DEFINE_enum(
    "compute_dtype", "float32", ["float32", "bfloat16"], "Compute dtype (bfloat16: the original Sakana variant)."
)
_EXPLAIN = flags.DEFINE_enum(
    "explain_rule",
    "bound",
    ["bound", "one_ulp"],
    "bound: a differing final element is explained when both bf16 values are correct roundings within the float32 error bound"
    " of the float64 reference (for 1-ULP pairs: the reference within the bound of the rounding midpoint). one_ulp: additionally exactly 1 ULP apart.",
)
_PROGRESS = flags.DEFINE_bool(
    "progress", True, "Progress on stderr (a bar on a terminal, a line every few seconds otherwise)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out report or our bundle in --stage_dir.")
_DEVICES = flags.DEFINE_integer(
    "devices",
    0,
    "With --all_selected_tensors: spread the tensors over this many devices, balanced by FLOPs (0: every device JAX sees, across processes under jax.distributed). The report is the single-device one.",
    lower_bound=0,
)
# jax.distributed: each process replays the tensors of its own devices; process 0 prints and writes the report
_DIST = app.distributed_flags(__name__)


def main(argv):
  del argv
  from parity_jax.errors import UsageError
  from parity_jax.files import check_output_path
  from parity_jax.svf import replay  # after flag parsing: a bad flag should not pay for importing jax

  dist = _DIST()
  if dist.requested:
    from parity_jax import runtime

    runtime.initialize(dist)
  if (_REPORT.value is None) == (_GOLDEN.value is None):
    raise UsageError("give exactly one of --python_report and --golden_dir")
  if _OUT.value:
    inputs = [
        _REPORT.value,
        _GOLDEN.value,
        _COMPONENTS.value,
        os.path.dirname(os.path.abspath(_REPORT.value)) if _REPORT.value else None,
    ]
    check_output_path(_OUT.value, inputs, "--out", overwrite=_OVERWRITE.value)
  result = replay(
      components_dir=_COMPONENTS.value,
      python_report=_REPORT.value,
      golden_dir=_GOLDEN.value,
      stage_dir=_STAGE_DIR.value,
      peer_timeout_s=dist.timeout_s,
      all_selected=_ALL.value,
      selected_source_filter=_FILTER.value,
      layout=_LAYOUT.value,
      chunk_mb=_CHUNK_MB.value,
      mode=_MODE.value,
      row_block=_ROW_BLOCK.value,
      compute_dtype=_COMPUTE.value,
      explain_rule=_EXPLAIN.value,
      progress=_PROGRESS.value,
      overwrite=_OVERWRITE.value,
      devices=_DEVICES.value,
  )
  import jax

  if jax.process_index() != 0:  # process 0 speaks for the run
    return result.exit_code
  print(result.table())
  if _OUT.value:
    print(f"report: {result.write_json(_OUT.value)}")
  ours = result.report["stage_debug"]
  for path in ours.values():
    if path:
      print(f"stages: {path}")
  print(result.verdict_line())
  return result.exit_code


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
