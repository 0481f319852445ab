"""Writing an Orbax checkpoint: the array specs orbax itself writes, per-process OCDBT databases, their merge,
and the metadata and markers that make the result an orbax checkpoint.

The migrator writes every array with tensorstore under the spec orbax's own
``ArrayWriteSpec`` builds (zarr3 in OCDBT, orbax's codecs), with the chunk
shape the migrator chose (:func:`write_spec`): each process of a job into its
own database ``<item>/ocdbt.process_<i>/``, the layout of a multi-host orbax
save; :func:`merge` joins them into the item's manifest with orbax's own
``merge_ocdbt_per_process_files``, :func:`check_merged` proves every chunk of
every array is indexed, and :func:`write_metadata` writes ``_strings.json``,
``_METADATA``, ``_CHECKPOINT_METADATA`` and the v1 markers (``orbax.checkpoint``,
``commit_success.txt``), as ``ocp.v1.save`` leaves them, so orbax restores the
result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import warnings
from typing import Any, Iterator

import numpy as np

from parity_jax.checkpoint import geometry
from parity_jax.checkpoint.formats.tstore import quiet_orbax
from parity_jax.errors import UsageError, first_line

__all__ = [
    "COMMIT_MARKER",
    "ITEM",
    "check_merged",
    "item_path",
    "merge",
    "metadata_files",
    "row_major_chunks",
    "write_context",
    "write_metadata",
    "write_spec",
]

ITEM = "state"  # the item (checkpointable) name the migrator writes, as ocp.v1.save names it


@contextlib.contextmanager
def row_major_chunks() -> Iterator[bool]:
  """While active, orbax writes chunked arrays in row-major chunks (see module doc).

  Yields True when the hook is installed, False when this orbax has no such
  hook (then orbax's own chunk shapes are used; everything still works).
  """
  try:
    from orbax.checkpoint._src.arrays import subchunking

    original = subchunking.choose_chunk_shape
  except (ImportError, AttributeError):
    warnings.warn("orbax has no chunk-shape hook; using orbax's chunk shapes", RuntimeWarning)
    yield False
    return

  def choose(global_shape, write_shape, dtype, target_byte_size, *, shard_axes=()):
    if target_byte_size is None or shard_axes or tuple(global_shape) != tuple(write_shape):
      return original(global_shape, write_shape, dtype, target_byte_size, shard_axes=shard_axes)
    return geometry.row_major_chunk_shape(tuple(write_shape), np.dtype(dtype).itemsize, target_byte_size)

  subchunking.choose_chunk_shape = choose
  try:
    yield True
  finally:
    subchunking.choose_chunk_shape = original


def write_spec(
    leaf_name: str,
    shape,
    dtype,
    item_dir: str,
    process_id: int | None,
    *,
    chunk_bytes: int,
    compression: str,
    chunk_shape: tuple[int, ...] | None = None,
):
  """Orbax's own ``ArrayWriteSpec`` for one array; ``chunk_shape`` (when given) replaces the chunk shape orbax
  would choose (e.g. one chunk per stack member of a stacked leaf)."""
  from orbax.checkpoint._src.arrays import subchunking
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  chosen = subchunking.choose_chunk_shape
  if chunk_shape is not None:
    subchunking.choose_chunk_shape = lambda *a, **k: tuple(int(c) for c in chunk_shape)
  try:
    return tsu.ArrayWriteSpec(
        item_dir,
        leaf_name,
        global_shape=tuple(shape),
        write_shape=tuple(shape),
        dtype=dtype,
        chunk_byte_size=chunk_bytes,
        use_compression=compression == "zstd",
        use_zarr3=True,
        use_ocdbt=True,
        process_id=process_id,
    )
  finally:
    subchunking.choose_chunk_shape = chosen


def write_context(bucket: Any = None):
  """orbax's tensorstore context for writing OCDBT; with ``bucket``, plus that store's retries, request
  concurrency and credentials (``Store.context_spec()``)."""
  import copy

  import tensorstore as ts
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  if bucket is None:
    return tsu.get_ts_context(use_ocdbt=True)
  base = copy.deepcopy(getattr(tsu, "_DEFAULT_OCDBT_TS_CONTEXT", {}))
  return ts.Context({**base, **bucket.context_spec()})


def _kvstore_tspec(item_dir: str, bucket: Any = None, **kw) -> dict:
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  from parity_jax.checkpoint.formats.orbax import on_bucket

  spec = tsu.build_kvstore_tspec(item_dir, use_ocdbt=True, **kw)
  return spec if bucket is None else on_bucket(spec, bucket)


def merge(item_dir: str, bucket: Any = None, num_processes: int | None = None) -> None:
  """Joins the per-process databases under ``item_dir`` into its top-level manifest (orbax's
  ``merge_ocdbt_per_process_files``). With ``bucket``, ``item_dir`` lies under the stand-in directory of
  :func:`parity_jax.checkpoint.formats.orbax.on_bucket` and the databases ``ocdbt.process_0`` ..
  ``ocdbt.process_<num_processes - 1>`` in the bucket are merged the same way, through the bucket's kvstore
  (no listing, no local file)."""
  from etils import epath
  from orbax.checkpoint._src.serialization import ocdbt_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  with quiet_orbax():
    try:
      if bucket is None:
        asyncio.run(
            ocdbt_utils.merge_ocdbt_per_process_files(
                epath.Path(item_dir), ts_context=tsu.get_ts_context(use_ocdbt=True), use_zarr3=True
            )
        )
      else:
        asyncio.run(_merge_on_bucket(item_dir, bucket, int(num_processes or 1)))
    except Exception as e:  # noqa: BLE001
      where = item_dir if bucket is None else bucket.url
      raise UsageError(f"cannot merge the per-process databases under {where}: {first_line(e)}") from None


async def _merge_on_bucket(item_dir: str, bucket: Any, n: int) -> None:
  """orbax's merge (children copied into the parent opened in MERGE mode, one atomic transaction) on a bucket."""
  import tensorstore as ts
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

  ctx = write_context(bucket)
  children = [
      ts.KvStore.open(_kvstore_tspec(os.path.join(item_dir, f"ocdbt.process_{i}"), bucket), context=ctx)
      for i in range(n)
  ]
  parent_spec = _kvstore_tspec(
      item_dir, bucket, ocdbt_write_options=tsu.OcdbtKvStoreWriteOptions(mode=tsu.OcdbtWriteMode.MERGE)
  )
  parent = await ts.KvStore.open(parent_spec, context=ctx)
  opened = [await c for c in children]
  txn = ts.Transaction(atomic=True)
  for child in opened:
    await child.experimental_copy_range_to(parent.with_transaction(txn))
  await txn.commit_async()


def check_merged(item_dir: str, arrays, bucket: Any = None) -> None:
  """The merged index holds every array's metadata and every one of its chunks (keys only, no data read).

  ``arrays``: objects with ``name`` (the storage name), ``n_chunks`` and ``dest`` (the leaf path, for messages).
  ``bucket``: as for :func:`merge`.
  """
  import tensorstore as ts

  try:
    kv = ts.KvStore.open(_kvstore_tspec(item_dir, bucket), context=write_context(bucket)).result()
    keys = [k.decode() for k in kv.list().result()]
  except Exception as e:  # noqa: BLE001
    raise UsageError(f"cannot list the merged checkpoint under {item_dir}: {first_line(e)}") from None
  meta, chunks = set(), {}
  for k in keys:
    name, _, rest = k.partition("/")
    if rest == "zarr.json":
      meta.add(name)
    elif rest == "c" or rest.startswith("c/"):
      chunks[name] = chunks.get(name, 0) + 1
  for leaf in arrays:
    if leaf.name not in meta or chunks.get(leaf.name, 0) != leaf.n_chunks:
      raise UsageError(
          f"the merged checkpoint lacks part of leaf {leaf.dest!r}"
          f" ({chunks.get(leaf.name, 0)} of {leaf.n_chunks} chunks"
          f"{'' if leaf.name in meta else ', no zarr.json'}); nothing installed"
      )


def item_path(target: str, layout: str) -> str:
  """Where the arrays of a checkpoint directory ``target`` live: ``<target>/state`` (v1) or ``target`` itself
  (``standard``: the layout ``ocp.StandardCheckpointer().save`` writes)."""
  return target if layout == "standard" else os.path.join(target, ITEM)


def _standard_handler() -> str:
  try:
    from orbax.checkpoint._src.handlers import standard_checkpoint_handler as h

    cls = h.StandardCheckpointHandler
    return f"{cls.__module__}.{cls.__qualname__}"
  except (ImportError, AttributeError):
    return "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


def _item_handler() -> str:
  """The handler name the single-process migrator's checkpoints record for their item (orbax's v1 partial save)."""
  try:
    from orbax.checkpoint.experimental.v1._src.handlers import stateful_checkpointable_handler as h

    cls = h.StatefulCheckpointableHandler
    return f"{cls.__module__}.{cls.__qualname__}"
  except (ImportError, AttributeError):
    return (
        "orbax.checkpoint.experimental.v1._src.handlers.stateful_checkpointable_handler."
        "StatefulCheckpointableHandler"
    )


def metadata_files(
    dest: str,
    arrays: list[tuple[str, ...]],
    strings: dict[tuple[str, ...], str],
    custom: dict[str, Any],
    init_ns: int,
    layout: str = "v1",
) -> list[tuple[str, bytes]]:
  """Everything but the array data of a checkpoint to be installed at ``dest``: ``(relative path, bytes)`` in the
  order they are written, ``commit_success.txt`` last (see :func:`write_metadata`)."""
  item = "" if layout == "standard" else ITEM + "/"
  out: list[tuple[str, bytes]] = []
  if strings:
    table = {".".join(keys): value for keys, value in strings.items()}
    out.append((item + "_strings.json", json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode()))
  entries = [(keys, "np.ndarray") for keys in arrays] + [(keys, "string") for keys in strings]
  tree = {
      str(keys): {
          "key_metadata": [{"key": k, "key_type": 2} for k in keys],
          "value_metadata": {"value_type": vt, "skip_deserialize": False},
      }
      for keys, vt in sorted(entries)
  }
  meta = {
      "tree_metadata": tree,
      "use_ocdbt": True,
      "use_zarr3": True,
      "store_array_data_equal_to_fill_value": True,
      "custom_metadata": None,
  }
  out.append((item + "_METADATA", json.dumps(meta).encode()))
  ckpt_meta = {
      "item_handlers": _standard_handler() if layout == "standard" else {ITEM: _item_handler()},
      "metrics": {},
      "performance_metrics": {},
      "init_timestamp_nsecs": init_ns,
      "commit_timestamp_nsecs": time.time_ns(),
      "custom_metadata": custom,
  }
  out.append(("_CHECKPOINT_METADATA", json.dumps(ckpt_meta).encode()))
  if layout != "standard":  # the v1 marker (StandardCheckpointer writes none)
    out.append(("orbax.checkpoint", b""))
  out.append((COMMIT_MARKER, f"Checkpoint commit was successful to {dest}".encode()))
  return out


COMMIT_MARKER = "commit_success.txt"


def write_metadata(
    target: str,
    dest: str,
    arrays: list[tuple[str, ...]],
    strings: dict[tuple[str, ...], str],
    custom: dict[str, Any],
    init_ns: int,
    layout: str = "v1",
    bucket: Any = None,
) -> None:
  """Everything but the array data, in a finished checkpoint directory ``target`` (to be installed at ``dest``).

  ``arrays``: the keys of every array leaf; ``strings``: keys -> value of every string leaf. ``layout``
  ``"v1"``: the item in ``state/`` (``ocp.v1.save``); ``"standard"``: the item at the top, recorded as
  ``ocp.StandardCheckpointer().save`` records it (one handler name), so that checkpointer restores it.
  With ``bucket`` (a bucket :class:`~parity_jax.stores.Store`, the checkpoint written in place there), each file
  is one object written in turn and ``commit_success.txt`` last: from that write on the checkpoint exists.
  """
  for rel, data in metadata_files(dest, arrays, strings, custom, init_ns, layout):
    if bucket is not None:
      bucket.child(rel).write_bytes(data)
      continue
    with open(os.path.join(target, *rel.split("/")), "wb") as f:
      f.write(data)
