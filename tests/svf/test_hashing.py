"""bf16 hashes (and torch's NaN policy), streamed hashes, the combined hash, safe source names."""

from __future__ import annotations

import hashlib

import ml_dtypes
import numpy as np
import pytest

from parity_jax.errors import UsageError
from parity_jax.svf import ArrayHasher, bf16_sha256, combined_sha256, safe_source_name, sha256_array

BF16 = ml_dtypes.bfloat16


def test_bf16_sha256_is_sha256_of_little_endian_c_order_bytes():
  bits = np.array([[0x3F80, 0x0000, 0x8000], [0x7F80, 0xC000, 0x0001]], np.uint16)  # 1, +0, -0, inf, -2, tiny
  want = hashlib.sha256(bytes([0x80, 0x3F, 0, 0, 0, 0x80, 0x80, 0x7F, 0, 0xC0, 1, 0])).hexdigest()
  a = bits.view(BF16)
  assert bf16_sha256(a) == want
  assert bf16_sha256(np.asfortranarray(a)) == want  # C order whatever the memory layout
  assert bf16_sha256(a.T.copy().T) == want
  # float inputs are rounded to bf16 (nearest even) first
  assert bf16_sha256(a.astype(np.float32)) == want
  assert bf16_sha256(np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32)) == bf16_sha256(
      np.array([1.0, 1 + 2**-6], np.float32).astype(BF16)
  )
  with pytest.raises(UsageError, match="floating"):
    bf16_sha256(np.arange(3))


def test_torch_nan_policy_maps_every_nan_to_0xffff():
  bits = np.array([0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x3F80, 0x7F80], np.uint16)
  a = bits.view(BF16)
  torch_bits = np.array([0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0x3F80, 0x7F80], "<u2")
  assert bf16_sha256(a, nan_policy="torch") == hashlib.sha256(torch_bits.tobytes()).hexdigest()
  assert bf16_sha256(a, nan_policy="keep") == hashlib.sha256(bits.astype("<u2").tobytes()).hexdigest()
  assert bf16_sha256(a[4:], nan_policy="torch") == bf16_sha256(a[4:])  # no NaN: the policies agree
  with pytest.raises(UsageError, match="nan_policy"):
    bf16_sha256(a, nan_policy="jax")


def test_streamed_hash_equals_whole_array_hash():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((37, 11)).astype(np.float32)
  h = ArrayHasher()
  for r in range(0, 37, 8):
    h.update(x[r : r + 8])
  assert h.hexdigest() == sha256_array(x) == hashlib.sha256(x.tobytes()).hexdigest()
  assert sha256_array(x.astype(">f4")) == sha256_array(x)  # little-endian bytes whatever the input order
  hb = ArrayHasher(bf16=True, nan_policy="torch")
  for r in range(0, 37, 5):
    hb.update(x[r : r + 5].astype(BF16))
  assert hb.hexdigest() == bf16_sha256(x.astype(BF16), nan_policy="torch")


def test_combined_hash_is_over_sorted_pairs():
  pairs = [("b.weight", "22"), ("a.weight", "11")]
  want = hashlib.sha256(b"a.weight\t11\nb.weight\t22\n").hexdigest()
  assert combined_sha256(pairs) == combined_sha256(reversed(pairs)) == want
  with pytest.raises(UsageError, match="duplicate"):
    combined_sha256([("a", "1"), ("a", "2")])


def test_safe_source_name():
  assert safe_source_name("model.layers.26.mlp.down_proj.weight") == "model_layers_26_mlp_down_proj_weight"
  assert safe_source_name("lm_head.weight") == "lm_head_weight"
  assert safe_source_name("a-b/c:d é") == "a_b_c_d__"
  assert safe_source_name("Already_Safe_09") == "Already_Safe_09"


# ------------------------------------------------------------------------------------------------------------------
# NaN in the goldens under each nan_policy (issue 16 section 3)
# ------------------------------------------------------------------------------------------------------------------

# golden bfloat16 rows holding NaNs in every encoding: torch vectorised (0xFFFF), torch scalar and ml_dtypes (0x7FC0),
# negative quiet (0xFFC0), signalling with a payload (0x7F81, 0xFF81), beside +-inf, the largest finite value, -0.0
_GOLDEN_BITS = np.array(
    [[0xFFFF, 0x7FC0, 0x3F80, 0x7F80], [0xFFC0, 0x7F81, 0xFF80, 0x8000], [0xFF81, 0x7F7F, 0x0001, 0xFFFF]], np.uint16
)
_IS_NAN = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 1]], bool)


@pytest.mark.parametrize("policy,nan_bits", [("keep", None), ("torch", 0xFFFF), ("torch_scalar", 0x7FC0)])
def test_golden_nans_hash_under_each_policy(policy, nan_bits):
  want_bits = _GOLDEN_BITS if nan_bits is None else np.where(_IS_NAN, np.uint16(nan_bits), _GOLDEN_BITS)
  want = hashlib.sha256(want_bits.astype("<u2").tobytes()).hexdigest()
  golden = _GOLDEN_BITS.view(BF16)
  assert bf16_sha256(golden, nan_policy=policy) == want
  streamed = ArrayHasher(bf16=True, nan_policy=policy)
  for r in range(3):  # row by row, as the gate feeds chunks
    streamed.update(golden[r : r + 1])
  assert streamed.hexdigest() == want


def test_nan_policies_tell_nan_encodings_apart_only_under_keep():
  torch_vec = np.array([0xFFFF, 0x3F80], np.uint16).view(BF16)
  torch_scalar = np.array([0x7FC0, 0x3F80], np.uint16).view(BF16)
  assert bf16_sha256(torch_vec, "keep") != bf16_sha256(torch_scalar, "keep")
  for policy in ("torch", "torch_scalar"):
    assert bf16_sha256(torch_vec, policy) == bf16_sha256(torch_scalar, policy)
  assert bf16_sha256(torch_vec, "torch") != bf16_sha256(torch_vec, "torch_scalar")
  # float32 NaNs (a golden stored as float32) are rounded to bfloat16 first, then canonicalised
  f32 = np.array([np.nan, -np.nan, 1.0], np.float32)
  assert (
      bf16_sha256(f32, "torch_scalar")
      == hashlib.sha256(np.array([0x7FC0, 0x7FC0, 0x3F80], "<u2").tobytes()).hexdigest()
  )
  with pytest.raises(UsageError, match="nan_policy"):
    ArrayHasher(bf16=True, nan_policy="ieee")
