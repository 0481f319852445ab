"""Tolerance profiles for stage-bundle comparison: what counts as "within float noise".

A profile is an ordered list of rules. Each rule names the stages it covers
with a regular expression (matched against the whole stage name) and the
thresholds those stages must meet; the first rule that matches a stage wins.
Three profiles are built in:

* ``f32``   -- a float32 port against a float32 (or float64) golden. Honest
  float32 reordering noise through a small transformer stays well under
  ``rel_l2 <= 1e-5`` per stage (the forward-parity bound); logits must also
  keep every top-1 token and a tiny KL.
* ``bf16``  -- bfloat16 weights and activations against a float32 golden.
  Bounds on rel-L2 and cosine per stage and on KL / top-k overlap of the
  logits, calibrated on HF Qwen2 models run in torch bf16 against float64
  (``bench/calibrate_profiles.py``; figures in docs/benchmarks.md). bf16
  stages may be compared against f32 goldens (exact upcast, ``widen_dtypes``).
* ``exact`` -- bit-identical bytes, every stage.

A profile also carries the two numbers the bisection verdict uses
(:mod:`parity_jax.bundles.verdict`): ``jump_factor`` (a stage whose rel-L2 grows by at
least this factor over its input's is a *jump*, not drift) and
``noise_floor`` (rel-L2 below this is rounding; growth is measured from at
least this level, so rounding-level inputs never make a harmless stage look
like a jump).

Profile JSON (``--profile_json``), schema ``parity_jax.tolerance_profile/1``::

  {
    "schema": "parity_jax.tolerance_profile/1",
    "name": "my-port",                      # optional, default: the file name
    "description": "...",                   # optional
    "extends": "f32",                       # optional: built-in rules appended after ours
    "jump_factor": 10,                      # optional, > 1 (default: the extended profile's, else 10)
    "noise_floor": 1.2e-7,                  # optional, >= 0 (default: the extended profile's, else 0)
    "widen_dtypes": false,                  # optional (default: the extended profile's, else false)
    "rules": [                              # first match wins; a stage no rule matches is an error
      {"stages": "logits", "max_rel_l2": 1e-4, "max_kl": 1e-6, "min_argmax_agreement": 1.0},
      {"stages": "layers\\\\.\\\\d+\\\\.attention", "max_rel_l2": 2e-5},
      {"stages": ".*", "max_rel_l2": 1e-5}
    ]
  }

Rule keys (every threshold optional, at least one per rule): ``max_rel_l2``,
``min_cosine``, ``max_abs_diff``, ``max_ulp``, ``max_frac_diff``,
``bit_exact``; on logits-like stages (last axis = vocabulary) also
``max_kl`` (largest per-token KL(golden||candidate)), ``max_mean_kl``,
``min_argmax_agreement`` and ``min_topk_overlap`` (mean over tokens of the
top-``topk`` token-set overlap, ``topk`` default 5). All thresholds of a rule
must hold, and every bound is inclusive: a value exactly at its limit passes
(``rel_l2 == max_rel_l2``, ``cosine == min_cosine``, ``max_ulp`` ULPs). A NaN
on one side only is always a breach.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

from parity_jax.errors import UsageError

PROFILE_SCHEMA = "parity_jax.tolerance_profile/1"

__all__ = [
    "BUILTIN_PROFILES",
    "PROFILE_SCHEMA",
    "Profile",
    "ToleranceRule",
    "builtin_profile",
    "load_profile_json",
    "profile_from_dict",
    "resolve_profile",
]

# Threshold keys: (kind, bounds) for validation. kind "num" = finite float, "int", "bool".
_NUM_KEYS = {
    "max_rel_l2": (0.0, math.inf),
    "min_cosine": (-1.0, 1.0),
    "max_abs_diff": (0.0, math.inf),
    "max_frac_diff": (0.0, 1.0),
    "max_kl": (0.0, math.inf),
    "max_mean_kl": (0.0, math.inf),
    "min_argmax_agreement": (0.0, 1.0),
    "min_topk_overlap": (0.0, 1.0),
}
_INT_KEYS = {"max_ulp": (0, 2**63 - 1), "topk": (1, 1 << 20)}
_BOOL_KEYS = ("bit_exact",)
LOGITS_KEYS = ("max_kl", "max_mean_kl", "min_argmax_agreement", "min_topk_overlap")
THRESHOLD_KEYS = tuple(_NUM_KEYS) + ("max_ulp",) + _BOOL_KEYS


@dataclasses.dataclass(frozen=True)
class ToleranceRule:
  """Thresholds for the stages whose full name matches ``stages`` (a regex)."""

  stages: str
  max_rel_l2: float | None = None
  min_cosine: float | None = None
  max_abs_diff: float | None = None
  max_ulp: int | None = None
  max_frac_diff: float | None = None
  bit_exact: bool = False
  max_kl: float | None = None
  max_mean_kl: float | None = None
  min_argmax_agreement: float | None = None
  min_topk_overlap: float | None = None
  topk: int = 5

  def matches(self, stage: str) -> bool:
    return re.fullmatch(self.stages, stage) is not None

  @property
  def wants_logits_stats(self) -> bool:
    return any(getattr(self, k) is not None for k in LOGITS_KEYS)

  def to_dict(self) -> dict[str, Any]:
    """Only the keys that are set (plus ``stages``), in a stable order."""
    out: dict[str, Any] = {"stages": self.stages}
    for f in dataclasses.fields(self):
      if f.name == "stages":
        continue
      v = getattr(self, f.name)
      if f.name == "bit_exact" and not v:
        continue
      if f.name == "topk" and not self.wants_logits_stats:
        continue
      if v is not None:
        out[f.name] = v
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ToleranceRule":
    """The inverse of :meth:`to_dict` (a rule read back from a report; :func:`profile_from_dict` validates user input)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def describe(self) -> str:
    """Short human text, e.g. ``rel_l2<=1e-05, cos>=0.999``."""
    parts = []
    if self.bit_exact:
      parts.append("bit-exact")
    for key, label, op in (
        ("max_rel_l2", "rel_l2", "<="),
        ("min_cosine", "cos", ">="),
        ("max_abs_diff", "|diff|", "<="),
        ("max_ulp", "ulp", "<="),
        ("max_frac_diff", "frac", "<="),
        ("max_kl", "kl", "<="),
        ("max_mean_kl", "mean_kl", "<="),
        ("min_argmax_agreement", "argmax", ">="),
        ("min_topk_overlap", f"top{self.topk}", ">="),
    ):
      v = getattr(self, key)
      if v is not None:
        parts.append(f"{label}{op}{v:.3g}" if isinstance(v, float) else f"{label}{op}{v}")
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Profile:
  """An ordered list of rules plus the bisection parameters."""

  name: str
  rules: tuple[ToleranceRule, ...]
  jump_factor: float = 10.0
  noise_floor: float = 0.0
  widen_dtypes: bool = False
  description: str = ""

  def rule_for(self, stage: str) -> ToleranceRule:
    for rule in self.rules:
      if rule.matches(stage):
        return rule
    raise UsageError(
        f'profile {self.name!r} has no rule for stage {stage!r} (add a catch-all rule {{"stages": ".*", ...}})'
    )

  def to_dict(self) -> dict[str, Any]:
    return {
        "schema": PROFILE_SCHEMA,
        "name": self.name,
        "description": self.description,
        "jump_factor": self.jump_factor,
        "noise_floor": self.noise_floor,
        "widen_dtypes": self.widen_dtypes,
        "rules": [r.to_dict() for r in self.rules],
    }


