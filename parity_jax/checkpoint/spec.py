"""Declarative remap specs, shared by the migrator and the verifier.

A spec is JSON::

  {"rules": [
     {"match": "^components/(?P<layer>\\\\d+)/g/V$",
      "to": "components/layers.\\\\g<layer>.mlp.gate_proj/V", "squeeze": [0]},
     {"match": "^step$", "to": "step"}],
   "group_depth": 1}

* Leaf paths are the pytree keys joined by ``/``; list indices are decimal
  strings. ``match`` is a full regex (``re.fullmatch``) on the source path;
  ``to`` is a :mod:`re` replacement template (``\\1``, ``\\g<name>``).
* Optional transforms: ``squeeze`` (source axes, each of size 1) or
  ``reshape`` (the target shape, one ``-1`` allowed). A reshape is accepted
  only when it is value-preserving in the strict sense of
  :func:`parity_jax.checkpoint.geometry.refinement`: same elements in the same
  C order, and every axis of either shape is a run of adjacent axes of a
  common refinement (splits and merges of adjacent axes, size-1 axes added or
  dropped). ``(4, 6) -> (6, 4)`` keeps the bytes but silently reinterprets the
  axes; it is refused.
* Element rules (:mod:`parity_jax.checkpoint.transforms`): ``transpose``
  (a permutation), ``ops`` (transposes and reshapes in order), ``stack``
  (many source leaves into one target leaf along declared axes, nested
  levels allowed), ``concat`` / ``split`` (fused projections: parts
  along one axis, sizes may differ), ``unstack`` and ``cast`` (a float dtype, checked against
  round-to-nearest-even). Every element keeps its bytes (or its correctly
  rounded value); only its position moves. The verifier checks them element
  by element; the migrator performs them with the same evaluation.
* ``"drop": true`` declares matched source leaves dropped (a tied
  ``lm_head``): used by no target, and not an error.
* ``group_depth`` (default 1): the verdict table groups leaves by the first
  ``group_depth`` components of the migrated path.

Validation happens in two steps and never reads array data:
:meth:`RemapSpec.from_json` / :meth:`RemapSpec.from_rules` check the spec on
its own; :meth:`RemapSpec.bind` checks it against the source leaves' metadata
(every leaf matches exactly one rule, every rule matches a leaf, no two leaves
map to one destination, each transform fits the leaf's shape, destinations
do not collide in orbax's storage names). Each step reports ALL problems
together in one :class:`SpecError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from parity_jax.checkpoint import geometry, keypath
from parity_jax.errors import UsageError

__all__ = ["LeafPlan", "MigrationPlan", "RemapRule", "RemapSpec", "SpecError", "Transform"]

_RULE_KEYS = {
    "match",
    "to",
    "squeeze",
    "reshape",
    "comment",
    "transpose",
    "ops",
    "stack",
    "cast",
    "drop",
    "fill",
    "unstack",
    "concat",
    "split",
}
_TOP_KEYS = {"rules", "group_depth", "comment", "description"}
_MAX_LISTED = 25  # problems spelled out in the one-line message; all are in .problems
SPEC_ERRORS_FORMAT = "parity_jax.spec_errors/1"


class SpecError(UsageError):
  """A spec that is malformed or does not fit the checkpoint; ``problems`` lists every issue."""

  def __init__(self, what: str, problems: Sequence[str]):
    self.what = what
    self.problems = list(problems)
    listed = "; ".join(self.problems[:_MAX_LISTED])
    more = len(self.problems) - _MAX_LISTED
    if more > 0:
      listed += f"; ... and {more} more"
    n = len(self.problems)
    super().__init__(f"{what}: {n} problem{'s' if n != 1 else ''}: {listed}")

  def to_dict(self) -> dict[str, Any]:
    """Every problem, none cut off (the one-line message lists the first few)."""
    return {
        "format": SPEC_ERRORS_FORMAT,
        "error": self.what,
        "n_problems": len(self.problems),
        "problems": list(self.problems),
    }

  def write_json(self, path: str | os.PathLike) -> str:
    """Writes :meth:`to_dict` atomically; returns the absolute path."""
    from parity_jax import jsonio

    return jsonio.write_json(path, self.to_dict())

  def line(self, written: Sequence[str] = (), hint: str = "") -> str:
    """The one-line message, saying first where all problems were written (or ``hint``: how to get them).

    Tools cut a line at 300 characters, so what matters comes first: the
    count, where to find the full list, then as many problems as fit.
    """
    n = len(self.problems)
    where = f"all {n} in {', '.join(written)}" if written else hint
    head = f"{self.what}: {n} problem{'s' if n != 1 else ''}{f' ({where})' if where and n > 1 else ''}: "
    return head + "; ".join(self.problems[:_MAX_LISTED])


@dataclasses.dataclass(frozen=True)
class Transform:
  """A value-preserving transform of one leaf: identity, squeeze or reshape."""

  kind: str  # "identity" | "squeeze" | "reshape"
  src_shape: tuple[int, ...]
  dst_shape: tuple[int, ...]
  axes: tuple[int, ...] = ()  # squeeze axes (normalised)

  def apply(self, x: np.ndarray) -> np.ndarray:
    """The migrated value of ``x`` (a view, never a copy, for contiguous input)."""
    x = np.asarray(x)
    if tuple(x.shape) != self.src_shape:
      raise UsageError(f"transform {self.describe()} expects shape {self.src_shape}, got {tuple(x.shape)}")
    if self.kind == "identity":
      return x
    if self.kind == "squeeze":
      return np.squeeze(x, axis=self.axes)
    return x.reshape(self.dst_shape)

  def describe(self) -> str:
    if self.kind == "squeeze":
      return f"squeeze{list(self.axes)}"
    if self.kind == "reshape":
      return f"reshape{list(self.dst_shape)}"
    return "identity"


@dataclasses.dataclass(frozen=True)
class RemapRule:
  """One remap rule; ``index`` is its 1-based position in the spec (for messages)."""

  index: int
  match: str
  to: str
  squeeze: tuple[int, ...] | None = None
  reshape: tuple[int, ...] | None = None
  pattern: re.Pattern = dataclasses.field(compare=False, repr=False, default=None)
  ops: tuple = ()  # transforms.Op chain of an element rule
  stack: tuple[tuple[int, str], ...] = ()  # (target axis, index template) per stack level
  cast: str | None = None
  drop: bool = False
  fill: float = 0.0  # what a pad op adds (a number, in the target dtype)
  unstack: tuple[tuple[int, str], ...] = ()  # (source axis, placeholder name in 'to') per level
  concat: tuple = ()  # (target axis, index template, order names) of a concatenation
  split: tuple = ()  # (source axis, sizes or None, sections or None, placeholder name, piece names)

  def unstacked(self, shape: tuple[int, ...], dest: str) -> list[tuple[str, tuple]] | str:
    """(dest, leading ops) of every piece of an unstacked source leaf of ``shape``, or why it does not fit."""
    from parity_jax.checkpoint.transforms import Op

    axes = [a for a, _ in self.unstack]
    if any(a >= len(shape) for a in axes):
      return f"unstack axis {max(axes)} is out of range for shape {list(shape)}"
    kept = tuple(d for i, d in enumerate(shape) if i not in axes)
    out = []
    for idx in np.ndindex(*[shape[a] for a in axes]):
      pairs = [[0, d] for d in shape]
      name = dest
      for (a, ph), i in zip(self.unstack, idx):
        pairs[a] = [i, i + 1]
        name = name.replace("{" + ph + "}", str(i))
      out.append((name, (Op("slice", tuple(x for p in pairs for x in p)), Op("reshape", kept))))
    return out

  @property
  def elementwise(self) -> bool:
    """Transposes, stacks or casts: checked element by element (:mod:`parity_jax.checkpoint.transforms`)."""
    return bool(self.ops or self.stack or self.cast or self.unstack or self.concat or self.split)

  def label(self) -> str:
    return f"rule #{self.index} ({self.match!r})"

  def to_dict(self) -> dict[str, Any]:
    d: dict[str, Any] = {"match": self.match, "to": self.to}
    if self.squeeze is not None:
      d["squeeze"] = list(self.squeeze)
    if self.reshape is not None:
      d["reshape"] = list(self.reshape)
    if self.ops:
      d["ops"] = [o.to_dict() for o in self.ops]
    if self.stack:
      d["stack"] = [{"axis": a, "index": t} for a, t in self.stack]
    if self.cast:
      d["cast"] = self.cast
    if self.drop:
      d["drop"] = True
    if any(o.kind == "pad" for o in self.ops):
      d["fill"] = self.fill
    if self.unstack:
      d["unstack"] = [{"axis": a, "name": n} for a, n in self.unstack]
    if self.concat:
      d["concat"] = {
          "axis": self.concat[0],
          "index": self.concat[1],
          **({"order": list(self.concat[2])} if self.concat[2] else {}),
      }
    if self.split:
      axis, sizes, sections, name, names = self.split
      d["split"] = {"axis": axis, "name": name, "names": list(names)}
      d["split"].update({"sizes": list(sizes)} if sizes is not None else {"sections": sections})
    return d

  def transform_for(self, shape: tuple[int, ...]) -> Transform | str:
    """The transform for a source leaf of ``shape``, or a one-line reason it does not fit."""
    shape = tuple(int(d) for d in shape)
    if self.squeeze is not None:
      axes = geometry.normalize_squeeze(self.squeeze, len(shape))
      if isinstance(axes, str):
        return f"squeeze {list(self.squeeze)}: {axes}"
      bad = [a for a in axes if shape[a] != 1]
      if bad:
        return f"squeeze {list(self.squeeze)}: axis {bad[0]} has size {shape[bad[0]]}, not 1"
      return Transform("squeeze", shape, geometry.squeezed_shape(shape, axes), axes)
    if self.reshape is not None:
      target = list(self.reshape)
      n = int(np.prod(shape)) if shape else 1
      if -1 in target:
        rest = int(np.prod([d for d in target if d != -1])) if len(target) > 1 else 1
        if rest == 0 or n % rest:
          return f"reshape {list(self.reshape)}: cannot infer -1 for {n} elements"
        target[target.index(-1)] = n // rest
      target_t = tuple(target)
      if int(np.prod(target_t)) != n:
        return f"reshape {list(self.reshape)}: {n} elements cannot become {target_t}"
      if geometry.refinement(shape, target_t) is None:
        return (
            f"reshape {shape} -> {target_t} is not value-preserving: it does not only split or merge" f" adjacent axes"
        )
      return Transform("reshape", shape, target_t)
    return Transform("identity", shape, shape)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """One source leaf, where it goes and how it is transformed."""

  source: str
  dest: str
  rule: RemapRule
  transform: Transform
  group: str


@dataclasses.dataclass(frozen=True)
class MigrationPlan:
  """A spec bound to a source checkpoint's leaves; ``leaves`` in source order."""

  spec: "RemapSpec"
  leaves: tuple[LeafPlan, ...]
  elements: tuple = ()  # transforms.ElementPlan per target leaf of an element rule
  dropped: tuple[str, ...] = ()  # source leaves declared dropped

  @property
  def inverse(self) -> dict[str, str]:
    """Destination path -> source path (the first member of a stack)."""
    return {**{p.dest: p.source for p in self.leaves}, **{e.dest: e.sources[0] for e in self.elements}}

  @property
  def forward(self) -> dict[str, str]:
    return {p.source: p.dest for p in self.leaves}

  def by_dest(self) -> dict[str, LeafPlan]:
    return {p.dest: p for p in self.leaves}


