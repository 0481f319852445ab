"""Element-level transforms of the remap spec: transpose/reshape chains, stacks, concat/split, dtype casts.

A spec rule with any of ``transpose``, ``ops``, ``stack`` or ``cast``
describes where every element of a target leaf comes from:

* ``ops``: an ordered list of ``{"transpose": [perm]}`` and ``{"reshape":
  [shape]}`` applied to the source leaf (``"transpose": perm`` alone is
  ``ops = [{"transpose": perm}]``). A transpose moves elements without
  changing their bytes: target ``[i_0..i_n]`` is source
  ``[i_{perm^-1(0)}..]``, numpy's ``np.transpose(x, perm)``. A reshape must be
  value-preserving in the sense of :func:`parity_jax.checkpoint.geometry.refinement`
  (splits and merges of adjacent axes), checked on the shape it applies to.
* ``stack``: a list of ``{"axis": a, "index": template}``. Every source leaf
  the rule maps to the same ``to`` is one member; ``template`` (a
  :mod:`re` replacement, e.g. ``\\g<layer>``) gives its integer position along
  target axis ``a``. Several levels nest (MaxText's scanned MoE:
  ``[experts, layers, ...]`` is two levels, axes 0 and 1); the axes are
  positions in the target, inserted in increasing order. The members must
  form a complete grid ``0..N_k-1`` per level, with equal shapes and dtypes.
* ``cast``: the target dtype (see :func:`cast_rule`).
* ``concat``: ``{"axis": a, "index": template[, "order": [names]]}``. Every
  source leaf the rule maps to the same ``to`` is one part; ``template``
  gives its position (an integer, or one of ``order``'s names). After the
  ops, the parts are concatenated along target axis ``a`` in that order
  (``np.concatenate``): their sizes along ``a`` may differ, every other axis
  must agree, every position must be filled exactly once. With ``stack``,
  each stack position holds one complete concat (``a`` is a target axis that
  is not a stack axis).
* ``split``: ``{"axis": a, "sizes": [n, ...] | "sections": k, "name": p[,
  "names": [...]]}``, the inverse: one source leaf cut along source axis
  ``a`` into consecutive pieces (``np.split``), each a target leaf named by
  ``to`` with ``{p}`` replaced by the piece's name (default ``0..N-1``); the
  sizes must sum to the axis (``sections`` must divide it). The rule's ops
  then apply to each piece.

:meth:`ElementPlan.source_of` maps a target index to the source leaf and index
its element comes from; the verifier evaluates a target leaf one C-order slab
at a time, reading for each member only the bounding box of the elements the
slab needs (``parity_jax.checkpoint.verify.elements``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from parity_jax.checkpoint import geometry

__all__ = [
    "CAST_DTYPES",
    "BoxSource",
    "ElementPlan",
    "Op",
    "bind_elements",
    "cast_rule",
    "expected_cast",
    "parse_element_keys",
    "same_cast",
]

ELEMENT_KEYS = ("transpose", "ops", "stack", "cast")
CAST_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclasses.dataclass(frozen=True)
class Op:
  """One step of a chain: ``transpose`` (``arg`` = perm), ``reshape`` (target shape, -1 allowed), ``pad``
  (``[before, after]`` per axis, flattened: elements of the rule's ``fill`` added) or ``slice`` (``[start, stop]``
  per axis, flattened: the elements outside are declared dropped)."""

  kind: str
  arg: tuple[int, ...]

  def pairs(self) -> list[tuple[int, int]]:
    return list(zip(self.arg[0::2], self.arg[1::2]))

  def to_dict(self) -> dict[str, Any]:
    if self.kind in ("pad", "slice"):
      return {self.kind: [list(p) for p in self.pairs()]}
    return {self.kind: list(self.arg)}

  def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | str:
    """The shape after this op, or a one-line reason it does not fit ``shape``."""
    if self.kind in ("pad", "slice"):
      pairs = self.pairs()
      if len(pairs) != len(shape):
        return f"{self.kind} {[list(p) for p in pairs]} has {len(pairs)} axes, the shape {list(shape)} has {len(shape)}"
      if self.kind == "pad":
        return tuple(d + a + b for d, (a, b) in zip(shape, pairs))
      bad = [i for i, (d, (a, b)) in enumerate(zip(shape, pairs)) if not 0 <= a <= b <= d]
      if bad:
        return f"slice {[list(p) for p in pairs]}: axis {bad[0]} range is not within 0..{shape[bad[0]]}"
      return tuple(b - a for a, b in pairs)
    if self.kind == "transpose":
      if sorted(self.arg) != list(range(len(shape))):
        return f"transpose {list(self.arg)} is not a permutation of the {len(shape)} axes of {list(shape)}"
      return tuple(shape[p] for p in self.arg)
    n = math.prod(shape)
    target = list(self.arg)
    if -1 in target:
      rest = math.prod(d for d in target if d != -1)
      if rest == 0 or n % rest:
        return f"reshape {list(self.arg)}: cannot infer -1 for {n} elements"
      target[target.index(-1)] = n // rest
    if math.prod(target) != n:
      return f"reshape {list(self.arg)}: {n} elements of {list(shape)} cannot become {target}"
    if geometry.refinement(shape, tuple(target)) is None:
      return f"reshape {list(shape)} -> {target} is not value-preserving (only splits or merges of adjacent axes)"
    return tuple(target)


def parse_element_keys(
    r: Mapping[str, Any], where: str
) -> tuple[tuple[Op, ...], tuple[tuple[int, str], ...], str | None, list[str]]:
  """(ops, stack levels, cast dtype name, problems) of one rule's element keys; checks the JSON only."""
  problems: list[str] = []
  ops: list[Op] = []

  def int_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)

  if "transpose" in r and "ops" in r:
    problems.append(f"{where}: give 'transpose' or 'ops', not both (put the transpose in 'ops')")
  raw_ops = [{"transpose": r["transpose"]}] if "transpose" in r else r.get("ops", [])
  if not isinstance(raw_ops, list):
    problems.append(f"{where}: 'ops' must be a list of {{'transpose': [...]}} / {{'reshape': [...]}}")
    raw_ops = []
  for i, o in enumerate(raw_ops):
    if not isinstance(o, dict) or len(o) != 1 or next(iter(o)) not in ("transpose", "reshape", "pad", "slice"):
      problems.append(
          f"{where}: ops[{i}] must be {{'transpose': [perm]}}, {{'reshape': [shape]}}, {{'pad': [[before, after],"
          f" ...]}} or {{'slice': [[start, stop], ...]}}, got {o!r}"
      )
      continue
    kind, arg = next(iter(o.items()))
    if kind in ("pad", "slice"):
      if not isinstance(arg, list) or not all(int_list(p) and len(p) == 2 and min(p) >= 0 for p in arg):
        problems.append(f"{where}: ops[{i}] {kind} must be a list of [a, b] pairs of integers >= 0, got {arg!r}")
      else:
        ops.append(Op(kind, tuple(x for p in arg for x in p)))
    elif not int_list(arg):
      problems.append(f"{where}: ops[{i}] {kind} must be a list of integers, got {arg!r}")
    elif kind == "reshape" and (any(d < -1 for d in arg) or arg.count(-1) > 1):
      problems.append(f"{where}: ops[{i}] reshape {arg} may hold sizes >= 0 and at most one -1")
    elif kind == "transpose" and sorted(arg) != list(range(len(arg))):
      problems.append(f"{where}: ops[{i}] transpose {arg} is not a permutation of 0..{len(arg) - 1}")
    else:
      ops.append(Op(kind, tuple(arg)))
  stack: list[tuple[int, str]] = []
  raw_stack = r.get("stack", [])
  if isinstance(raw_stack, dict):
    raw_stack = [raw_stack]
  if not isinstance(raw_stack, list):
    problems.append(f"{where}: 'stack' must be a list of {{'axis': int, 'index': template}}")
    raw_stack = []
  for i, s in enumerate(raw_stack):
    if (
        not isinstance(s, dict)
        or set(s) - {"axis", "index"}
        or not isinstance(s.get("axis"), int)
        or isinstance(s.get("axis"), bool)
        or s["axis"] < 0
        or not isinstance(s.get("index"), str)
    ):
      problems.append(f"{where}: stack[{i}] must be {{'axis': int >= 0, 'index': template}}, got {s!r}")
      continue
    stack.append((s["axis"], s["index"]))
  if len({a for a, _ in stack}) != len(stack):
    problems.append(f"{where}: two stack levels use the same axis")
  cast = r.get("cast")
  if cast is not None and cast not in CAST_DTYPES:
    problems.append(f"{where}: 'cast' {cast!r} is not one of {', '.join(CAST_DTYPES)}")
    cast = None
  return tuple(ops), tuple(sorted(stack)), cast, problems


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def parse_concat_split(r: Mapping[str, Any], where: str) -> tuple[tuple, tuple, list[str]]:
  """(concat, split, problems) of one rule's ``concat`` / ``split`` keys; checks the JSON only.

  ``concat``: ``(target axis, index template, order)``; ``split``: ``(source axis, sizes, sections, name,
  names)`` with exactly one of ``sizes`` / ``sections`` set (the other None).
  """
  problems: list[str] = []
  concat: tuple = ()
  split: tuple = ()
  if "concat" in r:
    c = r["concat"]
    ok = isinstance(c, dict) and not set(c) - {"axis", "index", "order"} and {"axis", "index"} <= set(c)
    ok = ok and _is_int(c["axis"]) and c["axis"] >= 0 and isinstance(c["index"], str)
    order = c.get("order") if isinstance(c, dict) else None
    if order is not None and not (
        isinstance(order, list) and order and all(isinstance(x, str) for x in order) and len(set(order)) == len(order)
    ):
      problems.append(f"{where}: concat 'order' must be a non-empty list of distinct strings, got {order!r}")
      ok = False
    if not ok:
      if not problems:
        problems.append(
            f"{where}: 'concat' must be {{'axis': int >= 0, 'index': template[, 'order': [names]]}}, got {c!r}"
        )
    else:
      concat = (c["axis"], c["index"], tuple(order) if order else ())
  if "split" in r:
    s = r["split"]
    ok = isinstance(s, dict) and not set(s) - {"axis", "sizes", "sections", "name", "names"}
    ok = ok and {"axis", "name"} <= set(s) and _is_int(s["axis"]) and s["axis"] >= 0 and isinstance(s["name"], str)
    if not ok:
      problems.append(
          f"{where}: 'split' must be {{'axis': int >= 0, 'sizes': [int, ...] or 'sections': int, 'name': str"
          f"[, 'names': [str, ...]]}}, got {s!r}"
      )
    else:
      sizes, sections, names = s.get("sizes"), s.get("sections"), s.get("names")
      n = None
      if (sizes is None) == (sections is None):
        problems.append(f"{where}: split takes 'sizes' or 'sections', exactly one")
      elif sizes is not None and not (isinstance(sizes, list) and sizes and all(_is_int(x) and x > 0 for x in sizes)):
        problems.append(f"{where}: split 'sizes' must be a non-empty list of integers > 0, got {sizes!r}")
      elif sections is not None and not (_is_int(sections) and sections > 0):
        problems.append(f"{where}: split 'sections' must be an integer > 0, got {sections!r}")
      else:
        n = len(sizes) if sizes is not None else sections
      if names is not None and not (
          isinstance(names, list) and all(isinstance(x, str) and x for x in names) and len(set(names)) == len(names)
      ):
        problems.append(f"{where}: split 'names' must be a list of distinct non-empty strings, got {names!r}")
        n = None
      elif names is not None and n is not None and len(names) != n:
        problems.append(f"{where}: split has {n} pieces but {len(names)} names")
        n = None
      to = r.get("to")
      if isinstance(to, str) and "{" + s["name"] + "}" not in to:
        problems.append(f"{where}: split name {s['name']!r} does not appear as {{{s['name']}}} in 'to'")
        n = None
      if n is not None:
        split = (
            s["axis"],
            tuple(sizes) if sizes is not None else None,
            sections,
            s["name"],
            tuple(names) if names is not None else tuple(str(i) for i in range(n)),
        )
  if concat and split:
    problems.append(f"{where}: give 'concat' (many leaves into one) or 'split' (one into many), not both")
  if split and ("stack" in r or "unstack" in r):
    problems.append(f"{where}: 'split' does not combine with 'stack' or 'unstack' in one rule")
  return concat, split, problems


