from parity_jax.bundles import qwen_graph as stage_names


def test_names_in_execution_order():
  names = stage_names.qwen_stage_names(2, qk_norm=False)
  assert names[:3] == ["embedding", "layers.0.attn_norm", "layers.0.q_proj"]
  assert names[-2:] == ["final_norm", "logits"]
  assert "layers.0.q_norm" not in names
  assert names.index("layers.0.output") < names.index("layers.1.attn_norm")
  assert len(stage_names.qwen_stage_names(1, qk_norm=True)) == 1 + 18 + 2


def test_sort_key_recovers_order_from_alphabetical():
  names = stage_names.qwen_stage_names(12, qk_norm=True)
  assert sorted(names, key=stage_names.qwen_stage_sort_key) == names
  assert sorted(names) != names  # alphabetical would put layers.10 before layers.2
  # names outside the Qwen graph go last, by name; logits right after final_norm, unknown layer stages after known
  mixed = ["zz", "logits", "aa", "final_norm", "layers.0.zz", "layers.0.output", "embedding"]
  want = ["embedding", "layers.0.output", "layers.0.zz", "final_norm", "logits", "aa", "zz"]
  assert sorted(mixed, key=stage_names.qwen_stage_sort_key) == want


def test_stage_inputs_outside_the_layers():
  """The data-flow inputs of the stages before and after the layers, written out from the Qwen graph."""
  from parity_jax.bundles.qwen_graph import qwen_stage_inputs

  names = ["embedding", "layers.0.output", "layers.1.output", "final_norm", "logits"]
  assert qwen_stage_inputs("embedding", names) == ()  # the first stage: nothing upstream
  assert qwen_stage_inputs("final_norm", names) == ("layers.1.output",)
  assert qwen_stage_inputs("logits", names) == ("final_norm",)
  assert qwen_stage_inputs("logits", names[:3]) == ("layers.1.output",)  # no final_norm compared
  assert qwen_stage_inputs("rotary_cache", names) is None  # not a Qwen stage


_ATTENTION = ["attn_norm", "q_proj", "k_proj", "v_proj", "q_rope", "k_rope", "attention", "attn_out"]
_DENSE = ["post_attn_residual", "ffn_norm", "ffn_gate", "ffn_up", "ffn_silu", "ffn_swiglu", "ffn_out", "output"]
_MOE = ["post_attn_residual", "ffn_norm", "router_logits", "routing_weights", "selected_experts", "routed_out"]


def test_a_moe_layer_has_the_sparse_block_and_a_dense_layer_the_mlp():
  def layer(names, i):
    return [n.split(".", 2)[2] for n in names if n.startswith(f"layers.{i}.")]

  names = stage_names.qwen_stage_names(2, qk_norm=False, moe_layers=[1], shared_expert=True)
  assert layer(names, 0) == _ATTENTION + _DENSE
  assert layer(names, 1) == _ATTENTION + _MOE + ["shared_out", "shared_gate", "ffn_out", "output"]
  names = stage_names.qwen_stage_names(2, qk_norm=False, moe_layers=[0])  # Qwen3-MoE: no shared expert
  assert layer(names, 0) == _ATTENTION + _MOE + ["ffn_out", "output"]
  assert layer(names, 1) == _ATTENTION + _DENSE


def test_stage_inputs_inside_the_layers():
  """A layer stage's inputs, written out from the Qwen graph; the first compared of alternatives is taken."""
  from parity_jax.bundles.qwen_graph import qwen_stage_inputs

  names = set(stage_names.qwen_stage_names(2, qk_norm=True))
  assert qwen_stage_inputs("layers.0.attn_norm", names) == ("embedding",)
  assert qwen_stage_inputs("layers.1.attn_norm", names) == ("layers.0.output",)
  assert qwen_stage_inputs("layers.1.v_proj", names) == ("layers.1.attn_norm",)
  assert qwen_stage_inputs("layers.0.q_rope", names) == ("layers.0.q_norm",)  # Qwen3: the q norm comes first
  assert qwen_stage_inputs("layers.0.q_rope", names - {"layers.0.q_norm"}) == ("layers.0.q_proj",)
  assert qwen_stage_inputs("layers.1.attention", names) == ("layers.1.q_rope", "layers.1.k_rope", "layers.1.v_proj")
  assert qwen_stage_inputs("layers.1.post_attn_residual", names) == ("layers.1.attn_out", "layers.0.output")
  assert qwen_stage_inputs("layers.0.ffn_swiglu", names) == ("layers.0.ffn_silu", "layers.0.ffn_up")
  assert qwen_stage_inputs("layers.0.output", names) == ("layers.0.ffn_out", "layers.0.post_attn_residual")
  assert qwen_stage_inputs("layers.0.output", {"layers.0.output"}) == ()  # a Qwen stage, no input compared
  assert qwen_stage_inputs("layers.0.mystery", names) is None  # not a Qwen layer stage


def test_is_qwen_stage_name():
  for name in ["embedding", "final_norm", "logits", "layers.0.q_proj", "layers.11.output"]:
    assert stage_names.is_qwen_stage_name(name), name
  for name in ["rotary_cache", "layers.0.bogus", "logits2", "final"]:
    assert not stage_names.is_qwen_stage_name(name), name
