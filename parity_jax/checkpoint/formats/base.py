"""What every checkpoint format provides: leaf metadata, read-only leaf readers, and the checkpoint itself.

A *checkpoint* here is one side of a migration (the source, the migrated
tree, a destination): a set of named leaves in some format (Orbax,
Hugging Face safetensors, ...) at some location (a local directory, a
bucket). Everything above this module -- the spec, the stream, the verifier,
the migrator -- sees only :class:`Checkpoint`, :class:`LeafMeta` and
:class:`LeafReader`; a new format is a new module beside this one that
implements them (and registers itself in :mod:`parity_jax.checkpoint.formats`).

* :class:`LeafMeta` -- one leaf's metadata: shape, dtype, storage chunking and
  what a read of a box costs (``box_reads``), never the values.
* :class:`LeafReader` -- read-only access to one leaf, one box at a time
  (``read_async`` / ``read_into_async`` futures), in bounded memory.
* :class:`Checkpoint` -- the opened (metadata only) checkpoint: its leaves,
  readers for them, whole-leaf reads of small leaves (``read_whole_async``),
  string leaves, and how its storage was read (``storage_facts``).
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import math
import threading
from typing import Any, Sequence

import numpy as np

from parity_jax.errors import UsageError, first_line

__all__ = ["Checkpoint", "LeafMeta", "LeafReadError", "LeafReader", "reader_threads"]


class LeafReadError(UsageError):
  """A leaf's data could not be read (missing or corrupted files, an unreachable store)."""

  def __init__(self, path: str, message: str):
    self.leaf = path
    super().__init__(f"cannot read leaf {path!r}: {message}")


