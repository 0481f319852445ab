"""Hugging Face safetensors directories as a checkpoint side: header metadata on open, leaves read by byte range.

A side is a directory holding either ``model.safetensors`` (layout
``single``) or shards listed in ``model.safetensors.index.json`` (layout
``sharded``; its ``weight_map`` names the file of every tensor). Each tensor
is one leaf; its path is the tensor name (``model.layers.0.mlp.up_proj.weight``).

Opening reads the 8-byte header length and the JSON header of every file,
never array data. Every safetensors dtype is read (F64/F32/F16/BF16,
F8_E4M3/F8_E5M2 through ml_dtypes, the signed and unsigned integers, BOOL;
:data:`parity_jax.dtypes.SAFETENSORS_DTYPES`). A header that cannot be parsed
at all is a one-line :class:`~parity_jax.errors.UsageError`. A tensor whose
entry lies -- an unknown dtype, ``data_offsets`` that do not match its shape,
that run past the end of the file (a truncated file) or that overlap another
tensor's bytes -- or that the index places in a file that does not hold it,
keeps ``LeafMeta.error`` set: the verifier reports it UNREADABLE by name
(as a source leaf, the tools refuse it in one line).

Shards (``model-0000i-of-0000N.safetensors``) and/or ``config.json`` without
the index or ``model.safetensors`` are an unfinished directory: the object that
makes it loadable is the last one a migration writes into a bucket, its commit
(:mod:`parity_jax.checkpoint.migrate.to_safetensors`); a one-line UsageError says so.

Values are read through :mod:`parity_jax.stores` (``read_range``) from a
bucket, and with ``pread`` on one descriptor per open reader from a local
file (a request per run costs a system call, not an open). A box of a leaf costs just its own
bytes (``LeafMeta.box_reads``): a C-contiguous box is one byte range; other
boxes are read as runs of rows, a bounded span of rows per request, and
picked out with a strided view. No leaf is read whole unless the whole leaf
is asked for, and no request is longer than :data:`READ_PIECE_BYTES`.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import struct
from typing import Any, Sequence

import numpy as np

from parity_jax.checkpoint import keypath
from parity_jax.checkpoint.formats.base import Checkpoint, LeafMeta, LeafReadError, LeafReader, reader_threads
from parity_jax.dtypes import SAFETENSORS_DTYPES
from parity_jax.errors import UsageError, first_line
from parity_jax.stores import Store, StoreError, open_store

__all__ = [
    "CONFIG",
    "INDEX",
    "SINGLE",
    "SUPPORTED",
    "SafetensorsCheckpoint",
    "SafetensorsLeafReader",
    "detect",
    "is_shard_name",
    "open_safetensors",
    "read_box_into",
]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SUPPORTED = (
    f"supported: a Hugging Face safetensors directory with {SINGLE}, or shards listed in {INDEX};"
    " or an Orbax PyTree checkpoint"
)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (its MAX_HEADER_SIZE, decimal)
READ_PIECE_BYTES = 8 << 20  # the longest single byte-range request


CONFIG = "config.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def is_shard_name(name: str) -> bool:
  """Whether ``name`` is a shard's file name as transformers (and our writer) names them."""
  return bool(_SHARD.fullmatch(name))


def detect(path: str | os.PathLike) -> bool:
  """Does ``path`` look like a safetensors directory (any ``*.safetensors`` file or the index), or what a
  safetensors migration into a bucket leaves when cut short (``config.json`` alone)? Names only."""
  try:
    store = open_store(path)
    if not store.is_dir():
      return False
    names, dirs = store.listdir()
  except (StoreError, OSError):
    return False
  return any(n.endswith(".safetensors") or n == INDEX for n in names) or (names == [CONFIG] and not dirs)


