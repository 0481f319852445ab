"""Ready remap specs for the Qwen family's conversions from Hugging Face into JAX frameworks' layouts.

:func:`preset_spec` fills a preset from the HF source's ``config.json``
(layers, heads, kv heads, head_dim, hidden size, experts, tied embeddings,
``model_type``); :func:`list_presets` names them. Every rule is an element
rule of :mod:`parity_jax.checkpoint.transforms`, so the verifier checks every
element; ``RemapSpec.to_json`` gives the expanded spec for a user to adapt.

* ``hf-to-tunix`` -- the pure dict of a tunix Qwen model's ``nnx.state`` as
  ``ocp.StandardCheckpointer().save`` writes it (tunix 0.1.7's
  ``models/qwen*/params.py`` key map: kernels transposed, attention kernels
  then reshaped to ``[embed, heads, head_dim]`` / ``[heads, head_dim, embed]``,
  MoE experts transposed and stacked on axis 0, the router transposed).
* ``hf-to-maxtext`` / ``hf-to-maxtext-scanned`` -- the params of the
  checkpoint MaxText's ``to_maxtext`` writes (``params/params/...``;
  ``param_mapping.py``'s Qwen names and hooks at e591f30c: kernels
  transposed then reshaped, q/k/v biases reshaped to ``[heads, head_dim]``;
  scanned layers stacked on axis 1, MoE experts on axis 0). MaxText's
  vocabulary padding applies only when its ``vocab_size`` exceeds HF's;
  give it as ``maxtext_vocab_size``.
* ``tunix-to-hf``, ``maxtext-to-hf``, ``maxtext-scanned-to-hf`` -- the
  reverses, built from the same table (reshape back, transpose, ``unstack``;
  the padded vocabulary sliced off); the config.json is the HF side's.

Families: qwen2, qwen3, qwen3_moe, and qwen2_moe for tunix only:

* tunix has no Qwen2-MoE model (tunix 0.1.7 and its main branch: ``models/qwen2``
  is dense). The tunix-style qwen2_moe layout here is DERIVED, consistently
  with tunix's qwen3 MoE map (router ``mlp/router/kernel`` transposed, experts
  ``mlp/{gate,up,down}_proj`` transposed and stacked on axis 0) and its qwen2
  map (q/k/v biases flat, ``attn/{q,k,v}_bias``); the shared expert is a
  dense MLP as tunix names one (``mlp/shared_expert/{gate,up,down}_proj/kernel``,
  transposed) and its gate a linear (``mlp/shared_expert_gate/kernel``,
  ``[hidden, 1]``, transposed). A Qwen2-MoE config with dense layers
  (``mlp_only_layers``, ``decoder_sparse_step`` != 1) is refused.
* MaxText's checkpoint conversion (``param_mapping.py``) maps no Qwen2-MoE
  model, and its Qwen mapping has no shared expert: ``hf-to-maxtext*`` and
  ``maxtext*-to-hf`` refuse qwen2_moe in one line rather than invent a layout.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

from parity_jax.checkpoint.spec import RemapSpec
from parity_jax.errors import UsageError

__all__ = ["PRESETS", "list_presets", "preset_rules", "preset_spec", "read_hf_config"]

PRESETS = {
    "hf-to-tunix": "HF safetensors -> tunix Qwen nnx.state pure dict (StandardCheckpointer); qwen2(_moe), qwen3(_moe)",
    "hf-to-maxtext": "HF safetensors -> MaxText checkpoint params, unscanned layers; qwen2, qwen3, qwen3_moe",
    "hf-to-maxtext-scanned": "HF safetensors -> MaxText checkpoint params, scanned layers (axis 1); qwen2, qwen3, qwen3_moe",
    "tunix-to-hf": "tunix Qwen nnx.state pure dict -> HF tensors (config.json: --hf_config or the HF side's)",
    "maxtext-to-hf": "MaxText checkpoint params, unscanned -> HF tensors (config.json as for tunix-to-hf)",
    "maxtext-scanned-to-hf": "MaxText checkpoint params, scanned layers -> HF tensors (config.json as for tunix-to-hf)",
}
_FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe")
_NO_LAYOUT = {  # (framework, family) the anchors define no layout for: refused in one line
    ("maxtext", "qwen2_moe"): "MaxText's checkpoint conversion (param_mapping.py) maps no Qwen2-MoE model and its"
    " Qwen mapping has no shared expert or shared-expert gate; use hf-to-tunix or a --spec of your own"
}


def list_presets() -> list[tuple[str, str]]:
  return sorted(PRESETS.items())


def read_hf_config(source: str | os.PathLike) -> dict[str, Any]:
  """An HF ``config.json``: the file, or the one in a directory (local or bucket); one-line UsageError otherwise."""
  from parity_jax.stores import StoreError, open_store

  try:
    store = open_store(source)
    text = (store.child("config.json") if store.is_dir() else store).read_bytes()
    cfg = json.loads(text.decode("utf-8"))
  except (StoreError, UnicodeDecodeError, ValueError) as e:
    raise UsageError(f"a preset is filled from the source's config.json: cannot read it in {source}: {e}") from None
  if not isinstance(cfg, dict):
    raise UsageError(f"{source}/config.json is not a JSON object")
  return cfg


def _dims(cfg: dict[str, Any]) -> dict[str, Any]:
  mt = cfg.get("model_type")
  if mt not in _FAMILIES:
    raise UsageError(f"the presets cover model_type {', '.join(_FAMILIES)}; config.json says {mt!r}")
  if mt == "qwen2_moe" and (cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step") or 1) != 1):
    raise UsageError(
        "the qwen2_moe presets cover all-MoE models; config.json has dense layers (mlp_only_layers"
        f" {cfg.get('mlp_only_layers')!r}, decoder_sparse_step {cfg.get('decoder_sparse_step')!r})"
    )
  try:
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    return dict(
        family=mt,
        layers=int(cfg["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        kv=int(cfg.get("num_key_value_heads") or heads),
        hd=int(cfg.get("head_dim") or hidden // heads),
        experts=int(cfg.get("num_experts") or 0),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        vocab=int(cfg["vocab_size"]),
    )
  except (KeyError, TypeError, ValueError) as e:
    raise UsageError(f"config.json lacks or garbles {e} (needed to fill the preset)") from None


# One table per framework: (HF name, framework path, kind, framework shape of one layer/expert, HF shape).
# Placeholders: {l} layer, {e} expert. Kinds: "copy"; "kernel" (HF [out, in] transposed, then reshaped to the
# framework shape when it has more axes); "reshape" (a bias to [heads, head_dim]); "expert" (transposed, stacked).
# Both directions come from the same entries: forward rules transpose then reshape (and stack), reverse rules
# reshape back then transpose (and unstack).


def _entries(d: dict[str, Any], fw: dict[str, str]) -> list[tuple[str, str, str, tuple, tuple]]:
  D, H, KV, hd, E = d["hidden"], d["heads"], d["kv"], d["hd"], d["experts"]
  out = [
      ("model.embed_tokens.weight", fw["embed"], "copy", (), ()),
      ("model.norm.weight", fw["norm"], "copy", (), ()),
      ("model.layers.{l}.input_layernorm.weight", fw["ln1"], "copy", (), ()),
      ("model.layers.{l}.post_attention_layernorm.weight", fw["ln2"], "copy", (), ()),
      ("model.layers.{l}.self_attn.q_proj.weight", fw["q"], "kernel", (D, H, hd), (H * hd, D)),
      ("model.layers.{l}.self_attn.k_proj.weight", fw["k"], "kernel", (D, KV, hd), (KV * hd, D)),
      ("model.layers.{l}.self_attn.v_proj.weight", fw["v"], "kernel", (D, KV, hd), (KV * hd, D)),
      ("model.layers.{l}.self_attn.o_proj.weight", fw["o"], "kernel", (H, hd, D), (D, H * hd)),
  ]
  if not d["tied"]:
    out.append(("lm_head.weight", fw["lm_head"], "kernel", (), ()))
  if d["family"] in ("qwen2", "qwen2_moe"):
    for p, n in (("q", H), ("k", KV), ("v", KV)):
      out.append((f"model.layers.{{l}}.self_attn.{p}_proj.bias", fw[f"{p}_bias"], fw["bias_kind"], (n, hd), (n * hd,)))
  else:
    out += [
        ("model.layers.{l}.self_attn.q_norm.weight", fw["q_norm"], "copy", (), ()),
        ("model.layers.{l}.self_attn.k_norm.weight", fw["k_norm"], "copy", (), ()),
    ]
  if d["family"] in ("qwen3_moe", "qwen2_moe"):
    out.append(("model.layers.{l}.mlp.gate.weight", fw["router"], "kernel", (), ()))
    for p in ("gate", "up", "down"):
      out.append((f"model.layers.{{l}}.mlp.experts.{{e}}.{p}_proj.weight", fw[f"expert_{p}"], "kernel", (), ()))
    if d["family"] == "qwen2_moe":  # the shared expert (a dense MLP) and its sigmoid gate ([1, hidden] in HF)
      for p in ("gate", "up", "down"):
        out.append((f"model.layers.{{l}}.mlp.shared_expert.{p}_proj.weight", fw[f"shared_{p}"], "kernel", (), ()))
      out.append(("model.layers.{l}.mlp.shared_expert_gate.weight", fw["shared_expert_gate"], "kernel", (), ()))
  else:
    for p in ("gate", "up", "down"):
      out.append((f"model.layers.{{l}}.mlp.{p}_proj.weight", fw[f"mlp_{p}"], "kernel", (), ()))
  del E
  return out


def _tunix_names() -> dict[str, str]:
  a = "layers/{l}/attn/"
  names = {
      "embed": "embedder/input_embedding",
      "norm": "final_norm/w",
      "lm_head": "lm_head/w",
      "ln1": "layers/{l}/input_layernorm/w",
      "ln2": "layers/{l}/post_attention_layernorm/w",
      "router": "layers/{l}/mlp/router/kernel",
      "bias_kind": "copy",  # tunix keeps q/k/v biases flat
  }
  for p in ("q", "k", "v", "o"):
    names[p] = a + f"{p}_proj/w"
  for p in ("q", "k", "v"):
    names[f"{p}_bias"] = a + f"{p}_bias"
  for p in ("q", "k"):
    names[f"{p}_norm"] = a + f"{p}_norm/w"
  for p in ("gate", "up", "down"):
    names[f"mlp_{p}"] = f"layers/{{l}}/mlp/{p}_proj/kernel"
    names[f"expert_{p}"] = f"layers/{{l}}/mlp/{p}_proj"  # experts stacked on axis 0
    names[f"shared_{p}"] = f"layers/{{l}}/mlp/shared_expert/{p}_proj/kernel"  # derived: tunix has no Qwen2-MoE
  names["shared_expert_gate"] = "layers/{l}/mlp/shared_expert_gate/kernel"  # derived, as above
  return names


def _maxtext_names(scanned: bool) -> dict[str, str]:
  lay = "params/params/decoder/" + ("layers/" if scanned else "layers_{l}/")
  att = lay + "self_attention/"
  names = {
      "embed": "params/params/token_embedder/embedding",
      "norm": "params/params/decoder/decoder_norm/scale",
      "lm_head": "params/params/decoder/logits_dense/kernel",
      "ln1": lay + "pre_self_attention_layer_norm/scale",
      "ln2": lay + "post_self_attention_layer_norm/scale",
      "q": att + "query/kernel",
      "k": att + "key/kernel",
      "v": att + "value/kernel",
      "o": att + "out/kernel",
      "q_bias": att + "query/bias",
      "k_bias": att + "key/bias",
      "v_bias": att + "value/bias",
      "bias_kind": "reshape",  # reshape_bias: [heads, head_dim]
      "q_norm": att + "query_norm/scale",
      "k_norm": att + "key_norm/scale",
      "router": lay + "moe_block/gate/kernel",
  }
  for p, mt in (("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")):
    names[f"mlp_{p}"] = lay + f"mlp/{mt}/kernel"
    names[f"expert_{p}"] = lay + f"moe_block/{mt}"
  return names


def _pattern(template: str, names: Sequence[str]) -> str:
  """A regex for ``template`` whose ``{name}`` placeholders (of ``names``) match integers as groups."""
  out = re.escape(template)
  for n in names:
    out = out.replace(re.escape("{" + n + "}"), rf"(?P<{n}>\d+)")
  return out


def _fill(template: str, names: Sequence[str]) -> str:
  for n in names:
    template = template.replace("{" + n + "}", rf"\g<{n}>")
  return template


def _stack_axes(hf: str, fw: str, framework: str, scanned: bool) -> list[tuple[str, int]]:
  """The placeholders of ``hf`` that are stacked in the framework leaf (absent from ``fw``), with their axes."""
  levels = []
  if "{e}" in hf and "{e}" not in fw:
    levels.append(("e", 0))
  if "{l}" in hf and "{l}" not in fw:
    levels.append(("l", 1 if framework == "maxtext" and scanned else 0))
  return levels


def _rules(d: dict[str, Any], framework: str, scanned: bool, reverse: bool, vocab: int | None) -> list[dict[str, Any]]:
  names = _tunix_names() if framework == "tunix" else _maxtext_names(scanned)
  rules = []
  for hf, fw, kind, fw_shape, hf_shape in _entries(d, names):
    levels = _stack_axes(hf, fw, framework, scanned)
    stacked = [n for n, _ in levels]
    in_path = [n for n in ("l", "e") if "{" + n + "}" in fw]
    if not reverse:
      r: dict[str, Any] = {"match": _pattern(hf, ("l", "e")), "to": _fill(fw, in_path)}
      ops: list[dict[str, Any]] = []
      if kind == "kernel":
        ops.append({"transpose": [1, 0]})
        if fw_shape:
          ops.append({"reshape": list(fw_shape)})
      elif kind == "reshape":
        ops.append({"reshape": list(fw_shape)})
      if levels:
        r["stack"] = [{"axis": a, "index": rf"\g<{n}>"} for n, a in levels]
    else:
      r = {"match": _pattern(fw, in_path), "to": _fill(hf, in_path)}
      ops = []
      if kind == "kernel":
        if fw_shape:
          ops.append({"reshape": [hf_shape[1], hf_shape[0]]})
        ops.append({"transpose": [1, 0]})
      elif kind == "reshape":
        ops.append({"reshape": list(hf_shape)})
      if levels:
        r["unstack"] = [{"axis": a, "name": n} for n, a in levels]
        del stacked
    if hf == "model.embed_tokens.weight" and framework == "maxtext" and vocab is not None and vocab > d["vocab"]:
      # pad_embedding_layer: zero rows appended; the way back slices them off
      ops = (
          [{"pad": [[0, vocab - d["vocab"]], [0, 0]]}]
          if not reverse
          else [{"slice": [[0, d["vocab"]], [0, d["hidden"]]]}]
      )
      if not reverse:
        r["fill"] = 0.0
    if ops:
      r["ops"] = ops
    rules.append(r)
  return rules


def preset_rules(
    name: str, cfg: dict[str, Any], *, maxtext_vocab_size: int | None = None, cast: str | None = None
) -> list[dict[str, Any]]:
  """The rules of preset ``name`` for the HF config ``cfg``; ``cast`` (a float dtype name) casts every leaf."""
  if name not in PRESETS:
    raise UsageError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
  d = _dims(cfg)
  framework = "tunix" if "tunix" in name else "maxtext"
  if (framework, d["family"]) in _NO_LAYOUT:
    raise UsageError(f"preset {name} has no {d['family']} layout: {_NO_LAYOUT[framework, d['family']]}")
  rules = _rules(d, framework, "scanned" in name, name.endswith("-to-hf"), maxtext_vocab_size)
  if cast:
    for r in rules:
      r["cast"] = cast
  return rules


def preset_spec(
    name: str,
    source: str | os.PathLike | None,
    *,
    hf_config: str | os.PathLike | None = None,
    maxtext_vocab_size: int | None = None,
    cast: str | None = None,
) -> RemapSpec:
  """Preset ``name`` filled from an HF config.json, as a validated :class:`RemapSpec`.

  The config is ``hf_config`` (a file or an HF directory) when given, else the
  HF source's own (``*-to-hf`` presets have a framework source: ``hf_config``
  is then required).
  """
  if hf_config is None:
    if name.endswith("-to-hf"):
      raise UsageError(f"preset {name} reads the model's config.json from the HF side: give hf_config (--hf_config)")
    hf_config = source
  rules = preset_rules(name, read_hf_config(hf_config), maxtext_vocab_size=maxtext_vocab_size, cast=cast)
  return RemapSpec.from_rules(rules, name=f"preset {name}")
