"""Long-context attention variants against HF transformers: RoPE ``linear`` / ``dynamic`` / ``yarn`` and sliding window.

Every case builds a tiny seeded HF model whose feature matters at the test's
length (original max position 16-32, window 8, sequences 2-4x that), saves it
(5.x style, or rewritten in the 4.x style of the published Qwen configs), loads
it with parity_jax and compares every stage to HF's eager forward: rel-L2 <=
1e-5 in float32 and the same top-1 token. Each case has a control: the same
checkpoint parsed with the feature turned off must miss HF by orders of
magnitude at some stage, which proves the inputs exercise the feature.

Needs torch + transformers (the [oracle] extra); skipped when either is missing.
"""

from __future__ import annotations

import copy
import math
import dataclasses
import json
import pathlib
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from parity_jax import qwen2  # noqa: E402
from parity_jax.arraydiff import diff_stats, ulp_distance  # noqa: E402
from parity_jax.oracle import forward_goldens  # noqa: E402
from parity_jax.oracle.hf_forward import hf_stages  # noqa: E402
from parity_jax.qwen2.model import dynamic_inv_freq, rope_cos_sin, rope_inv_freq_scaled  # noqa: E402

pytestmark = pytest.mark.oracle

TOL = 1e-5
CONTROL_MIN = 1e-3  # a feature turned off must miss HF by at least this much (100x the tolerance) at some stage

_SMALL = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


@dataclasses.dataclass(frozen=True)
class Case:
  model_type: str
  hf_config: dict[str, Any]  # kwargs of Qwen{2,3}Config
  seed: int
  batch: int
  seq: int
  style: str = "5.x"  # "4.x": config.json rewritten with top-level rope_theta / rope_scaling, no layer_types
  padded: bool = False
  positions_offset: int | None = None  # explicit position_ids = offset + arange(seq)


