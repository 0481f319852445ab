"""Qwen2 / Qwen3 (dense and MoE) weights: dataclass pytrees and the HF safetensors loader.

The pytree keeps HF's ``[out, in]`` weight layout, only split into named axes
(``wq[H, hd, D]``, ``wo[D, H, hd]``), so loading is a reshape and never a
transpose, and a later tensor-parallel placement can shard the ``heads`` and
``intermediate`` axes with ``NamedSharding`` directly:

=====================  ================  ===============================
field                  shape             HF tensor
=====================  ================  ===============================
``embed``              ``[V, D]``        ``model.embed_tokens.weight``
``layers[i].attn_norm````[D]``           ``...input_layernorm.weight``
``...attn.wq``         ``[H, hd, D]``    ``...self_attn.q_proj.weight``
``...attn.bq``         ``[H, hd]``       ``...self_attn.q_proj.bias``
``...attn.wk/wv``      ``[K, hd, D]``    ``...self_attn.{k,v}_proj.weight``
``...attn.bk/bv``      ``[K, hd]``       ``...self_attn.{k,v}_proj.bias``
``...attn.wo``         ``[D, H, hd]``    ``...self_attn.o_proj.weight``
``...attn.bo``         ``[D]``           ``...self_attn.o_proj.bias`` (Qwen3 + attention_bias)
``...attn.q_norm``     ``[hd]``          ``...self_attn.q_norm.weight`` (Qwen3)
``...attn.k_norm``     ``[hd]``          ``...self_attn.k_norm.weight`` (Qwen3)
``layers[i].ffn_norm`` ``[D]``           ``...post_attention_layernorm.weight``
``...mlp.w_gate/w_up`` ``[I, D]``        ``...mlp.{gate,up}_proj.weight``
``...mlp.w_down``      ``[D, I]``        ``...mlp.down_proj.weight``
``final_norm``         ``[D]``           ``model.norm.weight``
``lm_head``            ``[V, D]``        ``lm_head.weight`` (None when tied)
=====================  ================  ===============================

A layer with a sparse MoE block (``QwenConfig.moe_layers``) has ``mlp=None``
and a :class:`Moe` instead, its experts stacked along a leading axis ``E``
(``I_e`` = ``moe_intermediate_size``, ``I_s`` = ``shared_expert_intermediate_size``):

=========================  ================  ==================================================
``layers[i].moe.router``   ``[E, D]``        ``...mlp.gate.weight``
``...moe.w_gate/w_up``     ``[E, I_e, D]``   ``...mlp.experts.{e}.{gate,up}_proj.weight`` (E tensors)
``...moe.w_down``          ``[E, D, I_e]``   ``...mlp.experts.{e}.down_proj.weight``
``...moe.shared``          :class:`Mlp`       ``...mlp.shared_expert.*`` (Qwen2-MoE, ``[I_s, D]``...)
``...moe.shared_gate``     ``[1, D]``        ``...mlp.shared_expert_gate.weight`` (Qwen2-MoE)
=========================  ================  ==================================================

Absent optional parts (biases, q/k norms, a tied ``lm_head``) are ``None``, so
the tree structure itself says which variant a model is. The loader reads
``*.safetensors`` (one file, or the shards named by
``model.safetensors.index.json``) with the ``safetensors`` library, asserts
every tensor's shape, and reports missing and unknown keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors

from parity_jax.arraydiff import bit_equal
from parity_jax.dtypes import SAFETENSORS_DTYPES
from parity_jax.errors import UsageError
from parity_jax.qwen2.config import QwenConfig

__all__ = [
    "Attention",
    "Mlp",
    "Moe",
    "Layer",
    "Params",
    "LoadReport",
    "KEY_TABLE",
    "load_params",
    "init_params",
    "random_params",
    "to_hf_tensors",
]

Array = Any  # jax.Array or np.ndarray

_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _pytree(cls):
  """Frozen dataclass registered as a pytree with every field a data field."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  return jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)], meta_fields=[])


