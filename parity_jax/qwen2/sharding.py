"""Qwen weights on a device mesh: sharding rules, by-slice safetensors reads, mesh specs, batch placement.

``parity_jax.qwen2.load(path, mesh=mesh)`` places every weight directly onto
the mesh as a sharded ``jax.Array``. Each weight's :class:`PartitionSpec`
comes from a rule table: ``(regex, spec)`` rows matched (``re.fullmatch``)
against the weight's field path in :class:`~parity_jax.qwen2.params.Params`
(``embed``, ``layers.3.attn.wq``, ``layers.3.mlp.w_down``, ...), first match
wins; the spec is over the pytree's axes (``wq[heads, head_dim, hidden]``).
Caller rules are consulted before :data:`DEFAULT_RULES`:

=================================  =====================  ===========================
field                              default spec           split axis
=================================  =====================  ===========================
``embed``, ``lm_head``             ``P("tp", None)``      vocab
``attn.wq``, ``attn.wk/wv``        ``P("tp", None, None)``  query heads, kv heads
``attn.bq``, ``attn.bk/bv``        ``P("tp", None)``      query heads, kv heads
``attn.wo``                        ``P(None, "tp", None)``  query heads
``mlp.w_gate``, ``mlp.w_up``       ``P("tp", None)``      intermediate
``mlp.w_down``                     ``P(None, "tp")``      intermediate
norms, ``attn.bo``, q/k norms      ``P()``                replicated
=================================  =====================  ===========================

and the inputs' batch axis over ``dp`` (:func:`place_inputs`). With these
rules the forward is Megatron-style tensor parallel: every attention head and
MLP column lives on one ``tp`` shard, and ``o_proj`` / ``down_proj`` /
the embedding gather end in a sum over ``tp``. A weight whose split axis does
not divide over its mesh axis is a one-line :class:`UsageError` naming the
weight and the axis (e.g. 2 kv heads on ``tp=4``: override the rule, e.g.
``(r"layers\\.\\d+\\.attn\\.(wk|wv|bk|bv)", P())`` replicates them).

Reading (:class:`SafetensorsFile`): each device's shard is a box (one slice
per axis) of the stored tensor. The safetensors header gives every tensor's
byte range; a box of a C-contiguous tensor is a set of evenly strided byte
runs, read with ``readinto`` straight into a 64-byte aligned numpy array of
the shard's shape (or, for short runs and dtype conversions, through a buffer
of at most :data:`READ_BUFFER_BYTES`). No file is memory-mapped, so the pages
read never stay in the process's RSS, and no host ever holds more than one
shard plus that buffer of a tensor. On CPU an aligned array becomes the
device buffer without a copy. Each distinct shard is read once per process
and put on every local device that holds it (replication over ``dp``); under
``jax.distributed`` a process only reads the shards of its own devices
(``addressable_devices_indices_map``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parity_jax.dtypes import SAFETENSORS_DTYPES
from parity_jax.errors import UsageError

__all__ = [
    "DEFAULT_RULES",
    "LEAF_AXES",
    "MESH_AXES",
    "READ_BUFFER_BYTES",
    "Rules",
    "SafetensorsFile",
    "aligned_empty",
    "batch_sharding",
    "field_sharding",
    "make_mesh",
    "mesh_of",
    "param_shardings",
    "parse_mesh_spec",
    "place_inputs",
    "place_sharded",
    "shard_params",
    "spec_for",
    "to_host",
]

DP, TP = "dp", "tp"
#: The mesh axes the default rules and the ``--mesh`` flag speak of, in mesh order.
MESH_AXES = (DP, TP)

Rules = Sequence[tuple[str, Any]]

#: The default rule table (see the module docstring); the last row replicates everything else.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"embed|lm_head", P(TP, None)),
    (r"layers\.\d+\.attn\.w[qkv]", P(TP, None, None)),
    (r"layers\.\d+\.attn\.b[qkv]", P(TP, None)),
    (r"layers\.\d+\.attn\.wo", P(None, TP, None)),
    (r"layers\.\d+\.mlp\.w_(gate|up)", P(TP, None)),
    (r"layers\.\d+\.mlp\.w_down", P(None, TP)),
    (r".*", P()),
)

#: The named axes of every leaf of Params (by its last field name), for error messages.
LEAF_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "hidden"),
    "lm_head": ("vocab", "hidden"),
    "attn_norm": ("hidden",),
    "ffn_norm": ("hidden",),
    "final_norm": ("hidden",),
    "wq": ("heads", "head_dim", "hidden"),
    "wk": ("kv_heads", "head_dim", "hidden"),
    "wv": ("kv_heads", "head_dim", "hidden"),
    "wo": ("hidden", "heads", "head_dim"),
    "bq": ("heads", "head_dim"),
    "bk": ("kv_heads", "head_dim"),
    "bv": ("kv_heads", "head_dim"),
    "bo": ("hidden",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "w_gate": ("intermediate", "hidden"),
    "w_up": ("intermediate", "hidden"),
    "w_down": ("hidden", "intermediate"),
}

#: Largest read buffer (bytes) for short strided runs and dtype conversions.
READ_BUFFER_BYTES = 4 << 20
_ALIGN = 64  # bytes; XLA's CPU client takes 64-byte aligned host arrays without a copy


# ----------------------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------------------


def _as_spec(spec: Any, where: str) -> P:
  if isinstance(spec, P):
    return spec
  if isinstance(spec, (tuple, list)):
    return P(*spec)
  raise UsageError(f"sharding rule {where!r}: spec must be a PartitionSpec or a tuple, got {type(spec).__name__}")


def spec_for(field: str, rules: Rules | None = None) -> tuple[P, str]:
  """``(spec, pattern)`` of the first rule (caller rules, then :data:`DEFAULT_RULES`) matching ``field``."""
  for pattern, spec in tuple(rules or ()) + DEFAULT_RULES:
    try:
      hit = re.fullmatch(pattern, field)
    except re.error as e:
      raise UsageError(f"sharding rule {pattern!r} is not a valid regex: {e}") from None
    if hit:
      return _as_spec(spec, pattern), pattern
  raise AssertionError("DEFAULT_RULES ends with a catch-all")


def _axis_names(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def field_sharding(field: str, shape: Sequence[int], mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
  """The :class:`NamedSharding` of one weight, checked: known mesh axes, rank, and every split axis divides."""
  spec, pattern = spec_for(field, rules)
  shape = tuple(int(d) for d in shape)
  if len(spec) > len(shape):
    raise UsageError(
        f"{field}: sharding rule {pattern!r} gives spec {spec} for a rank-{len(shape)} weight {list(shape)}"
    )
  leaf = field.rsplit(".", 1)[-1]
  names = LEAF_AXES.get(leaf, tuple(f"axis{i}" for i in range(len(shape))))
  for dim, entry in enumerate(spec):
    axes = _axis_names(entry)
    for a in axes:
      if a not in mesh.shape:
        raise UsageError(
            f"{field}: sharding rule {pattern!r} names mesh axis {a!r}, which the mesh "
            f"({', '.join(f'{k}={v}' for k, v in mesh.shape.items())}) lacks"
        )
    parts = math.prod(mesh.shape[a] for a in axes)
    if parts > 1 and shape[dim] % parts:
      what = names[dim] if dim < len(names) else f"axis{dim}"
      over = "x".join(f"{a}={mesh.shape[a]}" for a in axes)
      raise UsageError(
          f"{field}: axis {dim} ({what}, size {shape[dim]}) does not divide over mesh axis {over}; "
          f"override its sharding rule (e.g. replicate it with P())"
      )
  return NamedSharding(mesh, spec)


def _leaf_fields(params: Any) -> list[tuple[str, Any]]:
  """``(field path, leaf)`` of every non-None leaf of a Params tree, in tree order."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = []
    for k in path:
      if hasattr(k, "name"):
        parts.append(k.name)
      elif hasattr(k, "idx"):
        parts.append(str(k.idx))
      else:
        parts.append(str(getattr(k, "key", k)))
    out.append((".".join(parts), leaf))
  return out