def _int_list(v: Any) -> bool:
  return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _check_template(pattern: re.Pattern, to: str) -> str | None:
  """Validates a replacement template against ``pattern``'s groups without needing a match."""
  names = {i: n for n, i in pattern.groupindex.items()}
  synthetic = "".join(f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pattern.groups + 1))
  try:
    re.compile(synthetic).sub(to, "", count=1)
  except (re.error, IndexError) as e:
    return str(e)
  return None


def _read_remote_spec(url: str) -> str:
  """The text of a spec stored as a ``gs://`` / ``s3://`` object (one read); the local file's messages otherwise."""
  from parity_jax import stores

  store = stores.open_store(url)
  try:
    data = store.read_bytes() if store.name else None
  except stores.StoreError as e:
    if e.kind != "not_found":
      raise
    data = None
  if data is None:
    if store.is_dir():
      raise UsageError(f"spec must be a JSON file, got a directory: {url}")
    raise UsageError(f"spec file does not exist: {url}")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UsageError(f"cannot read spec {url}: {e}") from None


class RemapSpec:
  """A validated list of rules plus ``group_depth``. Build with :meth:`from_json` or :meth:`from_rules`."""

  def __init__(self, rules: Sequence[RemapRule], group_depth: int = 1, source: str | None = None):
    self.rules = tuple(rules)
    self.group_depth = int(group_depth)
    self.source = source  # where the spec came from (a path or "<rules>")

  # ---- construction -------------------------------------------------------------------------

  @classmethod
  def from_rules(
      cls, rules: Sequence[Mapping[str, Any]], group_depth: int = 1, *, name: str = "<rules>"
  ) -> "RemapSpec":
    """Builds a spec from rule dicts (the JSON ``rules`` list); raises :class:`SpecError`."""
    return cls._parse({"rules": list(rules), "group_depth": group_depth}, name)

  @classmethod
  def from_dict(cls, obj: Any, *, name: str = "<dict>") -> "RemapSpec":
    return cls._parse(obj, name)

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "RemapSpec":
    """Reads and validates a JSON spec file; every problem raises one :class:`SpecError`."""
    from parity_jax import stores

    path = os.fspath(path)
    if stores.is_remote(path):
      text = _read_remote_spec(path)
    else:
      if not os.path.exists(path):
        raise UsageError(f"spec file does not exist: {path}")
      if os.path.isdir(path):
        raise UsageError(f"spec must be a JSON file, got a directory: {path}")
      try:
        with open(path, encoding="utf-8") as f:
          text = f.read()
      except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read spec {path}: {e}") from None
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise UsageError(f"spec {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return cls._parse(obj, path)

  @classmethod
  def _parse(cls, obj: Any, name: str) -> "RemapSpec":
    problems: list[str] = []
    if not isinstance(obj, dict):
      raise SpecError(f"spec {name}", ["the top level must be a JSON object with a 'rules' list"])
    unknown = sorted(set(obj) - _TOP_KEYS)
    if unknown:
      problems.append(f"unknown top-level key(s) {unknown} (allowed: {sorted(_TOP_KEYS)})")
    group_depth = obj.get("group_depth", 1)
    if not isinstance(group_depth, int) or isinstance(group_depth, bool) or group_depth < 1:
      problems.append(f"'group_depth' must be an integer >= 1, got {group_depth!r}")
      group_depth = 1
    raw_rules = obj.get("rules")
    rules: list[RemapRule] = []
    if not isinstance(raw_rules, list) or not raw_rules:
      problems.append("'rules' must be a non-empty list of rule objects")
      raw_rules = []
    for i, r in enumerate(raw_rules, start=1):
      where = f"rule #{i}"
      if not isinstance(r, dict):
        problems.append(f"{where}: must be an object with 'match' and 'to'")
        continue
      unknown = sorted(set(r) - _RULE_KEYS)
      if unknown:
        problems.append(f"{where}: unknown key(s) {unknown} (allowed: {sorted(_RULE_KEYS)})")
      match, to = r.get("match"), r.get("to")
      pattern = None
      if not isinstance(match, str) or not match:
        problems.append(f"{where}: 'match' must be a non-empty string (a regex)")
      else:
        try:
          pattern = re.compile(match)
        except re.error as e:
          problems.append(f"{where}: 'match' {match!r} is not a valid regex: {e}")
      if not isinstance(to, str) or not to:
        problems.append(f"{where}: 'to' must be a non-empty string (a replacement template)")
      elif pattern is not None:
        err = _check_template(pattern, to)
        if err:
          problems.append(f"{where}: 'to' {to!r} is not a valid template for {match!r}: {err}")
      squeeze = r.get("squeeze")
      reshape = r.get("reshape")
      if squeeze is not None:
        if not _int_list(squeeze) or not squeeze:
          problems.append(f"{where}: 'squeeze' must be a non-empty list of integer axes, got {squeeze!r}")
          squeeze = None
        elif len(set(squeeze)) != len(squeeze):
          problems.append(f"{where}: 'squeeze' {squeeze} repeats an axis")
      if reshape is not None:
        if not _int_list(reshape):
          problems.append(f"{where}: 'reshape' must be a list of integers, got {reshape!r}")
          reshape = None
        elif any(d < -1 for d in reshape) or reshape.count(-1) > 1:
          problems.append(f"{where}: 'reshape' {reshape} may hold sizes >= 0 and at most one -1")
      if squeeze is not None and reshape is not None:
        problems.append(f"{where}: give 'squeeze' or 'reshape', not both (a reshape can drop size-1 axes itself)")
      ops, stack, cast, drop, fill = (), (), None, False, 0.0
      if "fill" in r:
        fill = r["fill"]
        if isinstance(fill, bool) or not isinstance(fill, (int, float)):
          problems.append(f"{where}: 'fill' must be a number, got {fill!r}")
          fill = 0.0
        elif "ops" not in r:
          problems.append(f"{where}: 'fill' is what a pad op adds; this rule has no 'ops'")
      unstack = []
      if "unstack" in r:
        raw = r["unstack"] if isinstance(r["unstack"], list) else [r["unstack"]]
        for i, u in enumerate(raw):
          ok = isinstance(u, dict) and set(u) == {"axis", "name"} and isinstance(u.get("name"), str)
          ok = ok and isinstance(u["axis"], int) and not isinstance(u["axis"], bool) and u["axis"] >= 0
          if not ok:
            problems.append(f"{where}: unstack[{i}] must be {{'axis': int >= 0, 'name': str}}, got {u!r}")
          elif isinstance(to, str) and "{" + u["name"] + "}" not in to:
            problems.append(f"{where}: unstack name {u['name']!r} does not appear as {{{u['name']}}} in 'to'")
          else:
            unstack.append((u["axis"], u["name"]))
        if len({a for a, _ in unstack}) != len(unstack):
          problems.append(f"{where}: two unstack levels use the same axis")
      concat, split = (), ()
      if any(k in r for k in ("transpose", "ops", "stack", "cast", "unstack", "concat", "split")):
        from parity_jax.checkpoint import transforms

        ops, stack, cast, more = transforms.parse_element_keys(r, where)
        problems.extend(more)
        concat, split, more = transforms.parse_concat_split(r, where)
        problems.extend(more)
        if squeeze is not None or reshape is not None:
          problems.append(f"{where}: with transpose/ops/stack/cast, put a reshape in 'ops' (no 'squeeze'/'reshape')")
        if pattern is not None:
          for _, t in stack + ((None, concat[1]),) if concat else stack:
            err = _check_template(pattern, t)
            if err:
              problems.append(f"{where}: stack or concat index {t!r} is not a valid template for {match!r}: {err}")
      if "drop" in r:
        drop = r["drop"]
        if drop is not True:
          problems.append(f"{where}: 'drop' must be true")
        elif len(set(r) - {"match", "to", "drop", "comment"}):
          problems.append(f"{where}: a dropped leaf takes no transform")
      rules.append(
          RemapRule(
              index=i,
              match=match if isinstance(match, str) else "",
              to=to if isinstance(to, str) else "",
              squeeze=tuple(squeeze) if squeeze is not None else None,
              reshape=tuple(reshape) if reshape is not None else None,
              pattern=pattern,
              ops=ops,
              stack=stack,
              cast=cast,
              drop=drop is True,
              fill=float(fill),
              unstack=tuple(unstack),
              concat=concat,
              split=split,
          )
      )
    if problems:
      raise SpecError(f"invalid spec {name}", problems)
    return cls(rules, group_depth, source=name)

  # ---- use ------------------------------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    return {"rules": [r.to_dict() for r in self.rules], "group_depth": self.group_depth}

  def to_json(self, indent: int | None = 2) -> str:
    return json.dumps(self.to_dict(), indent=indent)

  def matching_rules(self, path: str) -> list[RemapRule]:
    return [r for r in self.rules if r.pattern.fullmatch(path)]

  def map_path(self, path: str) -> str | None:
    """Destination of ``path`` under the single rule that matches it, else None."""
    rules = self.matching_rules(path)
    if len(rules) != 1:
      return None
    return rules[0].pattern.fullmatch(path).expand(rules[0].to)

  def group_of(self, dest: str) -> str:
    return keypath.join(keypath.split(dest)[: self.group_depth])

  def inverse(self, source_paths: Iterable[str]) -> dict[str, str]:
    """Destination -> source for ``source_paths`` (shape-independent part of :meth:`bind`)."""
    out: dict[str, str] = {}
    problems: list[str] = []
    for p in source_paths:
      d = self.map_path(p)
      if d is None:
        n = len(self.matching_rules(p))
        problems.append(f"source leaf {p!r} matches {'no rule' if n == 0 else f'{n} rules'}")
      elif d in out:
        problems.append(f"source leaves {out[d]!r} and {p!r} both map to {d!r}")
      else:
        out[d] = p
    if problems:
      raise SpecError(f"spec {self.source} does not fit these leaves", problems)
    return out

  def bind(self, leaves: Mapping[str, Any], *, what: str = "source checkpoint") -> MigrationPlan:
    """Checks the spec against source leaf metadata and returns the plan.

    ``leaves`` maps source path -> an object with ``shape`` and ``kind``
    (``LeafMeta``). All problems are reported together, before any data is read.
    """
    problems: list[str] = []
    plans: list[LeafPlan] = []
    hits = {r.index: 0 for r in self.rules}
    dest_of: dict[str, str] = {}
    element_items: list[tuple] = []
    dropped: list[str] = []
    for path, meta in leaves.items():
      rules = self.matching_rules(path)
      for r in rules:
        hits[r.index] += 1
      if not rules:
        problems.append(f"source leaf {path!r} matches no rule")
        continue
      if len(rules) > 1:
        problems.append(f"source leaf {path!r} matches {len(rules)} rules: " + ", ".join(f"#{r.index}" for r in rules))
        continue
      rule = rules[0]
      if rule.drop:
        dropped.append(path)
        continue
      dest = rule.pattern.fullmatch(path).expand(rule.to)
      comps = keypath.split(dest)
      if not dest or any(c == "" for c in comps):
        problems.append(f"{rule.label()} maps {path!r} to {dest!r}, which has an empty path component")
        continue
      if rule.elementwise:
        m = rule.pattern.fullmatch(path)
        if not rule.unstack and not rule.split:
          element_items.append((path, rule, dest, m, meta))
          continue
        shape = tuple(getattr(meta, "shape", ()) or ())
        if rule.split:
          from parity_jax.checkpoint import transforms

          pieces = transforms.split_pieces(rule.split, shape, dest)
        else:
          pieces = rule.unstacked(shape, dest)
        if isinstance(pieces, str):
          problems.append(f"{rule.label()} does not fit source leaf {path!r}: {pieces}")
        else:
          element_items.extend((path, rule, d, m, meta, lead) for d, lead in pieces)
        continue
      shape = tuple(getattr(meta, "shape", ()) or ())
      kind = getattr(meta, "kind", "array")
      if kind == "string" and (rule.squeeze is not None or rule.reshape is not None):
        problems.append(f"{rule.label()}: source leaf {path!r} is a string; it cannot be squeezed or reshaped")
        continue
      t = rule.transform_for(shape)
      if isinstance(t, str):
        problems.append(f"{rule.label()} does not fit source leaf {path!r} of shape {shape}: {t}")
        continue
      if dest in dest_of:
        problems.append(f"source leaves {dest_of[dest]!r} and {path!r} both map to {dest!r}")
        continue
      dest_of[dest] = path
      plans.append(LeafPlan(path, dest, rule, t, self.group_of(dest)))
    elements = []
    if element_items:
      from parity_jax.checkpoint import transforms

      elements, more = transforms.bind_elements(element_items, self.group_of)
      problems.extend(more)
      for e in elements:
        if e.dest in dest_of:
          problems.append(f"source leaves {dest_of[e.dest]!r} and {e.sources[0]!r} both map to {e.dest!r}")
    for r in self.rules:
      if hits[r.index] == 0:
        problems.append(f"{r.label()} matches no source leaf")
    problems.extend(_destination_conflicts(list(dest_of) + [e.dest for e in elements]))
    if problems:
      raise SpecError(f"spec {self.source} does not fit the {what}", problems)
    return MigrationPlan(self, tuple(plans), tuple(elements), tuple(dropped))

  def __repr__(self) -> str:
    return f"RemapSpec({len(self.rules)} rules, group_depth={self.group_depth}, source={self.source!r})"


def _destination_conflicts(dests: list[str]) -> list[str]:
  """Destinations that cannot coexist in one pytree / one orbax checkpoint."""
  problems = []
  as_set = set(dests)
  for d in dests:
    comps = keypath.split(d)
    for i in range(1, len(comps)):
      prefix = "/".join(comps[:i])
      if prefix in as_set:
        problems.append(f"destination {prefix!r} is a leaf and also the parent of {d!r}")
        break
  # orbax stores each leaf under its keys joined by '.', so 'a.b/c' and 'a/b.c' collide on disk.
  storage: dict[str, str] = {}
  for d in dests:
    name = ".".join(keypath.split(d))
    if name in storage and storage[name] != d:
      problems.append(f"destinations {storage[name]!r} and {d!r} collide in orbax storage as {name!r}")
    storage.setdefault(name, d)
  return problems
