"""SVF goldens from the oracle: torch.svd components and the Python formula in torch float32 on CPU.

``python -m tools.regen_goldens --what=svf`` calls :func:`regenerate`, which
writes under ``<goldens_dir>/svf/``:

* ``svf_components.safetensors`` -- ``<name>.U``, ``<name>.S``, ``<name>.V`` from
  legacy ``torch.svd`` of seeded random matrices shaped like a small Qwen3-style
  model's selected tensors: attention q/k/v/o and MLP gate/up/down projections
  of two layers, a tall embedding and a tied LM head (same matrix, own offsets);
* ``svf_scale_offsets.safetensors`` -- ``<name>`` -> offsets;
* ``svf_stage_debug.safetensors`` -- the sample tensor's stages, ``stage.<stage>``,
  in its target orientation (a Flax-style ``[in, out]`` kernel: a transpose);
* ``svf_all_selected_stage_debug.safetensors`` -- every tensor's stages,
  ``tensor.<safe_source_name>.<stage>``, source-oriented;
* ``svf_report.json`` -- the Python-style report: per tensor the stage sha256
  and stats, the final bf16 sha256, the combined hash, torch's backend and
  versions, and torch measured against itself (1 thread vs the default);
* ``MANIFEST.json`` -- seeds, shapes, versions and the sha256 of every file.

Everything numeric here is torch: the goldens never come from the JAX code they
check (names, hashes and the combined hash are computed here independently of
``parity_jax.svf``). Like the Python process's default baseline, the stages are
computed from the components as read back from safetensors.

The hidden size is 80, not a multiple of 64, on purpose: for k = 64, 128, 192
torch's MKL sgemm and XLA's dot happen to accumulate in the same order and
agree bit for bit, while for k = 80 they do not, so the goldens contain real
bf16 rounding ties between torch and JAX and the explained-mismatch
accounting is exercised by real data. The k/v projections (k = 64) show the
other case: byte-identical finals.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import ml_dtypes
import numpy as np

from parity_jax import bundles
from parity_jax.oracle import to_numpy
from parity_jax.files import file_sha256, write_text_atomic
from parity_jax.provenance import default_provenance, package_versions, torch_backend

SEED = 20261123
MODEL = {
    "hidden_size": 80,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "vocab_size": 320,
    "tie_word_embeddings": True,
}
WEIGHT_STD = {"embed": 0.05, "attn": 0.02, "mlp": 0.03}
OFFSET_STD = 0.1
SAMPLE = "model.layers.1.mlp.down_proj.weight"  # target: Flax kernel [in, out]

STAGE_NAMES = (
    "source_f32",
    "offsets_f32",
    "scaled_s",
    "normalization",
    "u_scaled",
    "matmul_pre_norm",
    "zero_source_f32",
    "adapted_source_f32",
    "final_f32",
    "final_bf16",
)
FILES = {
    "components": "svf_components.safetensors",
    "offsets": "svf_scale_offsets.safetensors",
    "sample": "svf_stage_debug.safetensors",
    "all_selected": "svf_all_selected_stage_debug.safetensors",
    "report": "svf_report.json",
}


def selected_tensors(model: dict[str, Any] = MODEL) -> list[tuple[str, tuple[int, int], str]]:
  """``(hf_name, [out, in], kind)`` of every selected tensor, in model order."""
  h, q = model["hidden_size"], model["num_attention_heads"] * model["head_dim"]
  kv, inter, vocab = model["num_key_value_heads"] * model["head_dim"], model["intermediate_size"], model["vocab_size"]
  out = [("model.embed_tokens.weight", (vocab, h), "embed")]
  for i in range(model["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out += [
        (p + "self_attn.q_proj.weight", (q, h), "attn"),
        (p + "self_attn.k_proj.weight", (kv, h), "attn"),
        (p + "self_attn.v_proj.weight", (kv, h), "attn"),
        (p + "self_attn.o_proj.weight", (h, q), "attn"),
        (p + "mlp.gate_proj.weight", (inter, h), "mlp"),
        (p + "mlp.up_proj.weight", (inter, h), "mlp"),
        (p + "mlp.down_proj.weight", (h, inter), "mlp"),
    ]
  out.append(("lm_head.weight", (vocab, h), "tied"))
  return out


def _safe(name: str) -> str:
  # Written here, not imported from parity_jax.svf: the goldens must not share code with what they check.
  return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _combined(pairs) -> str:
  h = hashlib.sha256()
  for name, digest in sorted(pairs):
    h.update(f"{name}\t{digest}\n".encode())
  return h.hexdigest()


def torch_formula(U, S, V, offsets, orientation: str = "identity") -> dict[str, Any]:
  """The Python process's stages, in torch float32 (``torch`` tensors)."""
  import torch

  scaled_s = S * (1.0 + offsets)
  normalization = S.sum() / scaled_s.sum()
  u_scaled = U * scaled_s.reshape(1, -1)
  matmul_pre_norm = u_scaled @ V.T
  zero_scaled = S * (1.0 + torch.zeros_like(offsets))
  zero_source = ((U * zero_scaled.reshape(1, -1)) @ V.T) * (S.sum() / zero_scaled.sum())
  adapted = matmul_pre_norm * normalization
  final_f32 = adapted if orientation == "identity" else adapted.T
  return {
      "offsets_f32": offsets.float(),
      "scaled_s": scaled_s,
      "normalization": normalization,
      "u_scaled": u_scaled,
      "matmul_pre_norm": matmul_pre_norm,
      "zero_source_f32": zero_source,
      "adapted_source_f32": adapted,
      "final_f32": final_f32,
      "final_bf16": final_f32.to(torch.bfloat16),
  }


