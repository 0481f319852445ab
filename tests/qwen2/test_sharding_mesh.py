"""The Qwen forward on a device mesh: sharded loading by slice, the same stages, bounded host memory.

Everything runs in child processes with 8 forced host devices
(tests/helpers/devices.py). Goldens are HF transformers' stages: the committed
ones (goldens/forward, made by parity_jax.oracle) and, for models whose heads
divide over tp=8, ones the oracle makes here on the spot (never our own output).
"""

from __future__ import annotations

import json
import pathlib
import textwrap

import numpy as np
import pytest

from parity_jax import bundles
from parity_jax.bundles import compare_bundles, load_bundle
from parity_jax.errors import UsageError
from tests.helpers.devices import run_module, run_python
from tests.helpers.qwen import FORWARD, MODELS, config_dict, random_tensors, write_checkpoint

# Head counts that divide over tp=4 and tp=8 (the default rules split query and kv heads, MLP columns and vocab).
FRESH = {
    "qwen2_tp8": (
        "qwen2",
        dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_attention_heads=16, num_key_value_heads=8),
        2,
        811,
    ),  # two safetensors files + index
    "qwen3_tp8_tied": (
        "qwen3",
        dict(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=64,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=8,
            tie_word_embeddings=True,
            num_hidden_layers=1,
            layer_types=["full_attention"],
        ),
        None,
        812,
    ),
}
TOKENS = np.array([[0, 0, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]])
MASK = np.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
  """Fresh checkpoints and their HF goldens (the live oracle, float32 CPU), plus a tied model whose lm_head differs."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from parity_jax.oracle.hf_forward import hf_stages

  root = tmp_path_factory.mktemp("mesh")
  out = {}
  for name, (model_type, over, shards, seed) in FRESH.items():
    cfg = config_dict(model_type, **over)
    tensors = random_tensors(cfg, seed=seed)
    if cfg["tie_word_embeddings"]:  # transformers omits it; a bit-equal copy must load, a different one must not
      tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    path = write_checkpoint(root / name, cfg, tensors, shards=shards)
    golden = root / f"{name}.hf.safetensors"
    stages = hf_stages(path, TOKENS, MASK)
    prov = {
        "producer": "parity_jax.oracle.hf_forward",
        "inputs": {"tokens": TOKENS.tolist(), "attention_mask": MASK.tolist()},
    }
    bundles.StageBundle(stages, prov).save(golden)
    out[name] = {"dir": str(path), "golden": str(golden)}
    if cfg["tie_word_embeddings"]:
      bad = dict(tensors)
      bad["lm_head.weight"] = bad["lm_head.weight"].copy()
      bad["lm_head.weight"][-1, 3] += np.float32(1e-3)  # in the last tp shard only
      out["bad_tied"] = str(write_checkpoint(root / "bad_tied", cfg, bad))
  return out


MESH_SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from parity_jax import qwen2
    from parity_jax.bundles import StageBundle, compare_bundles, load_bundle
    from parity_jax.arraydiff import bit_equal
    from parity_jax.errors import UsageError
    from parity_jax.qwen2.parity import golden_inputs

    assert jax.device_count() == 8, jax.devices()
    job = json.loads(sys.argv[1])

    def stages_of(model, tokens, mask, logits_spec=None):
      logits, st = qwen2.forward(model, tokens, attention_mask=mask, capture=True)
      if logits_spec is not None:
        assert logits.sharding.spec == logits_spec, logits.sharding
      return StageBundle({k: np.asarray(v) for k, v in st.items()})

    def check(golden, cand, what):
      rep = compare_bundles(golden, cand, "f32")
      assert rep.passed, what + "\n" + rep.text(failing_only=True)

    def expect_error(fn, pattern):
      try:
        fn()
      except UsageError as e:
        assert re.search(pattern, str(e)) and "\n" not in str(e), str(e)
      else:
        raise AssertionError("no error; expected " + pattern)

    # 1. Fresh models, default rules, on (dp=2, tp=4) and (1, 8): every stage within f32 of the
    #    unsharded forward and of HF's, every weight bit-identical to the unsharded load.
    for name, item in job["fresh"].items():
      tokens, mask, _ = golden_inputs(item["golden"])
      ref_model = qwen2.load(item["dir"])
      ref = stages_of(ref_model, tokens, mask)
      check(item["golden"], ref, name + " unsharded vs HF")
      cfg = ref_model.config
      for spec in item["meshes"]:
        mesh = qwen2.make_mesh(spec)
        tp = mesh.shape["tp"]
        model = qwen2.load(item["dir"], mesh=mesh)
        for a, b in zip(jax.tree_util.tree_leaves(ref_model.params), jax.tree_util.tree_leaves(model.params)):
          assert bit_equal(np.asarray(a), np.asarray(b))
        layer = model.params.layers[0]
        assert layer.attn.wq.sharding.spec == P("tp", None, None)
        assert layer.attn.wk.addressable_shards[0].data.shape == (cfg.num_kv_heads // tp, cfg.head_dim, cfg.hidden_size)
        assert layer.attn.wo.sharding.spec == P(None, "tp", None)
        assert layer.mlp.w_down.addressable_shards[0].data.shape == (cfg.hidden_size, cfg.intermediate_size // tp)
        assert model.params.embed.addressable_shards[0].data.shape == (cfg.vocab_size // tp, cfg.hidden_size)
        assert layer.attn_norm.sharding.is_fully_replicated
        st = stages_of(model, tokens, mask, P("dp", None, "tp") if mesh.shape["dp"] > 1 else P(None, None, "tp"))
        check(ref, st, f"{name} {spec} vs unsharded")
        check(item["golden"], st, f"{name} {spec} vs HF")
      bf16 = qwen2.load(item["dir"], dtype="bfloat16", mesh=qwen2.make_mesh("dp:2,tp:4"))
      for a, b in zip(jax.tree_util.tree_leaves(qwen2.load(item["dir"], dtype="bfloat16").params),
                      jax.tree_util.tree_leaves(bf16.params)):
        assert a.dtype == b.dtype and bit_equal(np.asarray(a), np.asarray(b))

    # 2. Captured stages written to a bundle from a sharded run.
    item = job["fresh"]["qwen2_tp8"]
    tokens, mask, _ = golden_inputs(item["golden"])
    prov = qwen2.capture_to_bundle(item["dir"], tokens, job["bundle_out"], attention_mask=mask,
                                   mesh=qwen2.make_mesh("dp:2,tp:4"))
    assert prov["mesh"] == {"dp": 2, "tp": 4}
    check(item["golden"], load_bundle(job["bundle_out"]), "bundle from a sharded run vs HF")

    # 3. The committed HF goldens (2 or 1 kv heads, 4 query heads) on tp=4: the default rules replicate the kv
    #    heads and say so in one line naming weight and axis; a pinned split that does not divide is refused.
    from parity_jax.qwen2.sources import load_model
    for name in job["goldens"]:
      golden = job["forward"] + f"/{name}.padded.safetensors"
      tokens, mask, _ = golden_inputs(golden)
      mesh = qwen2.make_mesh("tp:4")
      expect_error(lambda: qwen2.load(job["models"] + "/" + name, mesh=mesh,
                                      rules=[(r"layers\.\d+\.attn\.wk", P("tp", None, None))]),
                   r"^layers\.0\.attn\.wk: axis 0 \(kv_heads, size [12]\) does not divide over mesh axis tp=4")
      model, report = load_model(job["models"] + "/" + name, mesh=mesh)
      notes = [n for n in report.sharding_notes if n.startswith("layers.*.attn.wk:")]
      assert len(notes) == 1 and re.fullmatch(
          r"layers\.\*\.attn\.wk: axis 0 \(kv_heads, size [12]\) does not divide over tp=4; replicated", notes[0]
      ), report.sharding_notes
      attn = model.params.layers[0].attn
      assert attn.wk.sharding.is_fully_replicated and attn.wq.sharding.spec == P("tp", None, None)
      check(golden, stages_of(model, tokens, mask), name + " tp=4 vs committed HF golden")

    # 4. Refusals, before any weight is read.
    fresh3 = job["fresh"]["qwen3_tp8_tied"]["dir"]
    expect_error(lambda: qwen2.load(job["bad_tied"], mesh=qwen2.make_mesh("tp:8")), r"lm_head\.weight differs")
    expect_error(lambda: qwen2.load(fresh3, mesh=qwen2.make_mesh("tp:8"), rules=[("embed", P("dp", None, None))]),
                 r"^embed: sharding rule 'embed' gives spec .* for a rank-2 weight")
    expect_error(lambda: qwen2.capture_stages(fresh3, np.ones((3, 4), int), mesh=qwen2.make_mesh("dp:2,tp:4")),
                 r"^tokens: batch 3 does not divide over mesh axis dp=2$")
    expect_error(lambda: qwen2.make_mesh("dp:4,tp:4"), r"needs 16 devices; JAX sees 8")
    print("OK")
""")


