"""Qwen weights on a device mesh: logical-axis rules, by-slice safetensors reads, meshes, batch placement.

``parity_jax.qwen2.load(path, mesh=mesh)`` places every weight directly onto
the mesh as a sharded ``jax.Array``. Any mesh a user makes works:
``jax.make_mesh`` (Explicit axes by default in current JAX, or
``axis_types=Auto``), a hand-built :class:`jax.sharding.Mesh`, or
:func:`make_mesh` here; the weights live on that mesh, and the forward runs
with every axis treated as Auto (:func:`compute_mesh`: same devices, same
names) so that XLA partitions it from the weights' shardings.

Which axis of which weight is split over which mesh axis comes from two
tables, as in MaxText / flax's ``logical_axis_rules``:

* :data:`FIELD_AXES` names the *logical* axes of every weight, by its field
  path in :class:`~parity_jax.qwen2.params.Params` (``wq`` is
  ``(heads, head_dim, hidden)``, a MoE block's ``w_gate`` is
  ``(experts, moe_intermediate, hidden)``, ...);
* the *axis rules* map logical axes to mesh axes: ``(logical, mesh_axes)``
  rows, tried in order, the first whose mesh axes the mesh has and the weight
  does not use yet wins (flax's ``logical_to_mesh_axes``). Caller rules
  (``axis_rules=``, ``--shard_rules``) come first, and a logical axis a caller
  names loses its default rows. :data:`DEFAULT_AXIS_RULES`: ``batch`` over
  ``dp``; ``vocab``, ``heads``, ``kv_heads``, ``intermediate`` over ``tp``;
  ``experts`` over ``ep`` (when the mesh has it) else ``tp``;
  ``moe_intermediate`` over ``tp`` (when the experts do not use it). A mesh
  with other axis names needs caller rules (e.g. ``batch=data,heads=model``).

With the defaults the forward is Megatron-style tensor parallel (every head
and MLP column on one ``tp`` shard; ``o_proj`` / ``down_proj`` / the
embedding gather end in a sum over ``tp``) and expert parallel over ``ep``
or ``tp``. A weight axis that does not divide over the mesh axes its rule
gives (2 kv heads on ``tp=4``) falls back to the next rule for it, else stays
whole (replicated over that mesh axis); a later axis of the same weight may
then use the freed mesh axis. Each fallback is one line in
:meth:`Placement.notes` (``layers.*.attn.wk: kv_heads (2) does not divide
over tp=4; replicated``), which the tools print. ``rules=[(regex, spec)]``
pins a field's :class:`PartitionSpec` outright (first ``re.fullmatch`` wins);
a pinned split that does not divide is a one-line :class:`UsageError`.

Reading (:class:`SafetensorsFile`): each device's shard is a box (one slice
per axis) of the stored tensor (for experts stacked from one tensor per
expert: a box of each expert's tensor). The safetensors header gives every
tensor's byte range; a box of a C-contiguous tensor is a set of evenly
strided byte runs, read with ``readinto`` straight into a 64-byte aligned
numpy array of the shard's shape (or, for short runs and dtype conversions,
through a buffer of at most :data:`READ_BUFFER_BYTES`). No file is
memory-mapped, so the pages read never stay in the process's RSS, and no host
ever holds more than one shard plus that buffer of a tensor. On CPU an
aligned array becomes the device buffer without a copy. Each distinct shard
is read once per process and put on every local device that holds it
(replication over ``dp``); under ``jax.distributed`` a process only reads the
shards of its own devices (``addressable_devices_indices_map``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from parity_jax.dtypes import SAFETENSORS_DTYPES
from parity_jax.errors import UsageError

__all__ = [
    "DEFAULT_AXIS_RULES",
    "FIELD_AXES",
    "LOGICAL_AXES",
    "MESH_AXES",
    "READ_BUFFER_BYTES",
    "AxisRules",
    "Placement",
    "Rules",
    "SafetensorsFile",
    "aligned_empty",
    "batch_sharding",
    "box_of",
    "compute_mesh",
    "field_axes",
    "field_sharding",
    "make_mesh",
    "mesh_of",
    "normalize_axis_rules",
    "param_shardings",
    "parse_axis_rules",
    "parse_mesh_spec",
    "place_batch",
    "place_inputs",
    "place_sharded",
    "rewrap",
    "shard_params",
    "spec_for",
    "to_host",
]

DP, TP = "dp", "tp"
#: The mesh axes of :func:`make_mesh` when a spec names only these (in mesh order); other names are kept as given.
MESH_AXES = (DP, TP)

Rules = Sequence[tuple[str, Any]]
AxisRules = Sequence[tuple[str, Any]]

#: Logical axis -> mesh axes, tried in order (see the module docstring). A value is a mesh axis name, a tuple of
#: names (split over their product) or None (never split).
DEFAULT_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", DP),
    ("vocab", TP),
    ("heads", TP),
    ("kv_heads", TP),
    ("intermediate", TP),
    ("experts", "ep"),
    ("experts", TP),
    ("moe_intermediate", TP),
)

#: Field path regex (``re.fullmatch``) -> the logical axes of that weight, dimension by dimension.
FIELD_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed|lm_head", ("vocab", "hidden")),
    (r"final_norm|layers\.\d+\.(attn_norm|ffn_norm)", ("hidden",)),
    (r"layers\.\d+\.attn\.wq", ("heads", "head_dim", "hidden")),
    (r"layers\.\d+\.attn\.w[kv]", ("kv_heads", "head_dim", "hidden")),
    (r"layers\.\d+\.attn\.wo", ("hidden", "heads", "head_dim")),
    (r"layers\.\d+\.attn\.bq", ("heads", "head_dim")),
    (r"layers\.\d+\.attn\.b[kv]", ("kv_heads", "head_dim")),
    (r"layers\.\d+\.attn\.bo", ("hidden",)),
    (r"layers\.\d+\.attn\.[qk]_norm", ("head_dim",)),
    (r"layers\.\d+\.(mlp|moe\.shared)\.w_(gate|up)", ("intermediate", "hidden")),
    (r"layers\.\d+\.(mlp|moe\.shared)\.w_down", ("hidden", "intermediate")),
    (r"layers\.\d+\.moe\.router", ("router_experts", "hidden")),  # small: kept whole, softmax needs every expert
    (r"layers\.\d+\.moe\.w_(gate|up)", ("experts", "moe_intermediate", "hidden")),
    (r"layers\.\d+\.moe\.w_down", ("experts", "hidden", "moe_intermediate")),
    (r"layers\.\d+\.moe\.shared_gate", ("gate", "hidden")),
)

#: Every logical axis name: the weights' (:data:`FIELD_AXES`) and the inputs' batch.
LOGICAL_AXES: tuple[str, ...] = tuple(dict.fromkeys(["batch"] + [a for _, axes in FIELD_AXES for a in axes]))

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


def spec_for(field: str, rules: Rules | None = None) -> tuple[P, str] | None:
  """``(spec, pattern)`` of the first caller rule matching ``field``, or None."""
  for pattern, spec in tuple(rules or ()):
    try:
      hit = re.fullmatch(pattern, field)
    except re.error as e:
      raise UsageError(f"sharding rule {pattern!r} is not a valid regex: {e}") from None
    if hit:
      return _as_spec(spec, pattern), pattern
  return None


def field_axes(field: str, rank: int) -> tuple[str | None, ...]:
  """The logical axes of a weight (:data:`FIELD_AXES`); unknown fields: no logical names (kept whole)."""
  for pattern, axes in FIELD_AXES:
    if re.fullmatch(pattern, field) and len(axes) == rank:
      return axes
  return (None,) * rank


def _axis_names(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _merge_axis_rules(axis_rules: AxisRules | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Caller rules first; a logical axis the caller names drops its default rows. Checked: known names, str axes."""
  caller = []
  for row in tuple(axis_rules or ()):
    if not (isinstance(row, (tuple, list)) and len(row) == 2 and isinstance(row[0], str)):
      raise UsageError(f"axis rule {row!r} is not (logical axis, mesh axes)")
    logical, axes = row
    if logical not in LOGICAL_AXES:
      raise UsageError(f"axis rule {logical!r}: unknown logical axis (the axes are {', '.join(LOGICAL_AXES)})")
    names = _axis_names(axes)
    if not all(isinstance(a, str) and a for a in names):
      raise UsageError(f"axis rule {logical!r}: mesh axes must be names, got {axes!r}")
    caller.append((logical, names))
  named = {logical for logical, _ in caller}
  return tuple(caller) + tuple((lg, _axis_names(a)) for lg, a in DEFAULT_AXIS_RULES if lg not in named)


