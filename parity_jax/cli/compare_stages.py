"""Compare two stage bundles stage by stage and name the first divergent stage.

  parity-compare-stages --golden=A.safetensors --candidate=B.safetensors \\
      [--profile=f32|bf16|exact | --profile_json=FILE] [--top_k=5] [--format=text|json] \\
      [--plot=out.png] [--html=report.html] [--stages=REGEX] [--allow_missing] [--failing_only]

(``python -m tools.compare_stages`` from the repository root is the same tool.)
Inputs are stage bundles (parity_jax/bundles/format.py), plain safetensors or
.npz. Stages are compared in execution order (stage_order metadata, else
inferred for Qwen names) with the statistics of parity_jax.compare; the verdict
names the first divergent stage and whether it is a jump or accumulated drift
(rule: parity_jax/bundles/verdict.py). Exit 0: every stage within tolerance;
1: something diverges; 2: bad input (one-line error, nothing written).
"""

from __future__ import annotations

import os

from absl import flags

from parity_jax.bundles import BUILTIN_PROFILES
from parity_jax.cli import app

_GOLDEN = flags.DEFINE_string("golden", None, "Reference stage bundle (.safetensors or .npz).")
_CANDIDATE = flags.DEFINE_string("candidate", None, "Stage bundle under test (.safetensors or .npz).")
_PROFILE = flags.DEFINE_enum("profile", "f32", list(BUILTIN_PROFILES), "Built-in tolerance profile.")
_PROFILE_JSON = flags.DEFINE_string(
    "profile_json", None, "Tolerance profile JSON (schema parity_jax.tolerance_profile/1); replaces --profile."
)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Largest divergences kept per stage.", lower_bound=0)
_FORMAT = flags.DEFINE_enum(
    "format", "text", ["text", "json"], "text: a table for people; json: the report for batch jobs."
)
_PLOT = flags.DEFINE_string(
    "plot",
    None,
    "Write a PNG: layer x stage heatmap of log10 rel-L2 and the error along the stage order (needs matplotlib).",
)
_HTML = flags.DEFINE_string("html", None, "Also write the report as a standalone HTML page (the notebook view).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --plot or --html.")
_STAGES = flags.DEFINE_string(
    "stages", None, "Only compare stages whose name matches this regular expression (re.search)."
)
_ALLOW_MISSING = flags.DEFINE_bool(
    "allow_missing", False, "Compare the common stages when some exist on one side only (they are listed)."
)
_FAILING_ONLY = flags.DEFINE_bool(
    "failing_only", False, "Text format: show only stages over tolerance (and the first divergent one)."
)
_PROGRESS = flags.DEFINE_bool(
    "progress", True, "Progress on stderr (a bar on a terminal, a line every few seconds otherwise)."
)


def main(argv):
  del argv
  from parity_jax.bundles import compare_bundles, load_profile_json
  from parity_jax.bundles.compare import OneSidedStagesError
  from parity_jax.errors import UsageError
  from parity_jax.files import check_output_path

  app.require(_GOLDEN, _CANDIDATE)
  if _PROFILE_JSON.value is not None:
    if flags.FLAGS["profile"].present:
      raise UsageError('give --profile or --profile_json, not both (a profile JSON can say "extends": "f32")')
    profile = load_profile_json(_PROFILE_JSON.value)
  else:
    profile = BUILTIN_PROFILES[_PROFILE.value]
  inputs = [_GOLDEN.value, _CANDIDATE.value, _PROFILE_JSON.value]
  if _PLOT.value:
    from parity_jax.bundles.plot import require_matplotlib

    require_matplotlib()
    check_output_path(_PLOT.value, inputs, "--plot", suffix=".png", overwrite=_OVERWRITE.value)
  if _HTML.value:
    check_output_path(_HTML.value, inputs, "--html", overwrite=_OVERWRITE.value)
    if _PLOT.value and os.path.realpath(_PLOT.value) == os.path.realpath(_HTML.value):
      raise UsageError("--plot and --html name the same file")
  try:
    report = compare_bundles(
        _GOLDEN.value,
        _CANDIDATE.value,
        profile=profile,
        top_k=_TOP_K.value,
        stages=_STAGES.value,
        allow_missing=_ALLOW_MISSING.value,
        progress=_PROGRESS.value,
    )
  except OneSidedStagesError as e:
    raise e.hint("--allow_missing") from None
  if _PLOT.value:
    report.plot(_PLOT.value)
  if _HTML.value:
    report.write_html(
        _HTML.value, title=f"compare-stages: {os.path.basename(_GOLDEN.value)} vs {os.path.basename(_CANDIDATE.value)}"
    )
  if _FORMAT.value == "json":
    print(report.to_json())
  else:
    print(report.text(failing_only=_FAILING_ONLY.value))
  app.print_written([("plot", _PLOT.value), ("html", _HTML.value)], json_mode=_FORMAT.value == "json")
  return report.exit_code


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