@pytest.mark.oracle
def test_sharded_forward_matches_unsharded_and_hf_on_two_meshes(fresh, tmp_path):
  # qwen3 on tp=8 is the tool test's (test_tools_take_a_mesh): every compile here costs seconds
  meshes = {"qwen2_tp8": ["dp:2,tp:4", "tp:8"], "qwen3_tp8_tied": ["dp:2,tp:4"]}
  job = {
      "fresh": {k: dict(v, meshes=meshes[k]) for k, v in fresh.items() if k in FRESH},
      "bad_tied": fresh["bad_tied"],
      "goldens": ["qwen2_tied", "qwen3"],
      "forward": str(FORWARD),
      "models": str(MODELS),
      "bundle_out": str(tmp_path / "sharded_run.safetensors"),
  }
  p = run_python(MESH_SCRIPT, [json.dumps(job)])
  assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stdout[-2000:] + p.stderr[-4000:]


@pytest.mark.oracle
def test_tools_take_a_mesh(fresh, tmp_path):
  item = fresh["qwen2_tp8"]
  out = tmp_path / "stages.safetensors"
  tokens = ";".join(",".join(str(t) for t in row) for row in TOKENS)
  mask = ";".join(",".join(str(t) for t in row) for row in MASK)
  p = run_module(
      "tools.capture_stages",
      [
          f"--model_dir={item['dir']}",
          f"--tokens={tokens}",
          f"--attention_mask={mask}",
          "--mesh=dp:2,tp:4",
          f"--out={out}",
      ],
  )
  assert p.returncode == 0 and "on mesh dp:2,tp:4" in p.stdout, p.stdout + p.stderr
  captured = load_bundle(out)
  assert captured.provenance["mesh"] == {"dp": 2, "tp": 4}
  rep = compare_bundles(item["golden"], captured, "f32")
  assert rep.passed, rep.text(failing_only=True)

  p = run_module(
      "tools.forward_parity",
      [
          f"--model_dir={fresh['qwen3_tp8_tied']['dir']}",
          f"--golden={fresh['qwen3_tp8_tied']['golden']}",
          "--mesh=tp:8",
          "--format=json",
      ],
  )
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  assert json.loads(p.stdout)["passed"] is True


