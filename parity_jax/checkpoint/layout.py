"""Finding the PyTree item of an Orbax checkpoint and reading its metadata (no array data).

Accepted layouts, on either side of a migration:

* ``v0``: a PyTree item directory written by ``ocp.PyTreeCheckpointer().save``
  or ``StandardCheckpointer`` (``_METADATA`` at the top).
* ``v1``: a checkpoint written by ``ocp.v1.save`` or ``ocp.v1.partial.save`` +
  ``finalize`` (one PyTree checkpointable, normally ``state/``).
* ``step``: a ``CheckpointManager`` step directory holding exactly one item.

Anything else (missing path, a file, a directory without an item, several
items, an unfinished orbax temporary directory, a ``CheckpointManager`` root)
is a :class:`~parity_jax.errors.UsageError` with one line that says what was
found and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np

from parity_jax.checkpoint import keypath
from parity_jax.checkpoint.tstore import quiet_orbax, raw_chunks, read_context
from parity_jax.errors import UsageError, first_line

__all__ = ["Checkpoint", "LeafMeta", "open_checkpoint", "resolve_item_dir"]

PYTREE_METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
_TMP_MARKERS = (".orbax-checkpoint-tmp", ".partial_save", ".migrating-")
_ARRAY_TYPES = {"np.ndarray", "jax.Array"}


@dataclasses.dataclass(frozen=True)
class LeafMeta:
  """Metadata of one stored leaf; enough to plan, never the values."""

  path: str
  keys: tuple[str, ...]
  kind: str  # "array" | "scalar" | "string"
  shape: tuple[int, ...]
  dtype: np.dtype | None  # None for strings
  chunk_shape: tuple[int, ...] | None  # storage chunk shape; None = unknown/one chunk
  storage_name: str  # orbax's name for the leaf in the item's key-value store
  value_type: str
  error: str | None = None  # set when the leaf's array metadata cannot be read (damaged files)
  raw_chunks: bool = False  # chunks stored uncompressed: any sub-box can be read without decoding a chunk

  @property
  def nbytes(self) -> int:
    if self.dtype is None:
      return 0
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize if self.shape else self.dtype.itemsize

  @property
  def streamable(self) -> bool:
    """Read directly from tensorstore (arrays and numeric scalars); strings go through orbax."""
    return self.kind in ("array", "scalar") and self.error is None


@dataclasses.dataclass
class Checkpoint:
  """An opened (metadata only) Orbax checkpoint."""

  path: str  # as given, made absolute
  item_dir: str
  layout: str  # "v0" | "v1" | "step"
  use_ocdbt: bool
  use_zarr3: bool
  leaves: dict[str, LeafMeta]
  empty_nodes: list[str]
  _metadata_tree: Any = None

  @property
  def metadata_tree(self) -> Any:
    """orbax's own metadata tree (the template for PLACEHOLDER restores), read on first use."""
    if self._metadata_tree is None:
      import orbax.checkpoint as ocp
      from etils import epath

      try:
        with quiet_orbax():
          self._metadata_tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.item_dir)).tree
      except Exception as e:
        raise UsageError(f"{self.path}: cannot read checkpoint metadata: {first_line(e)}") from None
    return self._metadata_tree

  def unreadable(self) -> dict[str, str]:
    """Leaves whose array metadata could not be read, with the reason."""
    return {p: m.error for p, m in self.leaves.items() if m.error}

  @property
  def nbytes(self) -> int:
    return sum(m.nbytes for m in self.leaves.values())

  def describe(self) -> str:
    return f"{self.layout} checkpoint, {len(self.leaves)} leaves, {self.nbytes / 2**20:.1f} MiB"


def _is_item_dir(d: str) -> bool:
  return os.path.isfile(os.path.join(d, PYTREE_METADATA))


def _subdirs(d: str) -> list[str]:
  try:
    return sorted(e.name for e in os.scandir(d) if e.is_dir())
  except OSError:
    return []


