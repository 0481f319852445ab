"""End-to-end parity of the JAX Qwen port against the HF oracle: one forward stage by stage, or a greedy decode.

Three questions, three sources of the golden:

* **is my port right?** ``forward_parity(model_dir, golden=PATH)``: our forward
  on the HF checkpoint against a golden bundle the oracle made (inputs
  recorded in its provenance); ``oracle=True`` makes the golden on the spot
  with HF transformers on the same checkpoint
  (:func:`parity_jax.oracle.hf_forward.hf_stages`);
* **is my converted checkpoint the same model?**
  ``forward_parity(converted_dir, reference_dir=ORIGINAL)``: HF runs the
  original checkpoint, our forward the converted one (read through
  :mod:`parity_jax.qwen2.sources`), so a weight lost or mangled by the
  conversion is named; with ``oracle=True`` on one directory both sides read
  the same weights and such a corruption passes, by design;
* **does it decode the same?** ``decode_parity``: our greedy
  :func:`parity_jax.qwen2.generate` against HF's ``generate`` step by step,
  the first divergent step, then the first divergent stage at that step.

The report names the first divergent stage. ``dtype="bfloat16"`` runs our
side in bf16 against the float32 golden under the ``bf16`` profile (unless a
profile is given).

**Mixtures of experts.** When a token's selected experts differ from the
golden's, :mod:`parity_jax.qwen2.routing` decides whether the flip is a tie
of the reference's router (legitimate) or a clear winner replaced (a bug),
and the candidate is replayed with the golden's choice forced at the flipped
tokens, layer by layer, so that every later stage stays comparable; the
report is the replay's, with the routing report (flip counts by kind, the
natural run's verdict) beside it. A bug flip is a failure naming
``layers.L.selected_experts`` unless an earlier stage already diverges.
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Any

import numpy as np

from parity_jax.bundles import BundleReader, BundleReport, StageBundle, compare_bundles, resolve_profile
from parity_jax.bundles.qwen_graph import qwen_stage_sort_key
from parity_jax.dtypes import compute_dtype
from parity_jax.errors import UsageError
from parity_jax.provenance import default_provenance
from parity_jax.qwen2.capture import _provenance, load_checked, model_stages
from parity_jax.qwen2.routing import RoutingReport, classify_flips, flipped_tokens, tie_tolerance
from parity_jax.report import Report

__all__ = [
    "DecodeParity",
    "ForwardParity",
    "StepRow",
    "check_real_rows",
    "decode_parity",
    "default_tokens",
    "forward_parity",
    "golden_inputs",
]

DEFAULT_PROFILE = {"float32": "f32", "bfloat16": "bf16"}


@dataclasses.dataclass
class ForwardParity(Report):
  """The comparison report plus both sides, so a notebook can dig into any stage.

  For a MoE model ``routing`` explains the routing flips (None for a dense
  model); when flips made a replay necessary, ``report`` and ``candidate``
  are the replay's and ``routing.natural`` the candidate's own run's report.
  """

  report: BundleReport
  golden: StageBundle | str  # the live oracle's bundle, or the golden file's path
  candidate: StageBundle
  tokens: np.ndarray
  attention_mask: np.ndarray | None
  routing: RoutingReport | None = None
  sharding_notes: tuple[str, ...] = ()

  @property
  def passed(self) -> bool:
    return self.report.passed and (self.routing is None or self.routing.passed)

  @property
  def first_divergent(self) -> str | None:
    """The first real divergence: the report's first divergent stage or the first bug flip, whichever comes first."""
    names = [n for n in (self.report.first_divergent, self.routing and self.routing.first_divergent_stage) if n]
    return min(names, key=qwen_stage_sort_key) if names else None

  def to_dict(self) -> dict[str, Any]:
    d = self.report.to_dict()
    if self.routing is not None:
      d["routing"] = self.routing.to_dict()
      d["passed"] = self.passed
      d["first_real_divergence"] = self.first_divergent
    return d

  def text(self, failing_only: bool = False) -> str:
    out = self.report.text(failing_only=failing_only)
    if self.routing is not None:
      out += "\n\n" + self.routing.text()
      if not self.passed:
        out += f"\nFAIL: first real divergence {self.first_divergent}"
      else:
        out += "\nPASS (every routing flip is a tie of the reference; the replay is within tolerance)"
    return out

  def _repr_html_(self) -> str:
    out = self.report._repr_html_()
    if self.routing is not None:
      out += self.routing._repr_html_()
    return out


