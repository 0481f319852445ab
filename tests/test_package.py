"""parity_jax/__init__.py: the subpackages load on first attribute access; anything else is an AttributeError."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib


def test_subpackages_load_lazily_and_unknown_names_are_attribute_errors():
  # a fresh interpreter: what "import parity_jax" alone loads, and what an attribute access adds
  code = (
      "import sys, parity_jax\n"
      "print('parity_jax.bundles' in sys.modules)\n"
      "print(parity_jax.bundles.__name__)\n"
      "print(hasattr(parity_jax, 'no_such_module'), hasattr(parity_jax, '_private'), hasattr(parity_jax, '__x__'))\n"
      "print(parity_jax.__version__)\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
  assert out[:3] == ["False", "parity_jax.bundles", "False False False"], out
  with open(pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
    assert out[3] == tomllib.load(f)["project"]["version"]