CASES = {
    "linear_qwen2": Case(
        "qwen2",
        dict(
            _SMALL,
            num_hidden_layers=2,
            max_position_embeddings=32,
            rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        ),
        seed=41001,
        batch=2,
        seq=64,
    ),
    "dynamic_qwen2": Case(
        "qwen2",
        dict(
            _SMALL,
            num_hidden_layers=2,
            max_position_embeddings=24,
            rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
        ),
        seed=41002,
        batch=2,
        seq=72,
        padded=True,
    ),
    # T = 16 fits in max_position_embeddings = 24, but the explicit positions run to 45: scaling is data-dependent.
    "dynamic_qwen3_positions": Case(
        "qwen3",
        dict(
            _SMALL,
            num_hidden_layers=2,
            head_dim=16,
            max_position_embeddings=24,
            rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 1000000.0},
        ),
        seed=41003,
        batch=1,
        seq=16,
        positions_offset=30,
    ),
    "yarn_qwen3": Case(
        "qwen3",
        dict(
            _SMALL,
            num_hidden_layers=2,
            head_dim=16,
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 16,
            },
        ),
        seed=41004,
        batch=2,
        seq=48,
        padded=True,
    ),
    # As the Qwen2.5 model cards say to enable YaRN: 4.x rope_scaling with "type", top-level rope_theta.
    "yarn_qwen2_4x": Case(
        "qwen2",
        dict(
            _SMALL,
            num_hidden_layers=2,
            max_position_embeddings=64,
            rope_theta=10000.0,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
        seed=41005,
        batch=1,
        seq=64,
        style="4.x",
    ),
    # 4.x style: no layer_types; transformers derives them from max_window_layers -> layer 0 full, 1 and 2 sliding.
    "sliding_qwen2_4x": Case(
        "qwen2",
        dict(
            _SMALL,
            num_hidden_layers=3,
            max_position_embeddings=64,
            rope_theta=10000.0,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        ),
        seed=41006,
        batch=3,
        seq=32,
        style="4.x",
        padded=True,
    ),
    "sliding_qwen3_layer_types": Case(
        "qwen3",
        dict(
            _SMALL,
            num_hidden_layers=3,
            head_dim=16,
            max_position_embeddings=64,
            use_sliding_window=True,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        seed=41007,
        batch=3,
        seq=32,
        padded=True,
    ),
}


def _to_4x(path: pathlib.Path, case: Case) -> None:
  """Rewrites the saved config.json as transformers 4.x wrote it (rope_theta / rope_scaling top-level, no layer_types)."""
  cfg = json.loads((path / "config.json").read_text())
  rope = cfg.pop("rope_parameters")
  cfg.pop("layer_types")
  cfg["torch_dtype"] = cfg.pop("dtype")
  cfg["rope_theta"] = rope["rope_theta"]
  cfg["rope_scaling"] = copy.deepcopy(case.hf_config.get("rope_scaling"))
  cfg["sliding_window"] = case.hf_config.get("sliding_window", 4096)
  cfg["transformers_version"] = "4.43.1"
  (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _feature_off(raw: dict[str, Any]) -> dict[str, Any]:
  """The same config.json with the long-context feature removed (default RoPE, no window)."""
  off = dict(raw)
  if off.get("rope_scaling"):
    off["rope_scaling"] = None
  if "rope_parameters" in off:
    off["rope_parameters"] = {"rope_type": "default", "rope_theta": off["rope_parameters"]["rope_theta"]}
  if off.get("use_sliding_window"):
    off["use_sliding_window"] = False
    off.pop("layer_types", None)
  return off


def _inputs(case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  rng = np.random.default_rng(case.seed + 1)
  tokens = rng.integers(1, case.hf_config["vocab_size"], (case.batch, case.seq))
  mask = None
  if case.padded:
    mask = np.ones(tokens.shape, np.int64)
    mask[0, :5] = 0  # left padding
    if case.batch > 1:
      mask[1, case.seq - 7 :] = 0  # right padding
    tokens = np.where(mask == 1, tokens, 0)
  positions = None
  if case.positions_offset is not None:
    positions = case.positions_offset + np.arange(case.seq)[None, :]
  return tokens, mask, positions


@pytest.fixture(scope="module")
def case_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("longctx")
  cache: dict[str, pathlib.Path] = {}

  def get(name: str) -> pathlib.Path:
    if name not in cache:
      case = CASES[name]
      # deep copy: transformers standardises the rope dict it is given in place (adds rope_type, rope_theta)
      model = forward_goldens.build_model(case.model_type, copy.deepcopy(case.hf_config), case.seed)
      model.save_pretrained(root / name)
      if case.style == "4.x":
        _to_4x(root / name, case)
      cache[name] = root / name
    return cache[name]

  return get


def _worst(ref, got) -> tuple[float, str]:
  worst, where = 0.0, ""
  for name in ref:
    r = diff_stats(ref[name], np.asarray(got[name]), name=name).rel_l2
    if not r <= worst:  # NaN counts as worst
      worst, where = r, name
  return worst, where


def _run(model: qwen2.Model, tokens, mask, positions):
  _, got = qwen2.forward(model, tokens, attention_mask=mask, positions=positions, capture=True)
  return got


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_stage_matches_hf_and_turning_the_feature_off_fails(case_dirs, name):
  case = CASES[name]
  path = case_dirs(name)
  raw = json.loads((path / "config.json").read_text())
  model = qwen2.load(path)
  cfg = model.config
  tag = f"[{name} seed={case.seed}]"
  if case.style == "4.x":
    assert "rope_parameters" not in raw and "layer_types" not in raw and "rope_theta" in raw, (tag, raw)
    assert raw["rope_scaling"] == case.hf_config.get("rope_scaling"), (tag, raw)  # as written, e.g. the model card's
  if "sliding" in name:
    assert cfg.sliding_window == 8 and cfg.sliding_layers in ((1, 2), (0, 2)) and cfg.rope_scaling is None, (tag, cfg)
  else:
    assert cfg.rope_scaling is not None and cfg.sliding_layers == (), (tag, cfg)
  tokens, mask, positions = _inputs(case)

  ref = hf_stages(path, tokens, mask, position_ids=positions)  # loads a fresh HF model (dynamic RoPE keeps state)
  got = _run(model, tokens, mask, positions)
  assert list(ref) == list(got), tag
  worst, where = _worst(ref, got)
  print(f"{tag} worst rel-L2 vs HF {worst:.3g} at {where}")
  assert worst <= TOL, f"{tag} worst rel-L2 {worst:.3g} at {where} > {TOL}"
  assert np.array_equal(np.argmax(ref["logits"], -1), np.argmax(np.asarray(got["logits"]), -1)), tag

  off = qwen2.Model(qwen2.parse_config(_feature_off(raw), source="off"), model.params)
  assert off.config.rope_scaling is None and off.config.sliding_layers == (), (tag, off.config)
  control, where = _worst(ref, _run(off, tokens, mask, positions))
  print(f"{tag} control (feature off) worst rel-L2 vs HF {control:.3g} at {where}")
  assert (
      control > CONTROL_MIN
  ), f"{tag} the feature does not change the numbers at this length: {control:.3g} at {where}"


def test_dynamic_rope_is_data_dependent_inside_one_jit(case_dirs):
  """One compiled forward, two position sets: unscaled below max_position_embeddings, scaled above, both as HF."""
  name = "dynamic_qwen3_positions"
  case, path = CASES[name], case_dirs(name)
  model = qwen2.load(path)
  tokens, _, _ = _inputs(case)
  fwd = jax.jit(lambda m, tok, pos: qwen2.forward(m, tok, positions=pos, capture=True)[1])
  for offset in (0, 8, 9, case.positions_offset):  # L = 16, 24 (= max_position_embeddings), 25, 46
    positions = jnp.asarray(offset + np.arange(case.seq)[None, :], jnp.int32)
    ref = hf_stages(path, tokens, position_ids=np.asarray(positions))
    worst, where = _worst(ref, fwd(model, jnp.asarray(tokens), positions))
    assert worst <= TOL, f"[{name} seed={case.seed} offset={offset}] worst rel-L2 {worst:.3g} at {where}"
  assert fwd._cache_size() == 1  # the positions' values never reached the host


# --- RoPE tables against transformers' own functions (no model) ---------------------------------------------------


def _hf_config(head_dim: int, rope_parameters: dict[str, Any], mpe: int):
  return transformers.Qwen2Config(
      hidden_size=head_dim * 2,
      num_attention_heads=2,
      num_key_value_heads=1,
      num_hidden_layers=1,
      vocab_size=8,
      intermediate_size=8,
      max_position_embeddings=mpe,
      rope_parameters=dict(rope_parameters),
  )


def _ours(head_dim: int, rope_parameters: dict[str, Any], mpe: int):
  cfg = qwen2.parse_config(
      {
          "model_type": "qwen2",
          "vocab_size": 8,
          "hidden_size": head_dim * 2,
          "intermediate_size": 8,
          "num_hidden_layers": 1,
          "num_attention_heads": 2,
          "num_key_value_heads": 1,
          "max_position_embeddings": mpe,
          "rope_parameters": dict(rope_parameters),
      }
  )
  return cfg


ROPE_GRID = [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "linear", "factor": 3.3},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.5},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 16,
        "beta_slow": 2,
        "truncate": False,
    },
    {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
    },
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "attention_factor": 0.9},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32},  # factor from the ratio
    {"rope_type": "yarn", "factor": 4.0},  # original_max_position_embeddings from max_position_embeddings
]