def golden_inputs(golden: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
  """The ``tokens`` and ``attention_mask`` recorded in a golden bundle's provenance (``inputs``)."""
  with BundleReader(golden) as r:
    prov = r.provenance
  inputs = prov.get("inputs")
  if not isinstance(inputs, dict) or "tokens" not in inputs:
    raise UsageError(
        f"{golden}: the golden's provenance records no inputs.tokens; give tokens and use the live oracle instead"
    )
  try:
    tokens = np.asarray(inputs["tokens"], dtype=np.int64)
    mask = inputs.get("attention_mask")
    mask = None if mask is None else np.asarray(mask, dtype=np.int64)
  except (TypeError, ValueError):
    raise UsageError(f"{golden}: inputs in the provenance are not rectangular integer arrays") from None
  return tokens, mask, prov


def default_tokens(vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 0) -> np.ndarray:
  """The live oracle's inputs when none are given: ``batch`` rows of ``seq`` seeded random token ids."""
  return np.random.default_rng(seed).integers(0, vocab_size, (batch, seq)).astype(np.int64)


def check_real_rows(attention_mask: Any) -> None:
  """Every row of a padding mask holds a real token: an all-padding row compares nothing a model computes for use."""
  if attention_mask is None:
    return
  m = np.asarray(attention_mask)
  if m.ndim == 2:
    for b, row in enumerate(m):
      if not np.any(row != 0):
        raise UsageError(
            f"attention_mask row {b} is all padding: no real token there, so nothing to compare (drop the row)"
        )


def _live_golden(source_dir: str, tokens: Any, mask: Any, what: str) -> StageBundle:
  from parity_jax.oracle.hf_forward import hf_stages

  prov = default_provenance(
      f"parity_jax.oracle.hf_forward ({what})",
      model=os.path.basename(os.path.normpath(source_dir)),
      model_dir=os.path.abspath(source_dir),
      dtype="float32",
      inputs={
          "tokens": np.asarray(tokens).tolist(),
          "attention_mask": None if mask is None else np.asarray(mask).tolist(),
      },
  )
  return StageBundle(hf_stages(source_dir, tokens, mask), prov)


def _golden_stage(golden: StageBundle | str, name: str) -> np.ndarray:
  if isinstance(golden, StageBundle):
    return np.asarray(golden[name])
  with BundleReader(golden) as r:
    if name not in r.names:
      raise UsageError(f"{golden}: the golden has no stage {name!r} (is it from a dense model?)")
    return np.asarray(r.get(name))


def _routing_replay(
    model: Any, tokens: Any, mask: Any, golden: Any, stages: dict, profile: Any, compare: Any
) -> tuple[dict, RoutingReport]:
  """Flips classified layer by layer, each layer's flipped tokens replayed with the golden's experts forced."""
  cfg = model.config
  forced: dict[int, tuple[np.ndarray, np.ndarray]] = {}
  flips = []
  natural = None
  runs = 1
  for _ in range(len(cfg.moe_layers)):
    found = None
    for layer in cfg.moe_layers:
      name = f"layers.{layer}.selected_experts"
      g = _golden_stage(golden, name)
      if g.shape != stages[name].shape:
        return stages, RoutingReport(cfg.moe_layers, flips, runs, {k: int(w.sum()) for k, (_, w) in forced.items()})
      new = flipped_tokens(g, stages[name])
      if layer in forced:
        new &= ~forced[layer][1]
      if new.any():
        found = (layer, g, new)
        break
    if found is None:
      break
    layer, g, new = found
    rel, absolute = tie_tolerance(profile, layer)
    logits = _golden_stage(golden, f"layers.{layer}.router_logits")
    flips += classify_flips(layer, logits, g, stages[f"layers.{layer}.selected_experts"], rel, absolute, where=new)
    where = new | (forced[layer][1] if layer in forced else False)
    forced[layer] = (g.astype(np.int32), where)
    if natural is None:
      natural = compare(stages)
    # Every MoE layer in the forced dict (unforced ones with no token marked), so that every replay has the same
    # pytree structure and compiles once.
    b, t = g.shape[:2]
    nothing = (np.zeros((b, t, cfg.num_experts_per_tok), np.int32), np.zeros((b, t), bool))
    stages = model_stages(model, tokens, mask, forced_experts={k: forced.get(k, nothing) for k in cfg.moe_layers})
    runs += 1
  counts = {k: int(w.sum()) for k, (_, w) in forced.items()}
  return stages, RoutingReport(cfg.moe_layers, flips, runs, counts, natural)


def forward_parity(
    model_dir: str | os.PathLike,
    golden: str | os.PathLike | None = None,
    *,
    oracle: bool = False,
    reference_dir: str | os.PathLike | None = None,
    tokens: Any = None,
    attention_mask: Any = None,
    dtype: str = "float32",
    profile: Any = None,
    top_k: int = 5,
    strict: bool = True,
    progress: bool = False,
    mesh: Any = None,
    rules: Any = None,
    axis_rules: Any = None,
) -> ForwardParity:
  """Runs our forward on ``model_dir`` and compares it with a golden file, the live oracle, or HF on ``reference_dir``.

  Exactly one golden source: ``golden`` (a bundle file), ``oracle=True`` (HF
  on ``model_dir`` itself) or ``reference_dir`` (HF on that original
  checkpoint, e.g. the one ``model_dir`` was converted from). Inputs come
  from ``tokens``/``attention_mask`` when given, else from the golden's
  provenance, else (live oracle) :func:`default_tokens`. ``profile`` defaults
  to ``f32`` for float32 and ``bf16`` for bfloat16. Bad input raises a
  one-line :class:`UsageError` before the model runs (an all-padding row
  included). ``mesh``/``rules``/``axis_rules`` load our side sharded onto a
  device mesh (:mod:`parity_jax.qwen2.sharding`); the comparison is the same.
  """
  dtype = compute_dtype(dtype).name
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise UsageError(f"no such model directory: {model_dir}")
  sources = [
      s for s, on in (("golden", golden is not None), ("oracle", oracle), ("reference_dir", reference_dir)) if on
  ]
  if not sources:
    raise UsageError(
        "give a golden bundle (golden), the live oracle (oracle=True) or an original checkpoint (reference_dir)"
    )
  if len(sources) > 1:
    raise UsageError(f"give one golden source, not {' and '.join(sources)}")
  live_dir = None if golden is not None else os.fspath(reference_dir) if reference_dir is not None else model_dir
  if live_dir is not None and not os.path.isdir(live_dir):
    raise UsageError(f"no such reference directory: {live_dir}")
  if tokens is None and golden is not None:
    tokens, recorded_mask, _ = golden_inputs(golden)
    if attention_mask is None:
      attention_mask = recorded_mask
  if live_dir is not None:
    from parity_jax.oracle import require_oracle

    require_oracle()
  check_real_rows(attention_mask)
  profile = resolve_profile(profile or DEFAULT_PROFILE[dtype])
  if tokens is None:
    from parity_jax.qwen2.sources import model_source

    tokens = default_tokens(model_source(live_dir).config(live_dir).vocab_size)
  model, load_report, tokens, mask = load_checked(
      model_dir, np.asarray(tokens), attention_mask, dtype, strict, mesh, rules, axis_rules
  )
  stages = model_stages(model, tokens, mask)
  if live_dir is not None:
    what = "live oracle" if reference_dir is None else "the reference checkpoint"
    golden_bundle: StageBundle | str = _live_golden(live_dir, tokens, mask, what)
  else:
    golden_bundle = os.fspath(golden)  # compared stage by stage straight from the file

  def compare(stages: dict) -> BundleReport:
    return compare_bundles(golden_bundle, stages, profile=profile, top_k=top_k, progress=progress)

  routing = None
  if model.config.is_moe:
    stages, routing = _routing_replay(model, tokens, mask, golden_bundle, stages, profile, compare)
  prov = _provenance(model_dir, model, load_report, tokens, mask, mesh)
  candidate = StageBundle(stages, prov)
  report = compare(candidate)
  mask = None if mask is None else np.asarray(mask)
  return ForwardParity(report, golden_bundle, candidate, tokens, mask, routing, tuple(load_report.sharding_notes))


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepRow:
  """One decode step: the tokens chosen on both sides and how its logits compare."""

  step: int
  golden_tokens: tuple[int, ...]
  candidate_tokens: tuple[int, ...]
  rel_l2: float
  kl_max: float | None
  argmax_agreement: float | None
  passed: bool
  breaches: tuple[str, ...]

  @property
  def same_tokens(self) -> bool:
    return self.golden_tokens == self.candidate_tokens

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"same_tokens": self.same_tokens}