def test_mesh_flag_errors_are_one_line():
  from parity_jax.qwen2 import sharding

  for text, msg in [
      ("dp=2,dp=2", "axis 'dp' given twice"),
      ("tp:x", "'tp:x' is not axis:size"),
      ("", "--mesh is empty"),
      ("tp:0", "size >= 1"),
  ]:
    with pytest.raises(UsageError, match=msg):
      sharding.parse_mesh_spec(text)
  assert sharding.parse_mesh_spec(" dp:2 , tp=4 ") == {"dp": 2, "tp": 4}
  assert sharding.parse_mesh_spec("data:2,model:4") == {"data": 2, "model": 4}  # any axis names (with axis rules)
  with pytest.raises(UsageError, match=r"--mesh=dp:1,tp:2 needs 2 devices; JAX sees 1 \(on CPU, XLA_FLAGS="):
    sharding.make_mesh("tp:2")


RSS_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, numpy as np
    from parity_jax import qwen2
    from parity_jax.qwen2 import sharding

    def status(key):  # kB -> bytes, this process's own mm (VmHWM is not inherited across exec, unlike ru_maxrss)
      for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
          return int(line.split()[1]) * 1024
      raise KeyError(key)

    path, spec = sys.argv[1], sys.argv[2]
    mesh = qwen2.make_mesh(spec)
    jax.block_until_ready(jax.device_put(np.ones(1024, np.float32), jax.devices()[-1]))  # runtime warmed up
    try:
      with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    except OSError:
      pass  # then VmHWM may include an earlier peak: the measure only over-estimates (see the test)
    before, hwm0 = status("VmRSS"), status("VmHWM")
    model = qwen2.load(path, mesh=mesh)
    jax.block_until_ready(model.params)
    peak = status("VmHWM")
    leaves = jax.tree_util.tree_leaves(model.params)
    resident = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    model_bytes = sum(x.nbytes for x in leaves)
    largest_shard = max(s.data.nbytes for x in leaves for s in x.addressable_shards)
    e = model.params.embed
    rows = e.shape[0] // mesh.shape["tp"]
    for s in e.addressable_shards[:1] + e.addressable_shards[-1:]:  # the values, not only their size
      r0 = s.index[0].start
      want = (np.arange(r0 * e.shape[1], (r0 + rows) * e.shape[1], dtype=np.int64) % 1021).astype(np.float32)
      assert np.array_equal(np.asarray(s.data).reshape(-1), want), r0
    print(json.dumps({"before": before, "hwm_before": hwm0, "peak": peak, "resident": resident,
                      "model_bytes": model_bytes, "largest_shard": largest_shard}))
