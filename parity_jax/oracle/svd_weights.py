"""A PyTorch ``svd_weights.pt`` (``<name>.U/.S/.V`` tensors) as an SVF components safetensors file.

Loading is ``torch.load(..., weights_only=True)``: no code in the file runs.
The components keep their keys, bytes and dtypes; the provenance records the
source path and its sha256. Needs torch (the ``[oracle]`` extra).
"""

from __future__ import annotations

import os

from parity_jax.errors import UsageError, first_line
from parity_jax.files import check_output_dir, file_sha256
from parity_jax.oracle import require_oracle, to_numpy
from parity_jax.provenance import default_provenance

__all__ = ["convert_svd_weights"]

_PARTS = (".U", ".S", ".V")


def _load(svd_weights: str):
  import torch

  if not os.path.isfile(svd_weights):
    raise UsageError(f"no such file: {svd_weights}")
  with open(svd_weights, "rb") as f:
    head = f.read(4)
  if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip archive, or a legacy pickle
    raise UsageError(
        f"{svd_weights} is not a PyTorch file (torch.save writes a zip archive or a pickle;"
        f" this starts with {head!r})"
    )
  try:
    data = torch.load(svd_weights, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt, foreign or unsafe files
    raise UsageError(
        f"cannot load {svd_weights} as a PyTorch file with torch.load(weights_only=True): {first_line(e)}"
    ) from None
  if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
    raise UsageError(f"{svd_weights}: expected a flat dict of '<name>.U/.S/.V' tensors, got {type(data).__name__}")
  return data


def convert_svd_weights(
    svd_weights: str | os.PathLike,
    out_dir: str | os.PathLike,
    layout: str = "torch_v",
    prefix: str = "",
    overwrite: bool = False,
) -> str:
  """Writes ``<out_dir>/<prefix>svf_components.safetensors`` from the ``.pt``; returns its path."""
  require_oracle()
  from parity_jax.svf import io
  from parity_jax.svf.core import validate_components

  svd_weights, out_dir = os.fspath(svd_weights), os.fspath(out_dir)
  out_name = prefix + io.COMPONENTS_SUFFIX
  check_output_dir(out_dir, [svd_weights], "out_dir", overwrite=overwrite, will_write=[out_name])
  data = _load(svd_weights)
  names = sorted({k[:-2] for k in data if k[-2:] in _PARTS})
  stray = [k for k in data if k[-2:] not in _PARTS]
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
  prov = default_provenance(
      "parity_jax.oracle.svd_weights",
      source=os.path.abspath(svd_weights),
      source_sha256=file_sha256(svd_weights),
      layout=layout,
  )
  io.write_components(out_dir, components, None, prov, prefix=prefix, overwrite=overwrite)
  return os.path.join(out_dir, out_name)
