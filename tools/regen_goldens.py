"""Regenerates goldens from the independent oracle (HF transformers + torch, CPU).

  python -m tools.regen_goldens --what=forward   # goldens/models + goldens/forward
  python -m tools.regen_goldens --what=svf       # goldens/svf
  python -m tools.regen_goldens --what=all

Needs the [oracle] extra. Each area writes a MANIFEST.json with seeds, inputs,
library versions and the sha256 of every file it wrote.
"""

from __future__ import annotations

import importlib

from absl import flags

from parity_jax.oracle import require_oracle
from tools import _cli

_WHAT = flags.DEFINE_enum("what", "all", ["forward", "svf", "all"], "Which goldens to regenerate.")
_OUT = flags.DEFINE_string("goldens_dir", "goldens", "Root of the goldens tree.")

_AREAS = {"forward": "parity_jax.oracle.forward_goldens", "svf": "parity_jax.oracle.svf_goldens"}


def main(argv):
  del argv
  require_oracle()
  areas = list(_AREAS) if _WHAT.value == "all" else [_WHAT.value]
  for area in areas:
    module = importlib.import_module(_AREAS[area])
    for path in module.regenerate(_OUT.value):
      print(path)
  return 0


if __name__ == "__main__":
  _cli.run(main)