def resolve_item_dir(path: str, role: str = "checkpoint") -> tuple[str, str]:
  """(item directory, layout) for a checkpoint path, or a one-line UsageError."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise UsageError(f"{role} does not exist: {path}")
  if not os.path.isdir(path):
    raise UsageError(f"{role} is not a directory: {path}")
  base = os.path.basename(path.rstrip("/"))
  if any(m in base for m in _TMP_MARKERS):
    raise UsageError(f"{role} is an unfinished temporary checkpoint directory (interrupted save?): {path}")
  if _is_item_dir(path):
    return path, "v0"
  items = [s for s in _subdirs(path) if _is_item_dir(os.path.join(path, s))]
  is_container = any(os.path.exists(os.path.join(path, f)) for f in (CHECKPOINT_METADATA, "orbax.checkpoint"))
  if items and not is_container:
    raise UsageError(
        f"{role} is not an Orbax checkpoint but holds one or more ({', '.join(items)});"
        f" pass it directly, e.g. {os.path.join(path, items[0])}"
    )
  if len(items) == 1:
    is_v1 = os.path.exists(os.path.join(path, "orbax.checkpoint"))
    return os.path.join(path, items[0]), ("v1" if is_v1 else "step")
  if len(items) > 1:
    raise UsageError(
        f"{role} holds {len(items)} PyTree items ({', '.join(items)}); pass one of them,"
        f" e.g. {os.path.join(path, items[0])}"
    )
  steps = [s for s in _subdirs(path) if re.fullmatch(r"(\w+_)?\d+", s)]
  if steps and any(_subdirs(os.path.join(path, s)) for s in steps):
    steps.sort(key=lambda s: int(re.sub(r"\D", "", s) or 0))
    raise UsageError(
        f"{role} looks like a CheckpointManager directory (steps {', '.join(steps[:5])}"
        f"{', ...' if len(steps) > 5 else ''}); pass one step directory, e.g. {os.path.join(path, steps[-1])}"
    )
  pending = [s for s in _subdirs(path) if any(m in s for m in _TMP_MARKERS)]
  if pending:
    raise UsageError(f"{role} holds only an unfinished checkpoint ({pending[0]}): {path}")
  raise UsageError(f"{role} is not an Orbax checkpoint (no {PYTREE_METADATA} in it or in one item below it): {path}")


def open_checkpoint(path: str | os.PathLike, role: str = "checkpoint") -> Checkpoint:
  """Resolves ``path`` and reads its tree metadata (shapes, dtypes, chunking); no array data.

  The leaf list comes from the item's ``_METADATA``; each array's shape,
  dtype and chunk shape from its zarr metadata, opened read-only with
  tensorstore (all leaves at once, synchronously: no event loop is left
  behind when a file is damaged). A leaf whose array metadata cannot be
  read keeps ``error`` set instead of failing the whole checkpoint, so the
  verifier can name it.
  """
  path = os.path.abspath(os.fspath(path))
  item_dir, layout = resolve_item_dir(path, role)
  try:
    with open(os.path.join(item_dir, PYTREE_METADATA), encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise UsageError(f"{role} {path}: cannot read {PYTREE_METADATA}: {first_line(e)}") from None
  if not isinstance(raw, dict) or not isinstance(raw.get("tree_metadata"), dict):
    raise UsageError(f"{role} {path}: {PYTREE_METADATA} has no tree_metadata (not a PyTree checkpoint?)")
  use_ocdbt = bool(raw.get("use_ocdbt", True))
  use_zarr3 = bool(raw.get("use_zarr3", False))

  entries: list[tuple[tuple[str, ...], str]] = []
  empty_nodes: list[str] = []
  problems = []
  for entry in raw["tree_metadata"].values():
    try:
      keys = tuple(str(k["key"]) for k in entry.get("key_metadata", []))
      vt = str(entry.get("value_metadata", {}).get("value_type", ""))
    except (AttributeError, KeyError, TypeError):
      raise UsageError(f"{role} {path}: malformed entry in {PYTREE_METADATA}") from None
    if vt in _ARRAY_TYPES or vt in ("scalar", "string"):
      bad = [k for k in keys if "/" in k or k == ""]
      if bad:
        problems.append(f"key {bad[0]!r} in {keys} is empty or contains '/', which leaf paths cannot express")
      entries.append((keys, vt))
    else:
      empty_nodes.append(keypath.join(keys))
  if problems:
    raise UsageError(f"{role} {path}: " + "; ".join(problems[:5]))
  entries.sort(key=lambda e: e[0])

  import tensorstore as ts
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu


  context = read_context(0)
  futures = {}
  for keys, vt in entries:
    if vt == "string":
      continue
    spec = tsu.ArrayReadSpec(item_dir, ".".join(keys), use_zarr3, use_ocdbt=use_ocdbt).json
    try:
      futures[keys] = ts.open(spec, open=True, read=True, write=False, context=context)
    except Exception as e:  # a spec tensorstore rejects outright
      futures[keys] = e
  leaves: dict[str, LeafMeta] = {}
  for keys, vt in entries:
    p = keypath.join(keys)
    name = ".".join(keys)
    if vt == "string":
      leaves[p] = LeafMeta(p, keys, "string", (), None, None, name, vt)
      continue
    kind = "scalar" if vt == "scalar" else "array"
    fut = futures[keys]
    try:
      if isinstance(fut, Exception):
        raise fut
      t = fut.result()
    except Exception as e:
      leaves[p] = LeafMeta(p, keys, kind, (), None, None, name, vt, error=first_line(e))
      continue
    chunk = t.chunk_layout.read_chunk.shape
    leaves[p] = LeafMeta(
        p, keys, kind, tuple(int(d) for d in t.shape), np.dtype(t.dtype.numpy_dtype),
        None if chunk is None else tuple(int(c) for c in chunk), name, vt, raw_chunks=raw_chunks(t),
    )
  return Checkpoint(path, item_dir, layout, use_ocdbt, use_zarr3, leaves, sorted(empty_nodes))