@dataclasses.dataclass
class DecodeParity(Report):
  """Greedy decoding against HF's ``generate``: per-step rows, the first divergent step, its stage report.

  ``candidate_tokens`` are our free-running greedy tokens; when they part
  from HF's, the step logits come from a run fed HF's tokens (teacher
  forcing), so every step compares the same history (``teacher_forced``).
  """

  rows: list[StepRow]
  tokens: np.ndarray  # the prompt
  attention_mask: np.ndarray | None
  golden_tokens: np.ndarray  # prompt + HF's tokens
  candidate_tokens: np.ndarray  # prompt + ours
  profile: Any
  teacher_forced: bool
  first_divergent_step: int | None
  step_report: BundleReport | None  # stages of the first divergent step (HF's vs ours)

  @property
  def passed(self) -> bool:
    return self.first_divergent_step is None

  @property
  def first_divergent(self) -> str | None:
    return None if self.step_report is None else self.step_report.first_divergent

  def to_dict(self) -> dict[str, Any]:
    return {
        "schema": "parity_jax.decode_parity/1",
        "passed": self.passed,
        "profile": self.profile.name,
        "steps": len(self.rows),
        "first_divergent_step": self.first_divergent_step,
        "first_divergent_stage": self.first_divergent,
        "teacher_forced": self.teacher_forced,
        "golden_tokens": self.golden_tokens.tolist(),
        "candidate_tokens": self.candidate_tokens.tolist(),
        "rows": [r.to_dict() for r in self.rows],
        "step_report": None if self.step_report is None else self.step_report.to_dict(),
    }

  def text(self, failing_only: bool = False) -> str:
    lines = [
        f"decode: {len(self.rows)} greedy steps against HF generate, profile {self.profile.name}"
        + (" (our logits from a run fed HF's tokens: the free-running tokens part)" if self.teacher_forced else ""),
        f"{'step':>5}  {'tokens':<10} {'rel-L2':>9} {'KL max':>9} {'argmax':>7}  result",
    ]
    for r in self.rows:
      if failing_only and r.passed and r.step != self.first_divergent_step:
        continue
      kl = "-" if r.kl_max is None else f"{r.kl_max:.2e}"
      am = "-" if r.argmax_agreement is None else f"{r.argmax_agreement:.3f}"
      res = "ok" if r.passed else "FAIL " + ", ".join(r.breaches)
      mark = "  <-- first divergent step" if r.step == self.first_divergent_step else ""
      lines.append(
          f"{r.step:>5}  {'same' if r.same_tokens else 'differ':<10} {r.rel_l2:>9.2e} {kl:>9} {am:>7}  {res}{mark}"
      )
    if self.step_report is not None:
      lines += ["", f"stages of step {self.first_divergent_step} (HF's vs ours):", self.step_report.text(failing_only)]
    if self.passed:
      lines.append(f"PASS: {len(self.rows)} steps, same tokens, every step's logits within {self.profile.name}")
    else:
      stage = f", first divergent stage {self.first_divergent}" if self.first_divergent else ""
      lines.append(f"FAIL: first divergent step {self.first_divergent_step}{stage}")
    return "\n".join(lines)

  def _repr_html_(self) -> str:
    return f"<pre>{html.escape(self.text())}</pre>"