@_pytree
class Attention:
  wq: Array  # [H, hd, D]
  wk: Array  # [K, hd, D]
  wv: Array  # [K, hd, D]
  wo: Array  # [D, H, hd]
  bq: Array | None = None  # [H, hd]
  bk: Array | None = None  # [K, hd]
  bv: Array | None = None  # [K, hd]
  bo: Array | None = None  # [D]
  q_norm: Array | None = None  # [hd]
  k_norm: Array | None = None  # [hd]


@_pytree
class Mlp:
  w_gate: Array  # [I, D]
  w_up: Array  # [I, D]
  w_down: Array  # [D, I]


@_pytree
class Moe:
  """A sparse MoE block: the router, the experts stacked on axis 0, and Qwen2-MoE's gated shared expert."""

  router: Array  # [E, D]
  w_gate: Array  # [E, I, D]
  w_up: Array  # [E, I, D]
  w_down: Array  # [E, D, I]
  shared: Mlp | None = None  # Qwen2-MoE
  shared_gate: Array | None = None  # [1, D], Qwen2-MoE


@_pytree
class Layer:
  attn_norm: Array  # [D]
  attn: Attention
  ffn_norm: Array  # [D]
  mlp: Mlp | None  # None on a layer with a sparse MoE block
  moe: Moe | None = None


@_pytree
class Params:
  embed: Array  # [V, D]
  layers: tuple[Layer, ...]
  final_norm: Array  # [D]
  lm_head: Array | None = None  # [V, D]; None when tied to ``embed``


@dataclasses.dataclass(frozen=True)
class _Key:
  """One row of the key table: HF name pattern -> pytree field, with both shapes.

  ``pattern`` is a regex over the HF name (group 1: the layer index of a
  per-layer key; group 2: the expert index of a per-expert key); ``field`` the
  dotted path in Params (``{i}``: the layer index). A per-expert row's tensors
  (one per expert, ``hf_shape`` each) stack along axis 0 into one field of
  ``shape``. ``layers`` lists the layers that have the key.
  """

  pattern: str
  field: str
  hf_shape: Callable[[QwenConfig], tuple[int, ...]]
  shape: Callable[[QwenConfig], tuple[int, ...]]
  needed: Callable[[QwenConfig], bool]  # no defaults here: _row, the only constructor, passes every field
  layers: Callable[[QwenConfig], Any]
  per_expert: bool

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.field

  def names(self, cfg: QwenConfig) -> list[tuple[str, str, int | None]]:
    """``(HF name, field path, expert index)`` of every tensor of this row that ``cfg`` needs."""
    if not self.needed(cfg):
      return []
    template = self.pattern.replace(r"(\d+)", "{}", 2).replace("\\", "")
    if not self.per_layer:
      return [(template, self.field, None)]
    out = []
    for i in self.layers(cfg):
      field = self.field.format(i=i)
      if self.per_expert:
        out += [(template.format(i, e), field, e) for e in range(cfg.num_experts)]
      else:
        out.append((template.format(i), field, None))
    return out


def _row(pattern, field, hf_shape, shape=None, needed=lambda c: True, layers=None, per_expert=False) -> _Key:
  return _Key(
      pattern, field, hf_shape, shape or hf_shape, needed, layers or (lambda c: range(c.num_layers)), per_expert
  )


def _dense_layers(c: QwenConfig) -> list[int]:
  return [i for i in range(c.num_layers) if i not in c.moe_layers]


def _moe_layers(c: QwenConfig) -> tuple[int, ...]:
  return c.moe_layers


def _shared(c: QwenConfig) -> bool:
  return c.shared_expert