def _torch_sha(t) -> str:
  return hashlib.sha256(to_numpy(t).tobytes()).hexdigest()


def _torch_stats(t) -> dict[str, Any]:
  import torch

  x = t.detach().double().reshape(-1)
  finite = torch.isfinite(x)
  f = x[finite]
  return {
      "count": int(x.numel()),
      "n_nan": int(torch.isnan(x).sum()),
      "n_inf": int(torch.isinf(x).sum()),
      "min": float(f.min()) if f.numel() else None,
      "max": float(f.max()) if f.numel() else None,
      "mean": float(f.mean()) if f.numel() else None,
      "rms": float(f.pow(2).mean().sqrt()) if f.numel() else None,
  }


def _record(name: str, shape, rank: int, target_shape, orientation: str, st: dict[str, Any]) -> dict[str, Any]:
  return {
      "name": name,
      "safe_name": _safe(name),
      "shape": list(shape),
      "rank": rank,
      "target_shape": list(target_shape),
      "layout": "torch_v",
      "orientation": orientation,
      "stages": {
          s: {
              "sha256": _torch_sha(st[s]),
              "dtype": str(st[s].dtype).replace("torch.", ""),
              "shape": list(st[s].shape),
              "stats": _torch_stats(st[s]),
          }
          for s in STAGE_NAMES
      },
      "final_bf16_sha256": _torch_sha(st["final_bf16"]),
  }


def _backend() -> dict[str, Any]:
  return torch_backend()


def self_consistency(components: dict[str, tuple[Any, Any, Any]], offsets: dict[str, Any]) -> dict[str, Any]:
  """torch against itself: the formula at 1 thread vs the default thread count."""
  import torch

  default = torch.get_num_threads()
  finals = {n: torch_formula(*components[n], offsets[n])["final_bf16"] for n in components}
  torch.set_num_threads(1)
  try:
    single = {n: torch_formula(*components[n], offsets[n])["final_bf16"] for n in components}
  finally:
    torch.set_num_threads(default)
  differing = sum(int((finals[n].view(torch.int16) != single[n].view(torch.int16)).sum()) for n in components)
  return {
      "threads_default": default,
      "threads_other": 1,
      "n_tensors": len(components),
      "n_elements": sum(int(finals[n].numel()) for n in components),
      "bf16_elements_differing": differing,
  }


