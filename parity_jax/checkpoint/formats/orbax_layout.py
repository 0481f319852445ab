"""Where an Orbax checkpoint keeps its PyTree item, and how its storage must be read (files and metadata only).

Accepted layouts, on either side of a migration (tested with checkpoints written
by orbax-checkpoint 0.5.10, 0.6.4, 0.10.2 and the current release):

* ``v0``: a PyTree item directory written by ``ocp.PyTreeCheckpointer().save``
  or ``StandardCheckpointer`` (``_METADATA`` at the top).
* ``v1``: a checkpoint written by ``ocp.v1.save`` or ``ocp.v1.partial.save`` +
  ``finalize`` (one PyTree checkpointable, normally ``state/``).
* ``step``: a ``CheckpointManager`` step directory holding exactly one item.
  orbax >= 0.6 marks a step directory with ``_CHECKPOINT_METADATA``; orbax 0.5
  wrote no marker at all, so an unmarked directory whose name is a step
  (``12``, ``checkpoint_12``) and which holds only item directories is taken
  as a step directory too.

Anything else (missing path, a file, a directory without an item, several
items, an unfinished orbax temporary directory, a ``CheckpointManager`` root,
a layout of another library such as a flax msgpack checkpoint) is a
:class:`~parity_jax.errors.UsageError` with one line that says what was found
and what to pass instead.

**How the storage is read** is decided from the checkpoint's own metadata, the
way current orbax decides when it restores (see
``tests/data/orbax_legacy/FINDINGS.md`` for the evidence):

* OCDBT or one directory per leaf: ``_METADATA["use_ocdbt"]`` when present
  (orbax >= 0.11.31 writes it), else OCDBT iff ``<item>/manifest.ocdbt`` exists.
* zarr3 or zarr v2: ``_METADATA["use_zarr3"]`` (absent = zarr v2).
* A storage chunk missing on disk (:data:`MISSING_CHUNK_RULE`): an error
  (the leaf is UNREADABLE) when the writer stored every chunk, i.e. when
  ``_METADATA["store_array_data_equal_to_fill_value"]`` is true (orbax >=
  0.10.0 always writes it so), when the metadata shows a writer that new
  (``use_ocdbt`` recorded: orbax >= 0.11.31), or for a zarr v2 leaf whose
  ``fill_value`` is null (tensorstore then writes every chunk, zeros
  included). Otherwise (orbax < 0.10, zarr3) the writer left out chunks equal
  to the fill value, and a missing chunk *is* that value: it is read as the
  fill value, exactly as orbax restores it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from parity_jax.errors import UsageError
from parity_jax.stores import Store, StoreError, is_remote, open_store

__all__ = ["COMMIT_MARKER", "MISSING_CHUNK_RULE", "SUPPORTED", "Tree", "decide_layout", "locate", "resolve_item_dir"]

PYTREE_METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
OCDBT_MANIFEST = "manifest.ocdbt"
_TMP_MARKERS = (".orbax-checkpoint-tmp", ".partial_save", ".migrating-")
_ARRAY_TYPES = {"np.ndarray", "jax.Array"}
_STEP_NAME = re.compile(r"(\w+_)?\d+")
_FILL_FLAG = "store_array_data_equal_to_fill_value"

SUPPORTED = (
    "supported: Orbax PyTree checkpoints, orbax >= 0.5 (PyTree/Standard dir, ocp.v1, CheckpointManager step dir),"
    " HF safetensors dirs"
)

MISSING_CHUNK_RULE = (
    "a storage chunk missing on disk is an error when the writer stored every chunk"
    f" (_METADATA {_FILL_FLAG}: true, orbax >= 0.10; use_ocdbt recorded, orbax >= 0.11.31; or zarr v2 with"
    " fill_value null), else it is the fill value, as orbax < 0.10 left out chunks equal to it"
)


COMMIT_MARKER = "commit_success.txt"  # orbax's CommitFileTemporaryPath: written last, marks a finished checkpoint


class Tree:
  """The names under a checkpoint path, read through its :class:`~parity_jax.stores.Store`.

  Local disk: plain directory scans, one directory at a time, as asked. A
  bucket: one listing of every object below the path (a bucket has no
  directories to scan), answered from memory after that. ``rel`` arguments are
  ``/``-separated paths relative to the root ("" is the root itself).
  """

  def __init__(self, store: Store):
    self.store = store
    self.remote = is_remote(store)
    self._keys: list[str] | None = None
    self._is_object: bool | None = None

  @property
  def url(self) -> str:
    return self.store.url

  def join(self, *rel: str) -> str:
    """The URL (bucket) or absolute path (local) of ``rel`` below the root."""
    parts = [r for r in rel if r]
    return self.store.child(*parts).url if parts else self.store.url

  def at(self, rel: str) -> Store:
    return self.store.child(rel) if rel else self.store

  def _all(self) -> list[str]:
    if self._keys is None:
      self._keys = self.store.walk()
    return self._keys

  def _below(self, rel: str) -> list[str]:
    p = rel.rstrip("/") + "/" if rel else ""
    return [k[len(p) :] for k in self._all() if k.startswith(p)]

  def exists(self, rel: str = "") -> bool:
    if not self.remote:
      return os.path.exists(self.join(rel))
    return self.is_dir(rel) or self.is_file(rel)  # the listing first: a bucket's object probe is a round trip

  def is_dir(self, rel: str = "") -> bool:
    if not self.remote:
      return os.path.isdir(self.join(rel))
    return bool(self._below(rel))

  def is_file(self, rel: str = "") -> bool:
    if not self.remote:
      return os.path.isfile(self.join(rel))
    if not rel:
      if self._is_object is None:
        self._is_object = self.store.is_file()
      return self._is_object
    return rel in self._all()

  def files(self, rel: str = "") -> list[str]:
    if not self.remote:
      try:
        return sorted(e.name for e in os.scandir(self.join(rel)) if e.is_file())
      except OSError:
        return []
    return sorted(k for k in self._below(rel) if "/" not in k)

  def subdirs(self, rel: str = "") -> list[str]:
    if not self.remote:
      try:
        return sorted(e.name for e in os.scandir(self.join(rel)) if e.is_dir())
      except OSError:
        return []
    return sorted({k.split("/", 1)[0] for k in self._below(rel) if "/" in k})

  def head(self, rel: str = "", n: int = 64) -> bytes:
    """The first ``n`` bytes of a file (fewer when it is shorter; b"" when it cannot be read)."""
    if not self.remote:
      try:
        with open(self.join(rel), "rb") as f:
          return f.read(n)
      except OSError:
        return b""
    obj = self.at(rel)
    try:
      return obj.read_range(0, n)
    except StoreError as e:
      if e.kind != "out_of_range":
        return b""
    try:
      return obj.read_bytes()[:n]
    except StoreError:
      return b""

  def read_bytes(self, rel: str) -> bytes:
    """A whole file; a one-line StoreError (a UsageError) when it cannot be read."""
    return self.at(rel).read_bytes()


def _rel(*parts: str) -> str:
  return "/".join(p for p in parts if p)


def _is_item_dir(tree: Tree, d: str) -> bool:
  return tree.is_file(_rel(d, PYTREE_METADATA))


def _is_msgpack_map(head: bytes) -> bool:
  return bool(head) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


def _foreign_file(tree: Tree) -> str | None:
  """What the root file is, when it is a checkpoint format of another library (None: not recognised)."""
  name = tree.store.name
  low = name.lower()
  head = tree.head()
  if _is_msgpack_map(head) and (low.startswith("checkpoint") or low.endswith(".msgpack")):
    return "a flax msgpack checkpoint file"
  if low.endswith(".safetensors"):
    return "a safetensors file"
  if low.endswith((".pt", ".pth", ".bin", ".ckpt")) and head.startswith(b"PK"):
    return "a PyTorch checkpoint file"
  if low.endswith(".npz"):
    return "a NumPy .npz archive"
  if low.endswith(".npy"):
    return "a NumPy .npy file"
  if head.startswith(b"\x89HDF"):
    return "an HDF5 file (Keras / h5py)"
  if low.endswith(".index") or low.endswith(".data-00000-of-00001"):
    return "a TensorFlow checkpoint file"
  if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
    return "a Python pickle file"
  return None


def _foreign_dir(tree: Tree) -> str | None:
  """What a directory without any Orbax PyTree item is, when it is recognisably something else."""
  files = tree.files()
  if "checkpoint" in files and _is_msgpack_map(tree.head("checkpoint")):
    return "a pre-_METADATA Orbax/flax checkpoint (a msgpack 'checkpoint' file)"
  flax = [f for f in files if re.fullmatch(r"checkpoint_\d+", f) and _is_msgpack_map(tree.head(f))]
  if flax:
    return f"a directory of flax msgpack checkpoints (e.g. {flax[-1]})"
  if "checkpoint" in files and any(f.endswith(".index") for f in files):
    return "a TensorFlow checkpoint directory"
  if any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files):
    return "a safetensors / Hugging Face model directory"
  if any(f in ("pytorch_model.bin", "pytorch_model.bin.index.json") for f in files):
    return "a PyTorch / Hugging Face model directory"
  if ".zarray" in files or "zarr.json" in files:
    return "a bare zarr array (no Orbax PyTree metadata)"
  if OCDBT_MANIFEST in files:
    return f"an OCDBT database without Orbax PyTree metadata ({PYTREE_METADATA})"
  return None


def _legacy_step_dir(tree: Tree, items: list[str]) -> bool:
  """An orbax 0.5 CheckpointManager step directory: a step-number name, nothing in it but item directories
  (and the commit marker orbax wrote there on GCS)."""
  files = [f for f in tree.files() if f != COMMIT_MARKER]
  return bool(_STEP_NAME.fullmatch(tree.store.name)) and bool(items) and not files


def _open_tree(path: str | os.PathLike | Store) -> Tree:
  if isinstance(path, Store):
    return Tree(path)
  if is_remote(path):
    return Tree(open_store(path))
  return Tree(open_store(os.path.abspath(os.fspath(path))))


def resolve_item_dir(path: str | os.PathLike | Store, role: str = "checkpoint") -> tuple[str, str]:
  """(item directory, layout) for a checkpoint path or bucket URL, or a one-line UsageError."""
  tree, item, layout = locate(path, role)
  return tree.join(item), layout


def locate(path: str | os.PathLike | Store, role: str = "checkpoint") -> tuple[Tree, str, str]:
  """(the checkpoint's :class:`Tree`, its item directory relative to the root, layout), or a one-line UsageError.

  On a bucket the checkpoint must also hold orbax's commit marker
  (:data:`COMMIT_MARKER`, see :func:`check_committed`).
  """
  tree = _open_tree(path)
  try:
    item, layout = _resolve(tree, role)
  except _NoItem:
    if tree.remote and not tree.is_file(COMMIT_MARKER):  # objects of an upload cut short before its metadata
      check_committed(tree, "", "", role)
    raise
  if tree.remote:
    check_committed(tree, item, layout, role)
  return tree, item, layout


def check_committed(tree: Tree, item: str, layout: str, role: str) -> None:
  """A bucket checkpoint without ``commit_success.txt`` is unfinished: a one-line UsageError.

  A bucket has no atomic rename, so orbax (``CommitFileTemporaryPath``, its
  default on ``gs://``) writes the checkpoint in place and the commit marker
  last, in the checkpoint directory (the step directory of a
  ``CheckpointManager``); our migrator does the same on ``gs://`` and
  ``s3://``. The marker is looked for in the path given and, for a PyTree item
  directory given directly, in the directory that holds it.
  """
  if tree.is_file(COMMIT_MARKER):
    return
  if layout == "v0" and not item:
    parent = tree.store.parent()
    if parent != tree.store and parent.child(COMMIT_MARKER).is_file():
      return
  raise UsageError(
      f"{role} is unfinished: no {COMMIT_MARKER} (orbax's commit marker, written last on a bucket) in {tree.url}"
      " -- an interrupted or still running save or migration"
  )


def _resolve(tree: Tree, role: str) -> tuple[str, str]:
  path = tree.url
  if not tree.exists():
    raise UsageError(f"{role} does not exist: {path}")
  if not tree.is_dir():
    what = _foreign_file(tree)
    if what:
      raise UsageError(f"{role} is not an Orbax checkpoint but {what}; {SUPPORTED}: {path}")
    raise UsageError(f"{role} is not a directory: {path}")
  base = tree.store.name
  if any(m in base for m in _TMP_MARKERS):
    raise UsageError(f"{role} is an unfinished temporary checkpoint directory (interrupted save?): {path}")
  if _is_item_dir(tree, ""):
    return "", "v0"
  subdirs = tree.subdirs()
  items = [s for s in subdirs if _is_item_dir(tree, s)]
  is_container = any(tree.exists(f) for f in (CHECKPOINT_METADATA, "orbax.checkpoint"))
  if items and not is_container and not _legacy_step_dir(tree, items):
    raise UsageError(
        f"{role} is not an Orbax checkpoint but holds one or more ({', '.join(items)});"
        f" pass it directly, e.g. {tree.join(items[0])}"
    )
  if len(items) == 1:
    is_v1 = tree.exists("orbax.checkpoint")
    return items[0], ("v1" if is_v1 else "step")
  if len(items) > 1:
    raise UsageError(
        f"{role} holds {len(items)} PyTree items ({', '.join(items)}); pass one of them, e.g. {tree.join(items[0])}"
    )
  steps = [s for s in subdirs if _STEP_NAME.fullmatch(s)]
  if steps and any(tree.subdirs(s) for s in steps):
    steps.sort(key=lambda s: int(re.sub(r"\D", "", s) or 0))
    raise UsageError(
        f"{role} looks like a CheckpointManager directory (steps {', '.join(steps[:5])}"
        f"{', ...' if len(steps) > 5 else ''}); pass one step directory, e.g. {tree.join(steps[-1])}"
    )
  pending = [s for s in subdirs if any(m in s for m in _TMP_MARKERS)]
  if pending:
    raise UsageError(f"{role} holds only an unfinished checkpoint ({pending[0]}): {path}")
  what = _foreign_dir(tree)
  if what:
    raise UsageError(f"{role} is not an Orbax checkpoint but {what}; {SUPPORTED}: {path}")
  raise _NoItem(
      f"{role} is not an Orbax checkpoint (no {PYTREE_METADATA} in it or in one item below it); {SUPPORTED}: {path}"
  )


class _NoItem(UsageError):
  """A directory with no PyTree item and nothing else recognisable in it."""


def _recorded_orbax_version(tree: Tree, item: str) -> str | None:
  """The writer's orbax version where a writer recorded it (our migrator's provenance), else None."""
  parent = item.rsplit("/", 1)[0] if "/" in item else ""
  for d in dict.fromkeys(["", parent]):
    rel = _rel(d, CHECKPOINT_METADATA)
    if not tree.is_file(rel):
      continue
    try:
      meta = json.loads(tree.read_bytes(rel))
      v = meta["custom_metadata"]["parity_jax_migration"]["provenance"]["versions"]["orbax-checkpoint"]
    except (UsageError, ValueError, KeyError, TypeError):
      continue
    if isinstance(v, str):
      return v
  return None


def decide_layout(
    raw: dict[str, Any], tree: Tree | str | os.PathLike, item: str | os.PathLike, layout: str
) -> tuple[bool, bool, bool, dict[str, Any]]:
  """(use_ocdbt, use_zarr3, strict, facts) from ``_METADATA`` and the directory, the way orbax decides.

  ``tree``/``item``: the checkpoint's :class:`Tree` and the item directory relative to it; or, as before
  the stores, the item directory and the checkpoint path (local paths or URLs).
  """
  if not isinstance(tree, Tree):
    item_dir, path = tree, item
    tree = _open_tree(path)
    item_store = _open_tree(item_dir).store
    if item_store != tree.store and not item_store.is_inside(tree.store):
      raise UsageError(f"item directory {item_dir} is not inside {path}")
    item = item_store.url[len(tree.store.url) :].strip("/")
  path, item_dir = tree.url, tree.join(item)
  manifest = tree.is_file(_rel(item, OCDBT_MANIFEST))
  if "use_ocdbt" in raw:
    use_ocdbt = bool(raw["use_ocdbt"])
    ocdbt_by = f"_METADATA use_ocdbt: {str(use_ocdbt).lower()}"
  else:
    use_ocdbt = manifest
    ocdbt_by = f"no use_ocdbt in _METADATA; {OCDBT_MANIFEST} {'present' if manifest else 'absent'}"
  use_zarr3 = bool(raw.get("use_zarr3", False))
  flag = raw.get(_FILL_FLAG)
  if flag is not None:
    strict = bool(flag)
    why = f"_METADATA {_FILL_FLAG}: {str(strict).lower()}"
  elif "use_ocdbt" in raw:
    strict, why = (
        True,
        f"no {_FILL_FLAG}, but use_ocdbt is recorded: written by orbax >= 0.11.31, which stores every chunk",
    )
  else:
    strict, why = (
        False,
        f"no {_FILL_FLAG} in _METADATA: written by orbax < 0.10, which left out chunks equal to the fill value",
    )
  if "use_ocdbt" in raw:
    hint, evidence = ">= 0.11.31", "use_ocdbt in _METADATA"
  elif flag is not None:
    hint, evidence = ">= 0.10.0, < 0.11.31", f"{_FILL_FLAG} but no use_ocdbt in _METADATA"
  else:
    hint, evidence = "< 0.10.0", f"neither use_ocdbt nor {_FILL_FLAG} in _METADATA"
  version = _recorded_orbax_version(tree, item)
  container = {"v0": "PyTree item directory", "v1": "ocp.v1 checkpoint (orbax.checkpoint marker)"}.get(layout)
  if container is None:
    marked = tree.exists(CHECKPOINT_METADATA)
    container = "CheckpointManager step directory" + (
        "" if marked else " without _CHECKPOINT_METADATA (orbax 0.5; recognised by its step-number name)"
    )
  facts = {
      "path": path,
      "item_dir": item_dir,
      "layout": layout,
      "container": container,
      "orbax_version": version,
      "orbax_version_hint": None if version else f"orbax {hint}",
      "orbax_version_evidence": ("recorded by parity_jax's migrator in _CHECKPOINT_METADATA" if version else evidence),
      "ocdbt": use_ocdbt,
      "ocdbt_decided_by": ocdbt_by,
      "zarr_format": 3 if use_zarr3 else 2,
      "zarr_decided_by": f"_METADATA use_zarr3: {str(use_zarr3).lower()}"
      if "use_zarr3" in raw
      else "no use_zarr3 in _METADATA: zarr v2",
      "missing_chunks": "error" if strict else "fill value",
      "missing_chunks_decided_by": why,
      "missing_chunk_rule": MISSING_CHUNK_RULE,
  }
  return use_ocdbt, use_zarr3, strict, facts
