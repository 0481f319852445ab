"""parity_jax.checkpoint.spec: reshapes of zero-sized leaves, where a -1 cannot be inferred."""

from __future__ import annotations

import types

import pytest

from parity_jax.checkpoint import RemapSpec, SpecError


def _leaf(shape):
  return types.SimpleNamespace(shape=tuple(shape), kind="array")


@pytest.mark.parametrize("shape, reshape", [((0, 4), [0, -1]), ((2, 0, 3), [-1, 0]), ((0,), [0, 0, -1])])
def test_a_minus_one_beside_a_zero_is_refused_with_one_line(shape, reshape):
  """0 elements fit any size in place of the -1: there is no one answer (and no division by zero)."""
  spec = RemapSpec.from_dict({"rules": [{"match": "^a$", "to": "b", "reshape": reshape}]})
  with pytest.raises(SpecError, match=r"cannot infer -1 for 0 elements"):
    spec.bind({"a": _leaf(shape)})


def test_zero_sized_reshapes_without_a_minus_one_bind():
  spec = RemapSpec.from_dict({"rules": [{"match": "^a$", "to": "b", "reshape": [0, 3]}]})
  plan = spec.bind({"a": _leaf((0, 3))})
  (only,) = plan.leaves
  assert only.transform.dst_shape == (0, 3)
