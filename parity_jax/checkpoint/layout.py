"""Finding the PyTree item of an Orbax checkpoint and reading its metadata (no array data).

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

import dataclasses
import json
import math
import os
import re
from typing import Any

import numpy as np

from parity_jax.checkpoint import keypath
from parity_jax.checkpoint.tstore import codec_info, quiet_orbax, read_context
from parity_jax.errors import UsageError, first_line

__all__ = ["Checkpoint", "LeafMeta", "MISSING_CHUNK_RULE", "SUPPORTED", "open_checkpoint", "resolve_item_dir"]

PYTREE_METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
OCDBT_MANIFEST = "manifest.ocdbt"
_TMP_MARKERS = (".orbax-checkpoint-tmp", ".partial_save", ".migrating-")
_ARRAY_TYPES = {"np.ndarray", "jax.Array"}
_STEP_NAME = re.compile(r"(\w+_)?\d+")
_FILL_FLAG = "store_array_data_equal_to_fill_value"

SUPPORTED = (
    "supported: Orbax PyTree checkpoints, orbax >= 0.5 (PyTree/Standard checkpoint dir, ocp.v1 checkpoint,"
    " CheckpointManager step dir)"
)

MISSING_CHUNK_RULE = (
    "a storage chunk missing on disk is an error when the writer stored every chunk"
    f" (_METADATA {_FILL_FLAG}: true, orbax >= 0.10; use_ocdbt recorded, orbax >= 0.11.31; or zarr v2 with"
    " fill_value null), else it is the fill value, as orbax < 0.10 left out chunks equal to it"
)


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
  strict: bool = True  # a missing storage chunk is an error (else it reads as the fill value); see MISSING_CHUNK_RULE
  codec: str = ""  # the chunk compression ("none", "zstd", ...); "" for strings and unreadable leaves

  @property
  def nbytes(self) -> int:
    if self.dtype is None:
      return 0
    return math.prod(self.shape) * self.dtype.itemsize

  @property
  def streamable(self) -> bool:
    """Read directly from tensorstore (arrays and numeric scalars); strings go through orbax."""
    return self.kind in ("array", "scalar") and self.error is None

  @property
  def n_chunks(self) -> int:
    if not self.shape or self.chunk_shape is None:
      return 1
    return math.prod(-(-d // max(1, c)) for d, c in zip(self.shape, self.chunk_shape))


@dataclasses.dataclass
class Checkpoint:
  """An opened (metadata only) Orbax checkpoint.

  It keeps one tensorstore context (:func:`.tstore.read_context`) and the
  read-only handle of every array leaf opened in it when its metadata was
  read, so reading a small leaf opens nothing (:meth:`handle`); streaming a
  big leaf opens it in a private context (:meth:`open_leaf`). Context and
  handles are dropped when the checkpoint is pickled and reopened on first use.
  """

  path: str  # as given, made absolute
  item_dir: str
  layout: str  # "v0" | "v1" | "step"
  use_ocdbt: bool
  use_zarr3: bool
  leaves: dict[str, LeafMeta]
  empty_nodes: list[str]
  _metadata_tree: Any = None
  strict_chunks: bool = True  # the checkpoint-level missing-chunk rule (a zarr v2 leaf may still be strict)
  facts: dict[str, Any] = dataclasses.field(default_factory=dict)  # how the layout was decided (see storage_facts)
  _context: Any = dataclasses.field(default=None, repr=False)
  _handles: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_context"], state["_handles"] = None, {}
    return state

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

  # ---- reading ------------------------------------------------------------------------------

  @property
  def context(self):
    """The checkpoint's shared tensorstore context (no chunk cache, OCDBT node cache, memory-mapped reads)."""
    if self._context is None:
      self._context = read_context(0)
    return self._context

  def read_spec(self, leaf: LeafMeta) -> dict[str, Any]:
    """The tensorstore spec orbax itself builds to read ``leaf``, with the leaf's missing-chunk rule."""
    return _read_spec(self.item_dir, leaf.storage_name, self.use_zarr3, self.use_ocdbt, leaf.strict)

  def handle(self, leaf: LeafMeta):
    """The leaf's read-only tensorstore handle in the shared context (opened once, then reused)."""
    h = self._handles.get(leaf.path)
    if h is None:
      import tensorstore as ts

      h = ts.open(self.read_spec(leaf), open=True, read=True, write=False, context=self.context).result()
      self._handles[leaf.path] = h
    return h

  def open_leaf(self, leaf: LeafMeta, cache_bytes: int = 0):
    """A new read-only handle in a private context with a chunk cache of ``cache_bytes`` (0: none).

    Streaming a big leaf goes through a context of its own, as it always
    did: everything it maps or caches is released when the reader closes
    (measured: sharing one context across the big leaves of a run kept ~45
    MiB more resident). Small leaves use :meth:`handle` instead.
    """
    import tensorstore as ts

    return ts.open(
        self.read_spec(leaf), open=True, read=True, write=False, context=read_context(int(max(0, cache_bytes)))
    ).result()

  def storage_facts(self) -> dict[str, Any]:
    """What the reader used to read this checkpoint: the layout facts, and how each was decided.

    ``orbax_version`` is known only where a writer recorded it (our migrator
    does); ``orbax_version_hint`` is what the metadata implies. Per-leaf
    storage (compression, chunking, missing-chunk rule) is summarised in
    ``leaf_storage`` groups, each with a count and up to three example leaves.
    """
    groups: dict[str, dict[str, Any]] = {}
    for m in self.leaves.values():
      if m.kind == "string":
        key = "string (in _strings.json)"
      elif m.error:
        key = "unreadable metadata"
      else:
        n = m.n_chunks
        chunks = "1 chunk" if n == 1 else f"{n} chunks"
        key = (
            f"{m.codec or '?'}, {chunks}{', uncompressed boxes readable in place' if m.raw_chunks else ''},"
            f" missing chunk = {'error' if m.strict else 'fill value'}"
        )
      g = groups.setdefault(key, {"storage": key, "leaves": 0, "examples": []})
      g["leaves"] += 1
      if len(g["examples"]) < 3:
        g["examples"].append(m.path)
    return {**self.facts, "leaf_storage": sorted(groups.values(), key=lambda g: -g["leaves"])}

  def storage_summary(self) -> str:
    """One short line: OCDBT or not, zarr version, compression, missing-chunk rule, orbax version if known."""
    f = self.facts
    codecs = sorted({m.codec for m in self.leaves.values() if m.codec})
    ver = f.get("orbax_version") or f.get("orbax_version_hint") or "orbax version unknown"
    if f.get("orbax_version"):
      ver = f"orbax {ver}"
    return (
        f"{'OCDBT' if self.use_ocdbt else 'one directory per leaf'}, zarr {'3' if self.use_zarr3 else 'v2'},"
        f" {'/'.join(codecs) or 'no arrays'}; missing chunks: {f.get('missing_chunks', '?')}; {ver}"
    )


