"""Replays a Python SVF run in JAX and judges parity, stage by stage and element by element.

  python -m tools.svf_parity --golden_dir=goldens/svf                        # the sample tensor
  python -m tools.svf_parity --golden_dir=goldens/svf --all_selected_tensors \\
      --selected_source_filter=model.layers.1. --stage_dir=out/svf_stages --out=out/svf_report.json
  python -m tools.svf_parity --python_report=tmp/sakana_parity/python_sample_trace.json \\
      --components_dir=tmp/sakana_parity/python_components --mode=bytes

Modes: ``stage_tolerances`` (every stage within its stated tolerance and every
differing final bf16 element an explained rounding tie; a different final hash
is reported, not failed) and ``bytes`` (additionally, identical final bf16
bytes). Unexplained elements fail in every mode. Prints a per-tensor table and
a verdict line; exit 0 PASS, 1 FAIL, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from parity_jax.errors import UsageError
from tools import _cli

_COMPONENTS = flags.DEFINE_string("components_dir", None, "Directory with *svf_components.safetensors and *svf_scale_offsets.safetensors (default: where the report says, else the report's directory).")
_REPORT = flags.DEFINE_string("python_report", None, "The Python run's report JSON (names its stage bundles).")
_GOLDEN = flags.DEFINE_string("golden_dir", None, "A directory holding svf_report.json and its bundles (instead of --python_report).")
_STAGE_DIR = flags.DEFINE_string("stage_dir", None, "Where to write our stage bundle (svf_stage_debug.safetensors or svf_all_selected_stage_debug.safetensors).")
_OUT = flags.DEFINE_string("out", None, "Where to write our report JSON.")
_ALL = flags.DEFINE_bool("all_selected_tensors", False, "Replay every tensor of the components file against the all-selected bundle.")
_FILTER = flags.DEFINE_string("selected_source_filter", None, "Only tensors whose source (or safe) name contains this string.")
_LAYOUT = flags.DEFINE_enum("layout", None, ["torch_v", "vh"], "How V is stored: torch_v (torch.svd's V, [n, k]) or vh ([k, n]). Default: the report's.")
_CHUNK_MB = flags.DEFINE_float("chunk_mb", 512.0, "Memory budget (MiB) per row chunk of U; 0 rebuilds every tensor whole.")
_MODE = flags.DEFINE_enum("mode", "stage_tolerances", ["stage_tolerances", "bytes"], "Verdict mode.")
_ROW_BLOCK = flags.DEFINE_integer("row_block", 8192, "Rows of U per matmul block; chunks are multiples of it.", lower_bound=1)
_COMPUTE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Compute dtype (bfloat16: the original Sakana variant).")
_EXPLAIN = flags.DEFINE_enum(
    "explain_rule", "bound", ["bound", "one_ulp"],
    "bound: a differing final element is explained when both bf16 values are correct roundings within the float32 error bound"
    " of the float64 reference (for 1-ULP pairs: the reference within the bound of the rounding midpoint). one_ulp: additionally exactly 1 ULP apart.",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bar on stderr.")


def _refuse_overwrite(inputs) -> None:
  out = _OUT.value
  if out and os.path.exists(out) and any(p and os.path.exists(p) and os.path.samefile(out, p) for p in inputs):
    raise UsageError(f"--out {out} would overwrite an input")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep stderr to the progress bar and errors
  from parity_jax.svf import replay  # after flag parsing: a bad flag should not pay for importing jax

  if _OUT.value and os.path.isdir(_OUT.value):
    raise UsageError(f"--out {_OUT.value} is a directory")
  report_in = _REPORT.value or (os.path.join(_GOLDEN.value, "svf_report.json") if _GOLDEN.value else None)
  _refuse_overwrite([report_in])
  result = replay(
      components_dir=_COMPONENTS.value,
      python_report=_REPORT.value,
      golden_dir=_GOLDEN.value,
      stage_dir=_STAGE_DIR.value,
      all_selected=_ALL.value,
      selected_source_filter=_FILTER.value,
      layout=_LAYOUT.value,
      chunk_mb=_CHUNK_MB.value,
      mode=_MODE.value,
      row_block=_ROW_BLOCK.value,
      compute_dtype=_COMPUTE.value,
      explain_rule=_EXPLAIN.value,
      show_progress=_PROGRESS.value,
  )
  rep = result.report
  _refuse_overwrite([rep["golden"]["bundle"], rep["components"]["components_file"], rep["components"]["offsets_file"]])
  print(result.table())
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    tmp = f"{_OUT.value}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(result.report, f, indent=1)
      f.write("\n")
    os.replace(tmp, _OUT.value)
    print(f"report: {_OUT.value}")
  print(result.verdict_line())
  return 0 if result.passed else 1


if __name__ == "__main__":
  _cli.run(main)
