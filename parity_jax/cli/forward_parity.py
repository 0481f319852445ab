"""End to end: our JAX Qwen forward against the HF oracle, and the first divergent stage.

  parity-forward-parity --model_dir=goldens/models/qwen3 \\
      --golden=goldens/forward/qwen3.safetensors [--dtype=bfloat16] [--plot=out.png] [--html=report.html]
  parity-forward-parity --model_dir=DIR --oracle --tokens="1,2,3;4,5,6"   # needs the [oracle] extra
  parity-forward-parity --reference_dir=ORIGINAL --model_dir=CONVERTED    # is my converted checkpoint the same model?
  parity-forward-parity --model_dir=DIR --oracle --decode_steps=8         # greedy decode against HF generate
  parity-forward-parity --model_dir=DIR --golden=G.safetensors --mesh=dp:2,tp:4   # weights sharded on 8 devices

(``python -m tools.forward_parity`` from the repository root is the same tool.)
Loads the checkpoint with parity_jax.qwen2, runs the tokens recorded in the
golden's metadata (or --tokens) with stage capture on, and compares every
stage against the golden: a file, HF transformers run on the spot on the same
checkpoint (--oracle), or HF run on the original checkpoint --reference_dir
while ours reads the converted --model_dir. --oracle answers "is my port
right" only: it loads the same weights into HF, so a corrupted weight passes
there by design; --golden and --reference_dir catch it. For mixture-of-experts
models every routing flip is classified (a tie of the reference, or a bug) and
the flipped tokens are replayed with the golden's experts. --decode_steps=N
compares N greedy decode steps with HF's generate and names the first
divergent step, then the first divergent stage at that step. --dtype=bfloat16
uses the bf16 profile. Exit 0: everything within tolerance; 1: something
diverges (the first divergent stage is named); 2: bad input (one line,
nothing written).
"""

from __future__ import annotations

from absl import flags

from parity_jax.cli import app

# The built-in profiles of parity_jax.bundles.tolerance, spelled out so that --help does not import the comparison
# stack (numpy, ml_dtypes); a test keeps the two lists equal.
PROFILE_NAMES = ("f32", "bf16", "exact")

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Checkpoint directory our forward runs (HF: config.json + *.safetensors)."
)
_GOLDEN = flags.DEFINE_string(
    "golden", None, "Golden stage bundle from the oracle (goldens/forward/NAME.safetensors); not with --oracle."
)
_ORACLE = flags.DEFINE_bool(
    "oracle",
    False,
    "Produce the golden on the spot with HF transformers on --model_dir itself (needs the [oracle] extra).",
)
_REFERENCE_DIR = flags.DEFINE_string(
    "reference_dir",
    None,
    "Original HF checkpoint: HF runs it, our forward runs the converted --model_dir (needs the [oracle] extra).",
)
_TOKENS = flags.DEFINE_string(
    "tokens",
    None,
    "Token ids '1,2,3' (rows separated by ';'); default: the golden's recorded inputs, or 2 rows of 16 seeded ids.",
)
_MASK = flags.DEFINE_string("attention_mask", None, "0/1 padding mask in the layout of --tokens.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Our weight and activation dtype.")
_PROFILE = flags.DEFINE_enum(
    "profile", None, list(PROFILE_NAMES), "Tolerance profile (default: f32, or bf16 with --dtype=bfloat16)."
)
_PROFILE_JSON = flags.DEFINE_string(
    "profile_json", None, "Tolerance profile JSON (schema parity_jax.tolerance_profile/1)."
)
_DECODE_STEPS = flags.DEFINE_integer(
    "decode_steps",
    None,
    "Compare N greedy decode steps (KV cache) with HF generate instead of one forward; needs --oracle or "
    "--reference_dir.",
    lower_bound=1,
)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Largest divergences kept per stage.", lower_bound=0)
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "text table or the JSON report.")
_PLOT = flags.DEFINE_string("plot", None, "Write the layer x stage heatmap PNG here (needs matplotlib).")
_HTML = flags.DEFINE_string("html", None, "Write the report as a standalone HTML page here (.html).")
_FAILING_ONLY = flags.DEFINE_bool("failing_only", False, "Text format: only stages over tolerance.")
_SAVE_CANDIDATE = flags.DEFINE_string("save_candidate", None, "Also write our stage bundle here (.safetensors).")
_SAVE_GOLDEN = flags.DEFINE_string(
    "save_golden", None, "With --oracle or --reference_dir: also write HF's stage bundle here."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files (--plot, --html, --save_*).")
_STRICT = flags.DEFINE_bool("strict", True, "Refuse checkpoints holding tensors the model does not use.")
_PROGRESS = flags.DEFINE_bool(
    "progress",
    True,
    "Progress of the stage comparison on stderr (a bar on a terminal, a line every few seconds otherwise).",
)
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "Load the weights sharded on a device mesh, e.g. dp:2,tp:4 or data:2,model:4 (with --shard_rules). Needs that "
    "many devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N).",
)
_SHARD_RULES = flags.DEFINE_string(
    "shard_rules",
    None,
    "Logical-axis rules before the defaults, e.g. kv_heads=none (replicate) or batch=data,heads=model; axes: batch, "
    "vocab, heads, kv_heads, head_dim, hidden, intermediate, experts, moe_intermediate.",
)