def normalize_axis_rules(axis_rules: AxisRules | None) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
  """Caller axis rules as a hashable, checked tuple (None when there are none)."""
  if not axis_rules:
    return None
  merged = _merge_axis_rules(axis_rules)
  return merged[: len(tuple(axis_rules))]


def _fmt_axes(axes: Sequence[str], mesh: Mesh) -> str:
  return "x".join(f"{a}={mesh.shape[a]}" for a in axes)


class Placement:
  """Shardings of the weights on one mesh, from caller field rules, axis rules and :data:`FIELD_AXES`.

  ``sharding(field, shape)`` is the weight's :class:`NamedSharding`;
  ``notes()`` the fallbacks it chose (one line per kind of weight).
  """

  def __init__(self, mesh: Mesh, rules: Rules | None = None, axis_rules: AxisRules | None = None):
    self.mesh = mesh
    self.rules = tuple(rules or ())
    self.axis_rules = _merge_axis_rules(axis_rules)
    self._notes: dict[str, str] = {}
    used = {a for _, axes in self.axis_rules for a in axes} | {
        a for _, spec in self.rules for entry in _as_spec(spec, "?") for a in _axis_names(entry)
    }
    wide = [a for a, n in mesh.shape.items() if n > 1]
    if wide and not used & set(wide):
      raise UsageError(
          f"no sharding rule uses the mesh axes {', '.join(f'{a}={mesh.shape[a]}' for a in wide)} (the default "
          "rules speak of dp, tp and ep); give axis rules, e.g. --shard_rules=batch=data,heads=model,kv_heads=model,"
          "intermediate=model,vocab=model"
      )
    for a in wide:
      if a not in used:
        self._notes[f"mesh:{a}"] = f"mesh axis {a}={mesh.shape[a]}: no rule uses it; everything is replicated over it"

  def spec(self, field: str, shape: Sequence[int]) -> P:
    """The :class:`PartitionSpec` of one weight (fallbacks recorded in :meth:`notes`)."""
    shape = tuple(int(d) for d in shape)
    pinned = spec_for(field, self.rules)
    if pinned is not None:
      spec, pattern = pinned
      self._check_pinned(field, shape, spec, pattern)
      return spec
    logical = field_axes(field, len(shape))
    used: set[str] = set()
    entries: list[Any] = []
    for dim, name in enumerate(logical):
      choice = None
      refused = []
      for lg, axes in self.axis_rules:
        if lg != name or not axes or not all(a in self.mesh.shape for a in axes) or used & set(axes):
          continue
        parts = math.prod(self.mesh.shape[a] for a in axes)
        if shape[dim] % parts:
          refused.append(axes)
          continue
        choice = axes
        break
      if refused:
        key = re.sub(r"^layers\.\d+\.", "layers.*.", field)
        where = f" ({name}, size {shape[dim]})"
        what = f"sharded over {_fmt_axes(choice, self.mesh)} instead" if choice else "replicated"
        self._notes.setdefault(
            key, f"{key}: axis {dim}{where} does not divide over {_fmt_axes(refused[0], self.mesh)}; {what}"
        )
      if choice:
        used |= set(choice)
        entries.append(choice[0] if len(choice) == 1 else choice)
      else:
        entries.append(None)
    return P(*entries)

  def sharding(self, field: str, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(field, shape))

  def _check_pinned(self, field: str, shape: tuple[int, ...], spec: P, pattern: str) -> None:
    if len(spec) > len(shape):
      raise UsageError(
          f"{field}: sharding rule {pattern!r} gives spec {spec} for a rank-{len(shape)} weight {list(shape)}"
      )
    logical = field_axes(field, len(shape))
    for dim, entry in enumerate(spec):
      axes = _axis_names(entry)
      for a in axes:
        if a not in self.mesh.shape:
          raise UsageError(
              f"{field}: sharding rule {pattern!r} names mesh axis {a!r}, which the mesh "
              f"({', '.join(f'{k}={v}' for k, v in self.mesh.shape.items())}) lacks"
          )
      parts = math.prod(self.mesh.shape[a] for a in axes)
      if parts > 1 and shape[dim] % parts:
        what = logical[dim] or f"axis{dim}"
        raise UsageError(
            f"{field}: axis {dim} ({what}, size {shape[dim]}) does not divide over mesh axis "
            f"{_fmt_axes(axes, self.mesh)}; change its sharding rule (e.g. replicate it with P())"
        )

  def notes(self) -> tuple[str, ...]:
    """One line per fallback (per kind of weight, ``layers.*``), in the order they were met."""
    return tuple(self._notes.values())

  def batch_axes(self) -> tuple[str, ...]:
    """The mesh axes the inputs' batch is split over (the ``batch`` rule), or ()."""
    for lg, axes in self.axis_rules:
      if lg == "batch" and axes and all(a in self.mesh.shape for a in axes):
        return axes
    return ()


