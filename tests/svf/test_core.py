"""SVF reconstruction: stages, layouts, orientation, row blocks and chunking, torch-order sums."""

from __future__ import annotations

import math
import re

import jax
import ml_dtypes
import numpy as np
import pytest

from parity_jax import arraydiff
from parity_jax.errors import UsageError
from parity_jax.svf import STAGES, reconstruct, resolve_orientation, torch_cpu_sum
from parity_jax.svf.bounds import FormulaConstants, gamma


def _components(m, n, seed=0, offset_std=0.1):
  """Orthonormal U [m, k], V [n, k] (QR of Gaussians), decreasing S, offsets."""
  rng = np.random.default_rng(seed)
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  s = np.sort(rng.uniform(0.05, 3.0, k))[::-1]
  o = rng.standard_normal(k) * offset_std
  return u.astype(np.float32), s.astype(np.float32), v.astype(np.float32), o.astype(np.float32)


def _np(stages):
  return {k: np.asarray(v) for k, v in stages.items()}


def _f64_truth(u, s, v, o):
  """M = sum_i U_ji ss_i V_li, T = sum_i |U_ji ss_i V_li| and N in float64 from the float32 inputs."""
  s64, o64 = s.astype(np.float64), o.astype(np.float64)
  ss = s64 * (1.0 + o64)
  u64, v64 = u.astype(np.float64), v.astype(np.float64)
  m = (u64 * ss) @ v64.T
  t = (np.abs(u64) * np.abs(ss)) @ np.abs(v64).T
  return m, t, s64.sum() / ss.sum()