def regenerate(goldens_dir: str) -> list[str]:
  """Writes the SVF goldens under ``goldens_dir/svf`` and returns the paths written."""
  import torch

  out_dir = os.path.join(goldens_dir, "svf")
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, v) for k, v in FILES.items()}
  specs = selected_tensors()
  with torch.no_grad():
    weights, comps_mem, offs = _draw(specs)
    comps, offs_back = _write_components(paths, comps_mem, offs, specs)
    records, in_memory_equal = _write_stages(paths, specs, weights, comps, offs_back, comps_mem, offs)
    report = {
        "format": "parity_jax.svf_report/1",
        "producer": "parity_jax.oracle.svf_goldens",
        "scope": "all_selected",
        "layout": "torch_v",
        "seed": SEED,
        "model": MODEL,
        "backend": _backend(),
        "versions": package_versions(),
        "components": {"components_file": FILES["components"], "offsets_file": FILES["offsets"], "directory": "."},
        "stage_debug": {"stage_tensor_file": FILES["sample"], "all_selected_stage_tensor_file": FILES["all_selected"]},
        "baseline": "safetensors readback",
        "in_memory_matches_readback": in_memory_equal,
        "sample": records.pop(),
        "tensors": records,
        "combined_sha256": _combined((r["name"], r["final_bf16_sha256"]) for r in records),
        "torch_self_consistency": self_consistency(comps, offs_back),
    }
  write_text_atomic(paths["report"], json.dumps(report, indent=1, sort_keys=True) + "\n")
  written = [paths[k] for k in ("components", "offsets", "sample", "all_selected", "report")]
  m, n = dict((nm, sh) for nm, sh, _ in specs)[SAMPLE]
  manifest = {
      "area": "svf",
      "generator": "parity_jax.oracle.svf_goldens.regenerate",
      "regenerate": "parity-regen-goldens --goldens_dir=goldens --what=svf --overwrite",
      "seed": SEED,
      "model": MODEL,
      "weight_std": WEIGHT_STD,
      "offset_std": OFFSET_STD,
      "sample": {"source_name": SAMPLE, "target_shape": [n, m], "orientation": "transpose"},
      "selected": [{"name": nm, "shape": list(sh)} for nm, sh, _ in specs],
      "backend": _backend(),
      "versions": package_versions(),
      "files": {os.path.basename(p): {"sha256": file_sha256(p), "bytes": os.path.getsize(p)} for p in written},
  }
  mpath = os.path.join(out_dir, "MANIFEST.json")
  write_text_atomic(mpath, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
  return written + [mpath]


def _draw(specs) -> tuple[dict[str, Any], dict[str, tuple[Any, Any, Any]], dict[str, Any]]:
  """Seeded weights (the LM head tied to the embedding), their ``torch.svd`` components and seeded offsets."""
  import torch

  gen = torch.Generator().manual_seed(SEED)
  weights: dict[str, Any] = {}
  comps: dict[str, tuple[Any, Any, Any]] = {}
  offs: dict[str, Any] = {}
  for name, shape, kind in specs:
    if kind == "tied":
      w = weights["model.embed_tokens.weight"]
    else:
      w = torch.randn(shape, generator=gen, dtype=torch.float32) * WEIGHT_STD[kind]
    weights[name] = w
    u, s, v = torch.svd(w)  # legacy torch.svd: V, not Vh
    comps[name] = (u, s, v)
    offs[name] = torch.randn(s.shape[0], generator=gen, dtype=torch.float32) * OFFSET_STD
  return weights, comps, offs


def _write_components(
    paths: dict[str, str], comps_mem, offs, specs
) -> tuple[dict[str, tuple[Any, Any, Any]], dict[str, Any]]:
  """Writes the components and offsets files; returns them as read back (the Python process's baseline)."""
  import safetensors.torch

  prov = default_provenance("parity_jax.oracle.svf_goldens", seed=SEED, decomposition="torch.svd (legacy: V, not Vh)")
  comp_tensors = {}
  for name, (u, s, v) in comps_mem.items():
    comp_tensors[f"{name}.U"], comp_tensors[f"{name}.S"], comp_tensors[f"{name}.V"] = (
        to_numpy(u),
        to_numpy(s),
        to_numpy(v),
    )
  bundles.save_bundle(paths["components"], comp_tensors, prov)
  bundles.save_bundle(paths["offsets"], {n: to_numpy(o) for n, o in offs.items()}, prov)
  back = safetensors.torch.load_file(paths["components"])
  comps = {n: (back[f"{n}.U"], back[f"{n}.S"], back[f"{n}.V"]) for n, _, _ in specs}
  return comps, safetensors.torch.load_file(paths["offsets"])


def _write_stages(paths, specs, weights, comps, offs_back, comps_mem, offs) -> tuple[list[dict[str, Any]], bool]:
  """The formula's stages of every tensor (all-selected bundle) and of the sample (transposed); their records.

  Returns the per-tensor records with the sample's record last, and whether the
  in-memory components give the same final bytes as the read-back ones.
  """
  import torch

  all_stages: dict[str, np.ndarray] = {}
  records = []
  in_memory_equal = True
  for name, shape, _ in specs:
    st = torch_formula(*comps[name], offs_back[name])
    st["source_f32"] = weights[name]
    mem = torch_formula(*comps_mem[name], offs[name])
    in_memory_equal &= bool(torch.equal(mem["final_bf16"].view(torch.int16), st["final_bf16"].view(torch.int16)))
    for s in STAGE_NAMES:
      all_stages[f"tensor.{_safe(name)}.{s}"] = to_numpy(st[s])
    records.append(_record(name, shape, int(comps[name][1].shape[0]), shape, "identity", st))
  m, n = dict((nm, sh) for nm, sh, _ in specs)[SAMPLE]
  sst = torch_formula(*comps[SAMPLE], offs_back[SAMPLE], orientation="transpose")
  sst["source_f32"] = weights[SAMPLE]
  sample_record = _record(SAMPLE, (m, n), int(comps[SAMPLE][1].shape[0]), (n, m), "transpose", sst)
  sample_record["source_name"] = SAMPLE
  bundle_prov = default_provenance(
      "parity_jax.oracle.svf_goldens", seed=SEED, formula="torch float32 CPU", layout="torch_v"
  )
  bundles.save_bundle(paths["sample"], {f"stage.{s}": to_numpy(sst[s]) for s in STAGE_NAMES}, bundle_prov)
  bundles.save_bundle(paths["all_selected"], all_stages, bundle_prov)
  return records + [sample_record], in_memory_equal


# ----------------------------------------------------------------------------
# Regenerated goldens against committed ones
# ----------------------------------------------------------------------------

#: Fields of a provenance record that describe the install, not the data.
ENVIRONMENT_FIELDS = ("versions", "platform", "python", "backend")
#: Stages whose values depend on the sign/rotation gauge of U and V (compared through their product instead).
GAUGE_STAGES = ("u_scaled",)


def _strip_env(d: Any) -> Any:
  return {k: v for k, v in d.items() if k not in ENVIRONMENT_FIELDS} if isinstance(d, dict) else d


def compare_regenerated(committed_dir: str | os.PathLike, fresh_dir: str | os.PathLike) -> dict[str, Any]:
  """Compares freshly regenerated SVF goldens with committed ones, promising only what holds.

  * **Same backend** (every field of :func:`parity_jax.provenance.torch_backend`
    equal: torch build, threads, dispatch level, BLAS build, CPU vendor, model and
    SIMD flags, dispatch overrides): every tensor bit for bit and the JSON files
    equal less environment fields.
  * **Another backend**: what is invariant. The random weights and offsets and
    every float32 stage within the ``f32`` profile's rel-L2 (1e-5), except
    ``u_scaled``, whose columns carry the SVD's sign/rotation gauge; ``S`` and
    the product ``U diag(S) V^T`` within the same tolerance, never U and V bitwise;
    and every ``final_bf16`` difference explained: each side's bf16 is exactly
    the round-to-nearest-even of its own ``final_f32``, so a flip is the rounding
    of a float32 difference that is itself within tolerance.

  Returns ``{"mode": "bytes"|"invariants", "problems": [...], ...}``; no problems means reproduced.
  """
  from parity_jax import arraydiff
  from parity_jax.bundles import builtin_profile

  committed, fresh = os.fspath(committed_dir), os.fspath(fresh_dir)
  want_manifest = _read_json(os.path.join(committed, "MANIFEST.json"))
  got_manifest = _read_json(os.path.join(fresh, "MANIFEST.json"))
  same_backend = want_manifest.get("backend") == got_manifest.get("backend")
  max_rel = builtin_profile("f32").rules[-1].max_rel_l2
  problems: list[str] = []
  n_flips = 0
  if sorted(want_manifest["files"]) != sorted(got_manifest["files"]):
    problems.append(f"file lists differ: {sorted(want_manifest['files'])} vs {sorted(got_manifest['files'])}")
  for name in sorted(set(want_manifest["files"]) & set(got_manifest["files"])):
    a_path, b_path = os.path.join(committed, name), os.path.join(fresh, name)
    if name.endswith(".json"):
      if same_backend and not _json_equal_less_env(_read_json(a_path), _read_json(b_path)):
        problems.append(f"{name}: differs beyond environment fields")
      continue
    with bundles.BundleReader(a_path) as want, bundles.BundleReader(b_path) as got:
      if got.names != want.names:
        problems.append(f"{name}: tensor names or order differ")
        continue
      if _strip_env(got.provenance) != _strip_env(want.provenance):
        problems.append(f"{name}: provenance differs beyond environment fields")
      tensors = {k: (want.get(k), got.get(k)) for k in want.names}
    if same_backend:
      problems += [f"{name}: {k} not bit-identical" for k, (a, b) in tensors.items() if not arraydiff.bit_equal(a, b)]
      continue
    if name == FILES["components"]:
      problems += _compare_components(name, tensors, max_rel)
      continue
    for key, (a, b) in tensors.items():
      stage = key.rsplit(".", 1)[-1]
      if stage in GAUGE_STAGES:
        continue
      if a.shape != b.shape or a.dtype != b.dtype:
        problems.append(f"{name}: {key} is {b.dtype}{list(b.shape)}, committed {a.dtype}{list(a.shape)}")
      elif stage == "final_bf16":
        f32_key = key[: -len("final_bf16")] + "final_f32"
        flips, why = _explain_bf16(a, b, *tensors[f32_key])
        n_flips += flips
        problems += [f"{name}: {key}: {w}" for w in why]
      else:
        st = arraydiff.diff_stats(a, b, name=key)
        if not st.rel_l2 <= max_rel:
          problems.append(f"{name}: {key} rel-L2 {st.rel_l2:.3g} > {max_rel:g}")
  return {
      "mode": "bytes" if same_backend else "invariants",
      "committed_backend": want_manifest.get("backend"),
      "fresh_backend": got_manifest.get("backend"),
      "max_rel_l2": max_rel,
      "bf16_flips_explained": n_flips,
      "problems": problems,
  }


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _json_equal_less_env(a: Any, b: Any) -> bool:
  if isinstance(a, dict) and isinstance(b, dict):
    a, b = _strip_env(a), _strip_env(b)
    return a.keys() == b.keys() and all(_json_equal_less_env(a[k], b[k]) for k in a)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_json_equal_less_env(x, y) for x, y in zip(a, b))
  return a == b


