"""End to end: our JAX Qwen forward against the HF oracle, and the first divergent stage.

  parity-forward-parity --model_dir=goldens/models/qwen3 \\
      --golden=goldens/forward/qwen3.safetensors [--dtype=bfloat16] [--plot=out.png]
  parity-forward-parity --model_dir=DIR --oracle --tokens="1,2,3;4,5,6"   # needs the [oracle] extra
  parity-forward-parity --model_dir=DIR --golden=G.safetensors --mesh=dp:2,tp:4   # weights sharded on 8 devices

(``python -m tools.forward_parity`` from the repository root is the same tool.)
Loads the HF checkpoint with parity_jax.qwen2, runs the tokens recorded in the
golden's metadata (or --tokens) with stage capture on, and compares every
stage against the golden (or, with --oracle, against HF transformers run on
the spot in float32). --dtype=bfloat16 uses the bf16 profile. Exit 0: every
stage within tolerance; 1: something diverges (the first divergent stage is
named); 2: bad input (one line, nothing written).
"""

from __future__ import annotations

from absl import flags

from parity_jax.bundles import BUILTIN_PROFILES
from parity_jax.cli import app

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "HF checkpoint directory (config.json + *.safetensors).")
_GOLDEN = flags.DEFINE_string(
    "golden", None, "Golden stage bundle from the oracle (goldens/forward/NAME.safetensors); not with --oracle."
)
_ORACLE = flags.DEFINE_bool(
    "oracle",
    False,
    "Produce the golden on the spot with HF transformers (needs the [oracle] extra); not with --golden.",
)
_TOKENS = flags.DEFINE_string(
    "tokens", None, "Token ids '1,2,3' (rows separated by ';'); default: the golden's recorded inputs."
)
_MASK = flags.DEFINE_string("attention_mask", None, "0/1 padding mask in the layout of --tokens.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Our weight and activation dtype.")
_PROFILE = flags.DEFINE_enum(
    "profile", None, list(BUILTIN_PROFILES), "Tolerance profile (default: f32, or bf16 with --dtype=bfloat16)."
)
_PROFILE_JSON = flags.DEFINE_string(
    "profile_json", None, "Tolerance profile JSON (schema parity_jax.tolerance_profile/1)."
)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Largest divergences kept per stage.", lower_bound=0)
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "text table or the JSON report.")
_PLOT = flags.DEFINE_string("plot", None, "Write the layer x stage heatmap PNG here (needs matplotlib).")
_FAILING_ONLY = flags.DEFINE_bool("failing_only", False, "Text format: only stages over tolerance.")
_SAVE_CANDIDATE = flags.DEFINE_string("save_candidate", None, "Also write our stage bundle here (.safetensors).")
_SAVE_GOLDEN = flags.DEFINE_string("save_golden", None, "With --oracle: also write the oracle's stage bundle here.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing --plot / --save_candidate / --save_golden files.")
_STRICT = flags.DEFINE_bool("strict", True, "Refuse checkpoints holding tensors the model does not use.")
_PROGRESS = flags.DEFINE_bool(
    "progress",
    True,
    "Progress of the stage comparison on stderr (a bar on a terminal, a line every few seconds otherwise).",
)
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "Load the weights sharded on a device mesh, e.g. dp:2,tp:4 (batch over dp; heads, MLP columns and vocab over tp). Needs that many devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N).",
)


def _check_flags() -> None:
  from parity_jax.errors import UsageError

  app.require(_MODEL_DIR)
  if _GOLDEN.value is None and not _ORACLE.value:
    raise UsageError("give --golden=FILE, or --oracle to run HF transformers on the spot")
  if _GOLDEN.value is not None and _ORACLE.value:
    raise UsageError("give --golden or --oracle, not both (--oracle makes the golden on the spot)")
  if _PROFILE.value and _PROFILE_JSON.value:
    raise UsageError("give --profile or --profile_json, not both")
  if _SAVE_GOLDEN.value and not _ORACLE.value:
    raise UsageError("--save_golden needs --oracle (a --golden file is already saved)")
  if _MASK.value and not _TOKENS.value:
    raise UsageError("--attention_mask needs --tokens")


def _check_outputs() -> None:
  from parity_jax.files import check_output_path

  inputs = [p for p in (_MODEL_DIR.value, _GOLDEN.value) if p]
  for flag in (_SAVE_CANDIDATE, _SAVE_GOLDEN):
    if flag.value:
      check_output_path(flag.value, inputs, f"--{flag.name}", suffix=".safetensors", overwrite=_OVERWRITE.value)
  if _PLOT.value:
    from parity_jax.bundles.plot import require_matplotlib

    require_matplotlib()
    check_output_path(_PLOT.value, inputs, "--plot", suffix=".png", overwrite=_OVERWRITE.value)


def main(argv):
  del argv
  from parity_jax.bundles import load_profile_json
  from parity_jax.bundles.compare import OneSidedStagesError
  from parity_jax.errors import UsageError
  from parity_jax.qwen2 import forward_parity, make_mesh

  _check_flags()
  _check_outputs()
  profile = load_profile_json(_PROFILE_JSON.value) if _PROFILE_JSON.value else _PROFILE.value
  tokens = app.parse_int_rows(_TOKENS.value, "tokens") if _TOKENS.value else None
  mask = app.parse_int_rows(_MASK.value, "attention_mask") if _MASK.value else None
  mesh = make_mesh(_MESH.value) if _MESH.value else None
  try:
    result = forward_parity(
        _MODEL_DIR.value,
        _GOLDEN.value,
        oracle=_ORACLE.value,
        tokens=tokens,
        attention_mask=mask,
        dtype=_DTYPE.value,
        profile=profile,
        top_k=_TOP_K.value,
        strict=_STRICT.value,
        mesh=mesh,
        progress=_PROGRESS.value,
    )
  except OneSidedStagesError as e:
    raise UsageError(f"stages present on one side only ({e.where}): is the golden from another model?") from None
  if _SAVE_CANDIDATE.value:
    result.candidate.save(_SAVE_CANDIDATE.value)
  if _SAVE_GOLDEN.value:
    result.golden.save(_SAVE_GOLDEN.value)
  if _PLOT.value:
    result.report.plot(_PLOT.value)
  if _FORMAT.value == "json":
    print(result.to_json())
  else:
    b, t = result.tokens.shape
    print(
        f"model {_MODEL_DIR.value} ({_DTYPE.value}) vs "
        f"{'the live HF oracle' if _ORACLE.value else _GOLDEN.value}; tokens of shape [{b}, {t}]"
        f"{', padded' if result.attention_mask is not None else ''}"
    )
    print(result.text(failing_only=_FAILING_ONLY.value))
  app.print_written(
      [(f.name, f.value) for f in (_SAVE_CANDIDATE, _SAVE_GOLDEN, _PLOT)], json_mode=_FORMAT.value == "json"
  )
  return result.exit_code


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
