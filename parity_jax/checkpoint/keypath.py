"""Leaf paths: the one way parity_jax names a leaf of a checkpoint tree.

A leaf path is the leaf's keys joined by ``/`` (``params/layers/0/kernel``),
list and tuple indices as decimal strings. Keys come from JAX key paths the way
orbax reads them (:func:`key_name` follows orbax's ``tree.utils.get_key_name``),
so the path of a leaf is the same whether it is read from orbax metadata, a
restored tree or a nested dict built by hand.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

__all__ = ["SEP", "flatten", "join", "key_name", "keypath_str", "nest", "split", "str_keypath"]

SEP = "/"


def key_name(key: Any) -> str:
  """The name of one JAX key entry (``DictKey``, ``SequenceKey``, ``GetAttrKey``, ``FlattenedIndexKey``)."""
  import jax  # local: keep `import parity_jax.checkpoint` light

  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return str(key.name)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def str_keypath(keypath: Sequence[Any]) -> tuple[str, ...]:
  """A JAX key path as a tuple of key names (orbax's ``str_keypath``)."""
  return tuple(key_name(k) for k in keypath)


def join(keys: Iterable[Any]) -> str:
  """Key names -> leaf path."""
  return SEP.join(str(k) for k in keys)


def split(path: str) -> tuple[str, ...]:
  """Leaf path -> key names (``""`` is the root, no keys)."""
  return tuple(path.split(SEP)) if path else ()


def keypath_str(keypath: Sequence[Any]) -> str:
  """A JAX key path (from ``tree_flatten_with_path``) -> leaf path."""
  return join(str_keypath(keypath))


def flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  """Nested dicts/lists/tuples -> {leaf path: leaf}, dict keys in sorted order (orbax's order)."""
  if isinstance(tree, dict):
    out: dict[str, Any] = {}
    for k in sorted(tree, key=str):
      out.update(flatten(tree[k], prefix + (str(k),)))
    return out
  if isinstance(tree, (list, tuple)):
    out = {}
    for i, v in enumerate(tree):
      out.update(flatten(v, prefix + (str(i),)))
    return out
  return {join(prefix): tree}


def nest(flat: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
  """{leaf path: leaf} (or (path, leaf) pairs) -> nested dicts; the inverse of :func:`flatten` for dict trees."""
  root: dict[str, Any] = {}
  for path, value in flat.items() if isinstance(flat, Mapping) else flat:
    *parents, last = split(path)
    node = root
    for c in parents:
      node = node.setdefault(c, {})
    node[last] = value
  return root
