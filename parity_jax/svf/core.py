"""SVF reconstruction in JAX, stage by stage, with the Python process's exact semantics.

The Python/PyTorch source of truth (Sakana Transformer²-style singular-value
fine-tuning) rebuilds every selected weight ``W`` (HF orientation ``[out, in]``)
from its legacy ``torch.svd`` components ``U [m, k]``, ``S [k]``, ``V [n, k]``::

    scaled_s      = S * (1.0 + offsets)
    normalization = S.sum() / scaled_s.sum()
    adapted       = (U * scaled_s.reshape(1, -1)) @ V.T
    adapted       = adapted * normalization
    final         = orient_to_manifest_shape(adapted).to(bfloat16)

:func:`reconstruct` evaluates exactly that, operation by operation, in float32
(``compute_dtype``) with ``Precision.HIGHEST`` matmuls, and can capture every
intermediate under the Python bundle's stage names (:data:`STAGES`).

Two choices make the result reproducible and comparable bit for bit:

* **Sums in torch's order.** ``S.sum()`` and ``scaled_s.sum()`` are evaluated
  by :func:`torch_cpu_sum`, which replays ATen's CPU ``cascade_sum`` order
  (8 float lanes x 4-way ILP, four cascade levels). The normalization scalar is
  then bit-identical to torch's on CPU, where a plain ``jnp.sum`` disagrees in
  the last bit for most vectors. That removes one whole source of bf16 flips.
* **Fixed row blocks.** The matmul runs over row blocks of ``U`` of exactly
  ``row_block`` rows (the last block may be shorter), each block one dot of a
  fixed shape. The chunked large-tensor gate cuts ``U`` at multiples of
  ``row_block``, so every row is computed by the same compiled dot of the same
  shape in both paths: chunked results equal unchunked ones by construction on
  any backend whose same-shape dot is deterministic, not only by the empirical
  fact that XLA CPU's dot does not depend on the number of rows (it does for a
  single row, where XLA switches to a matrix-vector kernel). The normalization
  scalar depends only on ``S`` and ``offsets``, which are never chunked.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from parity_jax.errors import UsageError

__all__ = [
    "DEFAULT_ROW_BLOCK",
    "LAYOUTS",
    "ORIENTATIONS",
    "ROW_STAGES",
    "STAGES",
    "reconstruct",
    "resolve_orientation",
    "row_stages",
    "source_shape",
    "torch_cpu_sum",
    "validate_components",
    "v_nk",
    "vector_stages",
]

#: Stage names, exactly the Python bundle's, in execution order.
STAGES: tuple[str, ...] = (
    "source_f32",  # the input W, when given
    "offsets_f32",
    "scaled_s",
    "normalization",
    "u_scaled",
    "matmul_pre_norm",
    "zero_source_f32",  # the rebuild with zero offsets: what the components reproduce of W
    "adapted_source_f32",  # source orientation [m, n]
    "final_f32",  # target orientation
    "final_bf16",
)
#: Stages with one row per row of ``U`` (source orientation): what the chunked gate streams.
ROW_STAGES: tuple[str, ...] = ("u_scaled", "matmul_pre_norm", "zero_source_f32", "adapted_source_f32")

#: ``torch_v``: V as legacy ``torch.svd`` returns it, ``[n, k]``. ``vh``: Vh as
#: ``torch.linalg.svd``/numpy return it, ``[k, n]``.
LAYOUTS: tuple[str, ...] = ("torch_v", "vh")
#: ``identity``: target is ``[m, n]`` (HF ``[out, in]``). ``transpose``: target is
#: ``[n, m]`` (Flax/Bumblebee-style ``[in, out]`` kernels).
ORIENTATIONS: tuple[str, ...] = ("identity", "transpose")

#: Rows of U per matmul block. XLA CPU (YNNPACK dots) pays a fixed cost per
#: dot call: on the 151936 x 1024 embedding, 1024-row blocks ran at 0.68x the
#: rate of one plain dot, 4096 at 0.95x, 8192 at 1.0x, 16384 at 1.03x (2-core
#: Zen 4, 2026-11-23). 8192 rows also bounds the chunked gate's smallest chunk
#: (8192 x (16 k + 32 n) bytes, 384 MiB at k = n = 1024).
DEFAULT_ROW_BLOCK = 8192

_PRECISION = lax.Precision.HIGHEST

# ATen's CPU sum kernel (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum):
# Vectorized<float> lanes as used by that kernel, its ILP factor and cascade levels.
_TORCH_SUM_LANES = 8
_TORCH_SUM_ILP = 4
_TORCH_SUM_LEVELS = 4


# ----------------------------------------------------------------------------
# Sums in torch's CPU order
# ----------------------------------------------------------------------------


def _ceil_log2(x: int) -> int:
  return 0 if x <= 1 else (x - 1).bit_length()


def _multi_row_sum(rows: jax.Array) -> jax.Array:
  """ATen ``multi_row_sum``: sums ``rows[i]`` over i with its 4-level cascade."""
  size = rows.shape[0]
  level_power = max(4, _ceil_log2(size) // _TORCH_SUM_LEVELS)
  level_step = 1 << level_power
  level_mask = level_step - 1
  zero = jnp.zeros(rows.shape[1:], rows.dtype)
  acc = [zero] * _TORCH_SUM_LEVELS
  i = 0
  while i + level_step <= size:
    for _ in range(level_step):
      acc[0] = acc[0] + rows[i]
      i += 1
    for j in range(1, _TORCH_SUM_LEVELS):
      acc[j] = acc[j] + acc[j - 1]
      acc[j - 1] = zero
      if i & (level_mask << (j * level_power)):
        break
  while i < size:
    acc[0] = acc[0] + rows[i]
    i += 1
  for j in range(1, _TORCH_SUM_LEVELS):
    acc[0] = acc[0] + acc[j]
  return acc[0]


def _row_sum(rows: jax.Array) -> jax.Array:
  """ATen ``row_sum``: ``rows`` seen as ``(-1, ilp)`` groups, then partials folded."""
  size = rows.shape[0]
  size_ilp = size // _TORCH_SUM_ILP
  grouped = rows[: size_ilp * _TORCH_SUM_ILP].reshape((size_ilp, _TORCH_SUM_ILP) + rows.shape[1:])
  partial = _multi_row_sum(grouped)
  p0 = partial[0]
  for i in range(size_ilp * _TORCH_SUM_ILP, size):
    p0 = p0 + rows[i]
  for j in range(1, _TORCH_SUM_ILP):
    p0 = p0 + partial[j]
  return p0


def torch_cpu_sum(x: jax.Array) -> jax.Array:
  """Sum of a 1-D array in the exact order of torch's CPU ``Tensor.sum()``.

  Replays ATen's ``cascade_sum`` for a contiguous float32 vector: the first
  ``8 * (n // 8)`` elements as 8-lane vectors accumulated 4 at a time through a
  4-level cascade, then the scalar tail, then the 8 lanes in order (vectors
  shorter than 8 take ATen's scalar path). Verified bit for bit against torch
  2.13 on x86-64 (AVX2 and AVX512 dispatch both use 8 float lanes here) in
  ``tests/test_svf_oracle.py``. Exact for ``n <= 32768``; beyond that torch
  splits the reduction across threads, and this stays a correct float32 sum
  with a different order. Inputs of other dtypes are summed in float32 and the
  result cast back (torch accumulates bf16 in float32 too, in another order).
  """
  x = jnp.asarray(x)
  if x.ndim != 1:
    raise UsageError(f"torch_cpu_sum expects a 1-D array, got shape {tuple(x.shape)}")
  out_dtype = x.dtype
  x = x.astype(jnp.float32)
  n = x.shape[0]
  if n >= _TORCH_SUM_LANES:
    vec_size = n // _TORCH_SUM_LANES
    lanes = _row_sum(x[: vec_size * _TORCH_SUM_LANES].reshape(vec_size, _TORCH_SUM_LANES))
    total = jnp.zeros((), jnp.float32)
    for t in range(vec_size * _TORCH_SUM_LANES, n):
      total = total + x[t]
    for lane in range(_TORCH_SUM_LANES):
      total = total + lanes[lane]
  else:
    total = _row_sum(x) if n else jnp.zeros((), jnp.float32)
  return total.astype(out_dtype)


# ----------------------------------------------------------------------------
# Shapes, layouts, orientation
# ----------------------------------------------------------------------------


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(x))


def source_shape(u_shape: tuple[int, ...], v_shape: tuple[int, ...], layout: str) -> tuple[int, int]:
  """``[m, n]`` of the rebuilt matrix from the shapes of U and V (or Vh)."""
  if layout not in LAYOUTS:
    raise UsageError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
  return (int(u_shape[0]), int(v_shape[0] if layout == "torch_v" else v_shape[1]))


def validate_components(
    u_shape, s_shape, v_shape, offsets_shape, layout: str, name: str | None = None
) -> tuple[int, int, int]:
  """Checks the component shapes against ``layout``; returns ``(m, n, k)``.

  Raises a one-line :class:`UsageError` naming the tensor when they disagree.
  """
  where = f"{name}: " if name else ""
  u_shape, s_shape, v_shape, offsets_shape = (
      tuple(int(d) for d in t) for t in (u_shape, s_shape, v_shape, offsets_shape)
  )
  if layout not in LAYOUTS:
    raise UsageError(f"{where}unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
  if len(u_shape) != 2 or len(s_shape) != 1 or len(v_shape) != 2:
    raise UsageError(
        f"{where}expected U [m, k], S [k], V 2-D; got U {list(u_shape)}, S {list(s_shape)}, V {list(v_shape)}"
    )
  k = s_shape[0]
  v_k = v_shape[1] if layout == "torch_v" else v_shape[0]
  if u_shape[1] != k or v_k != k:
    want = "[n, k]" if layout == "torch_v" else "[k, n]"
    raise UsageError(
        f"{where}component shapes disagree for layout {layout} (V as {want}): "
        f"U {list(u_shape)}, S {list(s_shape)}, V {list(v_shape)}"
    )
  if offsets_shape != (k,):
    raise UsageError(f"{where}offsets shape {list(offsets_shape)} does not match S [{k}]")
  m, n = source_shape(u_shape, v_shape, layout)
  return m, n, k


def resolve_orientation(
    src_shape: tuple[int, int], target_shape: tuple[int, ...] | None = None, orientation: str | None = None
) -> str:
  """``identity`` or ``transpose``, from the target shape and/or an explicit choice.

  ``target_shape`` equal to ``[m, n]`` means identity, equal to ``[n, m]``
  means transpose (a Flax/Bumblebee ``[in, out]`` kernel). A square matrix
  fits both; then identity unless ``orientation="transpose"`` says otherwise.
  Anything else -- another element count, a reshape, more axes -- is an error.
  """
  m, n = (int(d) for d in src_shape)
  if orientation is not None and orientation not in ORIENTATIONS:
    raise UsageError(f"unknown orientation {orientation!r}; expected one of {', '.join(ORIENTATIONS)}")
  if target_shape is None:
    return orientation or "identity"
  target = tuple(int(d) for d in target_shape)
  fits = [o for o, shp in (("identity", (m, n)), ("transpose", (n, m))) if target == shp]
  if not fits:
    raise UsageError(
        f"target shape {list(target)} is neither the source shape [{m}, {n}] nor its transpose [{n}, {m}];"
        " only identity and transpose orientations are supported"
    )
  if orientation is not None:
    if orientation not in fits:
      raise UsageError(
          f"orientation {orientation} does not turn source shape [{m}, {n}] into target shape {list(target)}"
      )
    return orientation
  return fits[0]


# ----------------------------------------------------------------------------
# The reconstruction
# ----------------------------------------------------------------------------


def _map_row_blocks(fn: Callable[[jax.Array], Any], u: jax.Array, row_block: int) -> Any:
  """``fn`` over consecutive row blocks of ``u`` of ``row_block`` rows; results stacked by row.

  Full blocks run in a ``fori_loop`` reading ``u`` with ``dynamic_slice`` and
  writing each block's outputs in place, so neither ``u`` nor the outputs are
  copied; the short last block (if any) is one more call of its own shape.
  """
  m = u.shape[0]
  if m <= row_block:
    return fn(u)
  n_full, rem = divmod(m, row_block)
  block_out = jax.eval_shape(fn, jax.ShapeDtypeStruct((row_block,) + u.shape[1:], u.dtype))
  outs = jax.tree.map(lambda s: jnp.zeros((m,) + s.shape[1:], s.dtype), block_out)

  def body(i, outs):
    start = i * row_block
    res = fn(lax.dynamic_slice_in_dim(u, start, row_block, axis=0))
    return jax.tree.map(lambda o, r: lax.dynamic_update_slice_in_dim(o, r, start, axis=0), outs, res)

  outs = lax.fori_loop(0, n_full, body, outs)
  if rem:
    res = fn(u[n_full * row_block :])
    outs = jax.tree.map(lambda o, r: lax.dynamic_update_slice_in_dim(o, r, n_full * row_block, axis=0), outs, res)
  return outs


def v_nk(v: Any, layout: str) -> Any:
  """V as a materialised ``[n, k]`` array whatever the stored layout.

  Every matmul reads V in this one layout. XLA's CPU dot picks its kernel (and
  so its accumulation order) by operand layout, and on some machines (AVX2
  EPYC, measured) ``a @ Vh`` and ``a @ V.T`` round differently; with one layout
  the two component layouts give identical bytes on every machine by
  construction. The transpose is a real copy made outside the jitted matmul,
  so XLA cannot fold it back into the dot.
  """
  if layout == "torch_v":
    return v
  if isinstance(v, np.ndarray):
    return np.ascontiguousarray(v.T)
  return jax.block_until_ready(jnp.transpose(jnp.asarray(v)))


def _matmul_vt(a: jax.Array, v: jax.Array) -> jax.Array:
  """``a @ V.T`` with V ``[n, k]`` (see :func:`v_nk`)."""
  return jnp.einsum("mk,nk->mn", a, v, precision=_PRECISION, preferred_element_type=a.dtype)


def _scalars(s: jax.Array, offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``scaled_s = S * (1.0 + offsets)`` and ``normalization = S.sum() / scaled_s.sum()``."""
  one = jnp.ones((), s.dtype)
  scaled_s = s * (one + offsets)
  normalization = torch_cpu_sum(s) / torch_cpu_sum(scaled_s)
  return scaled_s, normalization


@functools.partial(jax.jit, static_argnames=("compute_dtype", "row_block", "capture"))
def row_stages(u, s, v, offsets, *, compute_dtype: Any, row_block: int, capture: bool):
  """Row stages (source orientation) of the rows of ``U`` given; S, V ``[n, k]`` (:func:`v_nk`), offsets whole.

  ``capture=False``: ``final_bf16`` rows only. ``capture=True``: the four
  :data:`ROW_STAGES` plus ``final_bf16``, all ``[rows, ...]``.
  """
  cd = jnp.dtype(compute_dtype)
  u, s, v, offsets = (jnp.asarray(x).astype(cd) for x in (u, s, v, offsets))
  scaled_s, normalization = _scalars(s, offsets)

  if not capture:

    def block(ub):
      adapted = _matmul_vt(ub * scaled_s[None, :], v) * normalization
      return adapted.astype(jnp.bfloat16)

    return _map_row_blocks(block, u, row_block)

  scaled_zero, norm_zero = _scalars(s, jnp.zeros_like(offsets))

  def block(ub):
    u_scaled = ub * scaled_s[None, :]
    pre = _matmul_vt(u_scaled, v)
    zero = _matmul_vt(ub * scaled_zero[None, :], v) * norm_zero
    adapted = pre * normalization
    return {
        "u_scaled": u_scaled,
        "matmul_pre_norm": pre,
        "zero_source_f32": zero,
        "adapted_source_f32": adapted,
        "final_bf16": adapted.astype(jnp.bfloat16),
    }

  return _map_row_blocks(block, u, row_block)


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def vector_stages(s, offsets, *, compute_dtype: Any):
  """The whole-vector stages ``offsets_f32``, ``scaled_s`` and ``normalization``."""
  cd = jnp.dtype(compute_dtype)
  s, offsets = jnp.asarray(s).astype(cd), jnp.asarray(offsets).astype(cd)
  scaled_s, normalization = _scalars(s, offsets)
  return {"offsets_f32": offsets.astype(jnp.float32), "scaled_s": scaled_s, "normalization": normalization}


def _as_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def reconstruct(
    u: Any,
    s: Any,
    v: Any,
    offsets: Any,
    *,
    layout: str = "torch_v",
    target_shape: tuple[int, ...] | None = None,
    orientation: str | None = None,
    capture: bool = False,
    compute_dtype: Any = jnp.float32,
    source: Any = None,
    row_block: int = DEFAULT_ROW_BLOCK,
):
  """Rebuilds one SVF-adapted matrix with the Python formula.

  Args:
    u: ``U [m, k]``.
    s: ``S [k]``.
    v: ``V [n, k]`` (``layout="torch_v"``, legacy ``torch.svd``) or ``Vh [k, n]``
      (``layout="vh"``, ``torch.linalg.svd``/numpy).
    offsets: ``[k]``; ``scaled_s = S * (1 + offsets)``.
    layout: ``torch_v`` or ``vh``.
    target_shape: the manifest shape: ``[m, n]`` (identity, HF ``[out, in]``) or
      ``[n, m]`` (transpose, ``[in, out]`` kernels). ``None`` keeps ``[m, n]``.
    orientation: ``identity``/``transpose``; only needed to transpose a square matrix.
    capture: return every stage (a dict in :data:`STAGES` order) instead of
      only ``final_bf16``.
    compute_dtype: float32 (default, the Python process) or bfloat16 (the
      original Sakana variant). Stages named ``*_f32`` hold the compute-dtype
      values widened to float32.
    source: the original ``W [m, n]``; captured as ``source_f32`` when given.
    row_block: rows of U per matmul block (see the module docstring). The
      chunked gate must use the same value to be bit-identical.

  Returns:
    ``final_bf16`` in the target orientation, or with ``capture=True`` a dict
    stage name -> array (``source_f32`` only when ``source`` was given).
  """
  if int(row_block) < 1:
    raise UsageError(f"row_block must be >= 1, got {row_block}")
  m, n, _ = validate_components(_shape(u), _shape(s), _shape(v), _shape(offsets), layout)
  orient = resolve_orientation((m, n), target_shape, orientation)
  if source is not None and _shape(source) != (m, n):
    raise UsageError(f"source shape {list(_shape(source))} does not match the rebuilt shape [{m}, {n}]")
  compute_dtype = jnp.dtype(compute_dtype)
  if compute_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise UsageError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype}")
  kw = dict(compute_dtype=compute_dtype, row_block=int(row_block))
  v = v_nk(v, layout)
  orient_fn = (lambda x: x) if orient == "identity" else (lambda x: jnp.transpose(x))
  if not capture:
    return orient_fn(row_stages(u, s, v, offsets, capture=False, **kw))
  rows = row_stages(u, s, v, offsets, capture=True, **kw)
  vec = vector_stages(s, offsets, compute_dtype=compute_dtype)
  out: dict[str, jax.Array] = {}
  if source is not None:
    out["source_f32"] = jnp.asarray(source).astype(jnp.float32)
  out["offsets_f32"] = vec["offsets_f32"]
  out["scaled_s"] = _as_f32(vec["scaled_s"])
  out["normalization"] = _as_f32(vec["normalization"])
  for name in ROW_STAGES:
    out[name] = _as_f32(rows[name])
  out["final_f32"] = orient_fn(out["adapted_source_f32"])
  out["final_bf16"] = orient_fn(rows["final_bf16"])
  return out
