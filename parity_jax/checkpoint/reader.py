"""Reading single leaves of an Orbax checkpoint, read-only and in bounded memory.

Two paths, both touching only the leaves asked for:

* :func:`restore_leaves` -- orbax's own restore with every other leaf
  ``PLACEHOLDER`` (never read), as numpy (``restore_type=np.ndarray``) so that
  int64/float64 survive with x64 disabled. Used by the migrator and for leaves
  tensorstore cannot stream (strings).
* :class:`LeafReader` -- the leaf's zarr array opened directly with
  tensorstore, read-only (``open=True, read=True, write=False``), using the
  very spec orbax builds for its own restores
  (``tensorstore_utils.ArrayReadSpec``, with the checkpoint's missing-chunk
  rule, :data:`.layout.MISSING_CHUNK_RULE`), in a private context whose
  cache pool of a chosen size keeps a decoded chunk row alive while several
  boxes are cut from it. Boxes are read one at a time, so memory is bounded
  by the box plus the storage chunks it decodes. (Small leaves are read
  whole, many at once, through the handles the checkpoint keeps:
  :class:`.stream.SmallPairs`.)
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np

from parity_jax.checkpoint import keypath
from parity_jax.checkpoint.layout import Checkpoint, LeafMeta
from parity_jax.checkpoint.tstore import quiet_orbax
from parity_jax.errors import UsageError, first_line

__all__ = ["LeafReadError", "LeafReader", "read_string_leaf", "restore_leaves"]


class LeafReadError(UsageError):
  """A leaf's data could not be read (missing or corrupted files)."""

  def __init__(self, path: str, message: str):
    self.leaf = path
    super().__init__(f"cannot read leaf {path!r}: {message}")


class LeafReader:
  """Read-only tensorstore access to one array/scalar leaf. Use as a context manager."""

  def __init__(self, ckpt: Checkpoint, leaf: LeafMeta, cache_bytes: int = 0):
    if not leaf.streamable:
      raise UsageError(f"leaf {leaf.path!r} ({leaf.kind}) cannot be read with tensorstore")
    self.ckpt, self.leaf = ckpt, leaf
    self.cache_bytes = int(max(0, cache_bytes))
    self._ts = None

  def open(self) -> "LeafReader":
    """Opens the leaf read-only in a private context (chunk cache of ``cache_bytes``)."""
    try:
      t = self.ckpt.open_leaf(self.leaf, self.cache_bytes)
    except Exception as e:  # tensorstore raises ValueError/OSError subclasses with long specs
      raise LeafReadError(self.leaf.path, first_line(e)) from None
    if tuple(t.shape) != self.leaf.shape or np.dtype(t.dtype.numpy_dtype) != self.leaf.dtype:
      raise LeafReadError(
          self.leaf.path,
          f"stored array is {tuple(t.shape)} {t.dtype.numpy_dtype}, metadata says {self.leaf.shape} {self.leaf.dtype}",
      )
    self._ts = t
    return self

  def __enter__(self) -> "LeafReader":
    return self.open() if self._ts is None else self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._ts = None  # drops the handle and its private cache pool

  def read_async(self, box: Sequence[slice]):
    """A future for ``leaf[box]`` as a numpy array (use :meth:`result`)."""
    if self._ts is None:
      self.open()
    return self._ts[tuple(box)].read() if box else self._ts.read()

  def read_into_async(self, box: Sequence[slice], out: np.ndarray):
    """A future that fills ``out`` (C-contiguous, shape of ``box``, the leaf's dtype) with ``leaf[box]``.

    tensorstore copies straight into ``out`` (wrapped with ``ts.array(...,
    copy=False)``), so a caller that reuses its buffers allocates nothing per
    read: on this VM the page faults of fresh per-read output arrays cost as
    much as copying the data. Wait with :meth:`wait`.
    """
    import tensorstore as ts

    if self._ts is None:
      self.open()
    src = self._ts[tuple(box)].translate_to[0] if box else self._ts
    return ts.array(out, copy=False, write=True).write(src)

  def wait(self, future) -> None:
    """Waits for a :meth:`read_into_async` future; errors become :class:`LeafReadError`."""
    try:
      future.result()
    except Exception as e:
      raise LeafReadError(self.leaf.path, first_line(e)) from None

  def result(self, future) -> np.ndarray:
    try:
      out = future.result()
    except Exception as e:
      raise LeafReadError(self.leaf.path, first_line(e)) from None
    return np.asarray(out)

  def read(self, box: Sequence[slice] = ()) -> np.ndarray:
    return self.result(self.read_async(box))