@dataclasses.dataclass(frozen=True)
class LeafMeta:
  """Metadata of one stored leaf; enough to plan, never the values."""

  path: str
  keys: tuple[str, ...]
  kind: str  # "array" | "scalar" | "string"
  shape: tuple[int, ...]
  dtype: np.dtype | None  # None for strings
  chunk_shape: tuple[int, ...] | None  # storage chunk shape; None = unknown/one chunk
  storage_name: str  # the format's name for the leaf (orbax: keys joined by '.'; safetensors: the tensor name)
  value_type: str
  error: str | None = None  # set when the leaf's metadata cannot be read (damaged files)
  raw_chunks: bool = False  # chunks stored uncompressed (a sub-box is a byte range of the stored chunk)
  strict: bool = True  # a missing storage chunk is an error (else it reads as the fill value)
  codec: str = ""  # the chunk compression ("none", "zstd", ...); "" for strings and unreadable leaves
  box_reads: bool = False  # any box costs just its own bytes (no chunk to decode): read it in small pieces
  ranged: bool = False  # in a bucket, each stored chunk is fetched as many range requests (formats/ocdbt_ranges)

  @property
  def nbytes(self) -> int:
    if self.dtype is None:
      return 0
    return math.prod(self.shape) * self.dtype.itemsize

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def streamable(self) -> bool:
    """Read box by box (arrays and numeric scalars); strings are read whole."""
    return self.kind in ("array", "scalar") and self.error is None

  @property
  def n_chunks(self) -> int:
    if not self.shape or self.chunk_shape is None:
      return 1
    return math.prod(-(-d // max(1, c)) for d, c in zip(self.shape, self.chunk_shape))


class LeafReader(abc.ABC):
  """Read-only access to one array/scalar leaf, a box at a time. Use as a context manager.

  ``read_into_async(box, out)`` starts filling ``out`` (C-contiguous, the
  box's shape, the leaf's dtype) and returns a future for :meth:`wait`;
  ``read_async(box)`` returns a future of a new array for :meth:`result`.
  Errors become :class:`LeafReadError`.
  """

  def __init__(self, leaf: LeafMeta):
    if not leaf.streamable:
      raise UsageError(f"leaf {leaf.path!r} ({leaf.kind}) cannot be read box by box")
    self.leaf = leaf

  @abc.abstractmethod
  def open(self) -> "LeafReader":
    """Opens the leaf (idempotent); returns self."""

  def close(self) -> None:
    """Drops whatever the reader holds (handles, caches)."""

  def __enter__(self) -> "LeafReader":
    return self.open()

  def __exit__(self, *exc) -> None:
    self.close()

  @abc.abstractmethod
  def read_async(self, box: Sequence[slice]):
    """A future for ``leaf[box]`` as a numpy array (use :meth:`result`)."""

  @abc.abstractmethod
  def read_into_async(self, box: Sequence[slice], out: np.ndarray):
    """A future that fills ``out`` with ``leaf[box]`` (use :meth:`wait`)."""

  def wait(self, future) -> None:
    """Waits for a :meth:`read_into_async` future."""
    try:
      future.result()
    except LeafReadError:
      raise
    except Exception as e:
      raise LeafReadError(self.leaf.path, first_line(e)) from None

  def result(self, future) -> np.ndarray:
    """The array of a :meth:`read_async` future."""
    try:
      out = future.result()
    except LeafReadError:
      raise
    except Exception as e:
      raise LeafReadError(self.leaf.path, first_line(e)) from None
    return np.asarray(out)

  def read(self, box: Sequence[slice] = ()) -> np.ndarray:
    self.open()
    return self.result(self.read_async(box))


class Checkpoint(abc.ABC):
  """An opened (metadata only) checkpoint of some format; see the module docstring.

  Subclasses set ``path``, ``format``, ``layout``, ``leaves`` and
  ``empty_nodes`` and implement the readers. ``describe()``,
  ``storage_summary()`` and ``storage_facts()`` say what was found and how it
  is read, for people and for the report.
  """

  path: str  # as given, made absolute (or a bucket URL)
  format: str  # "orbax" | "safetensors"
  layout: str  # the format's layout name ("v0", "v1", "step"; "single", "sharded")
  leaves: dict[str, LeafMeta]
  empty_nodes: list[str]

  # ---- reading ----

  @abc.abstractmethod
  def reader(self, leaf: LeafMeta, cache_bytes: int = 0) -> LeafReader:
    """A new, unopened reader of ``leaf`` with a private chunk cache of ``cache_bytes`` (0: none)."""

  @abc.abstractmethod
  def read_whole_async(self, leaf: LeafMeta):
    """A future of the whole leaf as an array (small leaves, many in flight through shared handles)."""

  def read_whole(self, leaf: LeafMeta) -> np.ndarray:
    try:
      return np.asarray(self.read_whole_async(leaf).result())
    except LeafReadError:
      raise
    except Exception as e:
      raise LeafReadError(leaf.path, first_line(e)) from None

  def read_string(self, leaf: LeafMeta) -> str:
    raise LeafReadError(leaf.path, f"{self.format} checkpoints hold no string leaves")

  # ---- what was found ----

  def unreadable(self) -> dict[str, str]:
    """Leaves whose metadata could not be read, with the reason."""
    return {p: m.error for p, m in self.leaves.items() if m.error}

  @property
  def nbytes(self) -> int:
    return sum(m.nbytes for m in self.leaves.values())

  def describe(self) -> str:
    return f"{self.format} {self.layout} checkpoint, {len(self.leaves)} leaves, {self.nbytes / 2**20:.1f} MiB"

  def storage_facts(self) -> dict[str, Any]:
    """What the reader used to read this checkpoint (format-specific facts, and how each was decided)."""
    return {"path": self.path, "format": self.format, "layout": self.layout}

  def storage_summary(self) -> str:
    """One short line: how the storage is read."""
    return f"{self.format} ({self.layout})"


_POOLS: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def reader_threads(name: str, workers: int) -> concurrent.futures.ThreadPoolExecutor:
  """The threads a format's readers share under ``name`` (started on first use; a reader holds none of its own)."""
  with _POOLS_LOCK:
    pool = _POOLS.get(name)
    if pool is None:
      pool = _POOLS[name] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"parity_jax-{name}")
    return pool
