"""Regenerates goldens from the independent oracle (HF transformers + torch, CPU).

  parity-regen-goldens --goldens_dir=goldens --what=forward --overwrite   # goldens/models + goldens/forward
  parity-regen-goldens --goldens_dir=goldens --what=svf --overwrite       # goldens/svf
  parity-regen-goldens --goldens_dir=/tmp/fresh --what=all                # a fresh tree, e.g. to compare

(``python -m tools.regen_goldens`` from the repository root is the same tool.)
Needs the [oracle] extra. Each area writes a MANIFEST.json with seeds, inputs,
library versions, the backend and the sha256 of every file it wrote, and the
paths written are printed.
"""

from __future__ import annotations

import importlib

from absl import flags

from parity_jax.cli import app

_WHAT = flags.DEFINE_enum("what", "all", ["forward", "svf", "all"], "Which goldens to regenerate.")
_OUT = flags.DEFINE_string(
    "goldens_dir", None, "Root of the goldens tree (the repository's goldens/ directory, or a new one)."
)

_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace the goldens already in --goldens_dir (the areas regenerated)."
)

_AREAS = {"forward": "parity_jax.oracle.forward_goldens", "svf": "parity_jax.oracle.svf_goldens"}
_WRITES = {"forward": ("models", "forward"), "svf": ("svf",)}


def main(argv):
  del argv
  from parity_jax.files import check_output_dir
  from parity_jax.oracle import quiet_transformers, require_oracle

  app.require(_OUT)
  areas = list(_AREAS) if _WHAT.value == "all" else [_WHAT.value]
  check_output_dir(
      _OUT.value, (), "--goldens_dir", overwrite=_OVERWRITE.value, will_write=[d for a in areas for d in _WRITES[a]]
  )
  require_oracle()
  for area in areas:
    module = importlib.import_module(_AREAS[area])
    with quiet_transformers():  # our output is the paths written, not transformers' "Writing model shards" bars
      written = module.regenerate(_OUT.value)
    for path in written:
      print(path)
  return 0


run = app.entry(main, __doc__, __name__)

if __name__ == "__main__":
  run()
