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


def test_stage_inputs_outside_the_layers():
  """The data-flow inputs of the stages before and after the layers, written out from the Qwen graph."""
  from parity_jax.bundles.qwen_graph import qwen_stage_inputs

  names = ["embedding", "layers.0.output", "layers.1.output", "final_norm", "logits"]
  assert qwen_stage_inputs("embedding", names) == ()  # the first stage: nothing upstream
  assert qwen_stage_inputs("final_norm", names) == ("layers.1.output",)
  assert qwen_stage_inputs("logits", names) == ("final_norm",)
  assert qwen_stage_inputs("logits", names[:3]) == ("layers.1.output",)  # no final_norm compared
  assert qwen_stage_inputs("rotary_cache", names) is None  # not a Qwen stage
