"""Live torch oracle (skipped without torch): fresh seeds and shapes, torch's NaN and sum order, the converter."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from parity_jax import bundles as stages, arraydiff  # noqa: E402
from parity_jax.errors import UsageError  # noqa: E402
from parity_jax.oracle import svf_goldens, to_numpy  # noqa: E402
from tests.helpers.seed import TEST_SEED  # noqa: E402
from tests.helpers.tools import one_line_error, run_many  # noqa: E402
from parity_jax.svf import bf16_sha256, reconstruct, torch_cpu_sum  # noqa: E402
from parity_jax.svf.bounds import FormulaConstants, MismatchAccounting  # noqa: E402
from parity_jax.oracle.svd_weights import convert_svd_weights as convert  # noqa: E402

pytestmark = pytest.mark.oracle
ROOT = pathlib.Path(__file__).resolve().parents[2]
SEED = TEST_SEED  # fixed, printed in the session header and on failure; PARITY_JAX_TEST_SEED overrides


def test_torch_canonicalises_every_bf16_nan_and_our_policies_follow():
  """torch's vectorised kernels write 0xFFFF for every NaN, its scalar ones 0x7FC0; JAX keeps sign and payload."""
  bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFFBFFFFF, 0x3F800000], np.uint32)
  t = torch.from_numpy(bits.view(np.float32)).to(torch.bfloat16)
  got = t.view(torch.int16).numpy().view(np.uint16)
  vectorised = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
  assert got.tolist() == [0xFFFF if vectorised else 0x7FC0] * 5 + [0x3F80]
  with np.errstate(invalid="ignore"):
    ours = np.asarray(bits.view(np.float32)).astype(ml_dtypes.bfloat16)  # what JAX/ml_dtypes produce
  assert ours.view(np.uint16)[0] == 0x7FC0 and ours.view(np.uint16)[1] == 0xFFC0
  torch_hash = hashlib.sha256(got.astype("<u2").tobytes()).hexdigest()
  assert bf16_sha256(ours, nan_policy="torch" if vectorised else "torch_scalar") == torch_hash
  assert bf16_sha256(ours, nan_policy="torch_scalar" if vectorised else "torch") != torch_hash
  assert bf16_sha256(ours) != torch_hash