@pytest.mark.parametrize("k", range(len(ROPE_GRID)))
def test_scaled_inv_freq_and_attention_factor_match_hf(k):
  """Host tables: attention factor identical; inv_freq within 2 ulp (the pow note of rope_inv_freq), mostly identical."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  total = same = 0
  for head_dim in (8, 16, 64, 128):
    for theta in (10000.0, 1000000.0):
      params = dict(ROPE_GRID[k], rope_theta=theta)
      mpe = 128
      hf_inv, hf_af = ROPE_INIT_FUNCTIONS[params["rope_type"]](_hf_config(head_dim, params, mpe))
      cfg = _ours(head_dim, params, mpe)
      ours, af = rope_inv_freq_scaled(head_dim, cfg.rope_theta, cfg.rope_scaling)
      assert af == hf_af, (params, af, hf_af)
      hf_inv = hf_inv.numpy()
      assert ours.dtype == hf_inv.dtype == np.float32 and ours.shape == hf_inv.shape
      assert int(ulp_distance(hf_inv, ours).max()) <= 2, (params, head_dim)
      total += ours.size
      same += int((ours.view(np.uint32) == hf_inv.view(np.uint32)).sum())
  assert same >= 0.9 * total, (ROPE_GRID[k], same, total)


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_high_correction_bound_clipped_to_dim_minus_one(truncate):
  """A YaRN range whose high bound exceeds head_dim - 1 (small theta, long original context): HF clips it there.

  Precondition computed here from YaRN's formula: the unclipped bound lies above dim - 1 while the low bound lies
  inside the ramp, so the clip changes the ramp's slope (a port that skips or moves it differs in inv_freq).
  """
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  head_dim, theta, omp = 16, 50.0, 11000
  params = {
      "rope_type": "yarn",
      "factor": 4.0,
      "original_max_position_embeddings": omp,
      "beta_fast": 64,
      "beta_slow": 1,
      "truncate": truncate,
      "rope_theta": theta,
  }
  high = head_dim * math.log(omp / (1 * 2 * math.pi)) / (2 * math.log(theta))
  low = head_dim * math.log(omp / (64 * 2 * math.pi)) / (2 * math.log(theta))
  assert high > head_dim - 1 and 0 < low < head_dim // 2 - 1, (low, high)
  hf_inv, _ = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(head_dim, params, 4 * omp))
  cfg = _ours(head_dim, params, 4 * omp)
  ours, _ = rope_inv_freq_scaled(head_dim, cfg.rope_theta, cfg.rope_scaling)
  assert int(ulp_distance(hf_inv.numpy(), ours).max()) <= 2


def test_dynamic_inv_freq_matches_hf_runtime_recompute():
  """The in-jit recompute against ``_compute_dynamic_ntk_parameters(seq_len=tensor)``: within 4 ulp, ~85% identical."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  total = same = 0
  for head_dim in (16, 64):
    for theta, factor, mpe in ((10000.0, 4.0, 32), (1000000.0, 2.5, 24)):
      params = {"rope_type": "dynamic", "factor": factor, "rope_theta": theta}
      hf_cfg = _hf_config(head_dim, params, mpe)
      fn = jax.jit(lambda s: dynamic_inv_freq(s, head_dim, theta, factor, mpe))
      for seq_len in range(mpe + 1, 6 * mpe, 3):
        hf, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, None, seq_len=torch.tensor(seq_len))
        ours = np.asarray(fn(jnp.int32(seq_len)))
        assert int(ulp_distance(hf.numpy(), ours).max()) <= 4, (head_dim, theta, factor, seq_len)
        total += ours.size
        same += int((ours.view(np.uint32) == hf.numpy().view(np.uint32)).sum())
  assert same >= 0.8 * total, (same, total)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_cos_sin_match_a_fresh_hf_rotary_embedding(rope_type):
  """cos/sin (incl. yarn's attention factor and dynamic's max(position_ids)+1 rule) against Qwen2RotaryEmbedding."""
  from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

  head_dim, mpe = 32, 32
  params = {
      "linear": {"rope_type": "linear", "factor": 4.0},
      "dynamic": {"rope_type": "dynamic", "factor": 4.0},
      "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
  }[rope_type]
  params = dict(params, rope_theta=10000.0)
  cfg = _ours(head_dim, params, mpe)
  fn = jax.jit(lambda pos: rope_cos_sin(pos, head_dim, cfg.rope_theta, jnp.float32, cfg.rope_scaling))
  for positions in (np.arange(20)[None], np.arange(96)[None], np.stack([np.arange(40), np.arange(40) + 7])):
    emb = Qwen2RotaryEmbedding(_hf_config(head_dim, params, mpe))  # fresh: dynamic RoPE keeps grown frequencies
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions))
    ours_cos, ours_sin = fn(jnp.asarray(positions, jnp.int32))
    for a, b in ((cos.numpy(), ours_cos), (sin.numpy(), ours_sin)):
      d = diff_stats(a, np.asarray(b))
      assert d.rel_l2 <= 1e-6, (rope_type, positions.shape, d.summary())