_L = r"model\.layers\.(\d+)\."
_E = _L + r"mlp\.experts\.(\d+)\."
# The declarative table: every HF tensor this model reads, where it goes, and its shapes.
KEY_TABLE: tuple[_Key, ...] = (
    _row(r"model\.embed_tokens\.weight", "embed", lambda c: (c.vocab_size, c.hidden_size)),
    _row(_L + r"input_layernorm\.weight", "layers.{i}.attn_norm", lambda c: (c.hidden_size,)),
    _row(
        _L + r"self_attn\.q_proj\.weight",
        "layers.{i}.attn.wq",
        lambda c: (c.q_dim, c.hidden_size),
        lambda c: (c.num_heads, c.head_dim, c.hidden_size),
    ),
    _row(
        _L + r"self_attn\.q_proj\.bias",
        "layers.{i}.attn.bq",
        lambda c: (c.q_dim,),
        lambda c: (c.num_heads, c.head_dim),
        lambda c: c.qkv_bias,
    ),
    _row(
        _L + r"self_attn\.k_proj\.weight",
        "layers.{i}.attn.wk",
        lambda c: (c.kv_dim, c.hidden_size),
        lambda c: (c.num_kv_heads, c.head_dim, c.hidden_size),
    ),
    _row(
        _L + r"self_attn\.k_proj\.bias",
        "layers.{i}.attn.bk",
        lambda c: (c.kv_dim,),
        lambda c: (c.num_kv_heads, c.head_dim),
        lambda c: c.qkv_bias,
    ),
    _row(
        _L + r"self_attn\.v_proj\.weight",
        "layers.{i}.attn.wv",
        lambda c: (c.kv_dim, c.hidden_size),
        lambda c: (c.num_kv_heads, c.head_dim, c.hidden_size),
    ),
    _row(
        _L + r"self_attn\.v_proj\.bias",
        "layers.{i}.attn.bv",
        lambda c: (c.kv_dim,),
        lambda c: (c.num_kv_heads, c.head_dim),
        lambda c: c.qkv_bias,
    ),
    _row(
        _L + r"self_attn\.o_proj\.weight",
        "layers.{i}.attn.wo",
        lambda c: (c.hidden_size, c.q_dim),
        lambda c: (c.hidden_size, c.num_heads, c.head_dim),
    ),
    _row(_L + r"self_attn\.o_proj\.bias", "layers.{i}.attn.bo", lambda c: (c.hidden_size,), needed=lambda c: c.o_bias),
    _row(
        _L + r"self_attn\.q_norm\.weight", "layers.{i}.attn.q_norm", lambda c: (c.head_dim,), needed=lambda c: c.qk_norm
    ),
    _row(
        _L + r"self_attn\.k_norm\.weight", "layers.{i}.attn.k_norm", lambda c: (c.head_dim,), needed=lambda c: c.qk_norm
    ),
    _row(_L + r"post_attention_layernorm\.weight", "layers.{i}.ffn_norm", lambda c: (c.hidden_size,)),
    _row(
        _L + r"mlp\.gate_proj\.weight",
        "layers.{i}.mlp.w_gate",
        lambda c: (c.intermediate_size, c.hidden_size),
        layers=_dense_layers,
    ),
    _row(
        _L + r"mlp\.up_proj\.weight",
        "layers.{i}.mlp.w_up",
        lambda c: (c.intermediate_size, c.hidden_size),
        layers=_dense_layers,
    ),
    _row(
        _L + r"mlp\.down_proj\.weight",
        "layers.{i}.mlp.w_down",
        lambda c: (c.hidden_size, c.intermediate_size),
        layers=_dense_layers,
    ),
    _row(
        _L + r"mlp\.gate\.weight", "layers.{i}.moe.router", lambda c: (c.num_experts, c.hidden_size), layers=_moe_layers
    ),
    _row(
        _E + r"gate_proj\.weight",
        "layers.{i}.moe.w_gate",
        lambda c: (c.moe_intermediate_size, c.hidden_size),
        lambda c: (c.num_experts, c.moe_intermediate_size, c.hidden_size),
        layers=_moe_layers,
        per_expert=True,
    ),
    _row(
        _E + r"up_proj\.weight",
        "layers.{i}.moe.w_up",
        lambda c: (c.moe_intermediate_size, c.hidden_size),
        lambda c: (c.num_experts, c.moe_intermediate_size, c.hidden_size),
        layers=_moe_layers,
        per_expert=True,
    ),
    _row(
        _E + r"down_proj\.weight",
        "layers.{i}.moe.w_down",
        lambda c: (c.hidden_size, c.moe_intermediate_size),
        lambda c: (c.num_experts, c.hidden_size, c.moe_intermediate_size),
        layers=_moe_layers,
        per_expert=True,
    ),
    _row(
        _L + r"mlp\.shared_expert\.gate_proj\.weight",
        "layers.{i}.moe.shared.w_gate",
        lambda c: (c.shared_expert_intermediate_size, c.hidden_size),
        needed=_shared,
        layers=_moe_layers,
    ),
    _row(
        _L + r"mlp\.shared_expert\.up_proj\.weight",
        "layers.{i}.moe.shared.w_up",
        lambda c: (c.shared_expert_intermediate_size, c.hidden_size),
        needed=_shared,
        layers=_moe_layers,
    ),
    _row(
        _L + r"mlp\.shared_expert\.down_proj\.weight",
        "layers.{i}.moe.shared.w_down",
        lambda c: (c.hidden_size, c.shared_expert_intermediate_size),
        needed=_shared,
        layers=_moe_layers,
    ),
    _row(
        _L + r"mlp\.shared_expert_gate\.weight",
        "layers.{i}.moe.shared_gate",
        lambda c: (1, c.hidden_size),
        needed=_shared,
        layers=_moe_layers,
    ),
    _row(r"model\.norm\.weight", "final_norm", lambda c: (c.hidden_size,)),
    _row(r"lm_head\.weight", "lm_head", lambda c: (c.vocab_size, c.hidden_size)),
)


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor the config needs: its table row, the field it fills, and its expert slot in a stacked field."""

  key: _Key
  field: str
  expert: int | None


def _expected_names(cfg: QwenConfig) -> dict[str, _Tensor]:
  """HF name -> where it goes, for every tensor the config requires (lm_head only when untied)."""
  out: dict[str, _Tensor] = {}
  for key in KEY_TABLE:
    if key.field == "lm_head" and cfg.tie_word_embeddings:
      continue
    for name, field, expert in key.names(cfg):
      out[name] = _Tensor(key, field, expert)
  return out


def _fields(expected: Mapping[str, _Tensor]) -> dict[str, tuple[_Key, list[str]]]:
  """Field path -> (row, its HF tensor names; one per expert, in expert order, for a stacked field)."""
  out: dict[str, tuple[_Key, list[str]]] = {}
  for name, t in expected.items():
    out.setdefault(t.field, (t.key, []))[1].append(name)
  return out


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What the loader found: files read, stored dtypes, keys it could not place."""

  files: tuple[str, ...]
  stored_dtypes: tuple[str, ...]
  unknown_keys: tuple[str, ...]
  tied_lm_head_in_file: bool  # config ties embeddings and the file still carries a (bit-equal) lm_head.weight
  sharding_notes: tuple[str, ...] = ()  # one line per placement the mesh forced (e.g. heads replicated)