def test_torch_scalar_kernels_write_0x7fc0_for_every_nan():
  """The other dispatch, forced in a subprocess, so both policies are checked against real torch on every machine."""
  code = (
      "import numpy as np, torch; b = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFBFFFFF], np.uint32);"
      "print(torch.from_numpy(b.view(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).tolist())"
  )
  p = subprocess.run(
      [sys.executable, "-c", code],
      env=dict(os.environ, ATEN_CPU_CAPABILITY="default"),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert p.returncode == 0, p.stderr
  assert json.loads(p.stdout) == [0x7FC0] * 4


def test_torch_cpu_sum_replays_torch_sum_bit_for_bit():
  rng = np.random.default_rng(SEED)
  lengths = sorted({0, 1, 3, 7, 8, 9, 31, 32, 33, 64, 80, 1024, 3072} | set(rng.integers(2, 4096, 12).tolist()))
  for n in lengths:
    x = (rng.standard_normal(n) * rng.uniform(0.01, 100)).astype(np.float32)
    if rng.random() < 0.5:
      x = np.abs(x)  # singular values are non-negative
    want = torch.from_numpy(x).sum().numpy()
    assert arraydiff.bit_equal(np.asarray(torch_cpu_sum(x)), want), (SEED, n)


def _torch_svf(m, n, gen, orientation):
  w = torch.randn(m, n, generator=gen) * 0.02
  u, s, v = torch.svd(w)
  u, s, v = u.contiguous(), s.contiguous(), v.contiguous()
  o = torch.randn(s.shape[0], generator=gen) * 0.1
  return (u, s, v, o), svf_goldens.torch_formula(u, s, v, o, orientation)


def test_fresh_shapes_against_the_live_torch_formula():
  rng = np.random.default_rng(SEED)
  gen = torch.Generator().manual_seed(SEED)
  total = {"mismatch": 0, "elements": 0}
  for m, n in [(int(a), int(b)) for a, b in rng.integers(40, 360, (4, 2))] + [(300, 200)]:
    orientation = "transpose" if rng.random() < 0.5 else "identity"
    (u, s, v, o), want = _torch_svf(m, n, gen, orientation)
    un, sn, vn, on = (t.numpy() for t in (u, s, v, o))
    target = (m, n) if orientation == "identity" else (n, m)
    got = {k: np.asarray(x) for k, x in reconstruct(un, sn, vn, on, capture=True, target_shape=target).items()}
    for exact in ("offsets_f32", "scaled_s", "normalization", "u_scaled"):
      assert arraydiff.bit_equal(got[exact], to_numpy(want[exact])), (SEED, m, n, exact)
    acc = MismatchAccounting(FormulaConstants.from_components(sn, on))
    g_final = to_numpy(want["final_bf16"]).view(np.uint16)
    ours = got["final_bf16"].view(np.uint16)
    if orientation == "transpose":
      g_final, ours = g_final.T.copy(), ours.T.copy()
    acc.update(g_final, ours, un, vn)
    assert acc.n_unexplained == 0, (SEED, m, n, acc.to_dict()["unexplained_examples"])
    total["mismatch"] += acc.n_mismatch
    total["elements"] += m * n
  print(f"seed {SEED}: {total['mismatch']} of {total['elements']} final bf16 elements differ from torch, all explained")


def test_torch_against_itself_and_us_at_one_thread():
  # torch's own flips (1 thread vs default) and ours against 1-thread torch, on
  # shapes where XLA and MKL sum differently (k not a multiple of 64).
  gen = torch.Generator().manual_seed(SEED)
  default = torch.get_num_threads()
  flips_torch = flips_ours = 0
  for m, n in [(400, 300), (264, 330)]:
    (u, s, v, o), multi = _torch_svf(m, n, gen, "identity")
    torch.set_num_threads(1)
    try:
      single = svf_goldens.torch_formula(u, s, v, o)["final_bf16"]
    finally:
      torch.set_num_threads(default)
    fc = FormulaConstants.from_components(s.numpy(), o.numpy())
    a = MismatchAccounting(fc)
    a.update(to_numpy(single).view(np.uint16), to_numpy(multi["final_bf16"]).view(np.uint16), u.numpy(), v.numpy())
    b = MismatchAccounting(fc)
    b.update(
        to_numpy(single).view(np.uint16),
        np.asarray(reconstruct(u.numpy(), s.numpy(), v.numpy(), o.numpy())).view(np.uint16),
        u.numpy(),
        v.numpy(),
    )
    assert a.n_unexplained == 0 and b.n_unexplained == 0, (SEED, m, n)
    flips_torch += a.n_mismatch
    flips_ours += b.n_mismatch
  assert flips_ours > 0  # real ties against torch exist here, and every one is explained
  print(f"seed {SEED}: torch 1 vs {default} threads: {flips_torch} bf16 flips; JAX vs torch: {flips_ours}")


def test_convert_svd_weights_roundtrip_and_bad_files(tmp_path):
  gen = torch.Generator().manual_seed(SEED)
  data = {}
  for name, shape in [("model.layers.0.mlp.up_proj.weight", (24, 16)), ("lm_head.weight", (40, 16))]:
    u, s, v = torch.svd(torch.randn(shape, generator=gen))
    data[f"{name}.U"], data[f"{name}.S"], data[f"{name}.V"] = u, s, v  # non-contiguous U, as torch.svd returns it
  pt = tmp_path / "svd_weights.pt"
  torch.save(data, pt)
  out = tmp_path / "comps"
  (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
  p, junk = run_many(
      "convert_svd_weights",
      [
          [f"--svd_weights={pt}", f"--out_dir={out}", "--prefix=trinity_"],
          [f"--svd_weights={tmp_path / 'junk.pt'}", f"--out_dir={tmp_path / 'o3'}"],
      ],
  )
  assert p.returncode == 0, p.stderr
  path = out / "trinity_svf_components.safetensors"
  assert p.stdout.strip() == str(path)
  b = stages.load_bundle(path)
  for k, t in data.items():
    assert arraydiff.bit_equal(b[k], t.contiguous().numpy()), k
  assert b.provenance["source_sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
  # refuses to overwrite; bad files are one-line errors
  with pytest.raises(UsageError, match="refusing to overwrite"):
    convert(str(pt), str(out), prefix="trinity_")
  with pytest.raises(UsageError, match="refusing to overwrite"):  # the output is checked before the input is read
    convert(str(tmp_path / "junk.pt"), str(out), prefix="trinity_")
  bad = dict(data)
  del bad["lm_head.weight.V"]
  torch.save(bad, tmp_path / "bad.pt")
  with pytest.raises(UsageError, match="lm_head.weight has no .V"):
    convert(str(tmp_path / "bad.pt"), str(tmp_path / "o2"))
  torch.save({"a.U": torch.zeros(3, 2), "a.S": torch.zeros(2), "a.V": torch.zeros(3, 2)}, tmp_path / "shape.pt")
  with pytest.raises(UsageError, match="shapes disagree"):
    convert(str(tmp_path / "shape.pt"), str(tmp_path / "o2"), layout="vh")
  one_line_error(junk, "is not a PyTorch file")
  (tmp_path / "cut.pt").write_bytes(pt.read_bytes()[:64])  # a zip archive's start, cut short: torch.load refuses it
  with pytest.raises(
      UsageError, match=r"cannot load .*cut\.pt as a PyTorch file with torch\.load\(weights_only=True\): "
  ):
    convert(str(tmp_path / "cut.pt"), str(tmp_path / "o4"))
  assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_self_consistency_runs_the_second_pass_at_one_thread(monkeypatch):
  """The formula runs at the default thread count, then at 1 thread; the default is restored after."""
  default = torch.get_num_threads()
  seen = []
  formula = svf_goldens.torch_formula

  def recording(*args):
    seen.append(torch.get_num_threads())
    return formula(*args)

  monkeypatch.setattr(svf_goldens, "torch_formula", recording)
  gen = torch.Generator().manual_seed(SEED)
  w = torch.randn(6, 4, generator=gen)
  u, s, v = torch.svd(w)
  r = svf_goldens.self_consistency({"w": (u, s, v)}, {"w": torch.randn(4, generator=gen)})
  assert seen == [default, 1] and torch.get_num_threads() == default
  assert r["threads_default"] == default and r["threads_other"] == 1
  assert (r["n_tensors"], r["n_elements"]) == (1, 24) and 0 <= r["bf16_elements_differing"] <= 24


def _svf_tree(root, backend, report=None, tensors=None, prov=None, files=None):
  """A hand-built regenerated SVF area: MANIFEST.json, one report JSON and one stage bundle."""
  root.mkdir()
  (root / "r.json").write_text(json.dumps(report if report is not None else {"k": [1, {"versions": "x"}]}))
  default = {"tensor.w.adapted": np.linspace(1, 2, 6, dtype=np.float32), "tensor.w.u_scaled": np.ones(3, np.float32)}
  stages.save_bundle(root / "b.safetensors", default if tensors is None else tensors, prov or {"seed": 1})
  manifest = {"backend": backend, "files": files or ["b.safetensors", "r.json"]}
  (root / "MANIFEST.json").write_text(json.dumps(manifest))
  return root


def test_compare_regenerated_on_hand_built_areas(tmp_path):
  """The same backend compares JSON less environment fields and every bit; another compares float32 stages by
  rel-L2 (1e-5, the f32 profile) and skips the gauge-dependent u_scaled. The problems are written out by hand."""
  committed = _svf_tree(tmp_path / "committed", "A")
  n = iter(range(100))

  def problems(backend="A", **fresh):
    result = svf_goldens.compare_regenerated(committed, _svf_tree(tmp_path / f"f{next(n)}", backend, **fresh))
    assert result["mode"] == ("bytes" if backend == "A" else "invariants")
    return result["problems"]

  adapted = np.linspace(1, 2, 6, dtype=np.float32)
  assert problems() == [] and problems(report={"k": [1, {"versions": "y", "python": "3"}]}) == []
  assert problems(report={"k": [1, {"versions": "x"}, 2]}) == ["r.json: differs beyond environment fields"]
  assert problems(report={"k": [2, {"versions": "x"}]}) == ["r.json: differs beyond environment fields"]
  assert problems(report={"j": [1, {"versions": "x"}]}) == ["r.json: differs beyond environment fields"]
  assert problems(prov={"seed": 2}) == ["b.safetensors: provenance differs beyond environment fields"]
  assert problems(prov={"seed": 1, "platform": "other"}) == []
  swapped = {"tensor.w.u_scaled": np.ones(3, np.float32), "tensor.w.adapted": adapted}
  assert problems(tensors=swapped) == ["b.safetensors: tensor names or order differ"]
  bit = adapted.copy()
  bit.view(np.uint32)[0] ^= 1
  assert problems(tensors={"tensor.w.adapted": bit, "tensor.w.u_scaled": np.ones(3, np.float32)}) == [
      "b.safetensors: tensor.w.adapted not bit-identical"
  ]
  assert problems(files=["b.safetensors"]) == ["file lists differ: ['b.safetensors', 'r.json'] vs ['b.safetensors']"]
  # another backend: the same bit within float32 noise, u_scaled anything, the JSON not compared
  gauge = {"tensor.w.adapted": bit, "tensor.w.u_scaled": -np.ones(3, np.float32)}
  assert problems("B", tensors=gauge, report={"other": 1}) == []
  far = {"tensor.w.adapted": adapted * np.float32(1.001), "tensor.w.u_scaled": np.ones(3, np.float32)}
  (problem,) = problems("B", tensors=far)
  assert problem.startswith("b.safetensors: tensor.w.adapted rel-L2 ") and problem.endswith(" > 1e-05"), problem
  wide = {"tensor.w.adapted": adapted.astype(np.float64), "tensor.w.u_scaled": np.ones(3, np.float32)}
  assert problems("B", tensors=wide) == ["b.safetensors: tensor.w.adapted is float64[6], committed float32[6]"]


def test_selected_tensors_are_every_projection_of_every_layer_then_the_tied_head():
  """``(name, [out, in], kind)`` in model order, for a hand-sized model: q is heads * head_dim wide, k and v kv-heads."""
  model = dict(
      hidden_size=8,
      num_attention_heads=4,
      head_dim=3,
      num_key_value_heads=2,
      intermediate_size=20,
      vocab_size=50,
      num_hidden_layers=2,
  )
  want = [("model.embed_tokens.weight", (50, 8), "embed")]
  for i in range(2):
    want += [
        (f"model.layers.{i}.self_attn.q_proj.weight", (12, 8), "attn"),
        (f"model.layers.{i}.self_attn.k_proj.weight", (6, 8), "attn"),
        (f"model.layers.{i}.self_attn.v_proj.weight", (6, 8), "attn"),
        (f"model.layers.{i}.self_attn.o_proj.weight", (8, 12), "attn"),
        (f"model.layers.{i}.mlp.gate_proj.weight", (20, 8), "mlp"),
        (f"model.layers.{i}.mlp.up_proj.weight", (20, 8), "mlp"),
        (f"model.layers.{i}.mlp.down_proj.weight", (8, 20), "mlp"),
    ]
  want.append(("lm_head.weight", (50, 8), "tied"))
  assert svf_goldens.selected_tensors(model) == want