""")


def _write_big_checkpoint(path: pathlib.Path) -> int:
  """A ~300 MB float32 Qwen2 checkpoint written row block by row block (never whole in memory); returns its bytes.

  The tied 65536 x 1024 embedding is the largest tensor (its tp=8 shard is 32 MiB). Values: ``i % 1021``
  over the flat index, so a shard's rows can be checked without the file.
  """
  cfg = config_dict(
      "qwen2",
      vocab_size=65536,
      hidden_size=1024,
      intermediate_size=2048,
      num_hidden_layers=1,
      num_attention_heads=8,
      num_key_value_heads=8,
      tie_word_embeddings=True,
      layer_types=["full_attention"],
  )
  path.mkdir()
  (path / "config.json").write_text(json.dumps(cfg))
  from parity_jax import qwen2

  names = qwen2.to_hf_tensors(qwen2.init_params(qwen2.parse_config(cfg), put=None, scale=0.0), qwen2.parse_config(cfg))
  specs = [(n, a.shape, np.float32) for n, a in names.items()]
  with bundles.BundleWriter(path / "model.safetensors", specs) as w:
    for name, shape, _ in specs:
      cols = int(np.prod(shape[1:], dtype=np.int64))
      step = max(1, (8 << 20) // (4 * cols))
      for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        block = (np.arange(r0 * cols, r1 * cols, dtype=np.int64) % 1021).astype(np.float32)
        w.write_rows(name, block.reshape((r1 - r0,) + tuple(shape[1:])))
  return sum(int(np.prod(s)) * 4 for _, s, _ in specs)


def test_sharded_load_peak_host_memory_is_the_model_plus_one_shard(tmp_path):
  """Peak RSS growth during a sharded load <= the bytes the mesh holds + 1.2 x the largest tensor shard.

  On CPU the 8 "devices" are host memory, so the loaded model itself is part
  of the RSS: what the load may add on top is one shard being read (read
  straight into the array that becomes the device buffer) plus a small read
  buffer (4 MiB). A loader holding a whole tensor (the 256 MiB embedding), or
  keeping the file's mapped pages, or all 8 shards of a tensor before placing
  them, exceeds the bound by far. The mesh is (1, 8): every weight but the
  norms is split, so the bytes on the devices are the model's bytes plus 7
  extra copies of the (4 KiB) norm vectors.
  """
  path = tmp_path / "big"
  file_bytes = _write_big_checkpoint(path)
  p = run_python(RSS_SCRIPT, [str(path), "tp:8"])
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["model_bytes"] == file_bytes and r["largest_shard"] == (65536 // 8) * 1024 * 4
  assert r["resident"] - r["model_bytes"] <= 8 * 3 * 1024 * 4  # only the replicated norms, 8 copies each
  growth = r["peak"] - r["before"]  # exact when the load set a new high-water mark, else an over-estimate
  bound = r["resident"] + 1.2 * r["largest_shard"]
  print(
      f"sharded load: peak growth {growth / 2**20:.1f} MiB, model {r['model_bytes'] / 2**20:.1f} MiB, "
      f"bound {bound / 2**20:.1f} MiB"
  )
  assert r["resident"] <= growth <= bound, r


def test_read_box_reads_any_box_bit_exact(tmp_path):
  """Every box (full, offset, short, empty axes) of f32/bf16/f16 tensors, any buffer size, with conversions."""
  import itertools

  import ml_dtypes
  import safetensors.numpy

  from parity_jax.qwen2.sharding import SafetensorsFile

  rng = np.random.default_rng(5)
  tensors = {
      "a": rng.standard_normal((6, 5, 7)).astype(np.float32),
      "b": rng.standard_normal((9, 8)).astype(ml_dtypes.bfloat16),
      "c": rng.standard_normal((4,)).astype(np.float16),
  }
  path = tmp_path / "t.safetensors"
  safetensors.numpy.save_file(tensors, str(path))
  f = SafetensorsFile(path)
  for name, t in tensors.items():
    boxes = itertools.product(*[[(0, n), (1, n), (0, n - 1), (1, 3), (2, 2)] for n in t.shape])
    for box, buffer_bytes, out in itertools.product(boxes, (4, 64, 1 << 20), (None, np.float32, ml_dtypes.bfloat16)):
      index = tuple(slice(lo, hi) for lo, hi in box)
      got = f.read_box(name, index, out, buffer_bytes=buffer_bytes)
      want = t[index].astype(out or t.dtype)
      assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes(), (name, box)
      assert got.size == 0 or got.ctypes.data % 64 == 0
  view = f.read_box("a", (slice(1, 3), slice(2, 5)), view_shape=(6, 35))  # a reshape of the stored shape
  assert view.tobytes() == tensors["a"].reshape(6, 35)[1:3, 2:5].tobytes()
  with pytest.raises(UsageError, match="cannot view shape"):
    f.read_box("a", (slice(0, 1),), view_shape=(6, 36))


TWO_PROCESS_SCRIPT = textwrap.dedent(r"""
    import json, sys
    from parity_jax import runtime
    path, port, pid, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    runtime.initialize(runtime.Options(f"127.0.0.1:{port}", 2, pid))
    import jax, numpy as np
    from parity_jax import qwen2
    from parity_jax.bundles import StageBundle, compare_bundles, load_bundle
    from parity_jax.qwen2 import sharding

    reads = []
    original = sharding.SafetensorsFile.read_box
    def recording(self, name, index, *args, **kwargs):
      reads.append((name, tuple((s.start, s.stop) for s in index)))
      return original(self, name, index, *args, **kwargs)
    sharding.SafetensorsFile.read_box = recording

    assert jax.process_count() == 2 and jax.local_device_count() == 2 and jax.device_count() == 4
    mesh = qwen2.make_mesh("tp:4")  # spans both processes
    model = qwen2.load(path, mesh=mesh)
    cfg = model.config
    # this process read the embedding rows of its own two devices, nothing else of it
    rows = cfg.vocab_size // 4
    mine = sorted(d.id for d in jax.local_devices())
    want = {(rows * k, rows * (k + 1)) for k in range(4) if mesh.devices.reshape(-1)[k].id in mine}
    got = {box[0] for name, box in reads if name == "model.embed_tokens.weight"}
    assert got == want, (got, want)
    assert not model.params.embed.is_fully_addressable
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3]])
    prov = qwen2.capture_to_bundle(path, tokens, out, mesh=mesh)   # gathered from both processes; process 0 writes
    assert prov["processes"] == 2
    with jax.default_device(jax.local_devices()[0]):  # the unsharded reference, on one local device
      ref_model = qwen2.load(path)
      _, ref = qwen2.forward(ref_model, tokens, capture=True)
      ref = StageBundle({k: np.asarray(v) for k, v in ref.items()})
    if pid == 0:
      rep = compare_bundles(ref, load_bundle(out), "f32")
      assert rep.passed, rep.text(failing_only=True)
    print("OK", pid, sorted(got))