def _checkpoint_files(path: str) -> tuple[list[str], dict[str, str] | None]:
  """The safetensors files of a checkpoint dir, and the index's weight_map when sharded."""
  if not os.path.exists(path):
    raise UsageError(f"no such checkpoint directory: {path}")
  if not os.path.isdir(path):
    raise UsageError(f"expected a checkpoint directory, got a file: {path}")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
      raise UsageError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
      raise UsageError(f"{index}: weight_map is empty or not an object")
    files = sorted(set(weight_map.values()))
    for name in files:
      if os.path.basename(name) != name:
        raise UsageError(f"{index}: shard name {name!r} must be a file name inside the checkpoint directory")
      if not os.path.isfile(os.path.join(path, name)):
        raise UsageError(f"{index}: shard {name} is missing")
    return [os.path.join(path, n) for n in files], weight_map
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    return [single], None
  others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if others:
    raise UsageError(f"{path}: has {others[:3]} but neither model.safetensors nor model.safetensors.index.json")
  raise UsageError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _convert(a: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
  """Stored tensor -> requested dtype. Upcasts (bf16/f16 -> f32) are exact; f32 -> bf16 rounds to nearest even."""
  if a.dtype not in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
    raise UsageError(
        f"{name}: stored dtype {a.dtype} is not a float dtype this loader reads (float32, float16, bfloat16)"
    )
  return a if a.dtype == dtype else a.astype(dtype)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a checkpoint holds, checked against the config before any tensor is read."""

  files: list[str]
  expected: dict[str, _Tensor]  # HF name -> table row and field, every tensor the config needs
  file_of: dict[str, str]  # HF name -> file, for every expected tensor
  stored: dict[str, np.dtype]  # HF name -> stored dtype
  unknown: list[str]
  lm_head_in_file: tuple[str, str] | None  # (file, name) of a tied config's lm_head.weight


def _plan(path: str, cfg: QwenConfig, strict: bool) -> _Plan:
  """Index, keys, shapes and dtypes of a checkpoint against the config: missing/unknown/wrong tensors raise here."""
  files, weight_map = _checkpoint_files(path)
  expected = _expected_names(cfg)
  file_of: dict[str, str] = {}
  stored: dict[str, np.dtype] = {}
  unknown: list[str] = []
  lm_head_in_file = None
  seen_in: dict[str, str] = {}
  for file in files:
    try:
      handle = safetensors.safe_open(file, framework="numpy")
      keys = list(handle.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
      raise UsageError(
          f"cannot read {file} as safetensors: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
      ) from None
    for name in keys:
      if name in seen_in:
        raise UsageError(f"{name} appears in both {os.path.basename(seen_in[name])} and {os.path.basename(file)}")
      seen_in[name] = file
      if weight_map is not None and weight_map.get(name) != os.path.basename(file):
        raise UsageError(f"{os.path.basename(file)} holds {name}, which the index maps to {weight_map.get(name)!r}")
      if name == "lm_head.weight" and cfg.tie_word_embeddings:
        lm_head_in_file = (file, name)
        continue
      if name not in expected:
        unknown.append(name)
        continue
      key = expected[name].key
      hf_shape = tuple(key.hf_shape(cfg))
      sl = handle.get_slice(name)
      got = tuple(sl.get_shape())
      if got != hf_shape:
        raise UsageError(f"{name}: shape {list(got)} does not match the config's {list(hf_shape)}")
      dt = SAFETENSORS_DTYPES.get(sl.get_dtype())
      if dt not in _READABLE:
        raise UsageError(
            f"{name}: stored dtype {dt if dt is not None else sl.get_dtype()} is not a float dtype this "
            "loader reads (float32, float16, bfloat16)"
        )
      file_of[name], stored[name] = file, dt
    del handle
  if weight_map is not None:
    absent = sorted(set(weight_map) - set(seen_in))
    if absent:
      raise UsageError(f"index lists {len(absent)} tensors its shards do not hold, e.g. {absent[:3]}")
  missing = sorted(set(expected) - set(file_of), key=_natural)
  if missing:
    more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
    raise UsageError(f"{path}: {len(missing)} missing tensors: {', '.join(missing[:5])}{more}")
  unknown.sort(key=_natural)
  if unknown:
    more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
    msg = f"{path}: {len(unknown)} unknown tensors: {', '.join(unknown[:5])}{more}"
    if strict:
      raise UsageError(msg + " (load with strict=False to ignore them)")
    warnings.warn(msg, stacklevel=3)
  return _Plan(files, expected, file_of, stored, unknown, lm_head_in_file)


_READABLE = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
_TIED_MSG = "config ties word embeddings but lm_head.weight differs from model.embed_tokens.weight"


def load_params(
    path: str | os.PathLike,
    cfg: QwenConfig,
    dtype: Any = jnp.float32,
    strict: bool = True,
    put: Callable[[Any], Any] | None = jax.device_put,
    *,
    mesh: Any = None,
    rules: Any = None,
    axis_rules: Any = None,
) -> tuple[Params, LoadReport]:
  """Loads an HF Qwen2/Qwen3 checkpoint directory into :class:`Params`.

  ``dtype`` is float32 (bf16/f16-stored tensors are upcast exactly) or
  bfloat16 (bf16-stored tensors are taken as stored). Every tensor's shape is
  asserted against the config. Missing keys always raise; unknown keys raise
  when ``strict`` (the default) and are reported in the :class:`LoadReport`
  and as a warning otherwise. ``put`` places the finished numpy tree
  (``jax.device_put`` by default; pass ``None`` to keep host numpy arrays, or
  a function applying shardings).

  ``mesh`` (a :class:`jax.sharding.Mesh` with ``dp``/``tp`` axes) instead
  places every weight directly on the mesh, sharded by the rule table
  (``rules`` rows first, then :data:`parity_jax.qwen2.sharding.DEFAULT_RULES`):
  each device's shard is read from the file by byte range, so no host holds
  more of a tensor than one shard plus a small buffer, and under
  ``jax.distributed`` each process reads only its own devices' shards. All
  checks (keys, shapes, dtypes, divisibility of every split axis) run before
  the first tensor is read.
  """
  path = os.fspath(path)
  np_dtype = np.dtype(dtype)
  if np_dtype not in _DTYPES.values():
    raise UsageError(f"dtype must be float32 or bfloat16, got {np_dtype}")
  if mesh is not None and put is not jax.device_put:
    raise UsageError("give put or mesh, not both")
  plan = _plan(path, cfg, strict)
  notes: tuple[str, ...] = ()
  if mesh is not None:
    params, notes = _load_sharded(path, plan, cfg, np_dtype, mesh, rules, axis_rules)
  else:
    fields = _fields(plan.expected)
    values: dict[str, np.ndarray] = {
        field: np.empty(key.shape(cfg), np_dtype) for field, (key, names) in fields.items() if key.per_expert
    }
    for file in plan.files:
      names = [n for n in plan.expected if plan.file_of[n] == file]
      if not names:
        continue
      with safetensors.safe_open(file, framework="numpy") as handle:
        for name in names:
          t = plan.expected[name]
          a = _convert(handle.get_tensor(name), np_dtype, name)
          if t.expert is None:
            values[t.field] = a.reshape(t.key.shape(cfg))
          else:
            values[t.field][t.expert] = a
    if plan.lm_head_in_file is not None:
      file, name = plan.lm_head_in_file
      with safetensors.safe_open(file, framework="numpy") as h:
        lm = h.get_tensor(name)
      emb = values["embed"]
      if tuple(lm.shape) != (cfg.vocab_size, cfg.hidden_size) or not bit_equal(_convert(lm, np_dtype, name), emb):
        raise UsageError(f"{path}: {_TIED_MSG}")
    params = _assemble(cfg, values)
    params = put(params) if put is not None else params
  report = LoadReport(
      tuple(plan.files),
      tuple(sorted({str(d) for d in plan.stored.values()})),
      tuple(plan.unknown),
      plan.lm_head_in_file is not None,
      notes,
  )
  return params, report


def _load_sharded(
    path: str, plan: _Plan, cfg: QwenConfig, np_dtype: np.dtype, mesh: Any, rules: Any, axis_rules: Any
) -> tuple[Params, tuple[str, ...]]:
  """Every weight read shard by shard onto ``mesh`` (see :func:`load_params`); also the placement notes."""
  from parity_jax.qwen2 import sharding as sh

  fields = _fields(plan.expected)
  planner = sh.Placement(mesh, rules, axis_rules)
  shardings = {field: planner.sharding(field, key.shape(cfg)) for field, (key, _) in fields.items()}
  headers = {file: sh.SafetensorsFile(file) for file in plan.files}
  if plan.lm_head_in_file is not None:
    # Compared over this process's own embedding shards, piece by piece: never a whole tensor in memory.
    file, name = plan.lm_head_in_file
    emb_name = "model.embed_tokens.weight"
    lm_file, emb_file = headers[file], headers[plan.file_of[emb_name]]
    shape = (cfg.vocab_size, cfg.hidden_size)
    if lm_file.entries[name][1] != shape or lm_file.entries[name][0] not in _READABLE:
      raise UsageError(f"{path}: {_TIED_MSG}")
    for box in sh.shard_boxes(shape, shardings["embed"]):
      for piece in sh.row_pieces(box, shape, np_dtype.itemsize, sh.READ_BUFFER_BYTES):
        if not bit_equal(lm_file.read_box(name, piece, np_dtype), emb_file.read_box(emb_name, piece, np_dtype)):
          raise UsageError(f"{path}: {_TIED_MSG}")
  values = {}
  for field, (key, names) in fields.items():
    shape = tuple(key.shape(cfg))
    if key.per_expert:  # a box over the stacked experts: each expert's box read from its own tensor
      files = [headers[plan.file_of[n]] for n in names]

      def read(index, files=files, names=names, shape=shape):
        e0, e1 = sh.box_of(index, shape)[0]
        out = sh.aligned_empty([e1 - e0] + [hi - lo for lo, hi in sh.box_of(index, shape)[1:]], np_dtype)
        for k, e in enumerate(range(e0, e1)):
          out[k] = files[e].read_box(names[e], tuple(index)[1:], np_dtype)
        return out

    else:
      f, name = headers[plan.file_of[names[0]]], names[0]
      read = lambda index, f=f, name=name, shape=shape: f.read_box(name, index, np_dtype, view_shape=shape)  # noqa: E731
    values[field] = sh.place_sharded(read, shape, shardings[field])
  return _assemble(cfg, values), planner.notes()


def _natural(name: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _assemble(cfg: QwenConfig, fields: Mapping[str, Any]) -> Params:
  """Builds the pytree from field path -> array (the key table's field paths)."""
  get = fields.get

  def mlp(p: str) -> Mlp | None:
    if get(p + "w_gate") is None:
      return None
    return Mlp(w_gate=get(p + "w_gate"), w_up=get(p + "w_up"), w_down=get(p + "w_down"))

  layers = []
  for i in range(cfg.num_layers):
    p = f"layers.{i}."
    attn = Attention(
        wq=get(p + "attn.wq"),
        wk=get(p + "attn.wk"),
        wv=get(p + "attn.wv"),
        wo=get(p + "attn.wo"),
        bq=get(p + "attn.bq"),
        bk=get(p + "attn.bk"),
        bv=get(p + "attn.bv"),
        bo=get(p + "attn.bo"),
        q_norm=get(p + "attn.q_norm"),
        k_norm=get(p + "attn.k_norm"),
    )
    moe = None
    if i in cfg.moe_layers:
      moe = Moe(
          router=get(p + "moe.router"),
          w_gate=get(p + "moe.w_gate"),
          w_up=get(p + "moe.w_up"),
          w_down=get(p + "moe.w_down"),
          shared=mlp(p + "moe.shared."),
          shared_gate=get(p + "moe.shared_gate"),
      )
    layers.append(
        Layer(attn_norm=get(p + "attn_norm"), attn=attn, ffn_norm=get(p + "ffn_norm"), mlp=mlp(p + "mlp."), moe=moe)
    )
  return Params(embed=get("embed"), layers=tuple(layers), final_norm=get("final_norm"), lm_head=get("lm_head"))


def init_params(
    cfg: QwenConfig,
    seed: int = 0,
    dtype: Any = jnp.float32,
    scale: float = 0.02,
    put: Callable[[Any], Any] | None = jax.device_put,
) -> Params:
  """Random parameters with this config's tree structure (benchmarks, tests, sharding experiments).

  Norm weights are ones, everything else ``scale * N(0, 1)`` drawn on the host
  with ``numpy.random.default_rng(seed)`` in key-table order (fast even at
  0.5B parameters). The values mean nothing; shapes and structure match
  :func:`load_params` exactly.
  """
  rng = np.random.default_rng(seed)
  np_dtype = np.dtype(dtype)
  values: dict[str, np.ndarray] = {}
  for name, t in _expected_names(cfg).items():  # one draw per HF tensor, experts stacked as they come
    shape = t.key.hf_shape(cfg) if t.expert is not None else t.key.shape(cfg)
    if name.endswith("norm.weight"):
      a = np.ones(shape, np_dtype)
    else:
      a = rng.standard_normal(shape, dtype=np.float32)
      a *= np.float32(scale)
      a = a.astype(np_dtype, copy=False)
    if t.expert is None:
      values[t.field] = a
    else:
      values.setdefault(t.field, np.empty(t.key.shape(cfg), np_dtype))[t.expert] = a
  params = _assemble(cfg, values)
  return put(params) if put is not None else params


def random_params(
    cfg: QwenConfig,
    seed: int = 0,
    dtype: Any = jnp.float32,
    scale: float = 0.02,
    *,
    mesh: Any = None,
    rules: Any = None,
    axis_rules: Any = None,
) -> Params:
  """Random parameters generated on the device(s): nothing passes through the host.

  For benchmarks at real size (a 7B model's 15 GB of bf16 weights are made on
  the accelerator in about a second; nothing is written to disk). Norm
  weights are ones, everything else zero-mean uniform with standard deviation
  ``scale``, from a counter-based hash of (seed, tensor index in key-table
  order, element index) (:func:`_hash_uniform`): one jitted program that
  compiles in milliseconds, deterministic on every backend. With a ``mesh``
  each weight is generated already sharded by the rule table
  (:mod:`parity_jax.qwen2.sharding`). The values differ from
  :func:`init_params`' (another generator); shapes and structure are the same.
  """
  from parity_jax.qwen2 import sharding as sh

  np_dtype = np.dtype(dtype)
  fields = _fields(_expected_names(cfg))
  leaves = tuple(
      (tuple(int(d) for d in key.shape(cfg)), names[0].endswith("norm.weight")) for key, names in fields.values()
  )
  shardings = None
  if mesh is not None:
    planner = sh.Placement(mesh, rules, axis_rules)
    shardings = tuple(planner.sharding(field, shape) for field, (shape, _) in zip(fields, leaves))
  values = _random_tree(leaves, np_dtype, int(seed), float(scale), shardings)()
  return _assemble(cfg, dict(zip(fields, values)))


def _hash_uniform(shape: tuple[int, ...], dtype: Any, seed: int, leaf: int, scale: float) -> jax.Array:
  """Zero-mean uniform values with standard deviation ``scale`` from a counter-based integer hash.

  ``lowbias32`` (Wellons) of the element index, salted by seed and leaf: a
  few fused elementwise ops, so it compiles in milliseconds and runs at
  memory bandwidth (``jax.random``'s threefry took seconds to compile per
  shape on CPU).
  """
  n = math.prod(shape)
  x = jax.lax.iota(jnp.uint32, n) * jnp.uint32(0x9E3779B1)
  x = x + jnp.uint32((seed * 0x85EBCA77 + leaf * 0xC2B2AE3D + 0x27D4EB2F) & 0xFFFFFFFF)
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  x = x ^ (x >> 16)
  u = (x >> 8).astype(jnp.float32) * jnp.float32(2.0**-24) - jnp.float32(0.5)  # [-0.5, 0.5)
  return (u * jnp.float32(scale * math.sqrt(12.0))).astype(dtype).reshape(shape)


@functools.lru_cache(maxsize=None)
def _random_tree(
    leaves: tuple[tuple[tuple[int, ...], bool], ...],
    dtype: np.dtype,
    seed: int,
    scale: float,
    shardings: tuple[Any, ...] | None,
) -> Callable:
  """One jitted program drawing every leaf (one quick compile, however many shapes)."""

  def draw():
    return tuple(
        jnp.ones(shape, dtype) if norm else _hash_uniform(shape, dtype, seed, i, scale)
        for i, (shape, norm) in enumerate(leaves)
    )

  return jax.jit(draw, out_shardings=shardings)


def _get_field(params: Params, path: str) -> Any:
  obj: Any = params
  for part in path.split("."):
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  return obj


def to_hf_tensors(params: Params, cfg: QwenConfig) -> dict[str, np.ndarray]:
  """The inverse of the key table: HF tensor name -> host array in HF's shape (a reshape, no transpose).

  Used to write test checkpoints without torch and to check that loading
  round-trips bit for bit.
  """
  out: dict[str, np.ndarray] = {}
  for name, t in _expected_names(cfg).items():
    value = np.asarray(_get_field(params, t.field))
    out[name] = (value if t.expert is None else value[t.expert]).reshape(t.key.hf_shape(cfg))
  return out
