"""Converts a PyTorch ``svd_weights.pt`` into an SVF components safetensors file.

  python -m tools.convert_svd_weights --svd_weights=path/to/svd_weights.pt --out_dir=tmp/components

The ``.pt`` holds a flat mapping ``<source_name>.U``, ``<source_name>.S``,
``<source_name>.V`` -> tensors (legacy ``torch.svd`` layout: V is ``[n, k]``;
pass ``--layout=vh`` when the file holds Vh). Writes
``<out_dir>/svf_components.safetensors`` with the same keys, bytes and dtypes,
plus provenance (source path and sha256). Loading is ``torch.load(...,
weights_only=True)``: no code in the file is executed. Needs the ``[oracle]``
extra (torch); without it, one line and exit 2. Never overwrites.
"""

from __future__ import annotations

import os

from absl import flags

from parity_jax.errors import UsageError
from parity_jax.oracle import require_oracle
from tools import _cli

_IN = flags.DEFINE_string("svd_weights", None, "The PyTorch svd_weights.pt (keys <name>.U/.S/.V).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory for svf_components.safetensors.")
_PREFIX = flags.DEFINE_string("prefix", "", "File name prefix, e.g. 'trinity_' for trinity_svf_components.safetensors.")
_LAYOUT = flags.DEFINE_enum("layout", "torch_v", ["torch_v", "vh"], "How V is stored in the .pt.")


def convert(svd_weights: str, out_dir: str, layout: str = "torch_v", prefix: str = "") -> str:
  """Library entry point of the tool; returns the path written."""
  require_oracle()
  import torch

  from parity_jax import stages
  from parity_jax.oracle.svf_goldens import to_numpy
  from parity_jax.provenance import file_sha256
  from parity_jax.svf import io
  from parity_jax.svf.core import validate_components

  if not os.path.isfile(svd_weights):
    raise UsageError(f"no such file: {svd_weights}")
  try:
    data = torch.load(svd_weights, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt or unsafe files
    raise UsageError(f"cannot load {svd_weights} with torch.load(weights_only=True): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
    raise UsageError(f"{svd_weights}: expected a flat dict of '<name>.U/.S/.V' tensors")
  names = sorted({k[:-2] for k in data if k[-2:] in (".U", ".S", ".V")})
  stray = [k for k in data if k[-2:] not in (".U", ".S", ".V")]
  if not names:
    raise UsageError(f"{svd_weights}: no '<name>.U/.S/.V' keys")
  if stray:
    raise UsageError(f"{svd_weights}: unexpected keys {stray[:3]} (expected only '<name>.U/.S/.V')")
  components = {}
  for name in names:
    parts = [data.get(f"{name}.{p}") for p in "USV"]
    if any(p is None for p in parts):
      missing = [p for p, t in zip("USV", parts) if t is None]
      raise UsageError(f"{svd_weights}: {name} has no .{'/.'.join(missing)}")
    if any(not p.is_floating_point() for p in parts):
      raise UsageError(f"{svd_weights}: {name} components must be floating point")
    u, s, v = parts
    validate_components(u.shape, s.shape, v.shape, s.shape, layout, name)
    components[name] = tuple(to_numpy(p) for p in parts)
  out_path = os.path.join(out_dir, prefix + io.COMPONENTS_SUFFIX)
  if os.path.exists(out_path):
    raise UsageError(f"refusing to overwrite {out_path}")
  prov = stages.default_provenance(
      "tools.convert_svd_weights", source=os.path.abspath(svd_weights), source_sha256=file_sha256(svd_weights), layout=layout
  )
  io.write_components(out_dir, components, None, prov, prefix=prefix)
  return out_path


def main(argv):
  del argv
  if not _IN.value or not _OUT_DIR.value:
    raise UsageError("--svd_weights and --out_dir are required")
  path = convert(_IN.value, _OUT_DIR.value, _LAYOUT.value, _PREFIX.value)
  print(path)
  return 0


if __name__ == "__main__":
  _cli.run(main)
