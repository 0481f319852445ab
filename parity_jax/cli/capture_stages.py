"""Runs the JAX Qwen2/Qwen3 forward pass and writes every stage to a bundle.

  parity-capture-stages --model_dir=DIR --tokens=1,2,3 --out=bundle.safetensors
  parity-capture-stages --model_dir=DIR --tokens="0,0,5,6;7,8,9,10" \\
      --attention_mask="0,0,1,1;1,1,1,1" --dtype=bfloat16 --out=b.safetensors
  parity-capture-stages --model_dir=DIR --tokens="1,2;3,4" --mesh=dp:2,tp:4 --out=b.safetensors
  parity-capture-stages --model_dir=DIR --tokens="1,2;3,4" --mesh=data:2,model:4 \\
      --shard_rules=batch=data,heads=model,kv_heads=model,intermediate=model,vocab=model --out=b.safetensors

(``python -m tools.capture_stages`` from the repository root is the same tool.)
Rows of a batch are separated by ';'. The bundle holds the stages named by
parity_jax.bundles.qwen_graph in execution order (the MoE stages on sparse
layers), plus provenance (model, dtype, inputs, versions). On a mesh, each
placement the mesh forces (heads that do not divide: replicated) is printed as
one "sharding:" line. Bad input (missing dir, unsupported config, out-of-range
tokens, malformed or ragged --tokens, mask shape mismatch, an existing --out
without --overwrite) exits 2 with one line on stderr and writes nothing.
"""

from __future__ import annotations

from absl import flags

from parity_jax.cli import app

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "HF checkpoint directory (config.json + *.safetensors).")
_TOKENS = flags.DEFINE_string("tokens", None, "Token ids: '1,2,3', or rows separated by ';' for a batch.")
_MASK = flags.DEFINE_string("attention_mask", None, "Optional 0/1 padding mask, same layout as --tokens.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weight and activation dtype.")
_OUT = flags.DEFINE_string("out", None, "Output stage bundle (.safetensors).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
_STRICT = flags.DEFINE_bool("strict", True, "Refuse checkpoints holding tensors the model does not use.")
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "Load the weights sharded on a device mesh, e.g. dp:2,tp:4 (batch over dp; heads, MLP columns and vocab over tp). Needs that many devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N).",
)
_SHARD_RULES = flags.DEFINE_string(
    "shard_rules",
    None,
    "Logical-axis rules before the defaults, e.g. kv_heads=none (replicate) or batch=data,heads=model; axes: batch, "
    "vocab, heads, kv_heads, head_dim, hidden, intermediate, experts, moe_intermediate.",
)


def main(argv):
  del argv
  from parity_jax.errors import UsageError
  from parity_jax.qwen2 import capture_to_bundle, make_mesh, parse_axis_rules

  app.require(_MODEL_DIR, _TOKENS, _OUT)
  if _SHARD_RULES.value and not _MESH.value:
    raise UsageError("--shard_rules needs --mesh")
  tokens = app.parse_int_rows(_TOKENS.value, "tokens")
  mask = app.parse_int_rows(_MASK.value, "attention_mask") if _MASK.value else None
  axis_rules = parse_axis_rules(_SHARD_RULES.value) if _SHARD_RULES.value else None
  mesh = make_mesh(_MESH.value) if _MESH.value else None
  prov = capture_to_bundle(
      _MODEL_DIR.value,
      tokens,
      _OUT.value,
      dtype=_DTYPE.value,
      attention_mask=mask,
      strict=_STRICT.value,
      overwrite=_OVERWRITE.value,
      mesh=mesh,
      axis_rules=axis_rules,
  )
  for note in prov.get("sharding_notes", ()):
    print(f"sharding: {note}")
  b, t = tokens.shape
  on = f", on mesh {','.join(f'{k}:{v}' for k, v in prov['mesh'].items())}" if "mesh" in prov else ""
  print(
      f"wrote {_OUT.value}: model {prov['model']} ({prov['model_type']}), {_DTYPE.value}, tokens of shape [{b}, {t}]{on}"
  )
  return 0


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