_F32_EPS = 2.0**-23  # float32 machine epsilon: one ulp, relative
_BF16_EPS = 2.0**-7  # bfloat16 machine epsilon

BUILTIN_PROFILES: dict[str, Profile] = {
    "f32": Profile(
        name="f32",
        description="float32 port vs float32/float64 golden: per-stage rel-L2 <= 1e-5; logits keep every top-1 token",
        rules=(
            ToleranceRule(stages=r"(.*\.)?logits", max_rel_l2=1e-5, max_kl=1e-6, min_argmax_agreement=1.0),
            ToleranceRule(stages=r".*", max_rel_l2=1e-5),
        ),
        jump_factor=10.0,
        noise_floor=_F32_EPS,
    ),
    "bf16": Profile(
        name="bf16",
        description="bfloat16 weights+activations vs float32 golden: rel-L2 <= 0.1, cosine >= 0.995 per stage; logits KL and top-5 overlap",
        rules=(
            ToleranceRule(
                stages=r"(.*\.)?logits",
                max_rel_l2=0.1,
                min_cosine=0.995,
                max_kl=0.05,
                max_mean_kl=0.01,
                min_topk_overlap=0.8,
                topk=5,
            ),
            ToleranceRule(stages=r".*", max_rel_l2=0.1, min_cosine=0.995),
        ),
        jump_factor=4.0,
        noise_floor=_BF16_EPS,
        widen_dtypes=True,
    ),
    "exact": Profile(
        name="exact",
        description="bit-identical bytes in every stage",
        rules=(ToleranceRule(stages=r".*", bit_exact=True),),
        jump_factor=10.0,
        noise_floor=0.0,
    ),
}