def param_shardings(params: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """A pytree of :class:`NamedSharding` matching ``params`` (arrays or ``ShapeDtypeStruct`` leaves)."""
  fields = _leaf_fields(params)
  shardings = [
      field_sharding(f, np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape, mesh, rules) for f, leaf in fields
  ]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), shardings)


def shard_params(params: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """``params`` (host or device arrays) placed on ``mesh`` with the rule table (``init_params(put=...)``)."""
  return jax.device_put(params, param_shardings(params, mesh, rules))


def mesh_of(params: Any) -> Mesh | None:
  """The mesh the weights live on when they are sharded over more than one device, else None.

  None as well inside a caller's ``jit`` (traced weights): that jit's shardings rule there.
  """
  leaves = [x for x in jax.tree_util.tree_leaves(params) if isinstance(x, jax.Array)]
  if not leaves or isinstance(leaves[0], jax.core.Tracer):
    return None
  sh = leaves[0].sharding
  if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
    return sh.mesh
  return None


# ----------------------------------------------------------------------------------------------------------------
# Meshes
# ----------------------------------------------------------------------------------------------------------------


def parse_mesh_spec(text: str, flag: str = "mesh") -> dict[str, int]:
  """``"dp:2,tp:4"`` -> ``{"dp": 2, "tp": 4}`` (``=`` works as well as ``:``); axes dp and tp, sizes >= 1."""
  out: dict[str, int] = {}
  body = (text or "").strip()
  if not body:
    raise UsageError(f"--{flag} is empty; expected e.g. dp:2,tp:4")
  for part in body.split(","):
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*[:=]\s*(\d+)\s*", part)
    if not m:
      raise UsageError(f"--{flag}: {part.strip()!r} is not axis:size (expected e.g. dp:2,tp:4)")
    name, size = m.group(1), int(m.group(2))
    if name not in MESH_AXES:
      raise UsageError(f"--{flag}: unknown mesh axis {name!r}; the axes are {', '.join(MESH_AXES)}")
    if name in out:
      raise UsageError(f"--{flag}: axis {name!r} given twice")
    if size < 1:
      raise UsageError(f"--{flag}: axis {name} must have size >= 1, got {size}")
    out[name] = size
  return out


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None, flag: str = "mesh") -> Mesh:
  """A ``(dp, tp)`` mesh over the first ``dp * tp`` devices (absent axes have size 1).

  ``spec`` is ``"dp:2,tp:4"`` or a mapping. Asking for more devices than JAX
  sees is a one-line error that says how to get forced host devices on CPU.
  """
  sizes = parse_mesh_spec(spec, flag) if isinstance(spec, str) else dict(spec)
  for name in sizes:
    if name not in MESH_AXES:
      raise UsageError(f"--{flag}: unknown mesh axis {name!r}; the axes are {', '.join(MESH_AXES)}")
  shape = tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
  devices = list(jax.devices() if devices is None else devices)
  need = math.prod(shape)
  if need > len(devices):
    text = ",".join(f"{a}:{s}" for a, s in zip(MESH_AXES, shape))
    hint = (
        f" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={need} before JAX starts gives {need})"
        if devices and devices[0].platform == "cpu"
        else ""
    )
    raise UsageError(f"--{flag}={text} needs {need} devices; JAX sees {len(devices)}{hint}")
  return Mesh(np.array(devices[:need], dtype=object).reshape(shape), MESH_AXES)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and outputs
