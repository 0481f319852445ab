"""parity_jax.dtypes: the dtype tables against safetensors' own names, compute dtypes, bfloat16 bits, C order."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from parity_jax import dtypes
from parity_jax.errors import UsageError

BF16 = np.dtype(ml_dtypes.bfloat16)
ALL_NUMPY = [
    np.float64,
    np.float32,
    np.float16,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint64,
    np.uint32,
    np.uint16,
    np.uint8,
    np.bool_,
]


def _safetensors_header_dtype(dtype) -> str:
  """The dtype name safetensors itself writes in a file's header for an array of ``dtype``."""
  blob = safetensors.numpy.save({"x": np.zeros(2, dtype)})
  (n,) = struct.unpack("<Q", blob[:8])
  return json.loads(blob[8 : 8 + n])["x"]["dtype"]


@pytest.mark.parametrize("dtype", ALL_NUMPY, ids=lambda d: np.dtype(d).name)
def test_safetensors_names_are_the_ones_safetensors_writes(dtype):
  name = _safetensors_header_dtype(dtype)
  assert dtypes.safetensors_name(dtype) == name
  assert dtypes.SAFETENSORS_DTYPES[name] == np.dtype(dtype)


def test_the_table_is_exactly_what_safetensors_and_numpy_can_both_hold():
  assert sorted(dtypes.SAFETENSORS_DTYPES) == sorted(_safetensors_header_dtype(d) for d in ALL_NUMPY)
  assert dtypes.BF16 == BF16


def test_no_safetensors_name_for_what_it_cannot_store():
  assert dtypes.safetensors_name(np.complex64) is None
  assert dtypes.safetensors_name(np.dtype(">f4")) is None  # safetensors is little-endian only
  assert dtypes.safetensors_name(np.dtype("U3")) is None


def test_compute_dtype_from_names_and_dtypes():
  assert dtypes.compute_dtype("float32") == np.dtype(np.float32)
  assert dtypes.compute_dtype("bfloat16") == BF16
  assert dtypes.compute_dtype(np.float32) == np.dtype(np.float32)
  assert dtypes.compute_dtype(ml_dtypes.bfloat16) == BF16
  assert dtypes.compute_dtype(np.dtype("float32")) == np.dtype(np.float32)
  assert sorted(dtypes.COMPUTE_DTYPES) == ["bfloat16", "float32"]


@pytest.mark.parametrize("bad", ["float16", "f32", "", np.float16, np.float64, np.int32, None, 3, ["float32"]])
def test_compute_dtype_refuses_everything_else_in_one_line(bad):
  with pytest.raises(UsageError) as e:
    dtypes.compute_dtype(bad)
  msg = str(e.value)
  assert "\n" not in msg and "float32" in msg and "bfloat16" in msg and repr(bad) in msg


def test_c_contiguous_keeps_contiguous_arrays_and_the_rank():
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  assert dtypes.c_contiguous(a) is a  # no copy when there is nothing to do
  t = dtypes.c_contiguous(a.T)
  assert t.flags.c_contiguous and t.shape == (4, 3) and t.tobytes() == np.ascontiguousarray(a.T).tobytes()
  f = np.asfortranarray(a)
  assert dtypes.c_contiguous(f).flags.c_contiguous and dtypes.c_contiguous(f).tobytes() == a.tobytes()
  s = dtypes.c_contiguous(a[:, ::2])
  assert s.flags.c_contiguous and s.tolist() == [[0, 2], [4, 6], [8, 10]]
  zero_d = np.asarray(np.float32(5))
  assert dtypes.c_contiguous(zero_d).shape == ()


@pytest.mark.parametrize(
    "dtype,want",
    [
        (np.float16, True),
        (np.float32, True),
        (np.float64, True),
        (ml_dtypes.bfloat16, True),
        (ml_dtypes.float8_e4m3fn, True),
        (ml_dtypes.float8_e5m2, True),
        (np.int32, False),
        (np.uint8, False),
        (np.bool_, False),
        (np.complex64, False),  # numpy's finfo accepts complex types: the kind check must refuse them
        (np.complex128, False),
        (np.object_, False),
        (np.dtype("U4"), False),
    ],
    ids=str,
)
def test_is_float_dtype(dtype, want):
  assert dtypes.is_float_dtype(dtype) is want


