"""Remap specs: parsing, every validation error (reported together), inverse map; index geometry."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import types

import numpy as np
import pytest

from parity_jax.checkpoint import geometry
from parity_jax.checkpoint.spec import RemapRule, RemapSpec, SpecError
from parity_jax.errors import UsageError


def leaf(shape, kind="array"):
  return types.SimpleNamespace(shape=tuple(shape), kind=kind)


GOOD = {
    "rules": [
        {
            "match": r"^components/(?P<layer>\d+)/g/V$",
            "to": r"components/layers.\g<layer>.mlp.gate_proj/V",
            "squeeze": [0],
        },
        {"match": r"^emb$", "to": "embedding", "reshape": [2, -1]},
        {"match": r"^step$", "to": "step"},
    ],
    "group_depth": 1,
}


def test_from_json_reads_rules_and_roundtrips(tmp_path):
  p = tmp_path / "spec.json"
  p.write_text(json.dumps(GOOD))
  spec = RemapSpec.from_json(p)
  assert len(spec.rules) == 3 and spec.group_depth == 1 and spec.source == str(p)
  assert spec.to_dict() == GOOD
  assert RemapSpec.from_dict(spec.to_dict()).to_dict() == GOOD
  assert spec.to_json() == json.dumps(GOOD, indent=2) and spec.to_json(indent=None) == json.dumps(GOOD)
  assert spec.map_path("components/3/g/V") == "components/layers.3.mlp.gate_proj/V"
  assert spec.map_path("components/3/g/U") is None
  assert spec.group_of("components/layers.3.mlp.gate_proj/V") == "components"


def test_bind_builds_plan_transforms_and_inverse():
  spec = RemapSpec.from_rules(GOOD["rules"])
  plan = spec.bind({"components/0/g/V": leaf((1, 4, 3)), "emb": leaf((6, 5)), "step": leaf(())})
  by = {p.source: p for p in plan.leaves}
  assert by["components/0/g/V"].transform.dst_shape == (4, 3)
  assert by["components/0/g/V"].transform.kind == "squeeze"
  assert by["emb"].transform.dst_shape == (2, 15)  # -1 inferred
  assert by["step"].transform.kind == "identity"
  # how a verdict line names each transform
  assert [by[k].transform.describe() for k in ("components/0/g/V", "emb")] == ["squeeze[0]", "reshape[2, 15]"]
  assert plan.inverse == {"components/layers.0.mlp.gate_proj/V": "components/0/g/V", "embedding": "emb", "step": "step"}
  assert plan.forward == {"components/0/g/V": "components/layers.0.mlp.gate_proj/V", "emb": "embedding", "step": "step"}
  assert {d: p.source for d, p in plan.by_dest().items()} == plan.inverse  # each destination's own leaf plan
  assert plan.by_dest()["embedding"] is by["emb"]
  assert spec.inverse(["step", "emb"]) == {"step": "step", "embedding": "emb"}
  with pytest.raises(SpecError) as e:
    spec.inverse(["step", "components/3/g/U"])
  assert e.value.problems == ["source leaf 'components/3/g/U' matches no rule"]
  x = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
  y = by["components/0/g/V"].transform.apply(x)
  assert y.shape == (4, 3) and np.shares_memory(x, y)  # a view, never a copy


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "not valid JSON: .* line 1 column 2"),
        ("[]", "top level must be a JSON object"),
        ('{"rules": []}', "'rules' must be a non-empty list"),
        ('{"rules": [1]}', "must be an object"),
        ('{"rules": [{"match": "(", "to": "x"}]}', "not a valid regex"),
        ('{"rules": [{"match": "^a$"}]}', "'to' must be a non-empty string"),
        ('{"rules": [{"match": "^(a)$", "to": "\\\\2"}]}', "not a valid template"),
        ('{"rules": [{"match": "^(?P<x>a)$", "to": "\\\\g<y>"}]}', "not a valid template"),
        (
            '{"rules": [{"match": "^a$", "to": "a", "squeeze": [true]}]}',
            "'squeeze' must be a non-empty list of integer",
        ),
        ('{"rules": [{"match": "^a$", "to": "a", "squeeze": []}]}', "'squeeze' must be a non-empty list"),
        ('{"rules": [{"match": "^a$", "to": "a", "squeeze": [0, 0]}]}', "repeats an axis"),
        ('{"rules": [{"match": "^a$", "to": "a", "reshape": [-1, -1]}]}', "at most one -1"),
        ('{"rules": [{"match": "^a$", "to": "a", "reshape": "3"}]}', "'reshape' must be a list of integers"),
        ('{"rules": [{"match": "^a$", "to": "a", "squeeze": [0], "reshape": [3]}]}', "not both"),
        ('{"rules": [{"match": "^a$", "to": "a", "flip": [1, 0]}]}', "unknown key"),
        ('{"rules": [{"match": "^a$", "to": "a"}], "group_depth": 0}', "group_depth"),
        ('{"rules": [{"match": "^a$", "to": "a"}], "extra": 1}', "unknown top-level key"),
        # mut6a: the rule keys checked one by one (each message whole: rule #1 and what is wrong with it)
        (
            '{"rules": [{"match": "^a$", "to": "a", "ops": [], "fill": "x"}]}',
            "1 problem: rule #1: 'fill' must be a number, got 'x'",
        ),
        ('{"rules": [{"match": "^a$", "to": "a", "ops": [], "fill": true}]}', "'fill' must be a number, got True"),
        (
            '{"rules": [{"match": "^a$", "to": "a", "fill": 1}]}',
            "'fill' is what a pad op adds; this rule has no 'ops'$",
        ),
        (
            '{"rules": [{"match": "^a$", "to": "{u}{v}", "unstack": [{"axis": 0, "name": "u"}, {"axis": 0, "name": "v"}]}]}',
            "1 problem: rule #1: two unstack levels use the same axis$",
        ),
        (
            '{"rules": [{"match": "^a$", "to": "a", "squeeze": [0], "ops": [{"transpose": [1, 0]}]}]}',
            "with transpose/ops/stack/cast, put a reshape in 'ops' \\(no 'squeeze'/'reshape'\\)$",
        ),
        ('{"rules": [{"match": "^a$", "to": "a", "drop": 1}]}', "1 problem: rule #1: 'drop' must be true$"),
        (
            '{"rules": [{"match": "^a$", "to": "a", "drop": true, "squeeze": [0]}]}',
            "a dropped leaf takes no transform$",
        ),
    ],
)
def test_malformed_specs_are_refused_with_one_line(tmp_path, text, needle):
  p = tmp_path / "spec.json"
  p.write_text(text)
  with pytest.raises(UsageError, match=needle) as e:
    RemapSpec.from_json(p)
  assert "\n" not in str(e.value)


def test_missing_spec_file_and_directory(tmp_path):
  with pytest.raises(UsageError, match="spec file does not exist"):
    RemapSpec.from_json(tmp_path / "nope.json")
  with pytest.raises(UsageError, match="directory"):
    RemapSpec.from_json(tmp_path)


def test_a_spec_file_that_is_not_utf8_is_refused_with_one_line(tmp_path):
  p = tmp_path / "spec.json"
  p.write_bytes(b'{"rules": [{"match": "\xff", "to": "x"}]}')
  with pytest.raises(UsageError, match=f"^cannot read spec {re.escape(str(p))}: 'utf-8' codec can't decode byte 0xff"):
    RemapSpec.from_json(p)


def test_inverse_names_two_leaves_that_map_to_one_destination():
  spec = RemapSpec.from_rules([{"match": r"^(a|b)$", "to": "x"}])
  with pytest.raises(SpecError) as e:
    spec.inverse(["a", "b"])
  assert e.value.problems == ["source leaves 'a' and 'b' both map to 'x'"]
  assert repr(spec) == "RemapSpec(1 rules, group_depth=1, source='<rules>')"


def test_all_parse_problems_are_reported_together():
  with pytest.raises(SpecError) as e:
    RemapSpec.from_rules(
        [{"match": "(", "to": "x"}, {"match": "^a$", "to": "a", "squeeze": "0", "reshape": [3]}, {"to": "y"}]
    )
  assert len(e.value.problems) == 3  # rule #2: its squeeze, not also "give 'squeeze' or 'reshape', not both"
  assert "rule #1" in str(e.value) and "rule #2" in str(e.value) and "rule #3" in str(e.value)


def test_bind_reports_every_problem_together_before_reading_data():
  spec = RemapSpec.from_rules(
      [
          {"match": r"^a/(\d+)$", "to": r"x/\1", "squeeze": [0]},  # #1
          {"match": r"^a/1$", "to": "y"},  # #2: a/1 matched twice
          {"match": r"^b$", "to": "x/0"},  # #3: b and a/0 -> x/0
          {"match": r"^never$", "to": "z"},  # #4: matches nothing
          {"match": r"^c$", "to": "c", "reshape": [6, 4]},  # #5: not value-preserving
          {"match": r"^d$", "to": "d", "reshape": [5]},  # #6: wrong element count
          {"match": r"^e$", "to": "e/"},  # #7: empty component
          {"match": r"^f$", "to": "p"},  # #8: p is a leaf ...
          {"match": r"^g$", "to": "p/q"},  # #9: ... and a parent
          {"match": r"^h$", "to": "s.t/u"},  # #10: collides with #11 in storage
          {"match": r"^i$", "to": "s/t.u"},  # #11
          {"match": r"^j$", "to": "j", "squeeze": [3]},  # #12: out of range
          {"match": r"^k$", "to": "k", "squeeze": [-1]},  # #13: size 4, not 1
      ]
  )
  leaves = {
      "a/0": leaf((1, 2)),
      "a/1": leaf((1, 2)),
      "a/2": leaf((3, 2)),
      "b": leaf((2,)),
      "c": leaf((4, 6)),
      "d": leaf((2, 3)),
      "e": leaf(()),
      "f": leaf(()),
      "g": leaf(()),
      "h": leaf(()),
      "i": leaf(()),
      "j": leaf((1,)),
      "k": leaf((1, 4)),
      "unmatched": leaf(()),
  }
  with pytest.raises(SpecError) as e:
    spec.bind(leaves)
  text = " | ".join(e.value.problems)
  expected = [
      "'a/1' matches 2 rules: #1, #2",
      "'a/2' of shape (3, 2): squeeze [0]: axis 0 has size 3, not 1",
      "'a/0' and 'b' both map to 'x/0'",
      "rule #4 ('^never$') matches no source leaf",
      "reshape (4, 6) -> (6, 4) is not value-preserving",
      "24 elements" if False else "6 elements cannot become (5,)",
      "'e/', which has an empty path component",
      "destination 'p' is a leaf and also the parent of 'p/q'",
      "collide in orbax storage as 's.t.u'",
      "squeeze [3]: axis 3 is out of range for rank 1",
      "squeeze [-1]: axis 1 has size 4, not 1",
      "source leaf 'unmatched' matches no rule",
  ]
  for needle in expected:
    assert needle in text, needle
  assert len(e.value.problems) == len(expected)
  assert "\n" not in str(e.value)


def test_string_leaves_cannot_be_transformed():
  spec = RemapSpec.from_rules([{"match": "^s$", "to": "s", "squeeze": [0]}])
  with pytest.raises(SpecError, match="is a string"):
    spec.bind({"s": leaf((), kind="string")})


def test_long_problem_lists_stay_on_one_line():
  spec = RemapSpec.from_rules([{"match": "^nothing$", "to": "x"}])
  with pytest.raises(SpecError) as e:
    spec.bind({f"leaf{i}": leaf(()) for i in range(100)})
  assert len(e.value.problems) == 101 and "and 76 more" in str(e.value) and "\n" not in str(e.value)


# ---- geometry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, r",
    [
        ((1, 8, 6), (8, 6), (8, 6)),
        ((2, 12), (2, 3, 4), (2, 3, 4)),
        ((6, 4), (2, 12), (2, 3, 4)),
        ((4, 6), (6, 4), None),
        ((4, 6), (25,), None),
        ((1, 1), (), ()),
        ((5, 1, 1), (1, 5), (5,)),
    ],
)
def test_refinement(a, b, r):
  assert geometry.refinement(a, b) == r


SHAPE_PAIRS = [
    ((1, 6, 40), (6, 40)),
    ((50, 8), (5, 10, 8)),
    ((6, 4), (2, 12)),
    ((1, 5, 1), (5, 1)),
    ((3, 1, 4, 2), (12, 2)),
    ((), ()),
]


@pytest.mark.parametrize("a, b", SHAPE_PAIRS)
@pytest.mark.parametrize("target", [1, 3, 7, 40, 10**6])
def test_slabs_cover_every_element_once_in_c_order_in_both_shapes(a, b, target):
  r = geometry.refinement(a, b)
  n = int(np.prod(a)) if a else 1
  x = np.arange(n).reshape(a)
  y = x.reshape(b)
  ga, gb = geometry.axis_groups(a, r), geometry.axis_groups(b, r)
  plan = geometry.SlabPlan.for_target(r, target)
  seen = []
  for lo, hi in plan:
    sa = geometry.box_in(a, ga, r, lo, hi)
    sb = geometry.box_in(b, gb, r, lo, hi)
    pa, pb = x[sa].reshape(-1), y[sb].reshape(-1)
    assert np.array_equal(pa, pb)
    assert pa.size <= max(target, r[-1] if r else 1)
    assert pa[0] == geometry.flat_offset(lo, r)
    seen.append(pa)
  assert np.array_equal(np.concatenate(seen) if seen else np.zeros(0), np.arange(n))
  assert len(seen) == plan.n_slabs


def test_chunk_rows_and_row_major_chunks():
  assert geometry.chunk_row_elems((8, 100), (2, 100)) == 200
  assert geometry.chunk_row_elems((8, 100), (2, 10)) == 200  # a row of 10 chunks
  assert geometry.chunk_row_elems((8, 100), (8, 10)) == 800  # column blocks: every slab needs all
  assert geometry.chunk_row_elems((1, 64, 16), (1, 4, 16)) == 64
  assert geometry.chunk_row_elems((3, 4), None) == 12
  assert geometry.row_major_chunk_shape((4096, 16384), 4, 64 << 20) == (1024, 16384)
  assert geometry.row_major_chunk_shape((1, 65536, 4096), 4, 64 << 20) == (1, 4096, 4096)
  assert geometry.row_major_chunk_shape((3, 1000, 1000), 4, 1 << 20) == (1, 250, 1000)
  assert geometry.row_major_chunk_shape((7, 5), 4, None) == (7, 5)
  assert geometry.row_major_chunk_shape((), 4, 16) == ()
  for shape, target in itertools.product([(97, 13), (1, 40, 6), (6, 1, 40)], [4, 100, 1000]):
    c = geometry.row_major_chunk_shape(shape, 4, target)
    assert int(np.prod(c)) * 4 <= max(target, 4) or c[-1] == shape[-1] and int(np.prod(c[:-1])) == 1
    # every chunk is a C-contiguous run: ones, then one split axis, then whole axes
    assert any(all(cc == 1 for cc in c[:p]) and tuple(c[p + 1 :]) == tuple(shape[p + 1 :]) for p in range(len(shape)))


def test_slab_boundaries_alignment():
  plan = geometry.SlabPlan.for_target((64, 16), 4 * 16)
  assert plan.boundaries_are_multiples_of(64) and plan.boundaries_are_multiples_of(32)
  assert not plan.boundaries_are_multiples_of(128)
  assert geometry.SlabPlan.for_target((64, 16), 10**6).boundaries_are_multiples_of(64 * 16)


def test_slab_boundary_predicates_against_the_slabs_themselves():
  """Brute force: the boundaries are the flat offsets of the slabs the plan yields (and the end)."""
  rng = np.random.default_rng(5)
  for _ in range(300):
    r = tuple(int(x) for x in rng.integers(1, 7, rng.integers(1, 4)))
    n = int(np.prod(r))
    plan = geometry.SlabPlan.for_target(r, int(rng.integers(1, n + 1)))
    bounds = {geometry.flat_offset(lo, r) for lo, _ in plan} | {n}
    assert len(bounds) == plan.n_slabs + 1, (r, plan)
    for e in range(1, n + 2):
      every_multiple_is_a_boundary = all(m in bounds for m in range(e, n, e))
      assert plan.boundaries_include_multiples_of(e) == every_multiple_is_a_boundary, (r, plan, e)
      if plan.boundaries_are_multiples_of(e):  # conservative (a lone leading block may say no): never a wrong yes
        assert all(b % e == 0 or b == n for b in bounds), (r, plan, e)
  for r in ((4, 0), (0, 4), (3, 0, 2)):  # no elements: no slabs
    plan = geometry.SlabPlan.for_target(r, 8)
    assert (list(plan), plan.n_slabs) == ([], 0)


def test_which_rules_are_checked_element_by_element():
  """Renames, squeezes and reshapes keep every byte in order (compared as streams); transposes, stacks, unstacks
  and casts move or change elements (compared element by element)."""
  spec = RemapSpec.from_dict(
      {
          "rules": [
              {"match": "^a$", "to": "a"},
              {"match": "^b$", "to": "b", "reshape": [-1]},
              {"match": "^c$", "to": "c", "transpose": [1, 0]},
              {"match": "^d$", "to": "d", "cast": "bfloat16"},
          ]
      }
  )
  assert [r.elementwise for r in spec.rules] == [False, False, True, True]


def test_a_spec_written_out_reads_back_the_same():
  """--print_spec writes RemapSpec.to_dict(): every kind of rule survives the round trip unchanged."""
  rules = [
      {"match": "^a$", "to": "a"},
      {"match": "^b$", "to": "b", "squeeze": [0]},
      {"match": "^c$", "to": "c", "reshape": [2, -1]},
      {"match": "^d$", "to": "d", "transpose": [1, 0]},
      {"match": "^e$", "to": "e", "cast": "bfloat16"},
      {"match": "^(q|k)$", "to": "qk", "concat": {"axis": 1, "index": r"\1", "order": ["q", "k"]}},
      {"match": "^(f|g)$", "to": "fg", "concat": {"axis": 0, "index": r"\1"}},
      {"match": "^h$", "to": "h{p}", "split": {"axis": 0, "sizes": [2, 1], "name": "p", "names": ["x", "y"]}},
      {"match": "^i$", "to": "i{p}", "split": {"axis": 1, "sections": 3, "name": "p"}},
      {"match": "^j$", "to": "unused", "drop": True},
  ]
  spec = RemapSpec.from_dict({"rules": rules})
  again = RemapSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
  assert again.to_dict() == spec.to_dict()
  d = {r["match"]: r for r in spec.to_dict()["rules"]}
  assert d["^b$"]["squeeze"] == [0] and d["^c$"]["reshape"] == [2, -1] and d["^e$"]["cast"] == "bfloat16"
  assert "transpose" in json.dumps(d["^d$"])
  assert d["^(q|k)$"]["concat"] == rules[5]["concat"] and d["^(f|g)$"]["concat"] == rules[6]["concat"]
  assert d["^h$"]["split"] == rules[7]["split"]
  assert d["^i$"]["split"] == {**rules[8]["split"], "names": ["0", "1", "2"]}
  assert d["^j$"] == rules[9] and "drop" not in d["^a$"]


def test_a_destination_with_an_empty_component_is_one_problem_and_binds_nothing_else():
  # "e" -> "e/" is refused once; it is not then also taken as a child of the leaf "d" -> "e", nor as a destination
  spec = RemapSpec.from_rules([{"match": r"^e$", "to": "e/"}, {"match": r"^d$", "to": "e"}])
  with pytest.raises(SpecError) as e:
    spec.bind({"e": leaf((2,)), "d": leaf((3,))})
  assert e.value.problems == ["rule #1 ('^e$') maps 'e' to 'e/', which has an empty path component"]


def test_a_spec_error_spells_out_at_most_25_problems_and_counts_the_rest():
  assert str(SpecError("invalid spec s", ["only"])) == "invalid spec s: 1 problem: only"
  all25 = [f"p{i}" for i in range(25)]
  assert str(SpecError("invalid spec s", all25)) == "invalid spec s: 25 problems: " + "; ".join(all25)
  e = SpecError("invalid spec s", [f"p{i}" for i in range(30)])
  assert str(e) == "invalid spec s: 30 problems: " + "; ".join(all25) + "; ... and 5 more"
  assert e.problems == [f"p{i}" for i in range(30)] and e.what == "invalid spec s"  # every one kept


def test_an_element_target_that_a_plain_rule_also_writes_is_one_problem_naming_both_sources():
  spec = RemapSpec.from_rules(
      [
          {"match": r"^a$", "to": "x"},  # a plain rule
          {"match": r"^b$", "to": "x", "ops": [{"transpose": [1, 0]}]},  # an element rule onto the same leaf
      ]
  )
  leaves = [("a", (2, 3)), ("b", (3, 2))]
  with pytest.raises(SpecError) as e:
    spec.bind({n: types.SimpleNamespace(shape=sh, kind="array", dtype=np.dtype(np.float32)) for n, sh in leaves})
  assert e.value.problems == ["source leaves 'a' and 'b' both map to 'x'"]


@pytest.mark.parametrize(
    "stack, bad",
    [
        ([{"axis": -1, "index": "x"}], 0),
        ([{"axis": 0}], 0),  # no index
        ([{"axis": 0, "index": "a"}, {"axis": True, "index": "b"}], 1),  # a bool is no axis (nor the same as 1)
    ],
)
def test_a_malformed_stack_level_is_one_problem_and_nothing_else(stack, bad):
  with pytest.raises(SpecError) as e:
    RemapSpec.from_rules([{"match": "^a(.)$", "to": "a", "stack": stack}])
  assert e.value.problems == [
      f"rule #1: stack[{bad}] must be {{'axis': int >= 0, 'index': template}}, got {stack[bad]!r}"
  ]


@pytest.mark.parametrize("stack", ["ab", 3])
def test_a_stack_that_is_no_list_is_one_problem_and_its_items_are_not_checked(stack):
  with pytest.raises(SpecError) as e:
    RemapSpec.from_rules([{"match": "^a(.)$", "to": "a", "stack": stack}])
  assert e.value.problems == ["rule #1: 'stack' must be a list of {'axis': int, 'index': template}"]


def test_a_rule_built_in_code_maps_its_leaves_unless_it_says_drop():
  """RemapSpec takes RemapRule objects too: a rule given without ``drop`` renames, one with ``drop=True`` drops."""
  leaves = {"a": types.SimpleNamespace(shape=(2,), kind="array", dtype=np.dtype(np.float32))}
  rule = RemapRule(index=1, match="^a$", to="b", pattern=re.compile("^a$"))
  plan = RemapSpec([rule]).bind(leaves)
  assert (plan.forward, plan.dropped, rule.to_dict()) == ({"a": "b"}, (), {"match": "^a$", "to": "b"})
  gone = RemapRule(index=1, match="^a$", to="b", pattern=re.compile("^a$"), drop=True)
  plan = RemapSpec([gone]).bind(leaves)
  assert (plan.forward, plan.dropped) == ({}, ("a",))
  plan = RemapSpec([rule]).bind(leaves)
  for frozen in (rule, plan, plan.leaves[0], plan.leaves[0].transform):  # shared by every process and thread
    with pytest.raises(dataclasses.FrozenInstanceError):
      frozen.group = "x"


def test_a_transform_applies_only_to_its_own_shape():
  from parity_jax.checkpoint.spec import Transform

  x = np.arange(6, dtype=np.float32).reshape(1, 6)
  assert Transform("identity", (1, 6), (1, 6)).apply(x) is x
  y = Transform("reshape", (1, 6), (2, 3)).apply(x)
  assert y.shape == (2, 3) and y.tobytes() == x.tobytes() and np.shares_memory(x, y)
  with pytest.raises(UsageError, match=r"expects shape \(1, 6\), got \(6,\)$"):
    Transform("reshape", (1, 6), (2, 3)).apply(x.ravel())


def test_unstack_rules_write_out_and_read_back():
  spec = RemapSpec.from_rules([{"match": "^w$", "to": "w.{u}", "unstack": [{"axis": 0, "name": "u"}]}])
  d = spec.to_dict()
  assert d["rules"][0]["unstack"] == [{"axis": 0, "name": "u"}]
  assert RemapSpec.from_dict(d).to_dict() == d and spec.to_json() == json.dumps(d, indent=2)


def test_a_spec_in_a_bucket_is_read_like_a_file(gcs_bucket):
  text = json.dumps({"rules": [{"match": "^a$", "to": "b"}]})
  gcs_bucket.put("specs/spec.json", text.encode())
  gcs_bucket.put("specs/latin1.json", b'{"rules": [{"match": "\xff", "to": "x"}]}')
  url = gcs_bucket.url + "/specs"
  assert RemapSpec.from_json(url + "/spec.json").to_dict() == RemapSpec.from_dict(json.loads(text)).to_dict()
  for name, message in (
      ("nope.json", f"spec file does not exist: {url}/nope.json"),
      ("", f"spec must be a JSON file, got a directory: {url}"),
  ):
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
      RemapSpec.from_json(f"{url}/{name}".rstrip("/"))
  with pytest.raises(UsageError, match=f"^cannot read spec {re.escape(url)}/latin1.json: 'utf-8' codec"):
    RemapSpec.from_json(url + "/latin1.json")
