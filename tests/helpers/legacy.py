"""The committed checkpoints written by old orbax releases (tests/data/orbax_legacy), and their expected.json.

Every expected value here comes from ``expected.json``, written by the old
release's own generator from the values it saved (never from a restore, never
from parity_jax).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil

import numpy as np

from tests.helpers.ckpt import REPO

LEGACY = REPO / "tests" / "data" / "orbax_legacy"
RELEASES = ("0.5.10", "0.6.4", "0.10.2")


@dataclasses.dataclass(frozen=True)
class Leaf:
  path: str
  dtype: str
  shape: tuple[int, ...]
  sha256: str


@dataclasses.dataclass(frozen=True)
class Fixture:
  release: str
  name: str
  dir: pathlib.Path
  checkpoint: pathlib.Path  # what a user passes to a tool
  items: dict[str, tuple[pathlib.Path, tuple[Leaf, ...]]]  # item name -> (item dir, leaves)
  options: dict

  @property
  def id(self) -> str:
    return f"{self.release}/{self.name}"

  @property
  def leaves(self) -> tuple[Leaf, ...]:
    """The leaves of the checkpoint a tool opens (the only item, for every fixture but two_items)."""
    (only,) = self.items.values()
    return only[1]

  def item_names(self) -> list[str]:
    return sorted(self.items)


def load(fixture_dir: pathlib.Path) -> Fixture:
  ex = json.loads((fixture_dir / "expected.json").read_text())
  items = {}
  for name, item in ex["items"].items():
    leaves = tuple(Leaf("/".join(l["keys"]), l["dtype"], tuple(l["shape"]), l["sha256"]) for l in item["leaves"])
    items[name] = (fixture_dir / item["item_dir"], leaves)
  return Fixture(
      ex["versions"]["orbax-checkpoint"],
      fixture_dir.name,
      fixture_dir,
      fixture_dir / ex["checkpoint_path"],
      items,
      ex["options"],
  )


def all_fixtures() -> list[Fixture]:
  return [load(p.parent) for p in sorted(LEGACY.glob("orbax-*/*/expected.json"))]


def copy_checkpoint(fx: Fixture, dest: pathlib.Path) -> pathlib.Path:
  """A writable copy of the fixture's checkpoint (the committed files stay read-only inputs)."""
  shutil.copytree(fx.checkpoint, dest)
  return dest


def sha256_of(a) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()
