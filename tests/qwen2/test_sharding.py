"""The weights pytree can be placed tensor-parallel with NamedSharding and the same forward runs on it.

Runs in a subprocess with two virtual CPU devices (XLA's device count is fixed
at backend start). Query/kv heads and the intermediate axis are split over a
``tp`` mesh axis, the o_proj/down_proj contractions become cross-device sums.
"""

import subprocess
import sys
import textwrap

from tests.helpers.qwen import MODELS, ROOT

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from parity_jax import qwen2
    from parity_jax.arraydiff import diff_stats
    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("tp",))

    def spec(path, leaf):
      names = [getattr(k, "name", None) for k in path]
      field = names[-1]
      table = {"wq": P("tp"), "wk": P("tp"), "wv": P("tp"), "bq": P("tp"), "bk": P("tp"), "bv": P("tp"),
               "wo": P(None, "tp"), "w_gate": P("tp"), "w_up": P("tp"), "w_down": P(None, "tp")}
      return NamedSharding(mesh, table.get(field, P()))

    def put(params):
      return jax.device_put(params, jax.tree_util.tree_map_with_path(spec, params))

    path = "MODEL_DIR"
    ref = qwen2.load(path)
    tp = qwen2.load(path, put=put)
    wq = tp.params.layers[0].attn.wq
    assert wq.sharding.spec == P("tp") and wq.addressable_shards[0].data.shape[0] == wq.shape[0] // 2
    assert tp.params.layers[0].mlp.w_down.sharding.spec == P(None, "tp")
    tokens = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6])
    a, sa = qwen2.forward(ref, tokens, attention_mask=mask, capture=True)
    b, sb = qwen2.forward(tp, tokens, attention_mask=mask, capture=True)
    worst = max(diff_stats(np.asarray(sa[n]), np.asarray(sb[n])).rel_l2 for n in sa)
    assert worst < 1e-6, worst
    print("OK", worst)