def _rne_bf16_bits(x: np.ndarray) -> np.ndarray:
  """Hand-written float32 -> bfloat16 round-to-nearest-even on the bit patterns (finite and inf values only)."""
  u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
  rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
  return rounded.astype(np.uint16)


def test_bf16_bits_rounds_float32_to_nearest_even(test_seed):
  rng = np.random.default_rng(test_seed)
  x = rng.standard_normal(4093).astype(np.float32) * np.float32(1e3)
  # ties: low 16 bits exactly 0x8000, with an even and an odd kept bit; and values just either side of a tie
  ties = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF818000], np.uint32).view(np.float32)
  edge = np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, 1e-40], np.float32)
  x = np.concatenate([x, ties, edge]).reshape(3, -1)
  bits = dtypes.bf16_bits(x)
  assert bits.dtype == np.uint16 and bits.shape == x.shape and bits.flags.c_contiguous
  assert bits.tobytes() == _rne_bf16_bits(x).tobytes(), f"seed {test_seed}"
  assert dtypes.bf16_bits(x.astype(np.float64)).tobytes() == bits.tobytes()  # f64 holding f32 values: same


def test_bf16_bits_of_a_transposed_view_are_in_c_order():
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  assert dtypes.bf16_bits(x.T).tobytes() == _rne_bf16_bits(np.ascontiguousarray(x.T)).tobytes()
  assert dtypes.bf16_bits(np.float32(1.0)).shape == ()


def test_bf16_bits_of_array_likes():
  # a Python list and a float are arrays too (numpy's float64 of them, then rounded to bfloat16)
  want = _rne_bf16_bits(np.array([1.0, -2.5, 3.140625], np.float32))
  assert dtypes.bf16_bits([1.0, -2.5, 3.140625]).tobytes() == want.tobytes()
  assert dtypes.bf16_bits(1.0).tobytes() == np.uint16(0x3F80).tobytes()


# bfloat16 bit patterns: +/-inf, quiet NaNs of both signs, a signalling NaN with a payload, the largest finite
INF, NEG_INF, QNAN, NEG_QNAN, SNAN, NEG_SNAN, MAX = 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7F7F


@pytest.mark.parametrize(
    "policy,nan_bits",
    [("keep", None), ("torch", dtypes.TORCH_BF16_NAN_BITS), ("torch_scalar", dtypes.TORCH_SCALAR_BF16_NAN_BITS)],
)
def test_bf16_bits_nan_policies(policy, nan_bits):
  src = np.array([INF, NEG_INF, QNAN, NEG_QNAN, SNAN, NEG_SNAN, MAX, 0x0001, 0x8000], np.uint16)
  got = dtypes.bf16_bits(src.view(BF16), policy)
  nan = np.array([False, False, True, True, True, True, False, False, False])
  want = src.copy() if nan_bits is None else np.where(nan, np.uint16(nan_bits), src)
  assert got.tolist() == want.tolist()  # infinities and every non-NaN pattern untouched; NaNs as the policy says


def test_torch_nan_encodings_are_the_documented_ones():
  assert dtypes.TORCH_BF16_NAN_BITS == 0xFFFF and dtypes.TORCH_SCALAR_BF16_NAN_BITS == 0x7FC0
  assert dtypes.NAN_POLICIES == ("keep", "torch", "torch_scalar")


def test_bf16_bits_of_float32_nans_keep_the_sign_quieted():
  nans = np.array([0x7FC00000, 0xFFC00000, 0x7FC00001], np.uint32).view(np.float32)
  assert dtypes.bf16_bits(nans).tolist() == [QNAN, NEG_QNAN, QNAN]
  assert dtypes.bf16_bits(nans, "torch").tolist() == [0xFFFF] * 3


def test_bf16_bits_refuses_non_floats_and_unknown_policies():
  with pytest.raises(UsageError, match="floating"):
    dtypes.bf16_bits(np.arange(3, dtype=np.int32))
  with pytest.raises(UsageError, match="floating"):
    dtypes.bf16_bits(np.array([True]))
  with pytest.raises(UsageError, match="nan_policy") as e:
    dtypes.bf16_bits(np.zeros(2, np.float32), "ieee")
  assert "keep" in str(e.value) and "torch_scalar" in str(e.value)