# --- Config rules against transformers' own config classes --------------------------------------------------------

SLIDING_GRID = [
    dict(use_sliding_window=True, sliding_window=8, max_window_layers=2),
    dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
    dict(use_sliding_window=True, sliding_window=8, max_window_layers=28),
    dict(use_sliding_window=True, sliding_window=8),  # max_window_layers default 28
    dict(use_sliding_window=True),  # sliding_window default 4096
    dict(use_sliding_window=True, sliding_window=None, max_window_layers=1),
    dict(use_sliding_window=False, sliding_window=8, max_window_layers=1),
    dict(use_sliding_window=True, sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2),
    dict(use_sliding_window=True, sliding_window=16, max_window_layers=3, layer_types=["full_attention"] * 4),
    dict(use_sliding_window=True, sliding_window=16, layer_types=["attention", "sliding_attention"] * 2),  # legacy name
    dict(sliding_window=16, max_window_layers=1),  # use_sliding_window default false
]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("k", range(len(SLIDING_GRID)))
def test_sliding_layers_are_the_ones_transformers_picks(model_type, k):
  over = SLIDING_GRID[k]
  base = dict(
      model_type=model_type,
      vocab_size=8,
      hidden_size=32,
      intermediate_size=8,
      num_hidden_layers=4,
      num_attention_heads=2,
      num_key_value_heads=1,
      rope_theta=10000.0,
      **over,
  )
  hf = transformers.AutoConfig.for_model(**base)
  hf_sliding = tuple(i for i, t in enumerate(hf.layer_types) if t == "sliding_attention")
  cfg = qwen2.parse_config(base)
  assert cfg.sliding_layers == hf_sliding, (over, hf.layer_types)
  if hf_sliding:
    assert cfg.sliding_window == hf.sliding_window, over