""")


def test_two_processes_each_read_only_their_own_shards(tmp_path):
  """Under jax.distributed (2 processes x 2 devices, tp=4 across both): each process reads only its shards."""
  import subprocess
  import sys

  from tests.helpers import jobs
  from tests.helpers.devices import ROOT, device_env

  cfg = config_dict(
      "qwen2", vocab_size=96, hidden_size=64, intermediate_size=64, num_attention_heads=8, num_key_value_heads=4
  )
  path = write_checkpoint(tmp_path / "model", cfg, random_tensors(cfg, seed=813))
  port = jobs.free_port()
  out = tmp_path / "stages.safetensors"
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", TWO_PROCESS_SCRIPT, str(path), str(port), str(i), str(out)],
          cwd=ROOT,
          env=device_env(2),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  results = jobs.finish(procs, timeout=240)  # kills both if one overruns
  outs = [(so, se) for _, so, se in results]
  for rc, so, se in results:
    assert rc == 0 and "OK" in so, so[-2000:] + se[-3000:]
  assert "OK 0 [(0, 24), (24, 48)]" in outs[0][0] and "OK 1 [(48, 72), (72, 96)]" in outs[1][0]
  assert load_bundle(out).provenance["mesh"] == {"dp": 1, "tp": 4}


USER_MESH_SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import jax, numpy as np
    from jax.sharding import AxisType, Mesh, PartitionSpec as P
    from parity_jax import qwen2
    from parity_jax.bundles import StageBundle, compare_bundles
    from parity_jax.qwen2.sources import load_model

    assert jax.device_count() == 8
    path, golden = sys.argv[1], sys.argv[2]
    from parity_jax.qwen2.parity import golden_inputs
    tokens, mask, _ = golden_inputs(golden)

    def stages(model):
      _, st = qwen2.forward(model, tokens, attention_mask=mask, capture=True)
      return StageBundle({k: np.asarray(v) for k, v in st.items()})

    def check(ref, cand, what):
      rep = compare_bundles(ref, cand, "f32")
      assert rep.passed, what + "\n" + rep.text(failing_only=True)

    ref = stages(qwen2.load(path))
    check(golden, ref, "unsharded vs HF")
    devs = np.array(jax.devices()).reshape(2, 4)
    dp_tp = ("dp", "tp")
    rules_dm = [("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("intermediate", "model"),
                ("vocab", "model"), ("experts", "model")]
    meshes = {
        "jax.make_mesh (Explicit)": (jax.make_mesh((2, 4), dp_tp), None, "tp"),
        "jax.make_mesh (Auto)": (jax.make_mesh((2, 4), dp_tp, axis_types=(AxisType.Auto,) * 2), None, "tp"),
        "hand-built Mesh": (Mesh(devs, dp_tp), None, "tp"),
        "data/model + rules": (jax.make_mesh((2, 4), ("data", "model")), rules_dm, "model"),
        "expert axis ep": (jax.make_mesh((2, 4), ("dp", "ep")), None, "ep"),
    }
    assert all(t == AxisType.Explicit for t in meshes["jax.make_mesh (Explicit)"][0].axis_types)
    for what, (mesh, rules, expert_axis) in meshes.items():
      model, report = load_model(path, mesh=mesh, axis_rules=rules)
      moe = model.params.layers[0].moe
      assert moe.w_gate.sharding.spec[0] == expert_axis, (what, moe.w_gate.sharding)  # experts spread over devices
      assert moe.w_gate.addressable_shards[0].data.shape[0] == 8 // 4
      if expert_axis != "ep":  # 2 kv heads on 4: replicated, said in one line
        assert model.params.layers[0].attn.wk.sharding.is_fully_replicated, what
        assert any(re.fullmatch(r"layers\.\*\.attn\.wk: axis 0 \(kv_heads, size 2\) does not divide over "
                                + expert_axis + r"=4; replicated", n) for n in report.sharding_notes), report.sharding_notes
      st = stages(model)
      check(ref, st, what + " vs unsharded")
      check(golden, st, what + " vs HF")
    # an axis rule overrides a default: experts=none keeps them whole
    model, _ = load_model(path, mesh=meshes["hand-built Mesh"][0], axis_rules=[("experts", ())])
    spec = model.params.layers[0].moe.w_gate.sharding.spec
    assert spec[0] is None and spec[1] == "tp", spec  # experts whole; moe_intermediate takes the freed axis
    print("OK")
""")


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
  """A tiny Qwen2-MoE checkpoint (8 experts, 2 kv heads) and its HF golden on a left-padded batch."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from parity_jax.oracle.hf_forward import hf_stages
  from tests.helpers.moe import save, tiny_moe

  root = tmp_path_factory.mktemp("moe_mesh")
  path = save(tiny_moe("qwen2_moe", seed=814, num_hidden_layers=2), root / "moe")
  golden = root / "moe.hf.safetensors"
  prov = {
      "producer": "HF transformers",
      "inputs": {"tokens": TOKENS[:, :6].tolist(), "attention_mask": MASK[:, :6].tolist()},
  }
  bundles.StageBundle(hf_stages(path, TOKENS[:, :6], MASK[:, :6]), prov).save(golden)
  return path, golden


@pytest.mark.oracle
def test_meshes_as_users_make_them_moe(moe_checkpoint):
  """jax.make_mesh Explicit and Auto, a hand-built Mesh, other axis names with rules, an expert axis: all within f32."""
  path, golden = moe_checkpoint
  p = run_python(USER_MESH_SCRIPT, [str(path), str(golden)])
  assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stdout[-2000:] + p.stderr[-4000:]


@pytest.mark.oracle
def test_tools_print_the_placement_and_take_shard_rules(moe_checkpoint):
  path, golden = moe_checkpoint
  base = [f"--model_dir={path}", f"--golden={golden}"]
  p = run_module(
      "tools.forward_parity",
      base + ["--mesh=data:2,model:4", "--shard_rules=batch=data,heads=model,kv_heads=model,vocab=model,experts=model"],
  )
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith("sharding: ")]
  assert "sharding: layers.*.attn.wk: axis 0 (kv_heads, size 2) does not divide over model=4; replicated" in lines
  assert "PASS" in p.stdout