def decode_parity(
    model_dir: str | os.PathLike,
    *,
    steps: int,
    reference_dir: str | os.PathLike | None = None,
    tokens: Any = None,
    attention_mask: Any = None,
    dtype: str = "float32",
    profile: Any = None,
    top_k: int = 5,
    strict: bool = True,
    progress: bool = False,
    mesh: Any = None,
    rules: Any = None,
    axis_rules: Any = None,
) -> DecodeParity:
  """Our greedy decode of ``steps`` tokens on ``model_dir`` against HF ``generate`` on ``reference_dir`` (default: the same dir).

  Tokens must match (in float32, where the ``f32`` profile demands argmax
  agreement) and every step's logits lie within the profile's logits rule. The
  first step that does not is the first divergent step; both sides then run
  again capturing that step's stages (ours fed HF's tokens up to it), and the
  stage comparison names the first divergent stage there.
  """
  from parity_jax.oracle import require_oracle
  from parity_jax.qwen2.decode import check_left_padding, generate

  require_oracle()
  from parity_jax.oracle.hf_forward import hf_generate, load_hf_model

  dtype = compute_dtype(dtype).name
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise UsageError(f"no such model directory: {model_dir}")
  ref_dir = model_dir if reference_dir is None else os.fspath(reference_dir)
  if not os.path.isdir(ref_dir):
    raise UsageError(f"no such reference directory: {ref_dir}")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise UsageError(f"decode steps must be an integer >= 1, got {steps!r}")
  check_real_rows(attention_mask)
  if attention_mask is not None:
    check_left_padding(attention_mask)
  profile = resolve_profile(profile or DEFAULT_PROFILE[dtype])
  if tokens is None:
    from parity_jax.qwen2.sources import model_source

    tokens = default_tokens(model_source(ref_dir).config(ref_dir).vocab_size)
  model, _, tokens, mask = load_checked(
      model_dir, np.asarray(tokens), attention_mask, dtype, strict, mesh, rules, axis_rules
  )
  hf = load_hf_model(ref_dir, "float32")
  g_tokens, g_logits = hf_generate(hf, tokens, steps, mask)
  c_tokens, c_logits = generate(model, tokens, steps, mask)
  t = tokens.shape[1]
  forced = not np.array_equal(g_tokens, c_tokens)
  if forced:
    _, c_logits = generate(model, tokens, steps, mask, force_tokens=g_tokens[:, t:])
  rows = []
  for k in range(steps):
    rep = compare_bundles({"logits": g_logits[k][:, None]}, {"logits": c_logits[k][:, None]}, profile=profile, top_k=0)
    row = rep.rows[0]
    lg = row.logits
    same = np.array_equal(g_tokens[:, t + k], c_tokens[:, t + k])
    breaches = tuple(b.metric for b in row.breaches)
    if not same and profile.name == "f32":
      breaches += ("tokens",)
    rows.append(
        StepRow(
            k,
            tuple(int(x) for x in g_tokens[:, t + k]),
            tuple(int(x) for x in c_tokens[:, t + k]),
            float(row.rel_l2),
            None if lg is None else float(lg.kl_max),
            None if lg is None else float(lg.argmax_agreement),
            not breaches,
            breaches,
        )
    )
  first = next((r.step for r in rows if not r.passed), None)
  step_report = None
  if first is not None:
    _, _, g_stages = hf_generate(hf, tokens, first + 1, mask, capture_step=first)
    _, _, c_stages = generate(
        model, tokens, first + 1, mask, capture_step=first, force_tokens=g_tokens[:, t : t + first + 1]
    )
    step_report = compare_bundles(dict(g_stages), dict(c_stages), profile=profile, top_k=top_k, progress=progress)
  mask = None if mask is None else np.asarray(mask)
  return DecodeParity(rows, tokens, mask, g_tokens, c_tokens, profile, forced, first, step_report)