def field_sharding(
    field: str, shape: Sequence[int], mesh: Mesh, rules: Rules | None = None, axis_rules: AxisRules | None = None
) -> NamedSharding:
  """The :class:`NamedSharding` of one weight (a one-weight :class:`Placement`)."""
  return Placement(mesh, rules, axis_rules).sharding(field, shape)


def parse_axis_rules(text: str, flag: str = "shard_rules") -> tuple[tuple[str, tuple[str, ...]], ...]:
  """``"batch=data,heads=model,kv_heads=none,experts=ep+tp"`` -> axis rules (``none`` or empty: never split).

  ``+`` joins mesh axes a logical axis is split over together. Bad input is a one-line :class:`UsageError`.
  """
  body = (text or "").strip()
  if not body:
    raise UsageError(f"--{flag} is empty; expected e.g. heads=model,kv_heads=none")
  out = []
  seen = set()
  for part in body.split(","):
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*([A-Za-z_][\w+]*)?\s*", part)
    if not m:
      raise UsageError(f"--{flag}: {part.strip()!r} is not logical_axis=mesh_axis (e.g. heads=model, kv_heads=none)")
    logical, value = m.group(1), m.group(2) or "none"
    if logical not in LOGICAL_AXES:
      raise UsageError(f"--{flag}: unknown logical axis {logical!r} (the axes are {', '.join(LOGICAL_AXES)})")
    if logical in seen:
      raise UsageError(f"--{flag}: logical axis {logical!r} given twice")
    seen.add(logical)
    axes = () if value.lower() == "none" else tuple(value.split("+"))
    if any(not re.fullmatch(r"[A-Za-z_]\w*", a) for a in axes):
      raise UsageError(f"--{flag}: {part.strip()!r}: mesh axes are names joined by '+'")
    out.append((logical, axes))
  return tuple(out)


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