# ----------------------------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, ndim: int, batch: int | None, what: str = "tokens") -> NamedSharding:
  """Batch (axis 0) over ``dp`` when the mesh has it, the rest replicated; ``batch=None``: replicated."""
  dp = mesh.shape.get(DP, 1)
  if batch is None or dp == 1:
    return NamedSharding(mesh, P())
  if batch % dp:
    raise UsageError(f"{what}: batch {batch} does not divide over mesh axis {DP}={dp}")
  return NamedSharding(mesh, P(DP, *([None] * (ndim - 1))))


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array):
    if x.sharding == sharding or not x.is_fully_addressable:
      return x
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_inputs(mesh: Mesh, tokens: Any, attention_mask: Any, positions: Any) -> tuple[Any, Any, Any]:
  """The forward's inputs as global arrays on ``mesh``: batch over ``dp``, ``[1, T]`` positions replicated.

  Works under ``jax.distributed`` when every process passes the same host values.
  """
  b = int(tokens.shape[0])
  tokens = _put_global(tokens, batch_sharding(mesh, 2, b, "tokens"))
  if attention_mask is not None:
    attention_mask = _put_global(attention_mask, batch_sharding(mesh, 2, b, "attention_mask"))
  pb = int(positions.shape[0])
  positions = _put_global(positions, batch_sharding(mesh, 2, pb if pb == b and pb > 1 else None, "positions"))
  return tokens, attention_mask, positions


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of ``x`` as numpy, on every process (``process_allgather`` when it spans processes)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------------------------------------------
# By-slice reads
# ----------------------------------------------------------------------------------------------------------------