""")


def test_tensor_parallel_placement_runs_the_same_forward():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  r = subprocess.run(
      [sys.executable, "-c", SCRIPT.replace("MODEL_DIR", str(MODELS / "qwen2_gqa_bias"))],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_a_damaged_safetensors_header_is_one_line(tmp_path):
  """Hand-built files: each damage is a one-line UsageError naming it, never a struct/json traceback."""
  import json
  import struct

  import pytest

  from parity_jax.errors import UsageError
  from parity_jax.qwen2.sharding import SafetensorsFile

  def file(name, header=None, raw=None, data=b""):
    path = tmp_path / name
    if raw is None:
      body = json.dumps(header).encode()
      raw = struct.pack("<Q", len(body)) + body + data
    path.write_bytes(raw)
    return path

  good = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"x": "y"}}
  f = SafetensorsFile(file("good", good, data=b"\0" * 8))
  assert list(f.entries) == ["t"] and f.entries["t"][1:] == (
      (2,),
      8 + len(json.dumps(good)),
      16 + len(json.dumps(good)),
  )
  cases = [
      (file("short", raw=b"abc"), "file shorter than 8 bytes"),
      (file("past", raw=struct.pack("<Q", 100) + b"{}"), "header length 100 runs past the end of the file"),
      (file("list", []), "header is not a JSON object"),
      (file("nodtype", {"t": {"shape": [2], "data_offsets": [0, 8]}}, data=b"\0" * 8), "bad header entry for 't'"),
      (file("size", {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, data=b"\0" * 8), "do not fit"),
      (file("beyond", good, data=b"\0" * 7), "do not fit its shape"),
  ]
  for path, words in cases:
    with pytest.raises(UsageError, match=words):
      SafetensorsFile(path)


def test_axis_rules_are_checked_before_any_placement():
  import pytest

  from parity_jax.errors import UsageError
  from parity_jax.qwen2 import make_mesh
  from parity_jax.qwen2.sharding import Placement

  mesh = make_mesh("dp:1")
  for rules, words in [
      ([("heads",)], "is not (logical axis, mesh axes)"),
      ([("bogus", "tp")], "unknown logical axis"),
      ([("heads", 3)], "mesh axes must be names, got 3"),
      ([("heads", ("tp", ""))], "mesh axes must be names"),
  ]:
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
      Placement(mesh, axis_rules=rules)


def test_shard_params_places_every_leaf_on_the_mesh_with_the_same_values():
  import jax
  import numpy as np

  from parity_jax import qwen2
  from parity_jax.arraydiff import bit_equal
  from parity_jax.qwen2.sharding import shard_params
  from tests.helpers.qwen import config_dict

  cfg = qwen2.parse_config(config_dict())
  params = qwen2.init_params(cfg)
  mesh = qwen2.make_mesh("dp:1")
  placed = shard_params(params, mesh)
  assert jax.tree_util.tree_structure(placed) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(placed)):
    assert b.sharding.mesh.shape == mesh.shape and bit_equal(np.asarray(a), np.asarray(b))


def test_parse_axis_rules_reads_the_flag_and_names_each_mistake():
  import pytest

  from parity_jax.errors import UsageError
  from parity_jax.qwen2 import parse_axis_rules

  assert parse_axis_rules(" batch=data, heads = model ,kv_heads=none,experts=ep+tp,gate=") == (
      ("batch", ("data",)),
      ("heads", ("model",)),
      ("kv_heads", ()),
      ("experts", ("ep", "tp")),
      ("gate", ()),
  )
  assert parse_axis_rules("heads=NONE") == (("heads", ()),)
  for text, words in [
      ("", "--shard_rules is empty"),
      ("  ", "--shard_rules is empty"),
      ("heads", "--shard_rules: 'heads' is not logical_axis=mesh_axis"),
      ("bogus=tp", "--shard_rules: unknown logical axis 'bogus'"),
      ("heads=tp,heads=dp", "--shard_rules: logical axis 'heads' given twice"),
      ("heads=tp+", "--shard_rules: 'heads=tp\\+': mesh axes are names joined by '\\+'"),
  ]:
    with pytest.raises(UsageError, match=words):
      parse_axis_rules(text)
  with pytest.raises(UsageError, match="--rules is empty"):
    parse_axis_rules(None, flag="rules")


def test_read_box_reads_every_box_by_byte_range_as_numpy_slicing_does(tmp_path):
  """Boxes of a safetensors tensor (whole, rows, inner boxes, empty), in its dtype and converted, through every read
  path (straight into the result, piece by piece, rows grouped per read: the buffer sizes pick them) and through a
  reshaped view: each bit-equal to numpy slicing of the array written (then ``astype``)."""
  import itertools

  import ml_dtypes
  import numpy as np
  import pytest
  import safetensors.numpy

  from parity_jax.arraydiff import bit_equal
  from parity_jax.errors import UsageError
  from parity_jax.qwen2.sharding import SafetensorsFile, box_of, row_pieces

  rng = np.random.default_rng(7)
  arrays = {
      "f": rng.standard_normal((4, 6, 10)).astype(np.float32),
      "h": rng.standard_normal((6, 10)).astype(ml_dtypes.bfloat16),
  }
  path = tmp_path / "t.safetensors"
  safetensors.numpy.save_file(arrays, str(path))
  f = SafetensorsFile(path)
  boxes = [
      (),
      (slice(1, 3),),
      (slice(None), slice(2, 5)),
      (slice(1, 4), slice(0, 6), slice(3, 9)),
      (slice(0, 2), slice(1, 2), slice(None)),
      (slice(2, 2),),
      (slice(3, 4), slice(5, 6), slice(9, 10)),
  ]
  n = 0
  for name, index, buffer_bytes in itertools.product(("f", "h"), boxes, (4 << 20, 64, 8, 1)):
    a = arrays[name]
    index = index[: a.ndim]
    for out in (None, np.float32, np.float64):
      got = f.read_box(name, index, out_dtype=out, buffer_bytes=buffer_bytes)
      want = a[index].astype(a.dtype if out is None else out)
      assert bit_equal(got, want), (name, index, out, buffer_bytes)
      assert got.ctypes.data % 64 == 0 or got.size == 0
      n += 1
  assert n == 2 * 7 * 4 * 3
  view = f.read_box("f", (slice(1, 3), slice(2, 5)), view_shape=(8, 3, 10), buffer_bytes=64)
  assert bit_equal(view, arrays["f"].reshape(8, 3, 10)[1:3, 2:5])
  with pytest.raises(UsageError, match=r"f: cannot view shape \[4, 6, 10\] as \[4, 60, 2\]"):
    f.read_box("f", (), view_shape=(4, 60, 2))
  with pytest.raises(UsageError, match="strided shard index"):
    f.read_box("f", (slice(0, 4, 2),))

  assert box_of((slice(1, 3),), (4, 6)) == ((1, 3), (0, 6)) and box_of((slice(5, 2),), (8,)) == ((5, 5),)
  pieces = list(row_pieces((slice(1, 8), slice(2, 4)), (9, 5), itemsize=4, budget=20))  # 8 bytes a row: 2 rows
  assert pieces == [(slice(r, min(8, r + 2)), slice(2, 4)) for r in (1, 3, 5, 7)]
  assert list(row_pieces((), (3, 5), itemsize=4, budget=1)) == [(slice(r, r + 1), slice(0, 5)) for r in range(3)]
  with open(path, "r+b") as fh:  # cut after the header was read: the read itself names the end of the file
    fh.truncate(path.stat().st_size - 4)
  with pytest.raises(UsageError, match="unexpected end of file at offset"):
    f.read_box("h", ())


def test_place_sharded_reads_each_distinct_box_once_and_assembles_the_array():
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from parity_jax.arraydiff import bit_equal
  from parity_jax.qwen2 import make_mesh
  from parity_jax.qwen2.sharding import aligned_empty, place_sharded, shard_boxes, to_host

  a = np.arange(24, dtype=np.float32).reshape(4, 6)
  sharding = NamedSharding(make_mesh("dp:1"), P("dp"))
  reads = []

  def read(index):
    reads.append(index)
    return a[index]

  x = place_sharded(read, a.shape, sharding)
  assert isinstance(x, jax.Array) and x.sharding == sharding and bit_equal(to_host(x), a)
  assert [tuple((s.start or 0, s.stop or n) for s, n in zip(i, a.shape)) for i in reads] == [((0, 4), (0, 6))]
  assert len(shard_boxes(a.shape, sharding)) == 1
  e = aligned_empty((3, 5), np.float64, align=256)
  assert e.shape == (3, 5) and e.dtype == np.float64 and e.ctypes.data % 256 == 0 and e.flags.c_contiguous
