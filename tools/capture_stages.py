"""Runs the JAX Qwen2/Qwen3 forward pass and writes every stage to a bundle.

  python -m tools.capture_stages --model_dir=DIR --tokens=1,2,3 --out=bundle.safetensors
  python -m tools.capture_stages --model_dir=DIR --tokens="0,0,5,6;7,8,9,10" \
      --attention_mask="0,0,1,1;1,1,1,1" --dtype=bfloat16 --out=b.safetensors

Rows of a batch are separated by ';'. The bundle holds the stages named by
parity_jax.stage_names in execution order, plus provenance (model, dtype,
inputs, versions). Bad input (missing dir, unsupported config, out-of-range
tokens, malformed or ragged --tokens, mask shape mismatch) exits 2 with one
line on stderr and writes nothing.
"""

from __future__ import annotations

from absl import flags

from tools import _cli

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "HF checkpoint directory (config.json + *.safetensors).")
_TOKENS = flags.DEFINE_string("tokens", None, "Token ids: '1,2,3', or rows separated by ';' for a batch.")
_MASK = flags.DEFINE_string("attention_mask", None, "Optional 0/1 padding mask, same layout as --tokens.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weight and activation dtype.")
_OUT = flags.DEFINE_string("out", None, "Output stage bundle (.safetensors).")
_STRICT = flags.DEFINE_bool("strict", True, "Refuse checkpoints holding tensors the model does not use.")


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # no backend-probing INFO lines on stderr
  from parity_jax.errors import UsageError
  from parity_jax.qwen2.capture import capture_to_bundle, parse_int_rows

  for flag in (_MODEL_DIR, _TOKENS, _OUT):
    if not flag.value:
      raise UsageError(f"--{flag.name} is required")
  tokens = parse_int_rows(_TOKENS.value, "tokens")
  mask = parse_int_rows(_MASK.value, "attention_mask") if _MASK.value else None
  prov = capture_to_bundle(_MODEL_DIR.value, tokens, _OUT.value, dtype=_DTYPE.value, attention_mask=mask,
                           strict=_STRICT.value)
  b, t = tokens.shape
  print(f"wrote {_OUT.value}: model {prov['model']} ({prov['model_type']}), {_DTYPE.value}, tokens [{b}, {t}]")
  return 0


if __name__ == "__main__":
  _cli.run(main)
