"""The element verifier's two evaluations (whole boxes through views; per-element indices) against numpy.

Random element rules (transposes, splits and merges, pads, slices, stacks on random axes, casts) are applied
to random members by plain numpy in the test (``np.transpose``, ``reshape``, ``np.pad``, slicing, ``np.stack``,
``astype``), written as hand-made safetensors sides (tests/helpers/safetensors_files), and evaluated by
``TargetValues`` in slabs of random sizes: slabs whose boxes map to whole source boxes and slabs that fall back
to the index path (both are counted through the public ``ElementPlan.box_source``), every slab bit-equal to
numpy's. One flipped element at a random position must FAIL, naming the target index numpy finds first and the
source leaf and index an index tensor carried through the same numpy ops says it came from; both sha256 are
hashlib's of the numpy bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import ml_dtypes
import numpy as np
import pytest

from parity_jax.checkpoint import RemapSpec, open_checkpoint, verify_migration
from parity_jax.checkpoint import transforms
from parity_jax.checkpoint.verify import elements
from tests.helpers import safetensors_files as W

BF16 = np.dtype(ml_dtypes.bfloat16)
CASTS = {np.dtype(np.float32): [None, "bfloat16", "float16"], BF16: [None, "float32"], np.dtype(np.float16): [None]}


def _ops(rng, shape):
  """A random chain of 1-3 ops that fits ``shape``: (JSON ops, numpy function applying them)."""
  ops, fns = [], []
  for _ in range(int(rng.integers(1, 4))):
    kind = rng.choice(["transpose", "reshape", "pad", "slice"])
    if kind == "transpose" and len(shape) > 1:
      perm = [int(p) for p in rng.permutation(len(shape))]
      ops.append({"transpose": perm})
      fns.append(lambda x, perm=perm: np.transpose(x, perm))
      shape = tuple(shape[p] for p in perm)
    elif kind == "reshape":
      splittable = [i for i, d in enumerate(shape) if d in (4, 6)]
      if splittable and rng.random() < 0.5:
        i = splittable[int(rng.integers(len(splittable)))]
        shape = shape[:i] + (2, shape[i] // 2) + shape[i + 1 :]
      elif len(shape) > 1:
        i = int(rng.integers(len(shape) - 1))
        shape = shape[:i] + (shape[i] * shape[i + 1],) + shape[i + 2 :]
      else:
        continue
      ops.append({"reshape": list(shape)})
      fns.append(lambda x, s=shape: x.reshape(s))
    elif kind == "pad":
      pairs = [[int(rng.integers(0, 3)), int(rng.integers(0, 3))] for _ in shape]
      ops.append({"pad": pairs})
      fns.append(lambda x, p=pairs: ("pad", p, x))
      shape = tuple(d + a + b for d, (a, b) in zip(shape, pairs))
    elif kind == "slice":
      pairs = []
      for d in shape:
        a = int(rng.integers(0, d))
        pairs.append([a, int(rng.integers(a + 1, d + 1))])
      ops.append({"slice": pairs})
      fns.append(lambda x, p=pairs: x[tuple(slice(a, b) for a, b in p)])
      shape = tuple(b - a for a, b in pairs)
  return ops, fns, shape


def _apply(fns, x, fill, valid):
  """numpy's result of the chain on ``x``, and where it is padding (for the index tensor: ``valid`` False)."""
  for f in fns:
    got = f(x)
    if isinstance(got, tuple):  # a pad: the fill around x (the fill in x's dtype here; cast later)
      _, pairs, _ = got
      x = np.pad(x, pairs, constant_values=fill)
      valid = np.pad(valid, pairs, constant_values=False)
    else:
      x, valid = got, f(valid)
  return x, valid


