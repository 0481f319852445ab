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
  qwen2, qwen3, qwen3_moe.
* ``hf-to-maxtext`` / ``hf-to-maxtext-scanned`` -- the params of the
  checkpoint MaxText's ``to_maxtext`` writes (``params/params/...``;
  ``param_mapping.py``'s Qwen names and hooks at e591f30c: kernels
  transposed then reshaped, q/k/v biases reshaped to ``[heads, head_dim]``;
  scanned layers stacked on axis 1, MoE experts on axis 0). qwen2, qwen3,
  qwen3_moe. MaxText's vocabulary padding applies only when its
  ``vocab_size`` exceeds HF's; give it as ``maxtext_vocab_size``.

Not provided yet: the reverse presets (``tunix-to-hf``, ``maxtext-to-hf``,
...) need one source leaf split into many targets (``unstack``), and
``qwen2_moe`` (shared expert and its gate) has no tunix or MaxText mapping
to check against here.
"""

from __future__ import annotations

import json
import os
from typing import Any

from parity_jax.checkpoint.spec import RemapSpec
from parity_jax.errors import UsageError

__all__ = ["PRESETS", "list_presets", "preset_rules", "preset_spec", "read_hf_config"]

PRESETS = {
    "hf-to-tunix": "HF safetensors -> tunix Qwen nnx.state pure dict (StandardCheckpointer); qwen2, qwen3, qwen3_moe",
    "hf-to-maxtext": "HF safetensors -> MaxText checkpoint params, unscanned layers; qwen2, qwen3, qwen3_moe",
    "hf-to-maxtext-scanned": "HF safetensors -> MaxText checkpoint params, scanned layers (axis 1); qwen2, qwen3, qwen3_moe",
}
_FAMILIES = ("qwen2", "qwen3", "qwen3_moe")
_L = r"model\.layers\.(?P<l>\d+)\."


def list_presets() -> list[tuple[str, str]]:
  return sorted(PRESETS.items())


def read_hf_config(source: str | os.PathLike) -> dict[str, Any]:
  """``config.json`` of an HF directory (local or bucket); one-line UsageError otherwise."""
  from parity_jax.stores import StoreError, open_store

  try:
    text = open_store(source).child("config.json").read_bytes()
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


def _tunix(d: dict[str, Any]) -> list[dict[str, Any]]:
  D, H, KV, hd = d["hidden"], d["heads"], d["kv"], d["hd"]
  t = [{"transpose": [1, 0]}]
  rules = [
      {"match": r"model\.embed_tokens\.weight", "to": "embedder/input_embedding"},
      {"match": r"model\.norm\.weight", "to": "final_norm/w"},
      {"match": _L + r"(?P<n>input_layernorm|post_attention_layernorm)\.weight", "to": r"layers/\g<l>/\g<n>/w"},
      {
          "match": _L + r"self_attn\.q_proj\.weight",
          "to": r"layers/\g<l>/attn/q_proj/w",
          "ops": t + [{"reshape": [D, H, hd]}],
      },
      {
          "match": _L + r"self_attn\.(?P<p>k|v)_proj\.weight",
          "to": r"layers/\g<l>/attn/\g<p>_proj/w",
          "ops": t + [{"reshape": [D, KV, hd]}],
      },
      {
          "match": _L + r"self_attn\.o_proj\.weight",
          "to": r"layers/\g<l>/attn/o_proj/w",
          "ops": t + [{"reshape": [H, hd, D]}],
      },
  ]
  if not d["tied"]:
    rules.append({"match": r"lm_head\.weight", "to": "lm_head/w", "ops": t})
  if d["family"] == "qwen2":
    rules.append({"match": _L + r"self_attn\.(?P<p>q|k|v)_proj\.bias", "to": r"layers/\g<l>/attn/\g<p>_bias"})
  else:
    rules.append({"match": _L + r"self_attn\.(?P<p>q|k)_norm\.weight", "to": r"layers/\g<l>/attn/\g<p>_norm/w"})
  if d["family"] == "qwen3_moe":
    rules.append({"match": _L + r"mlp\.gate\.weight", "to": r"layers/\g<l>/mlp/router/kernel", "ops": t})
    rules.append(
        {
            "match": _L + r"mlp\.experts\.(?P<e>\d+)\.(?P<p>gate|up|down)_proj\.weight",
            "to": r"layers/\g<l>/mlp/\g<p>_proj",
            "ops": t,
            "stack": [{"axis": 0, "index": r"\g<e>"}],
        }
    )
  else:
    rules.append(
        {"match": _L + r"mlp\.(?P<p>gate|up|down)_proj\.weight", "to": r"layers/\g<l>/mlp/\g<p>_proj/kernel", "ops": t}
    )
  return rules


def _maxtext(d: dict[str, Any], scanned: bool, vocab: int | None) -> list[dict[str, Any]]:
  D, H, KV, hd = d["hidden"], d["heads"], d["kv"], d["hd"]
  t = [{"transpose": [1, 0]}]
  layer = "layers" if scanned else r"layers_\g<l>"
  stack = [{"axis": 1, "index": r"\g<l>"}] if scanned else []

  def per_layer(match: str, to: str, ops=(), experts: bool = False) -> dict[str, Any]:
    r: dict[str, Any] = {"match": _L + match, "to": f"params/params/decoder/{layer}/{to}"}
    if ops:
      r["ops"] = list(ops)
    levels = ([{"axis": 0, "index": r"\g<e>"}] if experts else []) + stack
    if levels:
      r["stack"] = levels
    return r

  emb: dict[str, Any] = {"match": r"model\.embed_tokens\.weight", "to": "params/params/token_embedder/embedding"}
  if vocab is not None and vocab > d["vocab"]:
    emb.update(ops=[{"pad": [[0, vocab - d["vocab"]], [0, 0]]}], fill=0.0)  # pad_embedding_layer: np.zeros rows
  rules = [emb, {"match": r"model\.norm\.weight", "to": "params/params/decoder/decoder_norm/scale"}]
  if not d["tied"]:
    rules.append({"match": r"lm_head\.weight", "to": "params/params/decoder/logits_dense/kernel", "ops": t})
  rules += [
      per_layer(r"input_layernorm\.weight", "pre_self_attention_layer_norm/scale"),
      per_layer(r"post_attention_layernorm\.weight", "post_self_attention_layer_norm/scale"),
      per_layer(r"self_attn\.q_proj\.weight", "self_attention/query/kernel", t + [{"reshape": [D, H, hd]}]),
      per_layer(r"self_attn\.k_proj\.weight", "self_attention/key/kernel", t + [{"reshape": [D, KV, hd]}]),
      per_layer(r"self_attn\.v_proj\.weight", "self_attention/value/kernel", t + [{"reshape": [D, KV, hd]}]),
      per_layer(r"self_attn\.o_proj\.weight", "self_attention/out/kernel", t + [{"reshape": [H, hd, D]}]),
  ]
  if d["family"] == "qwen2":
    rules += [
        per_layer(r"self_attn\.q_proj\.bias", "self_attention/query/bias", [{"reshape": [H, hd]}]),
        per_layer(r"self_attn\.k_proj\.bias", "self_attention/key/bias", [{"reshape": [KV, hd]}]),
        per_layer(r"self_attn\.v_proj\.bias", "self_attention/value/bias", [{"reshape": [KV, hd]}]),
    ]
  else:
    rules += [
        per_layer(r"self_attn\.q_norm\.weight", "self_attention/query_norm/scale"),
        per_layer(r"self_attn\.k_norm\.weight", "self_attention/key_norm/scale"),
    ]
  if d["family"] == "qwen3_moe":
    rules.append(per_layer(r"mlp\.gate\.weight", "moe_block/gate/kernel", t))
    for hf, mt in (("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")):
      rules.append(per_layer(rf"mlp\.experts\.(?P<e>\d+)\.{hf}_proj\.weight", f"moe_block/{mt}", t, experts=True))
  else:
    for hf, mt in (("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")):
      rules.append(per_layer(rf"mlp\.{hf}_proj\.weight", f"mlp/{mt}/kernel", t))
  return rules


def preset_rules(
    name: str, cfg: dict[str, Any], *, maxtext_vocab_size: int | None = None, cast: str | None = None
) -> list[dict[str, Any]]:
  """The rules of preset ``name`` for the HF config ``cfg``; ``cast`` (a float dtype name) casts every leaf."""
  if name not in PRESETS:
    raise UsageError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
  d = _dims(cfg)
  rules = _tunix(d) if name == "hf-to-tunix" else _maxtext(d, name == "hf-to-maxtext-scanned", maxtext_vocab_size)
  if cast:
    for r in rules:
      r["cast"] = cast
  return rules


def preset_spec(
    name: str, source: str | os.PathLike, *, maxtext_vocab_size: int | None = None, cast: str | None = None
) -> RemapSpec:
  """Preset ``name`` filled from ``source``'s config.json, as a validated :class:`RemapSpec`."""
  rules = preset_rules(name, read_hf_config(source), maxtext_vocab_size=maxtext_vocab_size, cast=cast)
  return RemapSpec.from_rules(rules, name=f"preset {name}")