def _check_flags() -> None:
  from parity_jax.errors import UsageError

  app.require(_MODEL_DIR)
  sources = [f"--{f.name}" for f in (_GOLDEN, _ORACLE, _REFERENCE_DIR) if f.value]
  if not sources:
    raise UsageError("give --golden=FILE, --oracle (HF on --model_dir) or --reference_dir=ORIGINAL")
  if len(sources) == 2:
    raise UsageError(f"give {sources[0]} or {sources[1]}, not both (each is a golden source)")
  if len(sources) > 2:
    raise UsageError(f"give one of {' / '.join(sources)}, not several (each is a golden source)")
  if _PROFILE.value and _PROFILE_JSON.value:
    raise UsageError("give --profile or --profile_json, not both")
  if _SAVE_GOLDEN.value and not (_ORACLE.value or _REFERENCE_DIR.value):
    raise UsageError("--save_golden needs --oracle or --reference_dir (a --golden file is already saved)")
  if _MASK.value and not _TOKENS.value:
    raise UsageError("--attention_mask needs --tokens")
  if _SHARD_RULES.value and not _MESH.value:
    raise UsageError("--shard_rules needs --mesh")
  if _DECODE_STEPS.value is not None:
    if _GOLDEN.value:
      raise UsageError("--decode_steps needs the live oracle (--oracle or --reference_dir), not a --golden file")
    for flag in (_SAVE_CANDIDATE, _SAVE_GOLDEN, _PLOT):
      if flag.value:
        raise UsageError(f"--{flag.name} is for one forward, not with --decode_steps")


def _check_outputs() -> None:
  from parity_jax.files import check_output_path

  inputs = [p for p in (_MODEL_DIR.value, _GOLDEN.value, _REFERENCE_DIR.value) if p]
  for flag in (_SAVE_CANDIDATE, _SAVE_GOLDEN):
    if flag.value:
      check_output_path(flag.value, inputs, f"--{flag.name}", suffix=".safetensors", overwrite=_OVERWRITE.value)
  if _PLOT.value:
    from parity_jax.bundles.plot import require_matplotlib

    require_matplotlib()
    check_output_path(_PLOT.value, inputs, "--plot", suffix=".png", overwrite=_OVERWRITE.value)
  if _HTML.value:
    check_output_path(_HTML.value, inputs, "--html", suffix=".html", overwrite=_OVERWRITE.value)


def main(argv):
  del argv
  import sys

  from parity_jax.bundles import load_profile_json
  from parity_jax.bundles.compare import OneSidedStagesError
  from parity_jax.errors import UsageError
  from parity_jax.qwen2 import decode_parity, forward_parity, make_mesh, parse_axis_rules

  _check_flags()
  _check_outputs()
  profile = load_profile_json(_PROFILE_JSON.value) if _PROFILE_JSON.value else _PROFILE.value
  tokens = app.parse_int_rows(_TOKENS.value, "tokens") if _TOKENS.value else None
  mask = app.parse_int_rows(_MASK.value, "attention_mask") if _MASK.value else None
  axis_rules = parse_axis_rules(_SHARD_RULES.value) if _SHARD_RULES.value else None
  mesh = make_mesh(_MESH.value) if _MESH.value else None
  common = dict(
      tokens=tokens,
      attention_mask=mask,
      dtype=_DTYPE.value,
      profile=profile,
      top_k=_TOP_K.value,
      strict=_STRICT.value,
      mesh=mesh,
      axis_rules=axis_rules,
      progress=_PROGRESS.value,
  )
  json_mode = _FORMAT.value == "json"
  golden_name = _GOLDEN.value or (
      f"HF on the reference {_REFERENCE_DIR.value}" if _REFERENCE_DIR.value else "the live HF oracle"
  )
  try:
    if _DECODE_STEPS.value is not None:
      result = decode_parity(_MODEL_DIR.value, steps=_DECODE_STEPS.value, reference_dir=_REFERENCE_DIR.value, **common)
    else:
      result = forward_parity(
          _MODEL_DIR.value, _GOLDEN.value, oracle=_ORACLE.value, reference_dir=_REFERENCE_DIR.value, **common
      )
  except OneSidedStagesError as e:
    raise UsageError(f"stages present on one side only ({e.where}): is the golden from another model?") from None
  notes = getattr(result, "sharding_notes", ())
  for note in notes:
    print(f"sharding: {note}", file=sys.stderr if json_mode else sys.stdout)
  if _SAVE_CANDIDATE.value:
    result.candidate.save(_SAVE_CANDIDATE.value)
  if _SAVE_GOLDEN.value:
    result.golden.save(_SAVE_GOLDEN.value)
  if _PLOT.value:
    result.report.plot(_PLOT.value)
  if _HTML.value:
    result.write_html(_HTML.value, title=f"parity-forward-parity: {_MODEL_DIR.value}")
  if json_mode:
    print(result.to_json())
  else:
    b, t = result.tokens.shape
    print(
        f"model {_MODEL_DIR.value} ({_DTYPE.value}) vs {golden_name}; tokens of shape [{b}, {t}]"
        f"{', padded' if result.attention_mask is not None else ''}"
    )
    print(result.text(failing_only=_FAILING_ONLY.value))
  app.print_written([(f.name, f.value) for f in (_SAVE_CANDIDATE, _SAVE_GOLDEN, _PLOT, _HTML)], json_mode=json_mode)
  return result.exit_code


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