def _unfinished(names: list[str]) -> list[str] | None:
  """The files of an unfinished safetensors migration (or upload): only ``config.json`` and
  ``model-0000i-of-0000N.safetensors`` shards, without the index written last; None if it is not one."""
  if INDEX in names or SINGLE in names or not names:
    return None
  if all(n == CONFIG or is_shard_name(n) for n in names):
    return names
  return None


class SafetensorsCheckpoint(Checkpoint):
  """An opened (headers only) safetensors directory; see the module docstring."""

  format = "safetensors"

  def __init__(
      self,
      path: str,
      layout: str,
      leaves: dict[str, LeafMeta],
      where: dict[str, tuple[Store, int]],
      files: list[str],
      facts: dict[str, Any],
  ):
    self.path = path
    self.layout = layout
    self.leaves = leaves
    self.empty_nodes = []
    self.where = where  # leaf path -> (file store, absolute offset of its first byte)
    self.files = files
    self.facts = facts

  def reader(self, leaf: LeafMeta, cache_bytes: int = 0) -> "SafetensorsLeafReader":
    return SafetensorsLeafReader(self, leaf)

  def read_whole_async(self, leaf: LeafMeta):
    def whole() -> np.ndarray:
      with self.reader(leaf) as r:
        return r._fill((), np.empty(leaf.shape, leaf.dtype))

    return _pool().submit(whole)

  def describe(self) -> str:
    return (
        f"safetensors {self.layout} checkpoint ({len(self.files)} file{'s' if len(self.files) != 1 else ''}),"
        f" {len(self.leaves)} leaves, {self.nbytes / 2**20:.1f} MiB"
    )

  def storage_facts(self) -> dict[str, Any]:
    return {"path": self.path, "format": self.format, "layout": self.layout, "files": list(self.files), **self.facts}

  def storage_summary(self) -> str:
    n = len(self.files)
    return f"safetensors ({self.layout}, {n} file{'s' if n != 1 else ''}; byte-range reads)"


class SafetensorsLeafReader(LeafReader):
  """One tensor of a safetensors file, read a box at a time by byte range (nothing is cached)."""

  def __init__(self, ckpt: SafetensorsCheckpoint, leaf: LeafMeta):
    super().__init__(leaf)
    self.ckpt = ckpt

  _src: "_Bytes | None" = None

  def open(self) -> "SafetensorsLeafReader":
    """Opens the file (a local file: one descriptor, read with pread; a bucket object: byte-range requests)."""
    if self._src is None:
      store, _ = self.ckpt.where[self.leaf.path]
      try:
        self._src = _Bytes(store)
      except StoreError as e:
        raise LeafReadError(self.leaf.path, first_line(e)) from None
    return self

  def close(self) -> None:
    if self._src is not None:
      self._src.close()
      self._src = None

  def _fill(self, box: Sequence[slice], out: np.ndarray) -> np.ndarray:
    _, begin = self.ckpt.where[self.leaf.path]
    self.open()
    try:
      read_box_into(self._src, begin, self.leaf.shape, self.leaf.dtype, box, out)
    except (StoreError, ValueError, OSError) as e:
      raise LeafReadError(self.leaf.path, first_line(e)) from None
    return out

  def read_async(self, box: Sequence[slice]):
    out = np.empty(_box_shape(box, self.leaf.shape), self.leaf.dtype)
    return _pool().submit(self._fill, box, out)

  def read_into_async(self, box: Sequence[slice], out: np.ndarray):
    if not out.flags.c_contiguous or out.dtype != self.leaf.dtype or out.shape != _box_shape(box, self.leaf.shape):
      raise UsageError(f"leaf {self.leaf.path!r}: the output buffer does not fit the box")
    return _pool().submit(self._fill, box, out)


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  """The threads that serve byte-range reads."""
  return reader_threads("safetensors", 4)