def _case(rng, tmp, name):
  """A random element rule with numpy's expected target, written out: (spec, src dir, expected, origin)."""
  dtype = [np.dtype(np.float32), BF16, np.dtype(np.float16)][int(rng.integers(3))]
  cast = CASTS[dtype][int(rng.integers(len(CASTS[dtype])))]
  grid = [(1,), (2,), (3,), (2, 2), (2, 3)][int(rng.integers(5))]  # one or two stack levels
  shape = tuple(int(d) for d in rng.integers(1, 7, size=int(rng.integers(1, 4))))
  ops = []
  while not ops:
    ops, fns, _ = _ops(rng, shape)
  fill = [0.0, -0.0, 1.5][int(rng.integers(3))]
  members, parts, origins, names = {}, [], [], []
  size = int(np.prod(shape))
  for m, key in enumerate(np.ndindex(*grid)):
    names.append("w." + ".".join(str(k) for k in key))
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    members[names[-1]] = x
    part, valid = _apply(fns, x, fill, np.ones(shape, bool))
    where, _ = _apply(fns, (m * size + np.arange(size)).reshape(shape), -1, np.ones(shape, bool))
    parts.append(part.astype(transforms.CAST_DTYPES[cast]) if cast else part)
    origins.append(np.where(valid, where, -1))
  if len(names) > 1:  # the grid's axes moved to random increasing positions of the target
    levels = len(grid)
    axes = sorted(int(a) for a in rng.choice(parts[0].ndim + levels, levels, replace=False))
    expected = np.moveaxis(np.stack(parts).reshape(grid + parts[0].shape), range(levels), axes)
    origin = np.moveaxis(np.stack(origins).reshape(grid + parts[0].shape), range(levels), axes)
    stack = [{"axis": a, "index": f"\\g<k{i}>"} for i, a in enumerate(axes)]
  else:
    expected, origin, stack = parts[0], origins[0], []
  expected = np.ascontiguousarray(expected)
  rule = {"match": r"w" + "".join(rf"\.(?P<k{i}>\d+)" for i in range(len(grid))), "to": "t", "ops": ops, "fill": fill}
  if stack:
    rule["stack"] = stack
  if cast:
    rule["cast"] = cast
  src = os.path.join(tmp, f"{name}_src")
  os.makedirs(src)
  W.write_file(os.path.join(src, "model.safetensors"), members)
  return RemapSpec.from_rules([rule]), src, expected, origin, shape, names


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  rng = np.random.default_rng(17)
  tmp = str(tmp_path_factory.mktemp("elements"))
  return [(rng, *_case(rng, tmp, f"c{i}")) for i in range(24)]


def test_every_slab_equals_numpy_on_both_paths(cases, monkeypatch):
  """Slabs of random sizes (and a tiny read-ahead, so that column strips are read as bands of whole rows)."""
  calls = {"box": 0, "index": 0}
  box_source = transforms.ElementPlan.box_source

  def counted(self, box):
    got = box_source(self, box)
    calls["box" if got is not None else "index"] += 1
    return got

  monkeypatch.setattr(transforms.ElementPlan, "box_source", counted)
  monkeypatch.setattr(elements, "CACHE_BYTES", 256)
  for rng, spec, src, expected, _, _, _ in cases:
    ck = open_checkpoint(src)
    (e,) = spec.bind(ck.leaves).elements
    assert e.dst_shape == expected.shape
    for slab in (1, int(rng.integers(2, 9)), int(rng.integers(9, 40))):
      got = np.empty(expected.size, expected.dtype)
      with elements.TargetValues(e, ck, slab) as v:
        for s in v.slabs(0, expected.size):
          assert s.hi - s.lo <= slab
          got[s.lo : s.hi] = s.values
      assert got.tobytes() == expected.tobytes(), (e.describe(), slab)
      # and a box of the leaf (the migrator evaluates one destination chunk at a time)
      box = tuple((int(rng.integers(0, d)), d) for d in expected.shape)
      part = expected[tuple(slice(a, b) for a, b in box)]
      got = np.empty(part.size, part.dtype)
      with elements.TargetValues(e, ck, slab) as v:
        for s in v.slabs(0, part.size, box):
          got[s.lo : s.hi] = s.values
      assert got.tobytes() == part.tobytes(), (e.describe(), slab, box)
  assert calls["box"] > 100 and calls["index"] > 0, calls


def test_a_reshape_that_scatters_a_box_takes_the_index_path(tmp_path, monkeypatch):
  """(4, 6) transposed then flattened: a slab of 5 starting mid-row of the (6, 4) is no box of the source."""
  x = np.arange(24, dtype=np.float32).reshape(4, 6)
  W.write_file(os.path.join(tmp_path, "model.safetensors"), {"w.0": x})
  spec = RemapSpec.from_rules([{"match": r"w\.0", "to": "t", "ops": [{"transpose": [1, 0]}, {"reshape": [24]}]}])
  ck = open_checkpoint(tmp_path)
  (e,) = spec.bind(ck.leaves).elements
  paths = []
  box_source = transforms.ElementPlan.box_source
  monkeypatch.setattr(
      transforms.ElementPlan, "box_source", lambda self, b: paths.append(box_source(self, b)) or paths[-1]
  )
  got = np.empty(24, np.float32)
  with elements.TargetValues(e, ck, 5) as v:
    for s in v.slabs(0, 24):
      got[s.lo : s.hi] = s.values
  assert got.tobytes() == x.T.reshape(-1).tobytes()
  assert any(p is None for p in paths) and any(p is not None for p in paths), paths