def _orbax_read_spec(item_dir: str, name: str, use_zarr3: bool, use_ocdbt: bool, strict: bool) -> dict[str, Any]:
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  return tsu.ArrayReadSpec(item_dir, name, use_zarr3, use_ocdbt=use_ocdbt, raise_array_data_missing_error=strict).json


_SENTINEL = "\ue000parity_jax_leaf\ue000"


def _substitute(obj: Any, name: str) -> Any:
  if isinstance(obj, str):
    return obj.replace(_SENTINEL, name) if _SENTINEL in obj else obj
  if isinstance(obj, dict):
    return {k: _substitute(v, name) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_substitute(v, name) for v in obj]
  return obj


_TEMPLATES: dict[tuple[str, bool, bool, bool], dict[str, Any] | None] = {}


def _read_spec(item_dir: str, name: str, use_zarr3: bool, use_ocdbt: bool, strict: bool) -> dict[str, Any]:
  """orbax's ``ArrayReadSpec(...).json`` for one leaf.

  Building it costs ~0.1 ms in orbax, which adds up over thousands of leaves,
  so orbax builds it once per item with a placeholder name that is then
  substituted; the first leaf checks that the substitution gives exactly
  orbax's spec (else orbax builds every spec).
  """
  key = (item_dir, use_zarr3, use_ocdbt, strict)
  if key not in _TEMPLATES:
    template = _orbax_read_spec(item_dir, _SENTINEL, use_zarr3, use_ocdbt, strict)
    exact = _substitute(template, name) == _orbax_read_spec(item_dir, name, use_zarr3, use_ocdbt, strict)
    if len(_TEMPLATES) > 64:
      _TEMPLATES.clear()
    _TEMPLATES[key] = template if exact and _SENTINEL in json.dumps(template, ensure_ascii=False) else None
  template = _TEMPLATES[key]
  if template is None:
    return _orbax_read_spec(item_dir, name, use_zarr3, use_ocdbt, strict)
  return _substitute(template, name)