def param_shardings(params: Any, mesh: Mesh, rules: Rules | None = None, axis_rules: AxisRules | None = None) -> Any:
  """A pytree of :class:`NamedSharding` matching ``params`` (arrays or ``ShapeDtypeStruct`` leaves)."""
  placement = Placement(mesh, rules, axis_rules)
  shardings = [placement.sharding(f, np.shape(leaf)) for f, leaf in _leaf_fields(params)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), shardings)


def shard_params(params: Any, mesh: Mesh, rules: Rules | None = None, axis_rules: AxisRules | None = None) -> Any:
  """``params`` (host or device arrays) placed on ``mesh`` with the rule tables (``init_params(put=...)``)."""
  return jax.device_put(params, param_shardings(params, mesh, rules, axis_rules))


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


@functools.lru_cache(maxsize=None)
def compute_mesh(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis Auto (same devices, names and order): where the forward runs.

  ``jax.make_mesh`` gives Explicit axes, under which every op needs its output
  sharding spelled out; with Auto axes XLA propagates shardings from the
  weights' placement, which is all a pure forward needs. Arrays move between
  the two meshes without a copy (:func:`rewrap`).
  """
  types = getattr(mesh, "axis_types", None)
  if types is None or all(t == AxisType.Auto for t in types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def rewrap(x: Any, mesh: Mesh) -> Any:
  """A global array viewed on an equivalent ``mesh`` (same devices, axis names and sizes): no data moves."""
  if not isinstance(x, jax.Array) or not isinstance(x.sharding, NamedSharding) or x.sharding.mesh == mesh:
    return x
  return jax.make_array_from_single_device_arrays(
      x.shape, NamedSharding(mesh, x.sharding.spec), [s.data for s in x.addressable_shards]
  )


# ----------------------------------------------------------------------------------------------------------------
# Meshes
# ----------------------------------------------------------------------------------------------------------------


def parse_mesh_spec(text: str, flag: str = "mesh") -> dict[str, int]:
  """``"dp:2,tp:4"`` -> ``{"dp": 2, "tp": 4}`` (``=`` works as well as ``:``); any axis names, sizes >= 1."""
  out: dict[str, int] = {}
  body = (text or "").strip()
  if not body:
    raise UsageError(f"--{flag} is empty; expected e.g. dp:2,tp:4")
  for part in body.split(","):
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*[:=]\s*(\d+)\s*", part)
    if not m:
      raise UsageError(f"--{flag}: {part.strip()!r} is not axis:size (expected e.g. dp:2,tp:4)")
    name, size = m.group(1), int(m.group(2))
    if name in out:
      raise UsageError(f"--{flag}: axis {name!r} given twice")
    if size < 1:
      raise UsageError(f"--{flag}: axis {name} must have size >= 1, got {size}")
    out[name] = size
  return out


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None, flag: str = "mesh") -> Mesh:
  """A mesh over the first ``prod(sizes)`` devices, every axis Auto.

  ``spec`` is ``"dp:2,tp:4"`` or a mapping. A spec naming only ``dp``/``tp``
  gives the ``(dp, tp)`` mesh (an absent one with size 1); other names (e.g.
  ``data:2,model:4`` or ``dp:2,ep:4``) are kept in the order given and need
  axis rules where the defaults do not speak of them. Asking for more devices
  than JAX sees is a one-line error that says how to get forced host devices on CPU.
  """
  sizes = parse_mesh_spec(spec, flag) if isinstance(spec, str) else dict(spec)
  names = MESH_AXES if set(sizes) <= set(MESH_AXES) else tuple(sizes)
  shape = tuple(int(sizes.get(a, 1)) for a in names)
  devices = list(jax.devices() if devices is None else devices)
  need = math.prod(shape)
  if need > len(devices):
    text = ",".join(f"{a}:{s}" for a, s in zip(names, shape))
    hint = (
        f" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={need} before JAX starts gives {need})"
        if devices and devices[0].platform == "cpu"
        else ""
    )
    raise UsageError(f"--{flag}={text} needs {need} devices; JAX sees {len(devices)}{hint}")
  return Mesh(np.array(devices[:need], dtype=object).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


# ----------------------------------------------------------------------------------------------------------------
# Inputs and outputs
# ----------------------------------------------------------------------------------------------------------------


def batch_sharding(
    mesh: Mesh, ndim: int, batch: int | None, what: str = "tokens", axis_rules: AxisRules | None = None
) -> NamedSharding:
  """Batch (axis 0) over the ``batch`` rule's mesh axes (default ``dp``), the rest replicated; None: replicated."""
  axes = ()
  for lg, names in _merge_axis_rules(axis_rules):
    if lg == "batch" and names and all(a in mesh.shape for a in names):
      axes = names
      break
  parts = math.prod(mesh.shape[a] for a in axes)
  if batch is None or parts == 1:
    return NamedSharding(mesh, P())
  if batch % parts:
    raise UsageError(f"{what}: batch {batch} does not divide over mesh axis {_fmt_axes(axes, mesh)}")
  return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes, *([None] * (ndim - 1))))


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array):
    if x.sharding == sharding or not x.is_fully_addressable:
      return x
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_batch(mesh: Mesh, x: Any, what: str = "input", axis_rules: AxisRules | None = None) -> jax.Array:
  """One batch-major input (``[B, ...]``) as a global array on ``mesh``, its batch over the batch rule's axes."""
  ndim = len(np.shape(x))
  return _put_global(x, batch_sharding(mesh, ndim, int(np.shape(x)[0]), what, axis_rules))


