"""The checkpoint tools with Hugging Face safetensors sides: exit codes, named failures, one-line errors.

The HF side is a tunix fixture written by transformers (tests/data/conversions/tunix); the migrated HF
sides are written by the hand-written safetensors writer (tests.helpers.safetensors_files).
"""

from __future__ import annotations

import json
import os
import re

import pytest

from parity_jax.checkpoint import open_checkpoint, restore_leaves
from tests.helpers import fused as FU
from tests.helpers import safetensors_files as W
from tests.helpers.conversion_specs import tunix_rules
from tests.helpers.tools import one_line_error, run_many

HF = os.path.join(os.path.dirname(__file__), "..", "data", "conversions", "tunix", "qwen3_moe_f32_sharded", "hf")
SPEC = {
    "rules": [
        {"match": r"model\.layers\.(\d+)\.(.*)", "to": r"layers.\1.\2"},
        {"match": r"(?!model\.layers\.)(?:model\.)?(.*)", "to": r"\1"},
    ]
}
SPEC_ORBAX = {
    "rules": [
        {"match": r"model\.layers\.(\d+)\.(.*)", "to": r"layers/\1/\2"},
        {"match": r"(?!model\.layers\.)(?:model\.)?(.*)", "to": r"\1"},
    ]
}


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
  root = tmp_path_factory.mktemp("conv_tools")
  src = open_checkpoint(HF)
  renamed = {}
  for name, m in src.leaves.items():
    a = src.read_whole(m)
    new = name.replace("model.layers.", "layers.", 1) if name.startswith("model.layers.") else name
    renamed[new.removeprefix("model.")] = a
  good = root / "good"
  good.mkdir()
  W.write_file(good / "model.safetensors", renamed)
  swapped = dict(renamed)
  e0, e1 = "layers.1.mlp.experts.0.up_proj.weight", "layers.1.mlp.experts.1.up_proj.weight"
  if e0 in swapped:
    swapped[e0], swapped[e1] = swapped[e1], swapped[e0]
  else:  # fused experts: swap the first two along the expert axis
    key = next(k for k in swapped if k.startswith("layers.1.mlp.experts.") and swapped[k].ndim == 3)
    e0 = e1 = key
    swapped[key] = swapped[key][[1, 0] + list(range(2, swapped[key].shape[0]))]
  bad = root / "swapped"
  bad.mkdir()
  W.write_file(bad / "model.safetensors", swapped)
  odd = root / "odd"
  odd.mkdir()
  W.write_file(odd / "weights.safetensors", renamed)
  garbage = root / "garbage"
  garbage.mkdir()
  (garbage / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
  (root / "nothing").mkdir()
  spec = root / "spec.json"
  spec.write_text(json.dumps(SPEC))
  spec_orbax = root / "spec_orbax.json"
  spec_orbax.write_text(json.dumps(SPEC_ORBAX))
  # hf -> tunix (tunix's own key map) against tunix's own conversion with one expert pair swapped
  with open(os.path.join(HF, "..", "expected.json")) as f:
    rules = tunix_rules(json.load(f)["tunix_key_map"])
  tunix = root / "tunix_spec.json"
  tunix.write_text(json.dumps({"rules": rules}))
  ck = open_checkpoint(os.path.join(HF, "..", "tunix_default"))
  tree = dict(restore_leaves(ck, sorted(ck.leaves)))
  tree["layers/0/mlp/down_proj"] = tree["layers/0/mlp/down_proj"][[0, 1, 3, 2]]
  (root / "tunix_bad").mkdir()
  W.write_file(root / "tunix_bad" / "model.safetensors", tree)
  for r in rules:  # two spec mistakes: a permutation of the wrong length and a stack with a missing member
    if r["match"] == re.escape("model.layers.0.self_attn.o_proj.weight"):
      r["ops"] = [{"transpose": [0]}] + r["ops"][1:]
  rules = [r for r in rules if r["match"] != re.escape("model.layers.1.mlp.experts.1.up_proj.weight")]
  rules.append({"match": re.escape("model.layers.1.mlp.experts.1.up_proj.weight"), "to": "x", "drop": True})
  broken = root / "tunix_broken_spec.json"
  broken.write_text(json.dumps({"rules": rules}))
  return dict(
      root=root,
      good=good,
      bad=bad,
      odd=odd,
      garbage=garbage,
      spec=spec,
      spec_orbax=spec_orbax,
      swapped=(e0, e1),
      tunix=tunix,
      tunix_bad=root / "tunix_bad",
      broken=broken,
  )


def test_verify_and_migrate_tools_with_hf_sides(sides):
  root, spec = sides["root"], sides["spec"]
  out = root / "orbax"
  (m,) = run_many("migrate_checkpoint", [[f"--source={HF}", f"--dest={out}", f"--spec={sides['spec_orbax']}"]])
  assert m.returncode == 0, m.stderr
  v = run_many(
      "verify_migration",
      [
          [f"--source={HF}", f"--migrated={sides['good']}", f"--spec={spec}"],
          [f"--source={HF}", f"--migrated={sides['bad']}", f"--spec={spec}", f"--report={root / 'bad.json'}"],
          [f"--source={HF}", f"--migrated={out}", f"--spec={sides['spec_orbax']}"],
          [f"--source={HF}", f"--migrated={sides['odd']}", f"--spec={spec}"],
          [f"--source={HF}", f"--migrated={sides['garbage']}", f"--spec={spec}"],
          [f"--source={root / 'nothing'}", f"--migrated={sides['good']}", f"--spec={spec}"],
          [f"--source={HF}", f"--migrated={os.path.join(HF, '..', 'tunix_default')}", f"--spec={sides['tunix']}"],
          [f"--source={HF}", f"--migrated={sides['tunix_bad']}", f"--spec={sides['tunix']}"],
          [
              f"--source={HF}",
              f"--migrated={sides['tunix_bad']}",
              f"--spec={sides['broken']}",
              f"--spec_errors={root / 'e.json'}",
          ],
      ],
  )
  assert v[0].returncode == 0 and v[0].stdout.splitlines()[-1] == "VERDICT: PASS", v[0].stdout + v[0].stderr
  assert v[1].returncode == 1, v[1].stdout + v[1].stderr
  report = json.loads((root / "bad.json").read_text())
  failed = sorted(r["migrated_path"] for r in report["leaves"] if r["status"] != "PASS")
  assert failed == sorted(set(sides["swapped"])), failed
  assert all(f in v[1].stdout for f in failed)
  assert v[2].returncode == 0, v[2].stdout + v[2].stderr
  one_line_error(v[3], "neither model.safetensors nor model.safetensors.index.json")
  one_line_error(v[4], "header is not valid JSON")
  one_line_error(v[5], "HF safetensors dirs")
  assert not os.path.exists(root / "good" / "bad.json")
  assert v[6].returncode == 0 and v[6].stdout.splitlines()[-1] == "VERDICT: PASS", v[6].stdout + v[6].stderr
  assert v[7].returncode == 1 and "layers/0/mlp/down_proj" in v[7].stdout, v[7].stdout + v[7].stderr
  assert "model.layers.0.mlp.experts.2.down_proj.weight" in v[7].stdout  # the source of the first difference
  line = one_line_error(v[8], "2 problems")
  problems = json.loads((root / "e.json").read_text())["problems"]
  assert len(problems) == 2 and "is not a permutation" in problems[0] + problems[1], problems
  assert any("missing member(s) at [1]" in p and "layers/1/mlp/up_proj" in p for p in problems), problems
  assert "e.json" in line


def test_preset_flags_on_both_tools(tmp_path):
  tunix = os.path.join(HF, "..", "tunix_default")
  t = FU.separate()  # concat rules through --spec, --print_spec, then the printed spec (tests/helpers/fused.py)
  src, fused = FU.write(tmp_path / "src", t), FU.write(tmp_path / "fused", FU.fused(t))
  (tmp_path / "concat.json").write_text(json.dumps({"rules": FU.CONCAT_RULES}))
  bad_rules = json.loads(json.dumps(FU.CONCAT_RULES))
  bad_rules[0]["concat"]["order"] = ["q", "k"]  # v is no part
  bad_rules[1]["concat"]["axis"] = 0  # the stack's axis
  (tmp_path / "bad.json").write_text(json.dumps({"rules": bad_rules}))
  q2moe = tmp_path / "q2moe"  # a Qwen2-MoE config.json: MaxText maps no such model
  q2moe.mkdir()
  with open(os.path.join(HF, "config.json")) as f:
    (q2moe / "config.json").write_text(json.dumps({**json.load(f), "model_type": "qwen2_moe"}))
  v = run_many(
      "verify_migration",
      [
          ["--list_presets"],
          [f"--source={HF}", f"--migrated={tunix}", "--preset=hf-to-tunix"],
          [f"--source={HF}", "--preset=hf-to-tunix", f"--print_spec={tmp_path / 'tunix.json'}"],
          [f"--source={HF}", f"--migrated={tunix}", f"--spec={tmp_path / 'tunix.json'}"],
          [f"--source={HF}", f"--migrated={tunix}", "--preset=hf-to-tunix", f"--spec={tmp_path / 'tunix.json'}"],
          [f"--source={HF}", f"--migrated={tunix}", "--preset=hf-to-flax"],
          [f"--source={HF}", "--preset=hf-to-tunix", f"--print_spec={os.path.join(HF, 'spec.json')}"],
          [f"--source={tunix}", f"--migrated={HF}", "--preset=tunix-to-hf"],  # config.json: the HF side's
          [f"--source={tunix}", "--preset=tunix-to-hf", f"--print_spec={tmp_path / 'back.json'}"],
          [f"--source={src}", f"--spec={tmp_path / 'concat.json'}", f"--print_spec={tmp_path / 'printed.json'}"],
          [f"--source={src}", f"--migrated={fused}", f"--spec={tmp_path / 'printed.json'}"],
          [
              f"--source={src}",
              f"--migrated={fused}",
              f"--spec={tmp_path / 'bad.json'}",
              f"--spec_errors={tmp_path / 'e.json'}",
          ],
          [f"--source={q2moe}", "--preset=hf-to-maxtext-scanned", f"--print_spec={tmp_path / 'q2.json'}"],
      ],
  )
  assert v[0].returncode == 0 and [line.split()[0] for line in v[0].stdout.splitlines()] == [
      "hf-to-maxtext",
      "hf-to-maxtext-scanned",
      "hf-to-tunix",
      "maxtext-scanned-to-hf",
      "maxtext-to-hf",
      "tunix-to-hf",
  ]
  assert v[1].returncode == 0 and v[1].stdout.splitlines()[-1] == "VERDICT: PASS", v[1].stdout + v[1].stderr
  assert v[2].returncode == 0 and "rules" in json.loads((tmp_path / "tunix.json").read_text())
  assert v[3].returncode == 0, v[3].stdout + v[3].stderr  # the printed spec, used as --spec, verifies the same
  one_line_error(v[4], "give --spec or --preset, not both")
  one_line_error(v[5], "unknown preset 'hf-to-flax'")
  one_line_error(v[6], "--print_spec")
  assert not os.path.exists(os.path.join(HF, "spec.json"))
  assert v[7].returncode == 0 and v[7].stdout.splitlines()[-1] == "VERDICT: PASS", v[7].stdout + v[7].stderr
  one_line_error(v[8], "give hf_config (--hf_config)")
  assert v[9].returncode == 0 and json.loads((tmp_path / "printed.json").read_text())["rules"][0]["concat"] == {
      "axis": 1,
      "index": r"\2",
      "order": ["q", "k", "v"],
  }
  assert v[10].returncode == 0 and v[10].stdout.splitlines()[-1] == "VERDICT: PASS", v[10].stdout + v[10].stderr
  one_line_error(v[11], "3 problems")  # each layer's v leaf is in no part, and the concat axis is the stack's
  problems = json.loads((tmp_path / "e.json").read_text())["problems"]
  assert sum("'v' is not one of the concat order ['q', 'k']" in p for p in problems) == 2, problems
  assert any("concat axis 0 of 'mlp/gate_up' is a stack axis" in p for p in problems), problems
  one_line_error(v[12], "preset hf-to-maxtext-scanned has no qwen2_moe layout")
  assert not os.path.exists(tmp_path / "q2.json")


def test_migrate_tool_performs_presets_both_ways_and_the_results_verify(tmp_path):
  """HF -> tunix with --preset: tunix's own conversion bit for bit (its committed checkpoint), both layouts; and
  tunix -> HF with --preset=tunix-to-hf: the original HF tensors bit for bit, in shards, with config.json. One
  migrate_checkpoint process and one verify_migration process for all the runs."""
  std, v1 = tmp_path / "std", tmp_path / "v1"
  tunix = os.path.join(HF, "..", "tunix_default")
  out = tmp_path / "hf"
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  args = ["--preset=tunix-to-hf", f"--hf_config={os.path.join(HF, 'config.json')}"]
  m = run_many(
      "migrate_checkpoint",
      [
          [f"--source={HF}", f"--dest={std}", "--preset=hf-to-tunix", "--chunk_mb=0.01"],
          [f"--source={HF}", f"--dest={v1}", "--preset=hf-to-tunix", "--layout=v1"],
          [f"--source={HF}", f"--dest={tmp_path / 'bad'}", "--preset=hf-to-tunix", "--layout=flat"],
          ["--list_presets"],
          [f"--source={tunix}", f"--dest={out}", "--max_shard_mb=0.1", *args],
          [f"--source={tunix}", f"--dest={tmp_path / 'one'}", *args],  # default shard size: one file, no index
          [f"--source={tunix}", f"--dest={tmp_path / 'taken'}", *args],
          [f"--source={tunix}", f"--dest={tmp_path / 'taken'}", "--overwrite", *args],
          [
              f"--source={tunix}",
              f"--dest={tmp_path / 'noconf'}",
              "--preset=tunix-to-hf",
              f"--hf_config={HF}",
              "--max_shard_mb=0",
          ],
      ],
  )
  assert m[0].returncode == 0 and m[1].returncode == 0, m[0].stderr + m[1].stderr
  assert "migrated 27 leaves" in m[0].stdout, m[0].stdout
  one_line_error(m[2], "--layout")
  assert not os.path.exists(tmp_path / "bad")
  assert m[3].returncode == 0 and "hf-to-tunix" in m[3].stdout
  assert os.path.isfile(std / "_METADATA") and os.path.isfile(v1 / "state" / "_METADATA")
  tck = open_checkpoint(tunix)
  want = dict(restore_leaves(tck, sorted(tck.leaves)))
  for d in (std, v1):
    ck = open_checkpoint(d)
    got = dict(restore_leaves(ck, sorted(ck.leaves)))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
      assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
  m = m[4:]
  assert m[0].returncode == 0 and m[1].returncode == 0, m[0].stderr + m[1].stderr
  one_line_error(m[2], "destination already exists")
  one_line_error(m[3], "is not an Orbax checkpoint")
  assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
  one_line_error(m[4], "max_shard_mb")
  assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]
  assert not os.path.exists(tmp_path / "noconf")
  files = sorted(os.listdir(out))
  assert "config.json" in files and "model.safetensors.index.json" in files and len(files) > 4, files
  with open(os.path.join(HF, "config.json")) as f, open(out / "config.json") as g:
    assert json.load(f) == json.load(g)
  b = open_checkpoint(HF)
  for a in (open_checkpoint(out), open_checkpoint(tmp_path / "one")):
    assert sorted(a.leaves) == sorted(b.leaves)
    for k in b.leaves:
      x, y = a.read_whole(a.leaves[k]), b.read_whole(b.leaves[k])
      assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k
  v = run_many(
      "verify_migration",
      [[f"--source={HF}", f"--migrated={d}", "--preset=hf-to-tunix"] for d in (std, v1)]
      + [[f"--source={tunix}", f"--migrated={out}", "--preset=tunix-to-hf"]],
  )
  for r in v:
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "VERDICT: PASS", r.stdout + r.stderr
