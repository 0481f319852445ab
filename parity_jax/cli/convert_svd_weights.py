"""Converts a PyTorch ``svd_weights.pt`` into an SVF components safetensors file.

  parity-convert-svd-weights --svd_weights=path/to/svd_weights.pt --out_dir=tmp/components

(``python -m tools.convert_svd_weights`` from the repository root is the same tool.)
The ``.pt`` holds a flat mapping ``<source_name>.U``, ``<source_name>.S``,
``<source_name>.V`` -> tensors (legacy ``torch.svd`` layout: V is ``[n, k]``;
pass ``--layout=vh`` when the file holds Vh). Writes
``<out_dir>/svf_components.safetensors`` with the same keys, bytes and dtypes,
plus provenance (source path and sha256), and prints its path. Loading is
``torch.load(..., weights_only=True)``: no code in the file is executed. Needs
the ``[oracle]`` extra (torch); without it, one line and exit 2. An existing
output is replaced only with --overwrite.
"""

from __future__ import annotations

from absl import flags

from parity_jax.cli import app

_IN = flags.DEFINE_string("svd_weights", None, "The PyTorch svd_weights.pt (keys <name>.U/.S/.V).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory for svf_components.safetensors (created if missing).")
_PREFIX = flags.DEFINE_string("prefix", "", "File name prefix, e.g. 'trinity_' for trinity_svf_components.safetensors.")
_LAYOUT = flags.DEFINE_enum("layout", "torch_v", ["torch_v", "vh"], "How V is stored in the .pt.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing components file.")


def main(argv):
  del argv
  from parity_jax.oracle.svd_weights import convert_svd_weights

  app.require(_IN, _OUT_DIR)
  print(convert_svd_weights(_IN.value, _OUT_DIR.value, _LAYOUT.value, _PREFIX.value, overwrite=_OVERWRITE.value))
  return 0


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