def read_string_leaf(ckpt: Checkpoint, leaf: LeafMeta) -> str:
  """A string leaf, read from the item's ``_strings.json`` (where orbax's StringHandler keeps them)."""
  import json

  path = os.path.join(ckpt.item_dir, "_strings.json")
  try:
    with open(path, encoding="utf-8") as f:
      table = json.load(f)
    value = table[leaf.storage_name]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise LeafReadError(leaf.path, f"cannot read it from {path}: {first_line(e)}") from None
  if not isinstance(value, str):
    raise LeafReadError(leaf.path, f"{path} holds a {type(value).__name__}, not a string")
  return value


def restore_leaves(ckpt: Checkpoint, paths: Sequence[str]) -> dict[str, Any]:
  """Restores only ``paths`` through orbax (all other leaves PLACEHOLDER, never read).

  Arrays and numeric scalars come back as numpy arrays with their stored
  dtype (0-d for scalars); strings as ``str``.
  """
  import jax
  import orbax.checkpoint as ocp

  wanted = set(paths)
  unknown = wanted - set(ckpt.leaves)
  if unknown:
    raise UsageError(f"no such leaf in {ckpt.path}: {sorted(unknown)[0]!r}")

  def item_fn(kp, m):
    return m if keypath.keypath_str(kp) in wanted else ocp.PLACEHOLDER

  def args_fn(kp, m):
    p = keypath.keypath_str(kp)
    if p not in wanted:
      return ocp.PLACEHOLDER
    return ocp.RestoreArgs() if ckpt.leaves[p].kind == "string" else ocp.RestoreArgs(restore_type=np.ndarray)

  first = sorted(wanted)[0] if len(wanted) == 1 else f"{len(wanted)} leaves incl. {sorted(wanted)[0]}"
  try:
    tree = ckpt.metadata_tree
  except UsageError as e:
    raise LeafReadError(first, str(e)) from None
  item = jax.tree_util.tree_map_with_path(item_fn, tree)
  restore_args = jax.tree_util.tree_map_with_path(args_fn, tree)
  _ignore_late_callbacks()
  try:
    with quiet_orbax():
      restored = ocp.PyTreeCheckpointer().restore(
          ckpt.item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
      )
  except Exception as e:
    raise LeafReadError(_culprit(ckpt, wanted, str(e)) or first, first_line(e)) from None
  out: dict[str, Any] = {}
  for kp, v in jax.tree_util.tree_flatten_with_path(restored)[0]:
    p = keypath.keypath_str(kp)
    if p not in wanted:
      continue
    meta = ckpt.leaves[p]
    if meta.kind == "string":
      out[p] = str(v)
    else:
      a = np.asarray(v)
      if a.dtype != meta.dtype:  # python scalars come back widened; the stored dtype is the truth
        a = a.astype(meta.dtype)
      out[p] = a
  missing = wanted - set(out)
  if missing:
    raise LeafReadError(sorted(missing)[0], "orbax returned no value for it")
  return out


def _culprit(ckpt: Checkpoint, wanted: set[str], message: str) -> str | None:
  """The leaf a batch restore error is about, from the storage name tensorstore quotes (``"a.b.c/c/0/0"``)."""
  hits = [
      p
      for p in wanted
      if ckpt.leaves[p].storage_name and re.search(rf'["/]{re.escape(ckpt.leaves[p].storage_name)}/', message)
  ]
  return max(hits, key=lambda p: len(ckpt.leaves[p].storage_name)) if hits else None


_HOOK: Any = None


def _ignore_late_callbacks() -> None:
  """Silences one known orbax/asyncio afterthought of a failed restore, and nothing else.

  When one leaf of a batch fails to read, orbax's restore raises at once and
  closes its event loop while tensorstore is still finishing the batch's
  other reads; their completion callbacks then hit the closed loop
  (``RuntimeError: Event loop is closed`` from ``call_soon_threadsafe``) and
  Python prints that as an "unraisable" traceback, after the tool's one-line
  error. The failure itself is already reported; every other unraisable
  exception still reaches the previous hook.
  """
  global _HOOK
  import sys

  if _HOOK is not None and sys.unraisablehook is _HOOK:
    return

  previous = sys.unraisablehook

  def hook(u):
    tb = u.exc_traceback
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    if (
        isinstance(u.exc_value, RuntimeError)
        and str(u.exc_value) == "Event loop is closed"
        and tb is not None
        and tb.tb_frame.f_code.co_name == "_check_closed"
    ):
      return
    previous(u)

  sys.unraisablehook = _HOOK = hook