def aligned_empty(shape: Sequence[int], dtype: Any, align: int = _ALIGN) -> np.ndarray:
  """``np.empty`` whose data starts on an ``align``-byte boundary (XLA CPU adopts it without a copy)."""
  dtype = np.dtype(dtype)
  shape = tuple(int(d) for d in shape)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  off = (-raw.ctypes.data) % align
  return raw[off : off + nbytes].view(dtype).reshape(shape)


def _box(index: Sequence[slice], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise UsageError(f"strided shard index {s} is not supported")
    out.append((start, max(start, stop)))
  return tuple(out)


class SafetensorsFile:
  """A safetensors file's header, and boxes of its tensors read by byte range (no mmap).

  ``entries[name] = (dtype, shape, begin, end)`` with ``begin``/``end`` absolute file offsets.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      with open(self.path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
          raise ValueError("file shorter than 8 bytes")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
          raise ValueError(f"header length {n} runs past the end of the file")
        header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
      raise UsageError(f"cannot read {self.path} as safetensors: {e}") from None
    if not isinstance(header, dict):
      raise UsageError(f"cannot read {self.path} as safetensors: header is not a JSON object")
    data_start = 8 + n
    self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
      if name == "__metadata__":
        continue
      try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise UsageError(f"{self.path}: bad header entry for {name!r}") from None
      if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > size:
        raise UsageError(f"{self.path}: {name} data_offsets {[begin, end]} do not fit its shape {list(shape)}")
      self.entries[name] = (dtype, shape, data_start + begin, data_start + end)

  def read_box(
      self,
      name: str,
      index: Sequence[slice],
      out_dtype: Any = None,
      view_shape: Sequence[int] | None = None,
      buffer_bytes: int = READ_BUFFER_BYTES,
  ) -> np.ndarray:
    """The box ``index`` of tensor ``name`` as an aligned numpy array in ``out_dtype``.

    ``view_shape`` reads the tensor as a C-order reshape of its stored shape
    (same element count), e.g. ``q_proj [q_dim, D]`` as ``[H, hd, D]``.
    Conversions are numpy ``astype`` (exact upcasts, round-to-nearest-even down).
    """
    stored, shape, begin, _ = self.entries[name]
    if view_shape is not None:
      view_shape = tuple(int(d) for d in view_shape)
      if math.prod(view_shape) != math.prod(shape):
        raise UsageError(f"{name}: cannot view shape {list(shape)} as {list(view_shape)}")
      shape = view_shape
    out_dtype = stored if out_dtype is None else np.dtype(out_dtype)
    box = _box(index, shape)
    out = aligned_empty([hi - lo for lo, hi in box], out_dtype)
    if out.size == 0:
      return out
    nd, isz = len(shape), stored.itemsize
    strides = [math.prod(shape[i + 1 :]) for i in range(nd)]  # elements
    a = nd - 1  # the last axis the box does not cover whole; everything after it is contiguous
    while a > 0 and box[a] == (0, shape[a]):
      a -= 1
    run = (box[a][1] - box[a][0]) * strides[a]  # elements per contiguous run
    with open(self.path, "rb", buffering=0) as f:
      if a == 0:
        self._read_runs(f, begin + box[0][0] * strides[0] * isz, 1, 0, run, stored, out.reshape(1, run), buffer_bytes)
        return out
      # runs along axis a-1 are evenly strided; the axes before it are looped over
      b = a - 1
      outer = [range(lo, hi) for lo, hi in box[:b]]
      rows = box[b][1] - box[b][0]
      dest = out.reshape(-1, rows, run)
      for k, idx in enumerate(np.ndindex(*[len(r) for r in outer]) if outer else [()]):
        start = sum((outer[i][j]) * strides[i] for i, j in enumerate(idx))
        start += box[b][0] * strides[b] + box[a][0] * strides[a]
        self._read_runs(f, begin + start * isz, rows, strides[b] * isz, run, stored, dest[k], buffer_bytes)
    return out

  @staticmethod
  def _readinto(f, offset: int, mv: memoryview) -> None:
    f.seek(offset)
    done = 0
    while done < len(mv):
      got = f.readinto(mv[done:])
      if not got:
        raise UsageError(f"{f.name}: unexpected end of file at offset {offset + done}")
      done += got

  def _read_runs(
      self, f, offset: int, rows: int, stride: int, run: int, stored: np.dtype, dest: np.ndarray, buffer_bytes: int
  ) -> None:
    """``rows`` runs of ``run`` elements, ``stride`` bytes apart from ``offset``, into ``dest[rows, run]``."""
    isz = stored.itemsize
    run_bytes = run * isz
    same = dest.dtype == stored
    if same and (rows == 1 or run_bytes >= buffer_bytes // 16):
      for r in range(rows):  # long runs: straight into the destination
        self._readinto(f, offset + r * stride, memoryview(dest[r].view(np.uint8)))
      return
    if run_bytes > buffer_bytes:  # long runs to convert: piece by piece through the buffer
      piece = max(1, buffer_bytes // isz)
      buf = np.empty(piece * isz, np.uint8)
      for r in range(rows):
        for e0 in range(0, run, piece):
          e1 = min(run, e0 + piece)
          mv = memoryview(buf[: (e1 - e0) * isz])
          self._readinto(f, offset + r * stride + e0 * isz, mv)
          dest[r, e0:e1] = buf[: (e1 - e0) * isz].view(stored)
      return
    # short runs: as many rows as fit the buffer per read, picked out with a strided view
    group = max(1, min(rows, (buffer_bytes - run_bytes) // max(stride, 1) + 1))
    buf = np.empty((group - 1) * stride + run_bytes, np.uint8)
    for r0 in range(0, rows, group):
      g = min(group, rows - r0)
      span = (g - 1) * stride + run_bytes
      self._readinto(f, offset + r0 * stride, memoryview(buf[:span]))
      view = np.lib.stride_tricks.as_strided(
          buf[:span].view(stored), shape=(g, run), strides=(stride, isz), writeable=False
      )
      dest[r0 : r0 + g] = view


def place_sharded(
    read: Callable[[tuple[slice, ...]], np.ndarray], shape: Sequence[int], sharding: NamedSharding
) -> jax.Array:
  """A global array from per-shard host reads: each distinct local shard read once, put, then dropped.

  ``read(index)`` returns the host array of one shard. Only this process's
  devices are read for; the shards are placed one at a time (and waited
  for), so at most one shard is held on the host.
  """
  shape = tuple(int(d) for d in shape)
  groups: dict[tuple, tuple[tuple[slice, ...], list[Any]]] = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    key = _box(index, shape)
    groups.setdefault(key, (tuple(index), []))[1].append(device)
  arrays = []
  for index, devices in groups.values():
    host = read(index)
    puts = [jax.device_put(host, d) for d in devices]
    jax.block_until_ready(puts)
    arrays += puts
    del host
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def shard_boxes(shape: Sequence[int], sharding: NamedSharding) -> list[tuple[slice, ...]]:
  """The distinct boxes of ``shape`` this process's devices hold under ``sharding``."""
  seen: dict[tuple, tuple[slice, ...]] = {}
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    seen.setdefault(_box(index, shape), tuple(index))
  return list(seen.values())


def row_pieces(index: Sequence[slice], shape: Sequence[int], itemsize: int, budget: int) -> Iterable[tuple[slice, ...]]:
  """``index`` cut along axis 0 into boxes of at most ``budget`` bytes (at least one row each)."""
  box = _box(index, shape)
  row_bytes = math.prod(hi - lo for lo, hi in box[1:]) * itemsize
  step = max(1, budget // max(row_bytes, 1))
  for r0 in range(box[0][0], box[0][1], step):
    yield (slice(r0, min(box[0][1], r0 + step)),) + tuple(slice(lo, hi) for lo, hi in box[1:])