def test_one_flipped_element_is_named_with_its_source(cases, tmp_path):
  u = {2: np.uint16, 4: np.uint32}
  for i, (rng, spec, src, expected, origin, shape, names) in enumerate(cases):
    ok = os.path.join(tmp_path, f"ok{i}")
    W.write_file(os.path.join(os.makedirs(ok) or ok, "model.safetensors"), {"t": expected})
    rep = verify_migration(src, ok, spec, slab_mb=float(rng.choice([1e-5, 1e-4, 8.0])))
    assert rep.passed, rep.text()
    digest = hashlib.sha256(expected.tobytes()).hexdigest()
    assert rep.leaves[0].sha256 == rep.leaves[0].source_sha256 == digest
    bad = expected.copy()
    flat = bad.reshape(-1).view(u[bad.dtype.itemsize])
    at = int(rng.integers(bad.size))
    flat[at] ^= 1 << int(rng.integers(0, 8 * bad.dtype.itemsize - 1))
    # numpy's first differing element; the source it came from by the index tensor
    t_index = tuple(int(j) for j in np.unravel_index(at, bad.shape))
    d = os.path.join(tmp_path, f"bad{i}")
    W.write_file(os.path.join(os.makedirs(d) or d, "model.safetensors"), {"t": bad})
    rep = verify_migration(src, d, spec, slab_mb=float(rng.choice([1e-5, 1e-4, 8.0])))
    r = rep.leaves[0]
    assert not rep.passed and r.status == "VALUE_MISMATCH", r.reason
    assert r.reason.startswith(f"1 of {bad.size} elements differ; first: t{list(t_index)} = "), r.reason
    o = int(origin[t_index])
    if o < 0:
      assert r.reason.endswith("(padding)"), r.reason
    else:
      m, s = divmod(o, int(np.prod(shape)))
      s_index = [int(j) for j in np.unravel_index(s, shape)]
      assert f" {names[m]}{s_index}" in r.reason or f"({names[m]}{s_index})" in r.reason, (r.reason, m, s_index)
    assert r.sha256 == hashlib.sha256(bad.tobytes()).hexdigest()
    assert r.source_sha256 == digest


def test_an_op_or_plan_field_it_does_not_know_takes_the_index_path(cases):
  _, spec, src, _, _, _, _ = cases[0]
  (e,) = spec.bind(open_checkpoint(src).leaves).elements
  whole = tuple((0, d) for d in e.dst_shape)
  assert e.box_source(whole) is not None
  assert dataclasses.replace(e, ops=e.ops + (transforms.Op("concat", (0,)),)).box_source(whole) is None

  @dataclasses.dataclass(frozen=True)
  class Wider(transforms.ElementPlan):
    pieces: tuple = ()

  same = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
  assert Wider(**same).box_source(whole) is not None  # a field at its default changes nothing
  assert Wider(**same, pieces=(1,)).box_source(whole) is None


def test_a_concat_takes_the_index_path(tmp_path):
  q, k = np.arange(12, dtype=np.float32).reshape(4, 3), -np.arange(6, dtype=np.float32).reshape(2, 3)
  W.write_file(os.path.join(tmp_path, "model.safetensors"), {"q": q, "k": k})
  spec = RemapSpec.from_rules(
      [{"match": "^(q|k)$", "to": "qk", "concat": {"axis": 0, "index": r"\1", "order": ["q", "k"]}}]
  )
  ck = open_checkpoint(tmp_path)
  (e,) = spec.bind(ck.leaves).elements
  assert e.box_source(((0, 6), (0, 3))) is None
  with elements.TargetValues(e, ck, 4) as v:
    got = np.concatenate([s.values for s in v.slabs(0, 18)])
  assert got.tobytes() == np.concatenate([q, k]).tobytes()


def test_a_target_of_the_wrong_shape_or_dtype_is_named_as_such(tmp_path):
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  src = os.path.join(tmp_path, "src")
  W.write_file(os.path.join(os.makedirs(src) or src, "model.safetensors"), {"w.0": x})
  spec = RemapSpec.from_rules([{"match": r"w\.0", "to": "t", "ops": [{"transpose": [1, 0]}]}])
  got = {}
  for name, t in (("ok", x.T), ("dtype", x.T.astype(np.float16)), ("shape", x), ("both", x.astype(np.float16))):
    d = os.path.join(tmp_path, name)
    W.write_file(os.path.join(os.makedirs(d) or d, "model.safetensors"), {"t": np.ascontiguousarray(t)})
    rep = verify_migration(src, d, spec)
    r = rep.leaves[0]
    assert rep.leaf("t") is rep.leaf("w.0") is r  # found by its migrated path, else by its source path
    with pytest.raises(KeyError):
      rep.leaf("w")
    got[name] = (r.status, r.reason)
    if name == "dtype":  # the report's table: the group's line, then the failing leaf with its reason
      assert rep.table_lines() == [
          "[FAIL] t  0/1 leaves bit-identical",
          "       DTYPE_MISMATCH  t <- w.0: dtype float16 != expected float32",
      ]
      assert rep.table_lines(max_failures_per_group=1) == rep.table_lines()  # all shown: no "more" line
      assert rep.table_lines(max_failures_per_group=0)[1:] == ["       ... and 1 more (see --report)"]
  assert got["ok"][0] == "PASS"
  assert got["dtype"] == ("DTYPE_MISMATCH", "dtype float16 != expected float32")
  assert got["shape"][0] == "SHAPE_MISMATCH" and got["shape"][1].startswith("shape (2, 3) != expected (3, 2) (")
  assert got["both"][0] == "SHAPE_MISMATCH" and got["both"][1].startswith("dtype float16 != expected float32; shape")