def builtin_profile(name: str) -> Profile:
  if name not in BUILTIN_PROFILES:
    raise UsageError(f"unknown profile {name!r}; built-in profiles: {', '.join(BUILTIN_PROFILES)}")
  return BUILTIN_PROFILES[name]


def _check_number(where: str, key: str, v: Any, lo: float, hi: float) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
    raise UsageError(f"{where}.{key} must be a finite number, got {json.dumps(v)}")
  if not lo <= float(v) <= hi:
    raise UsageError(f"{where}.{key} must lie in [{lo:g}, {hi:g}], got {v}")
  return float(v)


def _check_int(where: str, key: str, v: Any, lo: int, hi: int) -> int:
  if isinstance(v, bool) or not isinstance(v, int):
    raise UsageError(f"{where}.{key} must be an integer, got {json.dumps(v)}")
  if not lo <= v <= hi:
    raise UsageError(f"{where}.{key} must lie in [{lo}, {hi}], got {v}")
  return v


def _rule_from_dict(where: str, d: Any) -> ToleranceRule:
  if not isinstance(d, Mapping):
    raise UsageError(f"{where} must be an object, got {json.dumps(d)}")
  unknown = sorted(set(d) - {"stages", *_NUM_KEYS, *_INT_KEYS, *_BOOL_KEYS})
  if unknown:
    raise UsageError(f"{where}: unknown key {unknown[0]!r} (allowed: stages, {', '.join(THRESHOLD_KEYS + ('topk',))})")
  pattern = d.get("stages")
  if not isinstance(pattern, str) or not pattern:
    raise UsageError(f"{where}.stages must be a non-empty regular expression string")
  try:
    re.compile(pattern)
  except re.error as e:
    raise UsageError(f"{where}.stages is not a valid regular expression ({e}): {pattern!r}") from None
  kw: dict[str, Any] = {"stages": pattern}
  for key, (lo, hi) in _NUM_KEYS.items():
    if key in d:
      kw[key] = _check_number(where, key, d[key], lo, hi)
  for key, (lo, hi) in _INT_KEYS.items():
    if key in d:
      kw[key] = _check_int(where, key, d[key], lo, hi)
  if "bit_exact" in d:
    if not isinstance(d["bit_exact"], bool):
      raise UsageError(f"{where}.bit_exact must be true or false, got {json.dumps(d['bit_exact'])}")
    kw["bit_exact"] = d["bit_exact"]
  if not any(k in kw and (k != "bit_exact" or kw[k]) for k in THRESHOLD_KEYS):
    raise UsageError(f"{where} sets no threshold (one of {', '.join(THRESHOLD_KEYS)})")
  if "topk" in kw and not any(k in kw for k in LOGITS_KEYS):
    raise UsageError(f"{where}.topk only makes sense with min_topk_overlap or another logits threshold")
  return ToleranceRule(**kw)


