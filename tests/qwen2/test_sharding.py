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