def _compare_components(name: str, tensors: dict[str, tuple[np.ndarray, np.ndarray]], max_rel: float) -> list[str]:
  """S and the product U diag(S) V^T within tolerance; U and V themselves carry the gauge."""
  from parity_jax import arraydiff

  problems = []
  for key in (k for k in tensors if k.endswith(".S")):
    base = key[:-2]
    (sa, sb), (ua, ub), (va, vb) = tensors[key], tensors[base + ".U"], tensors[base + ".V"]
    st = arraydiff.diff_stats(sa, sb, name=key)
    if not st.rel_l2 <= max_rel:
      problems.append(f"{name}: {key} rel-L2 {st.rel_l2:.3g} > {max_rel:g}")
    prod = lambda u, s, v: (u.astype(np.float64) * s.astype(np.float64)) @ v.astype(np.float64).T  # noqa: E731
    st = arraydiff.diff_stats(prod(ua, sa, va), prod(ub, sb, vb), name=base)
    if not st.rel_l2 <= max_rel:
      problems.append(f"{name}: U diag(S) V^T of {base} rel-L2 {st.rel_l2:.3g} > {max_rel:g}")
  return problems


def _explain_bf16(a16: np.ndarray, b16: np.ndarray, a32: np.ndarray, b32: np.ndarray) -> tuple[int, list[str]]:
  """Counts bf16 flips and says why any is not the rounding of its own side's float32 value."""
  why = []
  for side, v16, v32 in (("committed", a16, a32), ("fresh", b16, b32)):
    if not np.array_equal(v16.view(np.uint16), v32.astype(ml_dtypes.bfloat16).view(np.uint16)):
      why.append(f"the {side} final_bf16 is not the rounding of its final_f32")
  return int(np.count_nonzero(a16.view(np.uint16) != b16.view(np.uint16))), why