def test_capture_has_exactly_the_python_stage_names_in_order():
  u, s, v, o = _components(24, 16)
  w = (u * s) @ v.T
  st = reconstruct(u, s, v, o, capture=True, source=w)
  assert list(st) == list(STAGES)
  assert "source_f32" not in reconstruct(u, s, v, o, capture=True)
  st = _np(st)
  assert st["normalization"].shape == () and st["final_bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
  assert all(st[k].dtype == np.float32 for k in STAGES if k != "final_bf16")
  assert arraydiff.bit_equal(st["source_f32"], w)
  # the fast path returns the same final bytes as the capture path
  assert arraydiff.bit_equal(np.asarray(reconstruct(u, s, v, o)), st["final_bf16"])


def test_final_lies_within_the_rigorous_float32_bound_of_the_float64_truth():
  u, s, v, o = _components(96, 72, seed=1)
  st = _np(reconstruct(u, s, v, o, capture=True))
  m, t, n = _f64_truth(u, s, v, o)
  fc = FormulaConstants.from_components(s, o)
  assert fc.n64 == pytest.approx(n, rel=1e-15)
  err = np.abs(st["adapted_source_f32"].astype(np.float64) - m * n)
  bound = fc.value_bound(np.abs(m), t) + fc.reference_bound(np.abs(m), t)
  assert np.all(err <= bound)
  # ...and the bound is not vacuous: a 0.1% normalization error breaks it on most elements
  wrong = st["matmul_pre_norm"].astype(np.float64) * n * 1.001
  assert np.mean(np.abs(wrong - m * n) > bound) > 0.5
  # the elementwise stages are single IEEE roundings of the float32 inputs
  ss32 = s * (np.float32(1) + o)
  assert arraydiff.bit_equal(st["scaled_s"], ss32)
  assert arraydiff.bit_equal(st["u_scaled"], u * ss32[None, :])
  assert arraydiff.bit_equal(st["final_bf16"], st["final_f32"].astype(ml_dtypes.bfloat16))


def test_torch_cpu_sum_is_a_correct_float32_sum_for_every_length():
  rng = np.random.default_rng(2)
  f = jax.jit(torch_cpu_sum)
  for n in list(range(0, 18)) + [31, 32, 33, 63, 127, 129, 511, 1000, 3072]:
    x = (rng.standard_normal(n) * 10).astype(np.float32)
    got = float(np.asarray(f(x)))
    exact = math.fsum(x.astype(np.float64))
    assert abs(got - exact) <= gamma(max(n - 1, 0), 2.0**-24) * float(np.abs(x).astype(np.float64).sum()) + 1e-45, n
  with pytest.raises(UsageError, match="1-D"):
    torch_cpu_sum(np.zeros((2, 2), np.float32))


def test_layouts_torch_v_and_vh_give_identical_bytes():
  u, s, v, o = _components(40, 56, seed=3)
  a = _np(reconstruct(u, s, v, o, layout="torch_v", capture=True))
  b = _np(reconstruct(u, s, np.ascontiguousarray(v.T), o, layout="vh", capture=True))
  for k in a:
    assert arraydiff.bit_equal(a[k], b[k]), k


def test_layout_mismatch_and_bad_shapes_are_usage_errors():
  u, s, v, o = _components(40, 56, seed=3)
  with pytest.raises(UsageError, match="layout vh"):
    reconstruct(u, s, v, o, layout="vh")
  with pytest.raises(UsageError, match="unknown layout"):
    reconstruct(u, s, v, o, layout="nx")
  with pytest.raises(UsageError, match="offsets shape"):
    reconstruct(u, s, v, o[:-1])
  with pytest.raises(UsageError, match="source shape"):
    reconstruct(u, s, v, o, source=np.zeros((56, 40), np.float32))
  with pytest.raises(UsageError, match="compute_dtype"):
    reconstruct(u, s, v, o, compute_dtype=np.float16)


def test_orientation_identity_transpose_and_nothing_else():
  u, s, v, o = _components(40, 24, seed=4)
  ident = _np(reconstruct(u, s, v, o, capture=True, target_shape=(40, 24)))
  trans = _np(reconstruct(u, s, v, o, capture=True, target_shape=[24, 40]))
  assert trans["final_f32"].shape == (24, 40)
  assert arraydiff.bit_equal(trans["final_f32"], np.ascontiguousarray(ident["final_f32"].T))
  assert arraydiff.bit_equal(trans["final_bf16"], np.ascontiguousarray(ident["final_bf16"].T))
  assert arraydiff.bit_equal(trans["adapted_source_f32"], ident["adapted_source_f32"])  # always source-oriented
  assert arraydiff.bit_equal(np.asarray(reconstruct(u, s, v, o, target_shape=(24, 40))), trans["final_bf16"])
  for bad in [(960,), (24, 41), (20, 48), (1, 40, 24)]:
    with pytest.raises(UsageError, match="neither"):
      reconstruct(u, s, v, o, target_shape=bad)
  # a square matrix fits both: identity unless asked
  assert resolve_orientation((8, 8), (8, 8)) == "identity"
  assert resolve_orientation((8, 8), (8, 8), "transpose") == "transpose"
  with pytest.raises(UsageError, match="does not turn"):
    resolve_orientation((8, 6), (8, 6), "transpose")
  with pytest.raises(UsageError, match="unknown orientation"):
    resolve_orientation((8, 6), None, "flip")
  us, ss, vs, os_ = _components(16, 16, seed=5)
  sq = np.asarray(reconstruct(us, ss, vs, os_, orientation="transpose"))
  assert arraydiff.bit_equal(sq, np.ascontiguousarray(np.asarray(reconstruct(us, ss, vs, os_)).T))


def _chunked(u, s, v, o, cuts, **kw):
  """Rebuild rows [c0, c1) for consecutive cuts and stack them, like the chunked gate."""
  parts = [_np(reconstruct(u[c0:c1], s, v, o, capture=True, **kw)) for c0, c1 in zip(cuts[:-1], cuts[1:])]
  keys = ("u_scaled", "matmul_pre_norm", "zero_source_f32", "adapted_source_f32", "final_bf16")
  return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def test_chunks_at_row_block_boundaries_are_bit_identical_at_realistic_width():
  # k = n = 1024 like Qwen3-0.6B's hidden size; m = 2049 leaves a one-row last
  # block, which XLA CPU computes with a matrix-vector kernel: it is that same
  # one-row dot in the full rebuild and in the chunked one.
  rng = np.random.default_rng(6)
  m, k = 2049, 1024
  u = (rng.standard_normal((m, k)) / 32).astype(np.float32)
  v = (rng.standard_normal((k, k)) / 32).astype(np.float32)
  s = rng.uniform(0.1, 5, k).astype(np.float32)
  o = (rng.standard_normal(k) * 0.1).astype(np.float32)
  full = _np(reconstruct(u, s, v, o, capture=True, row_block=1024))
  for cuts in ([0, 1024, m], [0, 2048, m]):
    ch = _chunked(u, s, v, o, cuts, row_block=1024)
    for key, val in ch.items():
      assert arraydiff.bit_equal(val, full[key]), (cuts, key)
  assert arraydiff.bit_equal(np.asarray(reconstruct(u[:1024], s, v, o, row_block=1024)), full["final_bf16"][:1024])


def test_small_row_blocks_with_ragged_tail_match_the_unblocked_rebuild():
  u, s, v, o = _components(50, 20, seed=7)
  whole = _np(reconstruct(u, s, v, o, capture=True, row_block=7))
  ch = _chunked(u, s, v, o, [0, 14, 49, 50], row_block=7)
  for key, val in ch.items():
    assert arraydiff.bit_equal(val, whole[key]), key
  # On XLA CPU the dot does not depend on the number of rows (>= 2), so the
  # block size is invisible there; the blocks make it so on any backend.
  if jax.default_backend() == "cpu":
    plain = _np(reconstruct(u, s, v, o, capture=True, row_block=1024))
    assert arraydiff.bit_equal(plain["final_bf16"], whole["final_bf16"])


def test_bfloat16_compute_variant_runs_and_rounds_inputs_first():
  u, s, v, o = _components(32, 24, seed=8)
  st = _np(reconstruct(u, s, v, o, capture=True, compute_dtype=ml_dtypes.bfloat16))
  assert st["final_f32"].dtype == np.float32
  assert arraydiff.bit_equal(st["final_bf16"], st["final_f32"].astype(ml_dtypes.bfloat16))
  bf = lambda x: x.astype(ml_dtypes.bfloat16)  # noqa: E731
  assert arraydiff.bit_equal(bf(st["scaled_s"]), bf(bf(s) * (bf(np.float32(1)) + bf(o))))


# ------------------------------------------------------------------------------------------------------------------
# The bfloat16-compute variant sums in float32 (issue 16 section 3)
# ------------------------------------------------------------------------------------------------------------------


def test_bfloat16_variant_sums_in_float32_and_rounds_the_sums_to_bfloat16():
  # bfloat16 values in [0.05, 3] have 8 significant bits: 24 of them sum exactly in float32 (and float64) in any
  # order, so the float32 sums are known exactly here, while a bfloat16 accumulator rounds at nearly every step.
  u, s, v, o = _components(32, 24, seed=9)  # the shapes of the test above: one compilation
  bf = lambda x: np.asarray(x).astype(ml_dtypes.bfloat16)  # noqa: E731
  s_b, o_b = bf(s), bf(o)
  scaled_b = bf(s_b.astype(np.float32) * (np.float32(1) + o_b.astype(np.float32)).astype(ml_dtypes.bfloat16))
  sum_s = s_b.astype(np.float64).sum()
  sum_scaled = scaled_b.astype(np.float64).sum()
  assert np.float32(sum_s) == sum_s and np.float32(sum_scaled) == sum_scaled  # exact in float32
  want = bf(np.float32(bf(sum_s).astype(np.float32)) / np.float32(bf(sum_scaled).astype(np.float32)))
  st = _np(reconstruct(u, s, v, o, capture=True, compute_dtype=ml_dtypes.bfloat16))
  assert st["scaled_s"].astype(ml_dtypes.bfloat16).tobytes() == scaled_b.tobytes()
  assert st["normalization"].dtype == np.float32 and st["normalization"].shape == ()
  assert bf(st["normalization"]).tobytes() == want.tobytes()
  assert st["normalization"] == want.astype(np.float32)  # widened exactly: the stage holds the bfloat16 value
  # the same sums through torch_cpu_sum: a bfloat16 vector is summed in float32 and the result cast back
  got = np.asarray(torch_cpu_sum(s_b))
  assert got.dtype == ml_dtypes.bfloat16 and got.tobytes() == bf(sum_s).tobytes()


def test_component_shapes_are_checked_against_the_layout():
  from parity_jax.errors import UsageError
  from parity_jax.svf.core import validate_components

  # W [m, n] = U [m, k] diag(S [k]) V^T: torch keeps V as [n, k], a "vh" layout as V^T [k, n]
  assert validate_components((6, 3), (3,), (5, 3), (3,), "torch_v") == (6, 5, 3)
  assert validate_components((6, 3), (3,), (3, 5), (3,), "vh") == (6, 5, 3)
  bad = [
      ((6, 3), (3,), (3, 5), (3,), "torch_v", "component shapes disagree for layout torch_v (V as [n, k])"),
      ((6, 3), (3,), (5, 3), (3,), "vh", "component shapes disagree for layout vh (V as [k, n])"),
      ((6, 4), (3,), (5, 3), (3,), "torch_v", "component shapes disagree"),
      ((6, 3), (3,), (5, 3), (4,), "torch_v", "offsets shape [4] does not match S [3]"),
      ((6, 3, 1), (3,), (5, 3), (3,), "torch_v", "expected U [m, k], S [k], V 2-D"),
      ((6, 3), (3,), (5, 3), (3,), "uv", "unknown layout 'uv'"),
  ]
  for u, s, v, o, layout, message in bad:
    with pytest.raises(UsageError, match=re.escape("w: " + message)):
      validate_components(u, s, v, o, layout, name="w")
