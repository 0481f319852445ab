"""Stage bundles: an ordered mapping name -> array in one ``.safetensors`` file.

A stage bundle is how every part of parity_jax exchanges intermediate tensors:
the forward pass's per-layer stages, the HF oracle's goldens, the SVF
reconstruction stages. The file is plain safetensors, so anything that reads
safetensors can read it; the header metadata carries what safetensors itself
does not keep:

* ``format``      -- ``parity_jax.stage_bundle/1``
* ``stage_order`` -- JSON list of the stage names in execution order
  (safetensors stores tensors sorted by name, which is the wrong order for a
  forward pass)
* ``provenance``  -- JSON object: producer, library versions, seed, and any
  free-form JSON the producer adds.

:func:`load_bundle` reads everything; :class:`BundleReader` opens lazily and
reads one tensor, or one row range of it, at a time; :class:`BundleWriter`
streams tensors row chunk by row chunk for bundles too big to hold in memory
(the safetensors library can only save a fully materialised dict).
"""

from __future__ import annotations

import collections
import json
import os
import struct
import zipfile
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import safetensors

from parity_jax.dtypes import SAFETENSORS_DTYPES, c_contiguous, safetensors_name
from parity_jax.errors import UsageError, first_line

FORMAT = "parity_jax.stage_bundle/1"

__all__ = ["FORMAT", "BundleReader", "BundleWriter", "StageBundle", "load_bundle", "save_bundle"]


def _to_numpy(x: Any) -> np.ndarray:
  a = np.asarray(x)
  if not a.dtype.isnative:
    a = a.astype(a.dtype.newbyteorder("="))
  if safetensors_name(a.dtype) is None:
    raise UsageError(f"stage bundles cannot store dtype {a.dtype}")
  return c_contiguous(a)


class StageBundle(Mapping[str, np.ndarray]):
  """An ordered, in-memory mapping stage name -> numpy array, plus provenance."""

  def __init__(
      self,
      stages: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
      provenance: Mapping[str, Any] | None = None,
      ordered: bool = True,
  ):
    # ``ordered`` is False when the order is only the file's storage order
    # (plain safetensors, .npz), so consumers may infer the execution order.
    self.ordered = ordered
    items = stages.items() if isinstance(stages, Mapping) else stages
    self._stages: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for name, value in items:
      self[name] = value
    self.provenance: dict[str, Any] = dict(provenance or {})

  def __setitem__(self, name: str, value: Any) -> None:
    if not isinstance(name, str) or not name:
      raise UsageError(f"stage names must be non-empty strings, got {name!r}")
    self._stages[name] = _to_numpy(value)

  def __getitem__(self, name: str) -> np.ndarray:
    return self._stages[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._stages)

  def __len__(self) -> int:
    return len(self._stages)

  @property
  def names(self) -> list[str]:
    return list(self._stages)

  def save(self, path: str | os.PathLike) -> None:
    save_bundle(path, self._stages, self.provenance)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "StageBundle":
    return load_bundle(path)

  def __repr__(self) -> str:
    return f"StageBundle({len(self)} stages, producer={self.provenance.get('producer')!r})"


def _metadata(names: Sequence[str], provenance: Mapping[str, Any] | None) -> dict[str, str]:
  return {
      "format": FORMAT,
      "stage_order": json.dumps(list(names)),
      "provenance": json.dumps(dict(provenance or {}), sort_keys=True, default=str),
  }


def save_bundle(
    path: str | os.PathLike, stages: Mapping[str, Any], provenance: Mapping[str, Any] | None = None
) -> None:
  """Writes ``stages`` (in their iteration order) and ``provenance`` to ``path``.

  The bytes are a deterministic function of the inputs (the safetensors
  library writes header metadata in hash-map order; :class:`BundleWriter`
  does not), and the file is written next to ``path`` and renamed into place,
  so a crash never leaves a truncated bundle behind.
  """
  arrays = collections.OrderedDict((name, _to_numpy(v)) for name, v in stages.items())
  with BundleWriter(path, [(n, a.shape, a.dtype) for n, a in arrays.items()], provenance) as w:
    for name, a in arrays.items():
      w.write(name, a)


class BundleReader:
  """Lazy read access to a stage bundle (or any safetensors file).

  ``names`` is the stage order from the metadata when present, else the order
  the tensors are laid out in the file. Use as a context manager.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.exists(self.path):
      raise UsageError(f"no such file: {self.path}")
    if os.path.isdir(self.path):
      raise UsageError(f"expected a .safetensors file, got a directory: {self.path}")
    try:
      self._file = safetensors.safe_open(self.path, framework="numpy")
      meta = self._file.metadata() or {}
      keys = list(self._file.keys())
      self._info = {k: (self._file.get_slice(k).get_shape(), self._file.get_slice(k).get_dtype()) for k in keys}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise UsageError(f"cannot read {self.path} as safetensors: {first_line(e)}") from None
    self.metadata: dict[str, str] = dict(meta)
    self.provenance: dict[str, Any] = {}
    if "provenance" in meta:
      try:
        self.provenance = json.loads(meta["provenance"])
      except json.JSONDecodeError:
        raise UsageError(f"{self.path}: provenance metadata is not valid JSON") from None
    order = None
    if "stage_order" in meta:
      try:
        order = json.loads(meta["stage_order"])
      except json.JSONDecodeError:
        raise UsageError(f"{self.path}: stage_order metadata is not valid JSON") from None
      if not isinstance(order, list) or sorted(order) != sorted(keys):
        raise UsageError(f"{self.path}: stage_order metadata does not list exactly the stored tensors")
    self.has_order = order is not None
    self.names: list[str] = order if order is not None else keys

  def __enter__(self) -> "BundleReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._file = None

  def __contains__(self, name: str) -> bool:
    return name in self._info

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._info[name][0])

  def dtype(self, name: str) -> np.dtype:
    return SAFETENSORS_DTYPES[self._info[name][1]]

  def get(self, name: str) -> np.ndarray:
    if name not in self._info:
      raise UsageError(f"{self.path}: no stage named {name!r}")
    return self._file.get_tensor(name)

  def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` along axis 0, read without loading the rest of the tensor."""
    if name not in self._info:
      raise UsageError(f"{self.path}: no stage named {name!r}")
    return self._file.get_slice(name)[start:stop]