def _bounds(box: Sequence[slice], shape: tuple[int, ...]) -> list[tuple[int, int]]:
  box = tuple(box) + (slice(None),) * (len(shape) - len(tuple(box)))
  if len(box) != len(shape):
    raise ValueError(f"box of {len(box)} axes for shape {shape}")
  out = []
  for s, d in zip(box, shape):
    lo, hi, step = s.indices(d)
    if step != 1:
      raise ValueError("strided boxes are not supported")
    out.append((lo, max(lo, hi)))
  return out


def _box_shape(box: Sequence[slice], shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(hi - lo for lo, hi in _bounds(box, shape))


def _pread(fd: int, offset: int, dest: np.ndarray) -> int:
  """One ``pread`` of a local file into the uint8 array ``dest``; the bytes read."""
  return os.preadv(fd, [memoryview(dest)], offset)


class _Bytes:
  """Where a leaf's bytes come from: a local file held open (pread, no copy), or a store's byte ranges."""

  def __init__(self, store: Store):
    self.store = store
    self.fd = None
    if store.local_path is not None:
      try:
        self.fd = os.open(store.local_path, os.O_RDONLY)
      except OSError as e:
        raise StoreError(f"{store}: {e.strerror or e}", "not_found" if e.errno == 2 else "io") from None

  def close(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None

  def __del__(self):
    self.close()

  def read_into(self, offset: int, dest: np.ndarray) -> None:
    n = dest.size
    if self.fd is None:
      data = self.store.read_range(offset, offset + n)
      if len(data) != n:
        raise StoreError(f"{self.store}: bytes [{offset}, {offset + n}) lie past its end", "out_of_range")
      dest[:] = np.frombuffer(data, np.uint8)
      return
    done = 0
    while done < n:
      got = _pread(self.fd, offset + done, dest[done:])
      if got <= 0:
        raise StoreError(f"{self.store}: bytes [{offset + done}, {offset + n}) lie past its end", "out_of_range")
      done += got


def _read_span(src: _Bytes, offset: int, dest: np.ndarray) -> None:
  """Fills the uint8 array ``dest`` with the bytes at ``offset``, at most READ_PIECE_BYTES per request."""
  n = dest.size
  for a in range(0, n, READ_PIECE_BYTES):
    b = min(n, a + READ_PIECE_BYTES)
    src.read_into(offset + a, dest[a:b])


def read_box_into(
    store: "_Bytes", begin: int, shape: tuple[int, ...], dtype: np.dtype, box: Sequence[slice], out: np.ndarray
) -> None:
  """Fills ``out`` (C-contiguous, the box's shape, ``dtype``) with ``box`` of the C-order array stored at ``begin``.

  The box is cut into runs: the trailing axes it covers whole and its extent
  on the last axis it does not, contiguous in the file. Runs that lie close
  together (at least a quarter of the bytes between them used) are read as
  one span of up to READ_PIECE_BYTES and picked out with a strided view;
  sparse runs are read one by one.
  """
  bounds = _bounds(box, shape)
  isz = np.dtype(dtype).itemsize
  flat = out.reshape(-1).view(np.uint8)
  if out.size == 0:
    return
  nd = len(shape)
  if nd == 0:
    _read_span(store, begin, flat)
    return
  strides = [math.prod(shape[i + 1 :]) * isz for i in range(nd)]  # bytes
  a = nd - 1  # the last axis the box does not cover whole; everything after it is contiguous
  while a > 0 and bounds[a] == (0, shape[a]):
    a -= 1
  run = (bounds[a][1] - bounds[a][0]) * strides[a]  # bytes per contiguous run
  start0 = begin + sum(lo * st for (lo, _), st in zip(bounds, strides))
  if a == 0:
    _read_span(store, start0, flat)
    return
  b = a - 1  # runs along axis b are evenly strided; the axes before it are looped over
  rows, stride = bounds[b][1] - bounds[b][0], strides[b]
  outer = [hi - lo for lo, hi in bounds[:b]]
  dest = flat.reshape(-1, rows, run)
  dense = run * 4 >= stride
  group = max(1, (READ_PIECE_BYTES - run) // stride + 1) if dense and run < READ_PIECE_BYTES else 1
  for k, idx in enumerate(np.ndindex(*outer) if outer else [()]):
    base = start0 + sum(i * st for i, st in zip(idx, strides))
    for r0 in range(0, rows, group):
      g = min(group, rows - r0)
      if g == 1:
        _read_span(store, base + r0 * stride, dest[k, r0])
        continue
      span = (g - 1) * stride + run
      buf = np.empty(span, np.uint8)
      _read_span(store, base + r0 * stride, buf)
      dest[k, r0 : r0 + g] = np.lib.stride_tricks.as_strided(buf, (g, run), (stride, 1), writeable=False)


# ---- opening ------------------------------------------------------------------------------------


def _header(store: Store, role: str, root: str) -> tuple[dict[str, Any], int, int]:
  """(header, offset of the data section, file size) of one safetensors file; one-line UsageError otherwise."""
  where = f"{role} {root}: {store.name}"
  try:
    size = store.size()
    if size < 8:
      raise UsageError(f"{where} is not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", store.read_range(0, 8))
    if n > size - 8:
      raise UsageError(f"{where}: the header length {n} runs past the end of the file ({size} bytes; truncated?)")
    if n > MAX_HEADER_BYTES:
      raise UsageError(f"{where}: the header length {n} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes")
    text = store.read_range(8, 8 + n)
  except StoreError as e:
    raise UsageError(f"{where}: {e}") from None
  try:
    header = json.loads(text.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise UsageError(f"{where}: the header is not valid JSON ({first_line(e)})") from None
  if not isinstance(header, dict):
    raise UsageError(f"{where}: the header is not a JSON object")
  return header, 8 + n, size


def _entry(
    name: str, info: Any, data_start: int, size: int
) -> tuple[np.dtype | None, tuple[int, ...], tuple[int, int] | None, str]:
  """(dtype, shape, (absolute begin, end), problem) of one header entry: problem '' when it is sound, else no
  span (None)."""
  if not isinstance(info, dict):
    return None, (), None, "its header entry is not an object"
  dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
  if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
    return None, (), None, f"its header shape {shape!r} is not a list of sizes"
  shape_t = tuple(shape)
  if dt not in SAFETENSORS_DTYPES:
    return None, shape_t, None, f"dtype {dt!r} is not one of {', '.join(SAFETENSORS_DTYPES)}"
  dtype = SAFETENSORS_DTYPES[dt]
  if (
      not isinstance(offs, list)
      or len(offs) != 2
      or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
      or not 0 <= offs[0] <= offs[1]
  ):
    return dtype, shape_t, None, f"its header data_offsets {offs!r} are not [begin, end]"
  want = math.prod(shape_t) * dtype.itemsize
  if offs[1] - offs[0] != want:
    return (
        dtype,
        shape_t,
        None,
        (
            f"the header lies: data_offsets {offs} hold {offs[1] - offs[0]} bytes, its shape {list(shape_t)} {dt} needs"
            f" {want}"
        ),
    )
  begin, end = data_start + offs[0], data_start + offs[1]
  if end > size:
    return (
        dtype,
        shape_t,
        None,
        (f"its bytes [{begin}, {end}) run past the end of the file ({size} bytes; truncated?)"),
    )
  return dtype, shape_t, (begin, end), ""


def _bad(name: str, error: str, shape=(), dtype=None) -> LeafMeta:
  return LeafMeta(name, keypath.split(name), "array", tuple(shape), dtype, None, name, "safetensors", error=error)


def open_safetensors(path: str | os.PathLike, role: str = "checkpoint") -> SafetensorsCheckpoint:
  """Reads the headers of a safetensors directory (no array data); one-line UsageError when it is not one."""
  try:
    store = open_store(path)
    root = str(store)
    names, _ = store.listdir()
  except StoreError as e:
    raise UsageError(f"{role}: {e}") from None
  if INDEX in names:
    layout = "sharded"
    try:
      index = json.loads(store.child(INDEX).read_bytes().decode("utf-8"))
    except (StoreError, UnicodeDecodeError, ValueError) as e:
      raise UsageError(f"{role} {root}: cannot read {INDEX}: {first_line(e)}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
      raise UsageError(f"{role} {root}: {INDEX} has no 'weight_map' of tensor name -> shard file")
    files = sorted(set(weight_map.values()))
    bad_names = [f for f in files if f in ("", ".", "..") or "/" in f or "\\" in f]
    if bad_names:
      raise UsageError(f"{role} {root}: {INDEX} names shard {bad_names[0]!r}, not a file in this directory")
  elif SINGLE in names:
    layout, weight_map, files = "single", None, [SINGLE]
  elif _unfinished(names):
    shards = [n for n in names if n != CONFIG]
    what = f"only {CONFIG}"
    if shards:
      what = f"{len(shards)} shard{'s' if len(shards) > 1 else ''} ({shards[0]}{', ...' if len(shards) > 1 else ''})"
    raise UsageError(
        f"{role} is unfinished: {what} but neither {INDEX} nor {SINGLE} (the last object written, the commit"
        f" of a safetensors directory in a bucket) in {root} -- an interrupted or still running migration or upload"
    )
  else:
    found = [n for n in names if n.endswith(".safetensors")]
    raise UsageError(
        f"{role} holds safetensors files ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}) but neither"
        f" {SINGLE} nor {INDEX}; {SUPPORTED}: {root}"
    )
  missing = [f for f in files if f not in names]
  if missing:
    raise UsageError(
        f"{role} {root}: {INDEX} lists shard {missing[0]!r}"
        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which is not in the directory"
    )

  leaves: dict[str, LeafMeta] = {}
  where: dict[str, tuple[Store, int]] = {}
  holders: dict[str, list[str]] = {}
  metadata: dict[str, Any] = {}
  for fname in files:
    fstore = store.child(fname)
    header, data_start, size = _header(fstore, role, root)
    meta = header.pop("__metadata__", None)
    if isinstance(meta, dict):
      metadata[fname] = meta
    spans = []
    for name, info in header.items():
      holders.setdefault(name, []).append(fname)
      if len(holders[name]) > 1:
        continue
      dtype, shape, span, problem = _entry(name, info, data_start, size)
      if problem:
        leaves[name] = _bad(name, f"{fname}: {problem}", shape, dtype)
        continue
      begin, end = span
      leaves[name] = LeafMeta(
          name, keypath.split(name), "array", shape, dtype, None, name, "safetensors", codec="none", box_reads=True
      )
      where[name] = (fstore, begin)
      if end > begin:
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
      if b1 < e0:
        for n in (n0, n1):
          other = n1 if n == n0 else n0
          leaves[n] = _bad(
              n, f"{fname}: the header lies: its bytes overlap those of {other!r}", leaves[n].shape, leaves[n].dtype
          )
          where.pop(n, None)
  for name, held in holders.items():
    if len(held) > 1:
      leaves[name] = _bad(name, f"tensor is stored in {len(held)} files ({', '.join(held)})")
      where.pop(name, None)
  if weight_map is not None:
    for name, fname in weight_map.items():
      held = holders.get(name)
      if not held:
        leaves[name] = _bad(name, f"{INDEX} puts it in {fname}, which does not hold it")
      elif len(held) == 1 and held != [fname]:
        leaves[name] = _bad(name, f"{INDEX} puts it in {fname}, but it is stored in {', '.join(held)}")
        where.pop(name, None)
  facts: dict[str, Any] = {"reads": "byte ranges from the header offsets"}
  if metadata:
    facts["metadata"] = metadata
  return SafetensorsCheckpoint(root, layout, dict(sorted(leaves.items())), where, files, facts)