def _is_item_dir(d: str) -> bool:
  return os.path.isfile(os.path.join(d, PYTREE_METADATA))


def _subdirs(d: str) -> list[str]:
  try:
    return sorted(e.name for e in os.scandir(d) if e.is_dir())
  except OSError:
    return []


def _files(d: str) -> list[str]:
  try:
    return sorted(e.name for e in os.scandir(d) if e.is_file())
  except OSError:
    return []


def _head(path: str, n: int = 64) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read(n)
  except OSError:
    return b""


def _is_msgpack_map(head: bytes) -> bool:
  return bool(head) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


def _foreign_file(path: str) -> str | None:
  """What a file is, when it is a checkpoint format of another library (None: not recognised)."""
  name = os.path.basename(path)
  low = name.lower()
  head = _head(path)
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


def _foreign_dir(path: str) -> str | None:
  """What a directory without any Orbax PyTree item is, when it is recognisably something else."""
  files = _files(path)
  if "checkpoint" in files and _is_msgpack_map(_head(os.path.join(path, "checkpoint"))):
    return "a pre-_METADATA Orbax/flax checkpoint (a msgpack 'checkpoint' file)"
  flax = [f for f in files if re.fullmatch(r"checkpoint_\d+", f) and _is_msgpack_map(_head(os.path.join(path, f)))]
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


def _legacy_step_dir(path: str, items: list[str]) -> bool:
  """An orbax 0.5 CheckpointManager step directory: a step-number name, nothing in it but item directories."""
  name = os.path.basename(path.rstrip("/"))
  return bool(_STEP_NAME.fullmatch(name)) and bool(items) and not _files(path)