def load_bundle(path: str | os.PathLike) -> StageBundle:
  """Reads a whole bundle. Also accepts plain safetensors and ``.npz`` files."""
  path = os.fspath(path)
  if path.endswith(".npz"):
    if not os.path.isfile(path):
      raise UsageError(f"no such file: {path}")
    try:
      with np.load(path, allow_pickle=False) as z:
        return StageBundle([(k, z[k]) for k in z.files], {"producer": "npz", "source": path}, ordered=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
      raise UsageError(f"cannot read {path} as .npz: {first_line(e)}") from None
  with BundleReader(path) as r:
    return StageBundle([(n, r.get(n)) for n in r.names], r.provenance, ordered=r.has_order)


class BundleWriter:
  """Streams a safetensors stage bundle to disk tensor by tensor, in row chunks.

  Declare every tensor's name, shape and dtype up front (the safetensors header
  holds all offsets), then write each tensor's rows in order with
  :meth:`write_rows`. The result is an ordinary safetensors file that
  :class:`BundleReader` and the safetensors library read. It appears at
  ``path`` only after :meth:`close` verified that every byte was written.

  ``interleave=True`` lets rows of different tensors alternate (each tensor's
  own rows still arrive in order), for producers that compute several tensors
  one row chunk at a time.
  """

  def __init__(
      self,
      path: str | os.PathLike,
      specs: Sequence[tuple[str, Sequence[int], Any]],
      provenance: Mapping[str, Any] | None = None,
      interleave: bool = False,
  ):
    self.path = os.fspath(path)
    self._interleave = interleave
    self._tmp = f"{self.path}.tmp-{os.getpid()}"
    header: dict[str, Any] = {"__metadata__": _metadata([s[0] for s in specs], provenance)}
    self._layout: dict[str, tuple[tuple[int, ...], np.dtype, int, int]] = {}
    offset = 0
    for name, shape, dtype in specs:
      dtype = np.dtype(dtype)
      if safetensors_name(dtype) is None:
        raise UsageError(f"stage bundles cannot store dtype {dtype}")
      if name in self._layout:
        raise UsageError(f"duplicate stage name {name!r}")
      shape = tuple(int(s) for s in shape)
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[name] = {"dtype": safetensors_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      self._layout[name] = (shape, dtype, offset, nbytes)
      offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    self._data_start = 8 + len(raw)
    self._f = open(self._tmp, "wb")
    self._f.write(struct.pack("<Q", len(raw)))
    self._f.write(raw)
    self._written = {name: 0 for name in self._layout}
    self._order = [s[0] for s in specs]
    self._current = 0

  def write(self, name: str, value: Any) -> None:
    """Writes a whole tensor."""
    self.write_rows(name, value)

  def write_rows(self, name: str, rows: Any) -> None:
    """Appends the next rows (a C-order block along axis 0) of tensor ``name``."""
    if name not in self._layout:
      raise UsageError(f"{name!r} is not a declared tensor of {self.path}")
    shape, dtype, offset, nbytes = self._layout[name]
    while (
        not self._interleave
        and self._current < len(self._order)
        and self._written[self._order[self._current]] == self._layout[self._order[self._current]][3]
    ):
      self._current += 1
    if not self._interleave and (self._current >= len(self._order) or self._order[self._current] != name):
      raise UsageError(
          f"tensors must be written in declared order; expected {self._order[self._current] if self._current < len(self._order) else None!r}, got {name!r}"
      )
    a = c_contiguous(np.asarray(rows))
    if a.dtype != dtype:
      raise UsageError(f"{name}: dtype {a.dtype} does not match declared {dtype}")
    if a.shape[1:] != shape[1:] and not (shape == () and a.shape == ()):
      raise UsageError(f"{name}: row block {a.shape} does not fit declared shape {shape}")
    if self._written[name] + a.nbytes > nbytes:
      raise UsageError(f"{name}: more rows written than its declared shape {shape}")
    self._f.seek(self._data_start + offset + self._written[name])
    self._f.write(memoryview(a.reshape(-1).view(np.uint8)))
    self._written[name] += a.nbytes

  def close(self) -> None:
    if self._f is None:
      return
    self._f.close()
    self._f = None
    short = [n for n, (_, _, _, nbytes) in self._layout.items() if self._written[n] != nbytes]
    if short:
      os.remove(self._tmp)
      raise UsageError(f"bundle {self.path} incomplete: {short[:5]} not fully written")
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self) -> "BundleWriter":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()
