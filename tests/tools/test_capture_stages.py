"""tools.capture_stages through real subprocess calls: a good run, and one-line exit-2 errors for bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from parity_jax import qwen2
from parity_jax.bundles import load_bundle
from parity_jax.bundles.qwen_graph import qwen_stage_names
from parity_jax.arraydiff import bit_equal
from tests.helpers.qwen import MODELS, ROOT
from tests.helpers.tools import run_many


def _run(*args):
  return subprocess.run(
      [sys.executable, "-m", "tools.capture_stages", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
  )


def test_capture_writes_bundle_matching_in_process_forward(tmp_path):
  out = tmp_path / "b.safetensors"
  r = _run(
      f"--model_dir={MODELS / 'qwen2_tied'}",
      "--tokens=0,0,5,6;7,8,9,10",
      "--attention_mask=0,0,1,1;1,1,1,1",
      f"--out={out}",
  )
  assert r.returncode == 0, r.stderr
  assert r.stderr.strip() == ""
  assert r.stdout.strip() == f"wrote {out}: model qwen2_tied (qwen2), float32, tokens of shape [2, 4]"  # a shape
  bundle = load_bundle(out)
  prov = bundle.provenance
  assert prov["model"] == "qwen2_tied" and prov["dtype"] == "float32" and prov["model_type"] == "qwen2"
  assert prov["inputs"] == {"tokens": [[0, 0, 5, 6], [7, 8, 9, 10]], "attention_mask": [[0, 0, 1, 1], [1, 1, 1, 1]]}
  assert os.path.samefile(prov["model_dir"], MODELS / "qwen2_tied")
  assert bundle.names == qwen_stage_names(2, qk_norm=False)
  # Same code in this process gives the same bytes: determinism across processes.
  model = qwen2.load(MODELS / "qwen2_tied")
  _, stages = qwen2.forward(
      model,
      np.array([[0, 0, 5, 6], [7, 8, 9, 10]]),
      attention_mask=np.array([[0, 0, 1, 1], [1, 1, 1, 1]]),
      capture=True,
  )
  assert all(bit_equal(np.asarray(stages[n]), bundle[n]) for n in bundle)


def test_capture_bfloat16(tmp_path):
  out = tmp_path / "b16.safetensors"
  r = _run(f"--model_dir={MODELS / 'qwen3'}", "--tokens=1,2,3", "--dtype=bfloat16", f"--out={out}")
  assert r.returncode == 0, r.stderr
  bundle = load_bundle(out)
  assert bundle.provenance["dtype"] == "bfloat16" and bundle["logits"].dtype.name == "bfloat16"
  assert "layers.1.q_norm" in bundle.names


@pytest.fixture(scope="module")
def unsupported_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("unsupported") / "m"
  shutil.copytree(MODELS / "qwen2_gqa_bias", d)
  cfg = json.loads((d / "config.json").read_text())
  cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "longrope", "factor": 4.0}
  (d / "config.json").write_text(json.dumps(cfg))
  return d


BAD = {
    "missing_dir": (["--model_dir={tmp}/nope", "--tokens=1,2"], "no such checkpoint directory"),
    "unsupported": (["--model_dir={unsupported}", "--tokens=1,2"], "rope_type='longrope' is not implemented"),
    "out_of_range": (["--model_dir={model}", "--tokens=1,2,384"], r"token ids must lie in \[0, 384\)"),
    "negative": (["--model_dir={model}", "--tokens=1,-2"], r"token ids must lie in \[0, 384\)"),
    "malformed": (["--model_dir={model}", "--tokens=1,x,3"], "non-integer"),
    "empty_field": (["--model_dir={model}", "--tokens=1,,3"], "non-integer"),
    "ragged": (["--model_dir={model}", "--tokens=1,2,3;4,5"], "different lengths"),
    "mask_shape": (
        ["--model_dir={model}", "--tokens=1,2,3", "--attention_mask=1,1"],
        "attention_mask must have the tokens' shape",
    ),
    "mask_values": (["--model_dir={model}", "--tokens=1,2,3", "--attention_mask=1,2,1"], "only 0 and 1"),
    "no_tokens": (["--model_dir={model}"], "missing required flag --tokens"),
    "bad_dtype": (["--model_dir={model}", "--tokens=1", "--dtype=float16"], "dtype"),
    "out_dir_missing": (["--model_dir={model}", "--tokens=1", "--out={tmp}/no/such/b.safetensors"], "does not exist"),
    "out_in_model_dir": (
        ["--model_dir={model}", "--tokens=1", "--out={model}/b.safetensors"],
        "would overwrite or lie inside an input",
    ),
    "stray_arg": (["--model_dir={model}", "--tokens=1", "extra"], "unexpected positional"),
    "shard_rules_without_mesh": (
        ["--model_dir={model}", "--tokens=1", "--out={tmp}/b.safetensors", "--shard_rules=heads=tp"],
        "--shard_rules needs --mesh",
    ),
    "shard_rules_malformed": (
        ["--model_dir={model}", "--tokens=1", "--out={tmp}/b.safetensors", "--mesh=tp:1", "--shard_rules=heads"],
        "is not logical_axis=mesh_axis",
    ),
    "shard_rules_twice": (
        [
            "--model_dir={model}",
            "--tokens=1",
            "--out={tmp}/b.safetensors",
            "--mesh=tp:1",
            "--shard_rules=batch=dp,batch=x",
        ],
        "logical axis 'batch' given twice",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, unsupported_dir):
  """Every BAD case through the tool in one process (tests.helpers.tools.run_many): case -> (result, its tmp dir)."""
  argvs, dirs = [], {}
  for case in sorted(BAD):
    tmp = tmp_path_factory.mktemp(case)
    args = [a.format(tmp=tmp, unsupported=unsupported_dir, model=MODELS / "qwen2_gqa_bias") for a in BAD[case][0]]
    if not any(a.startswith("--out=") for a in args):
      args.append(f"--out={tmp / 'b.safetensors'}")
    argvs.append(args)
    dirs[case] = tmp
  before = sorted(os.listdir(MODELS / "qwen2_gqa_bias"))
  results = run_many("capture_stages", argvs)
  assert sorted(os.listdir(MODELS / "qwen2_gqa_bias")) == before
  return {case: (r, dirs[case]) for case, r in zip(sorted(BAD), results)}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(bad_runs, case):
  import re

  r, tmp = bad_runs[case]
  assert r.returncode == 2, (r.returncode, r.stderr)
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr, r.stderr
  assert re.search(BAD[case][1], lines[0]), lines[0]
  assert not (tmp / "b.safetensors").exists()