def resolve_item_dir(path: str, role: str = "checkpoint") -> tuple[str, str]:
  """(item directory, layout) for a checkpoint path, or a one-line UsageError."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise UsageError(f"{role} does not exist: {path}")
  if not os.path.isdir(path):
    what = _foreign_file(path)
    if what:
      raise UsageError(f"{role} is not an Orbax checkpoint but {what}; {SUPPORTED}: {path}")
    raise UsageError(f"{role} is not a directory: {path}")
  base = os.path.basename(path.rstrip("/"))
  if any(m in base for m in _TMP_MARKERS):
    raise UsageError(f"{role} is an unfinished temporary checkpoint directory (interrupted save?): {path}")
  if _is_item_dir(path):
    return path, "v0"
  items = [s for s in _subdirs(path) if _is_item_dir(os.path.join(path, s))]
  is_container = any(os.path.exists(os.path.join(path, f)) for f in (CHECKPOINT_METADATA, "orbax.checkpoint"))
  if items and not is_container and not _legacy_step_dir(path, items):
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
  steps = [s for s in _subdirs(path) if _STEP_NAME.fullmatch(s)]
  if steps and any(_subdirs(os.path.join(path, s)) for s in steps):
    steps.sort(key=lambda s: int(re.sub(r"\D", "", s) or 0))
    raise UsageError(
        f"{role} looks like a CheckpointManager directory (steps {', '.join(steps[:5])}"
        f"{', ...' if len(steps) > 5 else ''}); pass one step directory, e.g. {os.path.join(path, steps[-1])}"
    )
  pending = [s for s in _subdirs(path) if any(m in s for m in _TMP_MARKERS)]
  if pending:
    raise UsageError(f"{role} holds only an unfinished checkpoint ({pending[0]}): {path}")
  what = _foreign_dir(path)
  if what:
    raise UsageError(f"{role} is not an Orbax checkpoint but {what}; {SUPPORTED}: {path}")
  raise UsageError(f"{role} is not an Orbax checkpoint (no {PYTREE_METADATA} in it or in one item below it): {path}")


def _recorded_orbax_version(path: str, item_dir: str) -> str | None:
  """The writer's orbax version where a writer recorded it (our migrator's provenance), else None."""
  for d in {path, os.path.dirname(item_dir)}:
    try:
      with open(os.path.join(d, CHECKPOINT_METADATA), encoding="utf-8") as f:
        meta = json.load(f)
      v = meta["custom_metadata"]["parity_jax_migration"]["provenance"]["versions"]["orbax-checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
      continue
    if isinstance(v, str):
      return v
  return None


def _decide_layout(
    raw: dict[str, Any], item_dir: str, path: str, layout: str
) -> tuple[bool, bool, bool, dict[str, Any]]:
  """(use_ocdbt, use_zarr3, strict, facts) from ``_METADATA`` and the directory, the way orbax decides."""
  manifest = os.path.exists(os.path.join(item_dir, OCDBT_MANIFEST))
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
  version = _recorded_orbax_version(path, item_dir)
  container = {"v0": "PyTree item directory", "v1": "ocp.v1 checkpoint (orbax.checkpoint marker)"}.get(layout)
  if container is None:
    marked = os.path.exists(os.path.join(path, CHECKPOINT_METADATA))
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


def open_checkpoint(path: str | os.PathLike, role: str = "checkpoint") -> Checkpoint:
  """Resolves ``path`` and reads its tree metadata (shapes, dtypes, chunking); no array data.

  The leaf list comes from the item's ``_METADATA``; each array's shape,
  dtype and chunk shape from its zarr metadata, opened read-only with
  tensorstore (all leaves at once in one shared context, synchronously: no
  event loop is left behind when a file is damaged). A leaf whose array
  metadata cannot be read keeps ``error`` set instead of failing the whole
  checkpoint, so the verifier can name it; so do two leaves that orbax stores
  under the same name (keys ``('a.b', 'c')`` and ``('a', 'b.c')`` both become
  ``a.b.c``), whose values cannot be told apart.
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
  use_ocdbt, use_zarr3, strict, facts = _decide_layout(raw, item_dir, path, layout)

  entries, empty_nodes = _tree_entries(raw["tree_metadata"], f"{role} {path}")
  collisions = _storage_collisions([k for k, _ in entries])

  context = read_context(0)
  names = [keys for keys, vt in entries if vt != "string" and keys not in collisions]
  opened = _open_all(item_dir, names, use_zarr3, use_ocdbt, strict, context)
  strict_keys = set()
  if not strict and not use_zarr3:
    # zarr v2 with fill_value null: tensorstore wrote every chunk (it has no fill value to leave out), so a
    # missing chunk is damage; reopen those leaves strictly.
    strict_keys = {k for k, t in opened.items() if not isinstance(t, Exception) and t.fill_value is None}
    opened.update(_open_all(item_dir, sorted(strict_keys), use_zarr3, use_ocdbt, True, context))

  leaves: dict[str, LeafMeta] = {}
  handles: dict[str, Any] = {}
  codecs = _CodecCache()
  for keys, vt in entries:
    p = keypath.join(keys)
    t = None if keys in collisions or vt == "string" else opened[keys]
    leaves[p] = _leaf_meta(keys, vt, t, collisions.get(keys), strict or keys in strict_keys, codecs)
    if leaves[p].error is None and t is not None:
      handles[p] = t
  if strict_keys:
    facts["missing_chunks"] = "error for zarr v2 leaves with fill_value null, else fill value"
    if len(strict_keys) == len(opened):
      facts["missing_chunks"] = "error"
    facts["missing_chunks_decided_by"] += (
        f"; {len(strict_keys)} zarr v2 leaf(s) have fill_value null, so their"
        " writer stored every chunk: missing chunks there are errors"
    )
  return Checkpoint(
      path,
      item_dir,
      layout,
      use_ocdbt,
      use_zarr3,
      leaves,
      sorted(empty_nodes),
      strict_chunks=strict,
      facts=facts,
      _context=context,
      _handles=handles,
  )


def _tree_entries(tree_metadata: dict, where: str) -> tuple[list[tuple[tuple[str, ...], str]], list[str]]:
  """The leaves ``(keys, value_type)`` of ``_METADATA``'s tree, sorted, and its empty nodes (paths)."""
  entries: list[tuple[tuple[str, ...], str]] = []
  empty_nodes: list[str] = []
  problems = []
  for entry in tree_metadata.values():
    try:
      keys = tuple(str(k["key"]) for k in entry.get("key_metadata", []))
      vt = str(entry.get("value_metadata", {}).get("value_type", ""))
    except (AttributeError, KeyError, TypeError):
      raise UsageError(f"{where}: malformed entry in {PYTREE_METADATA}") from None
    if vt in _ARRAY_TYPES or vt in ("scalar", "string"):
      bad = [k for k in keys if "/" in k or k == ""]
      if bad:
        problems.append(f"key {bad[0]!r} in {keys} is empty or contains '/', which leaf paths cannot express")
      entries.append((keys, vt))
    else:
      empty_nodes.append(keypath.join(keys))
  if problems:
    raise UsageError(f"{where}: " + "; ".join(problems[:5]))
  entries.sort(key=lambda e: e[0])
  return entries, empty_nodes


