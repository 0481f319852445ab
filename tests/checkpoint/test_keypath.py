"""checkpoint.keypath: leaf names from JAX key paths, written out by hand from orbax's get_key_name rules."""

from __future__ import annotations

import collections

import jax
import numpy as np

from parity_jax.checkpoint import keypath

Pair = collections.namedtuple("Pair", ["kernel", "bias"])


def test_each_kind_of_key_is_named_by_its_own_field():
  tu = jax.tree_util
  assert keypath.key_name(tu.DictKey("layer.0")) == "layer.0"
  assert keypath.key_name(tu.SequenceKey(3)) == "3"
  assert keypath.key_name(tu.GetAttrKey("kernel")) == "kernel"  # not ".kernel", its str()
  assert keypath.key_name(tu.FlattenedIndexKey(2)) == "2"
  assert keypath.key_name("plain") == "plain"


def test_a_tree_with_attributes_and_sequences_flattens_to_slash_joined_paths():
  tree = {"params": [Pair(np.zeros(2), np.ones(1))], "step": np.int32(3)}
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  paths = [keypath.join(keypath.str_keypath(kp)) for kp, _ in flat]
  assert paths == ["params/0/kernel", "params/0/bias", "step"]