def place_inputs(
    mesh: Mesh, tokens: Any, attention_mask: Any, positions: Any, axis_rules: AxisRules | None = None
) -> tuple[Any, Any, Any]:
  """The forward's inputs as global arrays on ``mesh``: batch over the batch rule's axes, ``[1, T]`` positions replicated.

  Works under ``jax.distributed`` when every process passes the same host values.
  """
  b = int(tokens.shape[0])
  tokens = _put_global(tokens, batch_sharding(mesh, 2, b, "tokens", axis_rules))
  if attention_mask is not None:
    attention_mask = _put_global(attention_mask, batch_sharding(mesh, 2, b, "attention_mask", axis_rules))
  pb = int(positions.shape[0])
  positions = _put_global(
      positions, batch_sharding(mesh, 2, pb if pb == b and pb > 1 else None, "positions", axis_rules)
  )
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


def box_of(index: Sequence[slice], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """``(start, stop)`` per axis of a shard index (slices, possibly fewer than axes)."""
  return _box(index, shape)


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
    # long runs to convert: piece by piece through the buffer
    if run_bytes > buffer_bytes:  # no mutate: which read path only; each gives the same bytes (test_sharding)
      piece = max(1, buffer_bytes // isz)  # no mutate: the piece size only; any size >= 1 reads the same bytes
      buf = np.empty(piece * isz, np.uint8)
      for r in range(rows):
        for e0 in range(0, run, piece):
          e1 = min(run, e0 + piece)
          mv = memoryview(buf[: (e1 - e0) * isz])
          self._readinto(f, offset + r * stride + e0 * isz, mv)
          dest[r, e0:e1] = buf[: (e1 - e0) * isz].view(stored)
      return
    # short runs: as many rows as fit the buffer per read, picked out with a strided view
    group = max(1, min(rows, (buffer_bytes - run_bytes) // max(stride, 1) + 1))  # no mutate: rows per read only
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