def _leaf_meta(
    keys: tuple[str, ...], vt: str, t: Any, collision: str | None, strict: bool, codecs: "_CodecCache"
) -> LeafMeta:
  """One leaf's metadata from its opened tensorstore ``t`` (an exception: the leaf keeps the error)."""
  p, name = keypath.join(keys), ".".join(keys)
  kind = {"string": "string", "scalar": "scalar"}.get(vt, "array")
  if collision is not None:
    return LeafMeta(p, keys, kind, (), None, None, name, vt, error=collision, strict=strict)
  if vt == "string":
    return LeafMeta(p, keys, "string", (), None, None, name, vt, strict=strict)
  if isinstance(t, Exception):
    return LeafMeta(p, keys, kind, (), None, None, name, vt, error=first_line(t), strict=strict)
  chunk = t.chunk_layout.read_chunk.shape
  raw, codec = codecs.info(t)
  return LeafMeta(
      p,
      keys,
      kind,
      tuple(int(d) for d in t.shape),
      np.dtype(t.dtype.numpy_dtype),
      None if chunk is None else tuple(int(c) for c in chunk),
      name,
      vt,
      raw_chunks=raw,
      strict=strict,
      codec=codec,
  )


class _CodecCache:
  """:func:`.tstore.codec_info` per distinct codec: comparing codecs costs ~2 us, describing one ~40 us."""

  def __init__(self):
    self._seen: list[tuple[Any, tuple[bool, str]]] = []

  def info(self, t: Any) -> tuple[bool, str]:
    try:
      codec = t.codec
      for c, info in self._seen:
        if c == codec:
          return info
    except Exception:  # noqa: BLE001 -- an odd codec: describe it directly
      return codec_info(t)
    info = codec_info(t)
    if len(self._seen) < 16:
      self._seen.append((codec, info))
    return info


_OPEN_WINDOW = 256  # opens in flight at once: all at once costs ~20 KiB of transient memory per leaf


def _open_all(
    item_dir: str, names: list[tuple[str, ...]], use_zarr3: bool, use_ocdbt: bool, strict: bool, context: Any
) -> dict[tuple[str, ...], Any]:
  """Opens every leaf read-only in ``context``, a window of them at a time; {keys: handle or the exception}."""
  import tensorstore as ts

  out: dict[tuple[str, ...], Any] = {}
  pending: list[tuple[tuple[str, ...], Any]] = []

  def settle(upto: int) -> None:
    while len(pending) > upto:
      keys, fut = pending.pop(0)
      try:
        out[keys] = fut.result()
      except Exception as e:  # noqa: BLE001 -- kept per leaf: the verifier names it
        out[keys] = e

  for keys in names:
    spec = _read_spec(item_dir, ".".join(keys), use_zarr3, use_ocdbt, strict)
    try:
      pending.append((keys, ts.open(spec, open=True, read=True, write=False, context=context)))
    except Exception as e:  # noqa: BLE001 -- a spec tensorstore rejects outright
      out[keys] = e
    settle(_OPEN_WINDOW)
  settle(0)
  return out


def _storage_collisions(keys: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
  """Leaves that orbax stores under one name (keys joined by '.'), each with a message naming the others."""
  by_name: dict[str, list[tuple[str, ...]]] = {}
  for k in keys:
    by_name.setdefault(".".join(k), []).append(k)
  out: dict[tuple[str, ...], str] = {}
  for name, ks in by_name.items():
    if len(ks) < 2:
      continue
    paths = [keypath.join(k) for k in ks]
    listed = " and ".join(repr(p) for p in paths)
    for k in ks:
      out[k] = (
          f"leaves {listed} collide: orbax stores both under the name {name!r} (keys joined by '.'),"
          " so both read back the same array"
      )
  return out
