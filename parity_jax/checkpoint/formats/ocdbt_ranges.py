"""Reading a big leaf of an OCDBT checkpoint in a bucket with many range requests per stored chunk.

tensorstore reads each stored chunk (one value of the OCDBT database) with one
request, so a leaf stored as a few 128 MiB chunks is read from a bucket at
about the rate of a few streams, however many requests the store allows in
flight (docs/benchmarks.md, issue 18). Here, instead:

1. the checkpoint's OCDBT B-tree, decoded by tensorstore itself
   (``ts.ocdbt.dump``), says where the value of each key lies: inline in the
   tree, or at ``offset``/``length`` in a data file (:class:`OcdbtIndex`; only
   the nodes whose key range can hold the leaf's keys are read, once per
   checkpoint);
2. the chunks a read needs are fetched as slices of at most
   :data:`SLICE_BYTES`, all in flight at once through the bucket's
   :class:`~parity_jax.stores.Store` (counted, retried, bounded waits);
3. they are put into an in-memory kvstore beside the leaf's zarr metadata, and
   tensorstore decodes them with the very spec orbax reads the leaf with, only
   its kvstore swapped (:class:`RangedLeafReader`).

4. a chunk whose codecs only lay out its values' bytes (:func:`raw_layout`: the migrator's uncompressed chunks,
   one inner chunk per zarr3 shard, little-endian) is not decoded: when it is laid out exactly so (the shard
   index's CRC-32C matches, the sizes fit) its values are a view of the joined bytes; anything else about it
   (a bad checksum, a missing inner chunk, another size) is left to tensorstore, which decides as in (3).

The values are tensorstore's decoding of the same stored bytes, or those bytes themselves where the codecs say
they are the values. A key the tree
does not hold is absent from the memory kvstore too, so a missing chunk follows
the leaf's own rule (an error, or the fill value). Each stored byte is fetched
once per reader: the slices partition the value, and a chunk is fetched by the
first read that needs it and kept (compressed) until the reader closes, the
decoded rows living in the reader's chunk cache as with tensorstore's reader.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import math
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from parity_jax.checkpoint.formats.base import LeafMeta, LeafReadError, LeafReader, reader_threads
from parity_jax.checkpoint.formats.tstore import check_opened, read_context
from parity_jax.errors import first_line
from parity_jax.stores import Pending, Store

if TYPE_CHECKING:
  from parity_jax.checkpoint.formats.orbax import OrbaxCheckpoint

__all__ = [
    "SLICE_BYTES",
    "OcdbtIndex",
    "RangedLeafReader",
    "RawLayout",
    "SPARE_BUFFERS",
    "SpareBuffers",
    "ValueRef",
    "chunk_boxes",
    "crc32c",
    "ranged_reads",
    "raw_layout",
]

_MIB = 1 << 20
# One range request; a stored value is cut into about equal slices of at most this many bytes. Small enough that
# one chunk row of a verify keeps many requests in flight (a 128 MiB chunk: 32), where a store serves each stream
# at a bounded rate (bench/buckets.py: 4 MiB slices read 1.2x faster than 16 MiB ones under a per-stream cap, and
# as fast without one).
SLICE_BYTES = 4 * _MIB
# Leaves whose stored chunks may exceed this are read this way; smaller chunks are each one request, and many of
# them are in flight through tensorstore's own reader (several chunk rows ahead).
RANGED_ABOVE_BYTES = 16 * _MIB
# Threads that wait for a read's slices, install them and wait for the decode (the work itself runs in the store's
# and tensorstore's threads): enough for every read the verifier keeps in flight.
_WORKERS = 16


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  return reader_threads("ocdbt-ranges", _WORKERS)


def ranged_reads(leaf: LeafMeta, remote: bool, use_ocdbt: bool) -> bool:
  """Whether ``leaf`` is read by :class:`RangedLeafReader`: an array or scalar in a bucket's OCDBT database whose
  stored chunks may exceed one slice."""
  if not (remote and use_ocdbt and leaf.streamable):
    return False
  chunk = leaf.shape if leaf.chunk_shape is None else leaf.chunk_shape
  return math.prod(chunk) * leaf.dtype.itemsize > RANGED_ABOVE_BYTES


@dataclasses.dataclass(frozen=True)
class ValueRef:
  """Where one key's value lies: ``inline`` in the tree, or ``length`` bytes at ``offset`` of data file ``file``
  (relative to the database's directory)."""

  inline: bytes | None = None
  file: str = ""
  offset: int = 0
  length: int = 0

  @classmethod
  def parse(cls, entry: dict) -> "ValueRef":
    if "inline_value" in entry:
      return cls(inline=bytes(entry["inline_value"]))
    # value:<base path>:<relative path>:<offset>:<length>; the base path (a per-process subdirectory) ends in "/"
    kind, rest = str(entry["indirect_value"]).split(":", 1)
    base, rel, offset, length = rest.rsplit(":", 3)
    if kind != "value":
      raise ValueError(f"unexpected OCDBT value reference {entry['indirect_value']!r}")
    return cls(file=base + rel, offset=int(offset), length=int(length))

  @property
  def nbytes(self) -> int:
    return len(self.inline) if self.inline is not None else self.length


class OcdbtIndex:
  """The keys of a checkpoint's OCDBT database and where their values lie, read from its B-tree on demand.

  ``under(prefix)`` reads only the nodes whose key range can hold keys that
  start with ``prefix`` (each node once per index; the nodes of one tree level
  are read together), through tensorstore's decoder of the OCDBT format.
  """

  def __init__(self, dump: Callable[[str | None], Any]):
    """``dump(location)``: a future of the decoded node at ``location`` (None: the manifest), as ``ts.ocdbt.dump``
    gives it."""
    self._dump = dump
    self._lock = threading.Lock()
    self._nodes: dict[str, dict] = {}
    manifest = dump(None).result()
    versions = manifest.get("versions") or []
    latest = max(versions, key=lambda v: v.get("generation_number", 0)) if versions else {}
    self._root = (latest.get("root") or {}).get("location")

  @classmethod
  def open(cls, store: Store, context: Any) -> "OcdbtIndex":
    """The index of the database in directory ``store``, read through tensorstore in ``context``."""
    import tensorstore as ts

    kv = ts.KvStore.open(store.kvstore_spec(), context=context).result()
    return cls(lambda location: ts.ocdbt.dump(kv, location))

  def _load(self, locations: Sequence[str]) -> list[dict]:
    with self._lock:
      todo = [loc for loc in dict.fromkeys(locations) if loc not in self._nodes]
    futures = [(loc, self._dump(loc)) for loc in todo]
    got = {loc: f.result() for loc, f in futures}
    with self._lock:
      self._nodes.update(got)
      return [self._nodes[loc] for loc in locations]

  def under(self, prefix: bytes) -> dict[bytes, ValueRef]:
    """Every key that starts with ``prefix``, with where its value lies."""
    out: dict[bytes, ValueRef] = {}
    level = [self._root] if self._root else []
    while level:
      below = []
      for node in self._load(level):
        entries = node.get("entries") or []
        if int(node.get("height", 0)) == 0:
          for e in entries:
            key = bytes(e["key"])
            if key.startswith(prefix):
              out[key] = ValueRef.parse(e)
          continue
        # child i holds the keys in [key_i, key_{i+1}); keep those that can start with prefix
        for i, e in enumerate(entries):
          lo = bytes(e["key"])
          hi = bytes(entries[i + 1]["key"]) if i + 1 < len(entries) else None
          if lo[: len(prefix)] <= prefix and (hi is None or hi > prefix):
            below.append(e["location"])
      level = below
    return out


def chunk_boxes(metadata: dict, box: Sequence[slice], shape: Sequence[int]) -> list[tuple[str, tuple[slice, ...]]]:
  """The stored chunks that ``box`` touches: each one's key (relative to the array's directory) and its box in the
  array (clipped to the shape), from the array's zarr metadata (zarr3 ``zarr.json`` or zarr v2 ``.zarray``)."""
  if metadata.get("zarr_format") == 3:
    grid = metadata["chunk_grid"]["configuration"]["chunk_shape"]
    enc = metadata.get("chunk_key_encoding") or {"name": "default"}
    name, conf = enc.get("name", "default"), enc.get("configuration") or {}
    sep = conf.get("separator", "/" if name == "default" else ".")
    default = name == "default"
  else:
    grid, sep, default = metadata["chunks"], metadata.get("dimension_separator") or ".", False
  ranges = []
  for d, n in enumerate(shape):
    lo, hi, _ = (box[d] if d < len(box) else slice(None)).indices(n)
    if hi <= lo:
      return []
    ranges.append(range(lo // grid[d], (hi - 1) // grid[d] + 1))
  out = []
  for idx in itertools.product(*ranges):
    parts = [str(i) for i in idx]
    key = sep.join(["c", *parts]) if default else (sep.join(parts) if parts else "0")
    out.append((key, tuple(slice(i * g, min((i + 1) * g, n)) for i, g, n in zip(idx, grid, shape))))
  return out


class SpareBuffers:
  """Spare buffers for stored and decoded chunks, shared by the open readers (the stream opens a reader per chunk
  row): on this kind of VM the page faults of a fresh 128 MiB buffer cost more than its copy, and a verify goes
  through one such buffer per chunk. At most ``keep`` free buffers of each kind are kept (two: the two sides of a
  pair have chunks of different sizes), and none once the last reader closes."""

  def __init__(self, keep: int = 2):
    self.keep, self._lock = keep, threading.Lock()
    self._arrays: list[np.ndarray] = []
    self._bytes: list[bytearray] = []
    self._users = 0

  def use(self) -> None:
    with self._lock:
      self._users += 1

  def release(self) -> None:
    """One reader closed (each :meth:`use` is released once); the last one frees the spares."""
    with self._lock:
      self._users -= 1
      if not self._users:
        self._arrays.clear()
        self._bytes.clear()

  def held(self) -> int:
    """How many spare buffers are kept now."""
    with self._lock:
      return len(self._arrays) + len(self._bytes)

  def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    with self._lock:
      for i, a in enumerate(self._arrays):
        if a.shape == shape and a.dtype == dtype:
          return self._arrays.pop(i)
    return np.empty(shape, dtype)

  def give(self, a: np.ndarray) -> None:
    with self._lock:
      self._arrays.append(a)
      del self._arrays[: -self.keep]

  def take_bytes(self, n: int) -> bytearray:
    with self._lock:
      fits = [b for b in self._bytes if b.__alloc__() > n]
      if fits:
        b = min(fits, key=lambda b: b.__alloc__())
        self._bytes.remove(b)
        if len(b) > n:
          del b[n:]  # within the allocation: CPython keeps it when it shrinks by less than half
        else:
          b.extend(bytes(n - len(b)))  # within the allocation: no new memory
        return b
    return bytearray(n)

  def give_bytes(self, b: bytearray) -> None:
    with self._lock:
      self._bytes.append(b)
      del self._bytes[: -self.keep]


SPARE_BUFFERS = SpareBuffers()  # the one pool of the process's ranged readers


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    table.append(c)
  return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of a zarr3 ``crc32c`` codec; for the few bytes of a shard index."""
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class RawLayout:
  """A stored chunk that holds its values' bytes as they are, C order, little-endian (:func:`raw_layout`).

  ``index``: where the 16-byte shard index and its CRC-32C lie, when the chunk is a zarr3 shard of exactly one
  inner chunk (``"end"`` or ``"start"``); None for a plain chunk.
  """

  chunk_shape: tuple[int, ...]
  dtype: np.dtype
  index: str | None = None

  @property
  def nbytes(self) -> int:
    return math.prod(self.chunk_shape) * self.dtype.itemsize

  def values(self, stored: bytes | bytearray) -> np.ndarray | None:
    """The chunk's values as a view of ``stored``; None when ``stored`` is not laid out exactly so (a missing
    inner chunk, a bad index checksum, a size that does not match): then tensorstore decodes it and decides."""
    data = memoryview(stored)
    if self.index is not None:
      n = _SHARD_INDEX_BYTES
      if len(data) < n:
        return None
      index, data_at = (data[-n:], 0) if self.index == "end" else (data[:n], n)
      if crc32c(bytes(index[:16])) != int.from_bytes(index[16:], "little"):
        return None
      offset, nbytes = (int.from_bytes(index[i : i + 8], "little") for i in (0, 8))
      stop = len(data) - n if self.index == "end" else len(data)
      if nbytes != self.nbytes or offset < data_at or offset + nbytes > stop:
        return None
      data = data[offset : offset + nbytes]
    if len(data) != self.nbytes:
      return None
    return np.frombuffer(data, self.dtype).reshape(self.chunk_shape)


# A shard of one inner chunk: its index is that chunk's (offset, nbytes), two little-endian uint64, then their CRC-32C.
_SHARD_INDEX_BYTES = 16 + 4
_RAW_DTYPES = "iuf"  # no bool (a byte that is neither 0 nor 1), no complex/void edge cases: tensorstore decides those


def raw_layout(metadata: dict, dtype: np.dtype) -> RawLayout | None:
  """The :class:`RawLayout` of an array's stored chunks when its codecs only lay out the values' bytes: zarr3
  ``bytes`` alone (little-endian), or ``sharding_indexed`` of one inner chunk per shard whose codecs are ``bytes``
  alone and whose index is ``bytes`` (little-endian) + ``crc32c``; zarr v2 with no compressor and no filters, C
  order, little-endian. None for anything else (compression, transposes, other dtypes): tensorstore decodes those.
  On a big-endian machine, always None."""
  dtype = np.dtype(dtype)
  if sys.byteorder != "little" or not (dtype.kind in _RAW_DTYPES or dtype.name == "bfloat16"):
    return None

  def little(codec: dict) -> bool:
    return codec.get("name") == "bytes" and (codec.get("configuration") or {}).get("endian", "little") == "little"

  def values_bytes(codec: dict) -> bool:  # the values' own bytes: little-endian, or single bytes in any order
    return little(codec) or (codec.get("name") == "bytes" and dtype.itemsize == 1)

  if metadata.get("zarr_format") == 3:
    grid = tuple(metadata["chunk_grid"]["configuration"]["chunk_shape"])
    codecs = metadata.get("codecs") or []
    if len(codecs) != 1:
      return None
    if values_bytes(codecs[0]):
      return RawLayout(grid, dtype)
    conf = codecs[0].get("configuration") or {}
    if codecs[0].get("name") != "sharding_indexed" or tuple(conf.get("chunk_shape") or ()) != grid:
      return None
    inner, index = conf.get("codecs") or [], conf.get("index_codecs") or []
    where = conf.get("index_location", "end")
    if (
        len(inner) == 1
        and values_bytes(inner[0])
        and len(index) == 2
        and little(index[0])
        and index[1].get("name") == "crc32c"
        and where in ("end", "start")
    ):
      return RawLayout(grid, dtype, where)
    return None
  if metadata.get("zarr_format") == 2 or "chunks" in metadata:
    stored = np.dtype(metadata.get("dtype", "")) if isinstance(metadata.get("dtype"), str) else None
    if (
        metadata.get("compressor") is None
        and not metadata.get("filters")
        and metadata.get("order", "C") == "C"
        and stored is not None
        and stored.byteorder in ("<", "|", "=")
        and stored.newbyteorder("=") == dtype.newbyteorder("=")
    ):
      return RawLayout(tuple(metadata["chunks"]), dtype)
  return None


class _Chunk:
  """One stored chunk: its slices in flight from creation; :meth:`array` decodes it once (then it holds only the
  decoded values: the stored bytes are dropped, or are the values' own buffer when the chunk is raw)."""

  def __init__(self, key: str, box: tuple[slice, ...], ref: ValueRef | None, store: Store):
    self.key, self.box, self.ref = key, box, ref
    self._lock = threading.Lock()
    self._array: np.ndarray | None = None
    self._raw = False  # the values are a view of the stored bytes
    self._backing: bytearray | None = None  # those bytes, when they are a reusable buffer
    self._error: BaseException | None = None
    self._parts: list[Pending] = []
    if ref is not None and ref.inline is None and ref.length:
      data = store.child(ref.file)
      n = max(1, math.ceil(ref.length / SLICE_BYTES))
      edges = [ref.offset + ref.length * i // n for i in range(n + 1)]
      self._parts = [data.read_range_async(a, b) for a, b in zip(edges, edges[1:])]

  @property
  def nbytes(self) -> int:
    return 0 if self._array is None else self._array.nbytes

  def drop(self) -> None:
    """Gives the decoded values' buffer back for reuse (the chunk must no longer be read)."""
    with self._lock:
      if self._array is not None and not self._raw:
        SPARE_BUFFERS.give(self._array)
      elif self._backing is not None:  # the values were a view of it: no read is using them any more
        SPARE_BUFFERS.give_bytes(self._backing)
      self._array = self._backing = None

  def _stored(self) -> bytes | bytearray | None:
    if self.ref is None:
      return None
    if self.ref.inline is not None:
      return self.ref.inline
    if len(self._parts) == 1:
      return self._parts.pop().result()
    value = SPARE_BUFFERS.take_bytes(self.ref.length)  # the slices joined, each dropped once copied
    pos = 0
    while self._parts:
      b = self._parts.pop(0).result()
      value[pos : pos + len(b)] = b
      pos += len(b)
    return value

  def array(self, handle, kv, raw: RawLayout | None) -> np.ndarray:
    """The decoded chunk (fetched and decoded by the first caller; a failure is kept and raised to every caller,
    since its slices are spent). With ``raw``, a well-formed stored chunk is its values' bytes: viewed, not
    decoded; anything else is decoded by tensorstore."""
    import tensorstore as ts

    with self._lock:
      if self._error is not None:
        raise self._error
      if self._array is None:
        try:
          value = self._stored()
          view = None if (raw is None or value is None) else raw.values(value)
          if view is not None:
            self._array, self._raw = view, True
            self._backing = value if isinstance(value, bytearray) else None
            return self._array
          if value is not None:
            kv.write(self.key, value).result()
            if isinstance(value, bytearray):
              SPARE_BUFFERS.give_bytes(value)
          del value
          buf = SPARE_BUFFERS.take(tuple(b.stop - b.start for b in self.box), np.dtype(handle.dtype.numpy_dtype))
          ts.array(buf, copy=False, write=True).write(handle[self.box].translate_to[0]).result()
          self._array = buf
        except Exception as e:  # noqa: BLE001 -- kept and re-raised, as above
          self._error = e
          self._parts = []
          raise
        finally:
          kv.write(self.key, None).result()  # the stored bytes are no longer needed (a no-op if none were written)
      return self._array


class RangedLeafReader(LeafReader):
  """A leaf of a bucket's OCDBT database read by range requests (see the module docstring).

  Decoded chunks are kept, least recently used first out, within the
  reader's ``cache_bytes`` (what the stream's plan gives a side to hold its
  chunk rows; 0 keeps none beyond the reads using them); an evicted chunk
  needed again is fetched again.
  """

  def __init__(self, ckpt: "OrbaxCheckpoint", leaf: LeafMeta, cache_bytes: int):
    super().__init__(leaf)
    self.ckpt = ckpt
    self.cache_bytes = int(cache_bytes)
    self._ts = self._kv = None
    self._name = self.leaf.storage_name + "/"
    self._refs: dict[str, ValueRef] = {}
    self._metadata: dict = {}
    self._chunks: collections.OrderedDict[str, _Chunk] = collections.OrderedDict()
    self._raw: RawLayout | None = None
    self._pins: collections.Counter[str] = collections.Counter()
    self._lock = threading.Lock()

  def open(self) -> "RangedLeafReader":
    if self._ts is not None:
      return self
    import tensorstore as ts

    name = self._name
    try:
      refs = self.ckpt.ocdbt_index().under(name.encode())
      self._refs = {k[len(name) :].decode(): v for k, v in refs.items()}
      ctx = read_context(0)
      kv = ts.KvStore.open({"driver": "memory"}, context=ctx).result()
      for meta_key in ("zarr.json", ".zarray", ".zattrs"):
        ref = self._refs.pop(meta_key, None)
        if ref is not None:
          value = _Chunk(name + meta_key, (), ref, self.ckpt.store)._stored()
          kv.write(name + meta_key, value).result()
          if meta_key != ".zattrs":
            self._metadata = json.loads(bytes(value))
      spec = {**self.ckpt.read_spec(self.leaf), "kvstore": {"driver": "memory", "path": name}}
      t = ts.open(spec, open=True, read=True, write=False, context=ctx).result()
    except Exception as e:  # tensorstore's ValueError/OSError subclasses with long specs, the store's StoreError
      raise LeafReadError(self.leaf.path, first_line(e)) from None
    self._ts, self._kv = check_opened(self.leaf, t), kv
    SPARE_BUFFERS.use()
    self._raw = raw_layout(self._metadata, np.dtype(t.dtype.numpy_dtype)) if self._metadata else None
    return self

  def close(self) -> None:
    opened, self._ts, self._kv = self._ts is not None, None, None  # drops the handle and the memory kvstore
    with self._lock:
      for c in self._chunks.values():
        c.drop()
      self._chunks.clear()
      self._pins.clear()
    if opened:
      SPARE_BUFFERS.release()

  def held_keys(self) -> list[str]:
    """The keys this reader's memory kvstore holds: the leaf's metadata only, since each stored chunk is deleted once
    decoded (its decoded values are what the cache holds); none before :meth:`open` or after :meth:`close`."""
    kv = self._kv
    return [] if kv is None else sorted(k.decode() for k in kv.list().result())

  def _start(self, box: Sequence[slice]) -> list[_Chunk]:
    """Starts fetching the chunks ``box`` needs that are neither decoded nor in flight; returns them all, pinned."""
    if self._ts is None:
      self.open()
    out = []
    with self._lock:
      for key, cbox in chunk_boxes(self._metadata, box, self.leaf.shape):
        c = self._chunks.get(key)
        if c is None:
          # a key the tree does not hold is not stored: the leaf's missing-chunk rule applies when it is decoded
          c = self._chunks[key] = _Chunk(self._name + key, cbox, self._refs.get(key), self.ckpt.store)
        self._chunks.move_to_end(key)
        self._pins[key] += 1
        out.append(c)
    return out

  def _release(self, chunks: list[_Chunk]) -> None:
    """Unpins ``chunks``; drops the least recently used unpinned chunks beyond ``cache_bytes``."""
    with self._lock:
      for c in chunks:
        k = c.key[len(self._name) :]
        self._pins[k] -= 1
        if self._pins[k] <= 0:
          del self._pins[k]
      held = sum(c.nbytes for c in self._chunks.values())
      for k in list(self._chunks):
        if held <= self.cache_bytes:
          break
        if k not in self._pins:
          c = self._chunks.pop(k)
          held -= c.nbytes
          c.drop()

  def _bounds(self, box: Sequence[slice]) -> list[tuple[int, int]]:
    box = tuple(box) + (slice(None),) * (len(self.leaf.shape) - len(box))
    return [s.indices(n)[:2] for s, n in zip(box, self.leaf.shape)]

  def read_into_async(self, box: Sequence[slice], out: np.ndarray):
    chunks, t, kv, want = self._start(box), self._ts, self._kv, self._bounds(box)
    raw = self._raw

    def run():
      try:
        for c in chunks:
          inter = [(max(a, cb.start), min(b, cb.stop)) for (a, b), cb in zip(want, c.box)]
          dst = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, want))
          src = tuple(slice(lo - cb.start, hi - cb.start) for (lo, hi), cb in zip(inter, c.box))
          out[dst] = c.array(t, kv, raw)[src]  # no reference kept: a released chunk's buffer is reused
      finally:
        self._release(chunks)

    return _pool().submit(run)

  def read_async(self, box: Sequence[slice]):
    out = np.empty(tuple(max(0, b - a) for a, b in self._bounds(box)), self.leaf.dtype)
    return _Then(self.read_into_async(box, out), out)


class _Then:
  """A future of ``out`` once ``fut`` is done."""

  def __init__(self, fut, out: np.ndarray):
    self._fut, self._out = fut, out

  def result(self, timeout: float | None = None) -> np.ndarray:
    self._fut.result(timeout)
    return self._out