def profile_from_dict(d: Any, source: str = "profile") -> Profile:
  """Validates a profile JSON object; every problem is a one-line :class:`UsageError`."""
  if not isinstance(d, Mapping):
    raise UsageError(f"{source}: a profile must be a JSON object")
  allowed = {"schema", "name", "description", "extends", "jump_factor", "noise_floor", "widen_dtypes", "rules"}
  unknown = sorted(set(d) - allowed)
  if unknown:
    raise UsageError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
  schema = d.get("schema")
  if schema != PROFILE_SCHEMA:
    raise UsageError(f'{source}: "schema" must be {PROFILE_SCHEMA!r}, got {json.dumps(schema)}')
  base = None
  if "extends" in d:
    if d["extends"] not in BUILTIN_PROFILES:
      raise UsageError(
          f"{source}: \"extends\" must name a built-in profile ({', '.join(BUILTIN_PROFILES)}), got {json.dumps(d['extends'])}"
      )
    base = BUILTIN_PROFILES[d["extends"]]
  rules_in = d.get("rules", [])
  if not isinstance(rules_in, list):
    raise UsageError(f'{source}: "rules" must be a list')
  if not rules_in and base is None:
    raise UsageError(f'{source}: "rules" must list at least one rule (or set "extends")')
  rules = tuple(_rule_from_dict(f"{source}: rules[{i}]", r) for i, r in enumerate(rules_in))
  if base is not None:
    rules += base.rules
  name = d.get("name", os.path.basename(source))
  desc = d.get("description", "")
  for key, v in (("name", name), ("description", desc)):
    if not isinstance(v, str):
      raise UsageError(f"{source}: {key!r} must be a string")
  jump = (
      _check_number(source, "jump_factor", d["jump_factor"], 1.0, math.inf)
      if "jump_factor" in d
      else (base.jump_factor if base else 10.0)
  )
  if jump <= 1.0:
    raise UsageError(f"{source}.jump_factor must be greater than 1, got {jump}")
  floor = (
      _check_number(source, "noise_floor", d["noise_floor"], 0.0, math.inf)
      if "noise_floor" in d
      else (base.noise_floor if base else 0.0)
  )
  widen = d.get("widen_dtypes", base.widen_dtypes if base else False)
  if not isinstance(widen, bool):
    raise UsageError(f"{source}.widen_dtypes must be true or false")
  return Profile(name=name, rules=rules, jump_factor=jump, noise_floor=floor, widen_dtypes=widen, description=desc)


def load_profile_json(path: str | os.PathLike) -> Profile:
  """Reads and validates a profile JSON file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UsageError(f"no such profile file: {path}")
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f"cannot read profile {path}: {e}") from None
  except json.JSONDecodeError as e:
    raise UsageError(f"profile {path} is not valid JSON: {e}") from None
  return profile_from_dict(d, source=path)


def resolve_profile(profile: "Profile | str | Mapping[str, Any]") -> Profile:
  """A :class:`Profile` from a Profile, a built-in name, a JSON file path or a dict."""
  if isinstance(profile, Profile):
    return profile
  if isinstance(profile, Mapping):
    return profile_from_dict(profile)
  if isinstance(profile, (str, os.PathLike)):
    s = os.fspath(profile)
    if s in BUILTIN_PROFILES:
      return BUILTIN_PROFILES[s]
    if s.endswith(".json") or os.path.sep in s:
      return load_profile_json(s)
    return builtin_profile(s)
  raise UsageError(f"profile must be a Profile, a built-in name or a JSON path, got {type(profile).__name__}")