def split_pieces(split: tuple, shape: tuple[int, ...], dest: str) -> list[tuple[str, tuple["Op", ...]]] | str:
  """(dest, leading slice op) of every piece of a split source leaf of ``shape``, or why it does not fit."""
  axis, sizes, sections, name, names = split
  if axis >= len(shape):
    return f"split axis {axis} is out of range for shape {list(shape)}"
  d = shape[axis]
  if sizes is None:
    if d % sections:
      return f"split into {sections} sections: axis {axis} of {list(shape)} has {d} elements, not a multiple"
    sizes = (d // sections,) * sections
  elif sum(sizes) != d:
    return f"split sizes {list(sizes)} sum to {sum(sizes)}, axis {axis} of {list(shape)} has {d}"
  out, off = [], 0
  for size, piece in zip(sizes, names):
    pairs = [[0, n] for n in shape]
    pairs[axis] = [off, off + size]
    out.append((dest.replace("{" + name + "}", piece), (Op("slice", tuple(x for p in pairs for x in p)),)))
    off += size
  return out


def cast_rule(src: np.dtype, dst: np.dtype) -> str | None:
  """None when casting ``src`` to ``dst`` is checked; else why not (only float <-> float casts are)."""
  names = {v: k for k, v in CAST_DTYPES.items()}
  if src not in names or dst not in names:
    return f"cast {src} -> {dst}: only casts between {', '.join(CAST_DTYPES)} are checked"
  return None


def expected_cast(x: np.ndarray, dst: np.dtype) -> np.ndarray:
  """``x`` cast to ``dst`` by round-to-nearest-even (numpy / ml_dtypes ``astype``): the value a cast must give."""
  return x.astype(dst)


def same_cast(expected: np.ndarray, got: np.ndarray) -> np.ndarray:
  """Per element: ``got`` equals ``expected`` bit for bit, or both are NaN of the same sign (payloads free)."""
  u = _UINT[expected.dtype.itemsize]
  e, g = expected.view(u), got.view(u)
  eq = e == g
  if not eq.all():
    with np.errstate(invalid="ignore"):
      en, gn = np.isnan(expected.astype(np.float32)), np.isnan(got.astype(np.float32))
    sign = u(1) << u(8 * expected.dtype.itemsize - 1)
    eq |= en & gn & ((e & sign) == (g & sign))
  return eq


def _back(ops, shapes, cur: list, valid: np.ndarray, like: np.ndarray) -> list:
  """Indices ``cur`` after the chain ``ops`` (``shapes``: the shape before each op, then after all) taken back to
  the member's source indices; ``valid`` is cleared in place where an element is padding."""
  for op, shape_in in zip(reversed(ops), reversed(shapes[:-1])):
    if op.kind == "pad":
      back = []
      for c, (a, _), d in zip(cur, op.pairs(), shape_in):
        c = c - a
        valid &= (c >= 0) & (c < d)
        back.append(np.clip(c, 0, max(d - 1, 0)))
      cur = back
    elif op.kind == "slice":
      cur = [c + a for c, (a, _) in zip(cur, op.pairs())]
    elif op.kind == "transpose":
      back = [None] * len(cur)
      for j, p in enumerate(op.arg):
        back[p] = cur[j]
      cur = back
    else:
      shape_out = op.out_shape(shape_in)
      flat = np.ravel_multi_index(cur, shape_out) if cur else np.zeros_like(like)
      cur = list(np.unravel_index(flat, shape_in)) if shape_in else []
  return cur


@dataclasses.dataclass(frozen=True)
class ElementPlan:
  """One target leaf of an element rule: its members (stack index -> source path), ops, cast and shapes."""

  dest: str
  group: str
  rule: Any  # the RemapRule
  members: Mapping[tuple[int, ...], str]
  stack_axes: tuple[int, ...]  # target axes of the stack levels, increasing
  ops: tuple[Op, ...]
  src_shape: tuple[int, ...]  # every member's shape
  shapes: tuple[tuple[int, ...], ...]  # the shape before each op, then the member's shape after all ops
  src_dtype: np.dtype
  dst_dtype: np.dtype
  dst_shape: tuple[int, ...]
  fill: float = 0.0  # what padding holds, in the target dtype
  concat_axis: int | None = None  # the target axis the concatenated parts follow each other on
  offsets: tuple[int, ...] = (0,)  # where each concat part starts along concat_axis, then the end
  part_shapes: tuple = ()  # per concat part: its ``shapes`` (part 0's are ``shapes``)

  @property
  def fill_bytes(self) -> np.ndarray:
    """The fill value in the target dtype (``-0.0`` differs from ``0.0``)."""
    return np.asarray(self.fill).astype(self.dst_dtype)

  @property
  def sources(self) -> list[str]:
    return [self.members[k] for k in sorted(self.members)]

  def describe(self) -> str:
    parts = [f"{o.kind}{list(o.arg)}" for o in self.ops]
    if self.concat_axis is not None:
      parts.append(f"concat{list(self.part_sizes)} on axis {self.concat_axis}")
    if self.stack_axes:
      parts.append(f"stack{len(self.members) // self.n_parts} on axes {list(self.stack_axes)}")
    if self.dst_dtype != self.src_dtype:
      parts.append(f"cast {self.src_dtype}->{self.dst_dtype}")
    return " then ".join(parts) or "identity"

  def member_axes(self) -> list[int]:
    return [a for a in range(len(self.dst_shape)) if a not in self.stack_axes]

  @property
  def n_parts(self) -> int:
    """Members per stack position: the concat parts (1 without concat)."""
    return len(self.offsets) - 1 if self.concat_axis is not None else 1

  @property
  def part_sizes(self) -> list[int]:
    return [b - a for a, b in zip(self.offsets, self.offsets[1:])]

  def source_indices(self, idx: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """For target multi-indices ``idx`` (arrays, one per axis): (member number, source multi-indices, valid).

    The member number indexes :meth:`member_keys`; source indices are in the
    member's stored shape; ``valid`` is False where the element is padding
    (it must hold ``fill``; its source index is meaningless).
    """
    keys = self.member_keys()
    n_parts = self.n_parts
    if self.stack_axes:
      grid = tuple(max(k[i] for k in keys) + 1 for i in range(len(self.stack_axes)))
      member = np.ravel_multi_index([idx[a] for a in self.stack_axes], grid) * n_parts
    else:
      member = np.zeros(np.shape(idx[0]) if idx else (), np.int64)
    cur = [idx[a] for a in self.member_axes()]
    if n_parts == 1:
      valid = np.ones(np.shape(member), bool)
      return member, _back(self.ops, self.shapes, cur, valid, member), valid
    # concat: the part an element lies in, its index within the part, then each part's own chain back
    ca = self.member_axes().index(self.concat_axis)
    part = np.searchsorted(np.asarray(self.offsets[1:]), idx[self.concat_axis], side="right")
    cur[ca] = cur[ca] - np.asarray(self.offsets)[part]
    member = member + part
    valid = np.ones(np.shape(member), bool)
    out = None
    for p in np.unique(part):
      sel = part == p
      v = valid[sel]
      back = _back(self.ops, self.part_shapes[p], [c[sel] for c in cur], v, member[sel])
      if out is None:
        out = [np.empty(np.shape(member), np.int64) for _ in back]
      for o, b in zip(out, back):
        o[sel] = b
      valid[sel] = v
    return member, out if out is not None else [], valid

  def member_keys(self) -> list[tuple[int, ...]]:
    return sorted(self.members)

  def box_source(self, box: Sequence[tuple[int, int]]) -> "BoxSource | None":
    """Where the target box ``box`` (``(start, stop)`` per axis) comes from, as whole boxes: None when it does not.

    Every member in the box's range of the stack axes gives the same source
    box, and :meth:`BoxSource.apply` turns that box's values into the
    member's part of the target box with views, ``np.transpose``, ``reshape``
    and padding (no per-element index arrays). A transpose and a slice map any
    box; a pad maps it to its part inside the source (possibly empty: all
    fill); a reshape maps it only where, in each group of axes it splits or
    merges, the box is one contiguous C-order range that is also a box of the
    other side. Anything else (a box a reshape scatters, a concat, an op or a
    plan field set to what this method does not know) gives None, and the caller uses
    :meth:`source_indices`.
    """
    other = [f for f in dataclasses.fields(self) if f.name not in _PLAN_FIELDS]  # any added later
    if self.concat_axis is not None or any(getattr(self, f.name) != f.default for f in other):
      return None  # a concat (its parts differ along an axis), or a structure this method does not know
    if any(o.kind not in _BOX_OPS for o in self.ops):
      return None
    box = [(int(a), int(b)) for a, b in box]
    if len(box) != len(self.dst_shape) or any(not 0 <= a < b <= d for (a, b), d in zip(box, self.dst_shape)):
      return None
    cur = [box[a] for a in self.member_axes()]
    steps: list[tuple[str, Any]] = []
    for op, shape_in, shape_out in zip(reversed(self.ops), reversed(self.shapes[:-1]), reversed(self.shapes[1:])):
      if op.kind == "transpose":
        back = [None] * len(cur)
        for j, p in enumerate(op.arg):
          back[p] = cur[j]
        steps.append(("transpose", op.arg))
        cur = back
      elif op.kind == "slice":
        cur = [(lo + a, hi + a) for (lo, hi), (a, _) in zip(cur, op.pairs())]
      elif op.kind == "pad":
        inner = [(max(lo - a, 0), min(hi - a, d)) for (lo, hi), (a, _), d in zip(cur, op.pairs(), shape_in)]
        offsets = tuple(il + a - lo for (il, _), (lo, _), (a, _) in zip(inner, cur, op.pairs()))
        steps.append(("pad", (offsets, tuple(hi - lo for lo, hi in cur))))
        if any(hi <= lo for lo, hi in inner):  # all padding: nothing of the source
          cur = None
          break
        cur = inner
      else:
        back = _reshape_box(cur, shape_in, shape_out)
        if back is None:
          return None
        steps.append(("reshape", tuple(hi - lo for lo, hi in cur)))
        cur = back
    stack = [box[a] for a in self.stack_axes]
    return BoxSource(tuple(stack), None if cur is None else tuple(cur), tuple(reversed(steps)), self)

  def source_of(self, index: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    """The source leaf and index of target element ``index``."""
    member, src, _ = self.source_indices([np.asarray([i]) for i in index])
    return self.members[self.member_keys()[int(member[0])]], tuple(int(s[0]) for s in src)


_BOX_OPS = frozenset({"transpose", "reshape", "pad", "slice"})
# The plan fields box_source understands: a plan with another field not at its default (a concat, a structure added
# later) uses the index path.
_PLAN_FIELDS = frozenset(
    {
        "dest",
        "group",
        "rule",
        "members",
        "stack_axes",
        "concat_axis",
        "offsets",
        "part_shapes",
        "ops",
        "src_shape",
        "shapes",
        "src_dtype",
        "dst_dtype",
        "dst_shape",
        "fill",
    }
)


@dataclasses.dataclass(frozen=True)
class BoxSource:
  """A target box's source (:meth:`ElementPlan.box_source`): the members in ``stack`` (a range per stack axis),
  each read at ``box`` (None: the box is all padding), then ``steps`` applied in order."""

  stack: tuple[tuple[int, int], ...]
  box: tuple[tuple[int, int], ...] | None
  steps: tuple[tuple[str, Any], ...]
  plan: "ElementPlan"

  def members(self) -> list[tuple[int, tuple]]:
    """(member number, index of its part in the target box) for each member the box covers, in C order."""
    e = self.plan
    grid = tuple(e.dst_shape[a] for a in e.stack_axes)
    out = []
    for coord in np.ndindex(*(hi - lo for lo, hi in self.stack)):
      absolute = tuple(c + lo for c, (lo, _) in zip(coord, self.stack))
      where, it = [], iter(coord)
      for a in range(len(e.dst_shape)):
        where.append(next(it) if a in e.stack_axes else slice(None))
      out.append((int(np.ravel_multi_index(absolute, grid)), tuple(where)))  # () in a () grid: 0
    return out

  def apply(self, x: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A member's part of the target box from its source box's values ``x`` (None when ``box`` is None), and
    where it is not padding (None: nowhere padding). Padding holds zeros here; the caller writes the fill."""
    valid = None
    for kind, arg in self.steps:
      if kind == "transpose":
        x = x.transpose(arg)
        valid = None if valid is None else valid.transpose(arg)
      elif kind == "reshape":
        x = x.reshape(arg)
        valid = None if valid is None else valid.reshape(arg)
      else:
        offsets, shape = arg
        y, ok = np.zeros(shape, self.plan.src_dtype), np.zeros(shape, bool)
        if x is not None:
          inner = tuple(slice(o, o + n) for o, n in zip(offsets, x.shape))
          y[inner] = x
          ok[inner] = True if valid is None else valid
        x, valid = y, ok
    return x, valid


def _reshape_box(box, shape_in, shape_out):
  """The box of ``shape_in`` whose elements a reshape to ``shape_out`` puts at ``box``, or None if not a box."""
  if 0 in shape_in or 0 in shape_out:
    return None
  groups, i, j = [], 0, 0  # runs of axes with equal products: (in axes, out axes)
  while i < len(shape_in) or j < len(shape_out):
    i0, j0 = i, j
    pi = shape_in[i] if i < len(shape_in) else 1
    pj = shape_out[j] if j < len(shape_out) else 1
    i, j = min(i + 1, len(shape_in)), min(j + 1, len(shape_out))
    while pi != pj:
      if pi < pj and i < len(shape_in):
        pi, i = pi * shape_in[i], i + 1
      elif pj < pi and j < len(shape_out):
        pj, j = pj * shape_out[j], j + 1
      else:
        return None
    groups.append((i0, i, j0, j))
  out = []
  for i0, i1, j0, j1 in groups:
    dims, part = shape_out[j0:j1], box[j0:j1]
    partial = [k for k, (lo, hi) in enumerate(part) if (lo, hi) != (0, dims[k])]
    k = partial[-1] if partial else 0
    if any(hi - lo != 1 for lo, hi in part[:k]):
      return None  # not one contiguous range of the group
    inner = math.prod(dims[k + 1 :])
    lo = 0
    for (a, _), d in zip(part[: k + 1], dims[: k + 1]):
      lo = lo * d + a
    lo *= inner
    hi = lo + ((part[k][1] - part[k][0]) * inner if part else 1)
    got = _range_box(shape_in[i0:i1], lo, hi)
    if got is None:
      return None
    out += got
  return out


def _range_box(shape, lo: int, hi: int):
  """The C-order range ``[lo, hi)`` of ``shape`` as a box, or None if it is not one."""
  for k in range(len(shape)):
    inner = math.prod(shape[k + 1 :])
    if lo % inner or hi % inner:
      continue
    a, b = lo // inner, hi // inner
    if a // shape[k] != (b - 1) // shape[k]:
      continue
    prefix = np.unravel_index(a // shape[k], shape[:k]) if k else ()
    return (
        [(int(p), int(p) + 1) for p in prefix]
        + [(a % shape[k], (b - 1) % shape[k] + 1)]
        + [(0, d) for d in shape[k + 1 :]]
    )
  return [] if not shape and (lo, hi) == (0, 1) else None


def bind_elements(
    items: Sequence[tuple[str, Any, str, Any, Mapping[str, Any] | None]], group_of
) -> tuple[list[ElementPlan], list[str]]:
  """Plans of the target leaves of element rules, and every problem found.

  ``items``: (source path, rule, dest, match object, source meta[, ops before
  the rule's own]) per source leaf matched by an element rule; an unstacked
  leaf gives one item per piece, its slice and axis drop as the leading ops.
  """
  problems: list[str] = []
  by_dest: dict[str, list[tuple[str, Any, Any, Any, tuple]]] = {}
  bad_dests = set()
  for it in items:
    path, rule, dest, m, meta = it[:5]
    chain = tuple(it[5]) + tuple(rule.ops) if len(it) > 5 else tuple(rule.ops)
    by_dest.setdefault(dest, []).append((path, rule, m, meta, chain))
    shape = tuple(getattr(meta, "shape", ()) or ())
    for op in chain:  # each member's chain against its own shape first: one problem per wrong rule
      out = op.out_shape(shape)
      if isinstance(out, str):
        problems.append(f"{rule.label()} does not fit source leaf {path!r} of shape {list(meta.shape)}: {out}")
        bad_dests.add(dest)
        break
      shape = out
  plans = []
  for dest, members in by_dest.items():
    if dest in bad_dests:
      continue
    rules = {r.index: r for _, r, _, _, _ in members}
    shapes_of = {
        (c, tuple(a for a, _ in r.stack), r.concat[0] if r.concat else None, r.cast, r.fill)
        for _, r, _, _, c in members
    }
    if len(shapes_of) > 1:
      problems.append(
          f"rules {', '.join(f'#{i}' for i in sorted(rules))} map to {dest!r} with different transforms"
          " (ops, stack or concat axes, or cast)"
      )
      continue
    rule, chain = members[0][1], members[0][4]
    if not rule.stack and not rule.concat and len(members) > 1:  # every member would be at [] of the target
      problems.append(f"source leaves {', '.join(repr(m[0]) for m in members)} all map to {dest!r}")
      continue
    keys: dict[tuple[int, ...], str] = {}
    bad = False
    for path, r, m, meta, _ in members:
      try:
        key = tuple(int(m.expand(t)) for _, t in r.stack)
      except (ValueError, re.error, IndexError) as e:
        problems.append(f"{r.label()}: stack index of {path!r} is not an integer ({e})")
        bad = True
        continue
      if r.concat:
        pos = _concat_position(r, m)
        if isinstance(pos, str):
          problems.append(f"{r.label()}: concat index of {path!r} {pos}")
          bad = True
          continue
        key += (pos,)
      if key in keys:
        what = "stacks" if not r.concat else "concat members"
        problems.append(
            f"overlapping {what}: source leaves {keys[key]!r} and {path!r} both go to {dest!r} at {list(key)}"
        )
        bad = True
      keys[key] = path
    if bad:
      continue
    metas = {p: meta for p, _, _, meta, _ in members}
    if any(getattr(metas[p], "kind", "array") == "string" for p in keys.values()):
      problems.append(f"{rule.label()}: string leaves cannot be transposed, stacked or cast ({dest!r})")
      continue
    levels = len(rule.stack) + (1 if rule.concat else 0)
    sizes = [max(k[i] for k in keys) + 1 for i in range(levels)]
    if rule.concat and rule.concat[2]:
      sizes[-1] = len(rule.concat[2])  # every name of 'order' is a member
    if any(min(k[i] for k in keys) < 0 for i in range(levels)):
      problems.append(f"{rule.label()}: negative stack or concat index for {dest!r}")
      continue
    missing = [k for k in np.ndindex(*sizes) if k not in keys]
    if missing:
      shown = ", ".join(str(list(k)) for k in missing[:5])
      problems.append(
          f"{rule.label()}: {'stack' if rule.stack else 'concat'} {dest!r} is missing member(s) at {shown}"
          f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''} of a {sizes} grid"
      )
      continue
    n_parts = sizes[-1] if rule.concat else 1
    # the members at one concat position (every stack position) share a shape; all share a dtype
    part_src = [
        {tuple(metas[p].shape) for k, p in keys.items() if not rule.concat or k[-1] == q} for q in range(n_parts)
    ]
    dtypes_set = {metas[p].dtype for p in keys.values()}
    if any(len(ps) > 1 for ps in part_src) or len(dtypes_set) > 1:
      shapes_set = {sh for ps in part_src for sh in ps}
      problems.append(
          f"{rule.label()}: the members of {dest!r} differ in shape or dtype"
          f" ({sorted(str(list(s)) for s in shapes_set)}, {sorted(str(d) for d in dtypes_set)})"
      )
      continue
    part_shapes = []
    for q in range(n_parts):
      # the chain fits: each part's shape is its members' own, and every member's chain was checked above
      shapes = [next(iter(part_src[q]))]
      for op in chain:
        shapes.append(op.out_shape(shapes[-1]))
      part_shapes.append(tuple(shapes))
    axes = tuple(a for a, _ in rule.stack)
    member_shape = list(part_shapes[0][-1])
    rank = len(member_shape) + len(axes)
    if any(a >= rank for a in axes):
      problems.append(f"{rule.label()}: stack axis {max(axes)} is out of range for a target of rank {rank}")
      continue
    concat_axis, offsets = None, (0,)
    if rule.concat:
      concat_axis = rule.concat[0]
      if concat_axis >= rank or concat_axis in axes:
        problems.append(
            f"{rule.label()}: concat axis {concat_axis} of {dest!r} is "
            + ("a stack axis" if concat_axis in axes else f"out of range for a target of rank {rank}")
        )
        continue
      ca = [a for a in range(rank) if a not in axes].index(concat_axis)
      ends = [ps[-1] for ps in part_shapes]
      other = {tuple(d for i, d in enumerate(e) if i != ca) for e in ends}
      if len({len(e) for e in ends}) > 1 or len(other) > 1 or len({len(ps[0]) for ps in part_shapes}) > 1:
        shown = ", ".join(f"{p}: {list(e)}" for p, e in zip(_part_paths(keys, n_parts), ends))
        problems.append(
            f"{rule.label()}: the parts of {dest!r} differ on an axis other than concat axis {concat_axis} ({shown})"
        )
        continue
      offsets = tuple(int(x) for x in np.cumsum([0] + [e[ca] for e in ends]))
      member_shape[ca] = offsets[-1]
    dst_shape, it, sz = [], iter(member_shape), dict(zip(axes, sizes))
    for a in range(rank):
      dst_shape.append(sz[a] if a in sz else next(it))
    src_dtype = dtypes_set.pop()
    dst_dtype = CAST_DTYPES[rule.cast] if rule.cast else src_dtype
    if dst_dtype != src_dtype:
      why = cast_rule(src_dtype, dst_dtype)
      if why:
        problems.append(f"{rule.label()}: {dest!r}: {why}")
        continue
    plans.append(
        ElementPlan(
            dest,
            group_of(dest),
            rule,
            dict(keys),
            axes,
            chain,
            part_shapes[0][0],
            part_shapes[0],
            src_dtype,
            dst_dtype,
            tuple(dst_shape),
            rule.fill,
            concat_axis,
            offsets,
            tuple(part_shapes),
        )
    )
  return plans, problems


def _concat_position(rule, m) -> int | str:
  """The concat position of a member matched by ``m``: its index template, an integer or a name of 'order'."""
  _, template, order = rule.concat
  v = m.expand(template)  # the template was checked against the pattern's groups when the spec was read
  if order:
    return order.index(v) if v in order else f"{v!r} is not one of the concat order {list(order)}"
  try:
    return int(v)
  except ValueError:
    return f"{v!r} is not an integer (give 'order' to name the parts)"


def _part_paths(keys: Mapping[tuple[int, ...], str], n_parts: int) -> list[str]:
  """One source path per concat part (the first stack position's)."""
  return [keys[min(k for k in keys if k[-1] == q)] for q in range(n_parts)]
