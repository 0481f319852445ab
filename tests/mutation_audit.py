"""Mutation audit: do the tests of a module fail when the module is wrong? Run by hand; pytest does not collect it.

Picks N one-line mutants (seeded) in the modules given, applies each in turn to
a scratch copy of the repository (never the working tree), runs the tests that
cover the mutated module with a timeout, and prints, per mutant, killed /
survived / timeout with file:line and the mutated line, then the kill rate.

    python tests/mutation_audit.py parity_jax/svf/*.py parity_jax/dtypes.py --n=80 --seed=7 --timeout=120

Mutation operators (AST-based, each a change of one expression or statement):
flip a comparison (``<``/``<=``, ``==``/``!=``, ``in``/``not in``, ``is``/``is
not``), an integer constant +-1, ``and``/``or``, negate an ``if``/``while``/
conditional-expression test, drop a ``not``, ``return X`` -> ``return None``
(a bool returned flipped), a boolean constant flipped, an arithmetic or bitwise
operator swapped, a statement deleted (replaced by ``pass``). Not mutated, as
equivalent by construction or noise: docstrings, f-strings, the arguments of
``raise`` (messages), logging/print/warnings calls, annotations, imports,
``__all__``, lines marked ``# no mutate``.

Which tests cover a module, by the mirrored layout: ``parity_jax/<sub>/<mod>.py``
-> ``tests/<sub>/test_<mod>*.py``, ``parity_jax/<mod>.py`` ->
``tests/test_<mod>*.py``; a ``cli`` module also gets the end-to-end files of ``tests/tools/`` that name its
tool, the ones about that tool alone first (``app``: all of them). A
subpackage module without a mirrored test file falls back to every test file of
its ``tests/<sub>/`` directory (said in the output), unless ``ALSO_TESTED_BY``
names the files that call it directly (then those); a top-level module without
one has no tests, and its mutants count as survivors. ``ALSO_TESTED_BY`` adds
files to a mirrored module's. ``--tests`` overrides the mapping for every module.

Scratch copy: the working tree's tracked and untracked (not ignored) files,
copied to ``--scratch`` (a fresh temporary directory by default), so new,
uncommitted tests take part. Each mutant is written there, its tests run with
``python -m pytest -x -q -n 0`` in that directory (byte-code caching off, so a
mutant of the same size and second can never be served from a stale ``.pyc``),
and the original restored. Before the mutants, every test set runs once
unmutated: a set that fails without a mutant would make its mutants' kills
meaningless, so the audit stops.

Exit code: 0 when the kill rate reaches ``--target`` (default 0, i.e. always),
1 when not, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import fnmatch
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NO_MUTATE = ("# no mutate", "# pragma: no mutate")
_QUIET_CALLS = {"print", "warn", "debug", "info", "warning", "error", "exception", "critical", "log"}
_CMP_FLIP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BINOP_SWAP = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.BitXor: ast.BitOr,
}


@dataclasses.dataclass(frozen=True)
class Mutant:
  path: str  # relative to the repository root
  line: int  # 1-based, where the mutated code starts
  op: str
  original: str  # the original line (stripped)
  mutated: str  # the mutated line (stripped)
  first: int  # 0-based lines [first, last] of the module are replaced by ``replacement``
  last: int
  replacement: str

  def source(self) -> str:
    """The whole mutated module."""
    lines = _module_lines(self.path)
    return "".join(lines[: self.first] + [self.replacement] + lines[self.last + 1 :])

  def valid(self) -> bool:
    """The mutated module parses, and differs from the original beyond layout."""
    try:
      tree = ast.parse(self.source())
    except SyntaxError:
      return False
    return ast.dump(tree) != ast.dump(ast.parse("".join(_module_lines(self.path))))


_LINES: dict[str, list[str]] = {}


def _module_lines(path: str) -> list[str]:
  if path not in _LINES:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      _LINES[path] = f.read().splitlines(keepends=True)
  return _LINES[path]


# ------------------------------------------------------------------------------------------------ generating mutants


def _call_name(call: ast.Call) -> str:
  f = call.func
  if isinstance(f, ast.Name):
    return f.id
  if isinstance(f, ast.Attribute):
    return f.attr
  return ""


def _quiet_zones(tree: ast.AST) -> set[int]:
  """ids of the nodes no mutant may touch: f-strings, raise arguments, log/print calls, annotations, __all__."""
  zones: list[ast.AST] = []
  for node in ast.walk(tree):
    if isinstance(node, ast.JoinedStr):
      zones.append(node)
    elif isinstance(node, ast.Raise):
      zones += [n for n in (node.exc, node.cause) if n is not None]
    elif isinstance(node, ast.Call) and _call_name(node) in _QUIET_CALLS:
      zones.append(node)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      zones += [a.annotation for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs if a.annotation]
      zones += [n for n in (node.returns,) if n is not None]
    elif isinstance(node, ast.AnnAssign):
      zones.append(node.annotation)
    elif isinstance(node, ast.Assert) and node.msg is not None:
      zones.append(node.msg)
    elif isinstance(node, ast.If) and any(s in ast.unparse(node.test) for s in ("TYPE_CHECKING", "__name__")):
      zones.append(node)
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
      zones.append(node)
  quiet: set[int] = set()
  for z in zones:
    quiet.update(id(n) for n in ast.walk(z))
  return quiet


def _is_docstring(stmt: ast.stmt) -> bool:
  return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _byte_col_to_char(line: str, col: int) -> int:
  return len(line.encode("utf-8")[:col].decode("utf-8", errors="replace"))


class _Source:
  """A module's text and the rewrites of one node's span."""

  def __init__(self, text: str):
    self.text = text
    self.lines = text.splitlines(keepends=True)

  def replace_expr(self, node: ast.AST, new: str) -> tuple[int, int, str] | None:
    """The edit replacing ``node`` (on one line) by ``new``; None when the node spans lines."""
    if node.lineno != node.end_lineno:
      return None
    i = node.lineno - 1
    line = self.lines[i]
    a, b = _byte_col_to_char(line, node.col_offset), _byte_col_to_char(line, node.end_col_offset)
    return i, i, line[:a] + new + line[b:]

  def delete_stmt(self, stmt: ast.stmt) -> tuple[int, int, str] | None:
    """The edit replacing ``stmt`` by ``pass`` (line count kept); None when it shares a line with another."""
    first, last = stmt.lineno - 1, stmt.end_lineno - 1
    head, tail = self.lines[first], self.lines[last]
    a = _byte_col_to_char(head, stmt.col_offset)
    b = _byte_col_to_char(tail, stmt.end_col_offset)
    if head[:a].strip() or tail[b:].split("#")[0].strip():
      return None
    return first, last, head[:a] + "pass\n" + "\n" * (last - first)


def _expr_mutants(node: ast.AST) -> list[tuple[str, ast.expr, str]]:
  """(operator name, node to replace, replacement text) for one expression node."""
  out = []
  if isinstance(node, ast.Compare):
    for i, op in enumerate(node.ops):
      if type(op) in _CMP_FLIP:
        m = copy.deepcopy(node)
        m.ops[i] = _CMP_FLIP[type(op)]()
        out.append(("flip-compare", node, ast.unparse(m)))
  elif isinstance(node, ast.BoolOp):
    m = copy.deepcopy(node)
    m.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    out.append(("and-or", node, ast.unparse(m)))
  elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
    out.append(("drop-not", node, f"({ast.unparse(node.operand)})"))
  elif isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAP:
    strings = (ast.JoinedStr,)
    if not any(
        isinstance(s, strings) or (isinstance(s, ast.Constant) and isinstance(s.value, str))
        for s in (node.left, node.right)
    ):
      m = copy.deepcopy(node)
      m.op = _BINOP_SWAP[type(node.op)]()
      out.append(("swap-arith", node, ast.unparse(m)))
  elif (
      isinstance(node, ast.UnaryOp)
      and isinstance(node.op, ast.USub)
      and isinstance(node.operand, ast.Constant)
      and type(node.operand.value) is int
  ):
    out += [("int+1", node, repr(1 - node.operand.value)), ("int-1", node, repr(-node.operand.value - 1))]
  elif isinstance(node, ast.Constant):
    if isinstance(node.value, bool):
      out.append(("flip-bool", node, repr(not node.value)))
    elif isinstance(node.value, int):
      out.append(("int+1", node, repr(node.value + 1)))
      out.append(("int-1", node, repr(node.value - 1)))
  return out


def mutants_of(path: str) -> list[Mutant]:
  """Every candidate one-line mutant of the module at ``path`` (relative to the repository root), unchecked.

  Checking that a mutant parses and changes the code costs a parse of the
  module each: :func:`pick` checks only the ones it draws.
  """
  text = "".join(_module_lines(path))
  tree = ast.parse(text)
  src = _Source(text)
  quiet = _quiet_zones(tree)
  out: list[Mutant] = []

  def add(op: str, line: int, edit: tuple[int, int, str] | None) -> None:
    if edit is None:
      return
    orig_line = src.lines[line - 1]
    if any(tag in orig_line for tag in _NO_MUTATE):
      return
    first, last, new = edit
    mutated_line = new.splitlines()[line - 1 - first]
    out.append(Mutant(path, line, op, orig_line.strip(), mutated_line.strip(), first, last, new))

  # a unary minus on a constant is one number: "-1" mutates as a whole, never as "-(1+1)"
  negated_consts = {id(n.operand) for n in ast.walk(tree) if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub)}
  # module- and class-level statements define names: deleting one is a NameError at import or a changed dataclass
  top_level = {id(s) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef)) for s in n.body}
  for node in ast.walk(tree):
    if id(node) in quiet:
      continue
    if isinstance(node, ast.stmt):
      deletable = (
          ast.Assign,
          ast.AugAssign,
          ast.AnnAssign,
          ast.Expr,
          ast.Return,
          ast.Raise,
          ast.Assert,
          ast.Continue,
          ast.Break,
      )
      noise = _is_docstring(node) or (isinstance(node, ast.Expr) and id(node.value) in quiet)
      if isinstance(node, deletable) and not noise and id(node) not in top_level:
        add("delete", node.lineno, src.delete_stmt(node))
      if isinstance(node, ast.Return) and node.value is not None:
        v = node.value
        if isinstance(v, ast.Constant) and isinstance(v.value, bool):
          pass  # flip-bool covers it
        elif not (isinstance(v, ast.Constant) and v.value is None):
          add("return-None", v.lineno, src.replace_expr(v, "None"))
      if isinstance(node, (ast.If, ast.While)) and id(node.test) not in quiet:
        add("negate-cond", node.test.lineno, src.replace_expr(node.test, f"not ({ast.unparse(node.test)})"))
      if isinstance(node, ast.AugAssign) and type(node.op) in _BINOP_SWAP:
        m = copy.deepcopy(node)
        m.op = _BINOP_SWAP[type(node.op)]()
        if node.lineno == node.end_lineno:
          add("swap-arith", node.lineno, src.replace_expr(node, ast.unparse(m)))
    elif isinstance(node, ast.IfExp):
      m = copy.deepcopy(node)
      m.test = ast.UnaryOp(op=ast.Not(), operand=m.test)
      add("negate-cond", node.lineno, src.replace_expr(node, ast.unparse(m)))
    elif isinstance(node, ast.expr):
      if isinstance(node, ast.Constant) and id(node) in negated_consts:
        continue
      for op, target, new in _expr_mutants(node):
        add(op, target.lineno, src.replace_expr(target, new))
  return out


def pick(mutants: list[Mutant], n: int, seed: int) -> list[Mutant]:
  """``n`` mutants on ``n`` distinct lines drawn uniformly (seeded); on each line an operator, then one of its mutants.

  Drawing the operator first keeps statement deletion (possible on almost every
  line) from crowding out the subtler operators of the same line.
  """
  rng = random.Random(seed)
  by_line: dict[tuple[str, int], dict[str, list[Mutant]]] = {}
  for m in mutants:
    by_line.setdefault((m.path, m.line), {}).setdefault(m.op, []).append(m)
  lines = sorted(by_line)
  chosen = []
  for k in rng.sample(lines, len(lines)):
    ops = by_line[k]
    while ops and len(chosen) < n:
      op = rng.choice(sorted(ops))
      m = rng.choice(ops[op])
      if m.valid():
        chosen.append(m)
        break
      ops[op].remove(m)
      if not ops[op]:
        del ops[op]
    if len(chosen) == n:
      break
  return sorted(chosen, key=lambda m: (m.path, m.line))


# ------------------------------------------------------------------------------------------------ tests of a module

# module -> test files, beyond its mirrored ones, that exercise that module's own code (not only through a tool)
ALSO_TESTED_BY: dict[str, tuple[str, ...]] = {
    "parity_jax/__init__.py": ("tests/test_package.py",),  # the package's lazy attribute access
    "parity_jax/checkpoint/spec.py": ("tests/checkpoint/test_transforms.py",),  # RemapSpec's rules, applied
    "parity_jax/checkpoint/transforms.py": (
        "tests/checkpoint/test_spec.py",  # bind() builds the transform plan
        "tests/checkpoint/verify/test_elements.py",  # ElementPlan.box_source, called directly, and both read paths
    ),
    # the element verifier: its tests are the element rules' (transposes, stacks, casts, padding), through verify
    "parity_jax/checkpoint/verify/elements.py": ("tests/checkpoint/test_transforms.py",),
    "parity_jax/stores/base.py": ("tests/stores/test_local.py",),  # Store's shared methods, through LocalStore
    # modules without a mirrored test file: these files call them directly, and replace the fallback to every test
    # file of tests/checkpoint/ (150 s unmutated on a loaded machine: surviving mutants ran into --timeout=180)
    "parity_jax/checkpoint/geometry.py": (
        "tests/checkpoint/test_spec.py",  # refinement, axis_groups, box_in, flat_offset, chunk shapes, SlabPlan
        "tests/checkpoint/stream/test_stream.py",  # SlabPlan and flat_offset against a stream's slabs
    ),
    "parity_jax/checkpoint/keypath.py": (
        "tests/checkpoint/test_example.py",  # flatten
        "tests/checkpoint/verify/test_pieces.py",  # split
        "tests/checkpoint/verify/test_verify.py",  # flatten, nest
    ),
    # --- group A (checkpoint/**, stores/**; mut4a): the migrator's modules. Their only mirrored directory file left
    # by the audit's --exclude (test_job.py, test_conversions.py) was test_destination.py; these cheap files call
    # migrate() directly, single process, and read its output back
    "parity_jax/checkpoint/migrate/__init__.py": (  # mirrored: tests/checkpoint/test_migrate.py (the arguments)
        "tests/checkpoint/migrate/test_destination.py",
        "tests/checkpoint/verify/test_verify.py",  # chunk_mb, batch_mb, compression, layouts
        "tests/checkpoint/migrate/test_to_safetensors.py",  # mut6a: dest_format="safetensors", shards, config, bucket
    ),
    "parity_jax/checkpoint/migrate/schedule.py": (
        "tests/checkpoint/test_migrate.py",  # groups of whole chunks up to batch_mb, the result's counts
        "tests/checkpoint/migrate/test_destination.py",  # the commit, temporaries, refusals
        "tests/checkpoint/verify/test_verify.py",  # chunked, batched, compressed writes, verified after
        "tests/checkpoint/test_transforms.py",  # element targets (concat, split) written in many slabs, verified
    ),
    "parity_jax/checkpoint/migrate/plan.py": (
        "tests/checkpoint/migrate/test_destination.py",
        "tests/checkpoint/verify/test_verify.py",  # plan_arrays under several chunk sizes and compressions
        "tests/checkpoint/test_transforms.py",  # mut6a: element targets (concat, split) planned, written, verified
    ),
    "parity_jax/checkpoint/migrate/result.py": (
        "tests/checkpoint/migrate/test_destination.py",
        "tests/checkpoint/verify/test_verify.py",
    ),
    "parity_jax/checkpoint/migrate/to_safetensors.py": (  # mirrored: shards, config, result, refusals
        "tests/checkpoint/migrate/test_destination.py",  # the in-place checks of a safetensors destination
        "tests/checkpoint/test_transforms.py",  # element targets (a split) into safetensors, verified
    ),
    "parity_jax/checkpoint/formats/orbax_writer.py": (  # its mirrored file tests the pieces; the whole write here
        "tests/checkpoint/migrate/test_destination.py",
        "tests/checkpoint/verify/test_verify.py",
    ),
    "parity_jax/checkpoint/stream/hashing.py": (  # its mirrored file tests the pieces; the verifier's use here
        "tests/checkpoint/stream/test_small.py",
        "tests/checkpoint/stream/test_stream.py",
    ),
    "parity_jax/checkpoint/stream/readers.py": (  # mirrored: the spill reader; the side readers through a verify
        "tests/checkpoint/stream/test_small.py",
        "tests/checkpoint/stream/test_stream.py",
    ),
    "parity_jax/stores/gcs.py": ("tests/stores/test_remote.py",),  # requests to the GCS emulator
    "parity_jax/stores/s3.py": ("tests/stores/test_remote.py",),  # requests to moto
    "parity_jax/stores/stats.py": (
        "tests/stores/test_local.py",  # LocalStore counting its own reads
        "tests/stores/test_remote.py",  # gs and s3 counts against the emulators
    ),
    # ---- group A, session 6 (checkpoint/**, stores/**; helper mut6a) ----
    # a bucket store's naming (child, parent, is_inside, kvstore paths) is tested without a server in test_base.py
    "parity_jax/stores/remote.py": ("tests/stores/test_base.py",),
    # the values phase of one process (strings compared, a leaf that cannot be read) is verify_migration's, called
    # directly by test_verify.py; test_values.py is its job schedule
    "parity_jax/checkpoint/verify/values.py": ("tests/checkpoint/verify/test_verify.py",),
    # ---- group B (foundations, bundles, svf, runtime, qwen2, oracle, cli; helper mut4b) ----
    # forward_parity on the committed goldens, the MoE routing replay and decode_parity, called directly
    "parity_jax/qwen2/parity.py": ("tests/tools/test_forward_parity.py",),
    "parity_jax/qwen2/capture.py": ("tests/qwen2/test_parity.py",),  # load_checked, model_stages, _provenance
    # the HF oracle's capture: its direct test first, then the regeneration of the committed goldens through it,
    # and the MoE goldens test_moe.py makes with it (the router hooks: the committed goldens are all dense)
    "parity_jax/oracle/hf_forward.py": ("tests/oracle/test_regeneration.py", "tests/qwen2/test_moe.py"),
    # the SVF goldens' writer (_draw, the components and manifest) runs only in the regeneration test
    "parity_jax/oracle/svf_goldens.py": ("tests/oracle/test_regeneration.py",),
    # the forward on a mesh of several devices (on_mesh's sharded branch): only the forced-device subprocesses run it
    # (mut5b: and the MoE forward, forced experts included, which only test_moe.py runs)
    "parity_jax/qwen2/model.py": ("tests/qwen2/test_sharding_mesh.py", "tests/qwen2/test_moe.py"),
    # the stage statistics and breaches behind every comparison: audited, as before test_diff.py, with every
    # bundles test file (test_verdict_hf.py is left out by the audit command)
    "parity_jax/bundles/diff.py": tuple(
        f"tests/bundles/test_{m}.py"
        for m in ("boundaries", "compare", "format", "logits", "plot", "qwen_graph", "render", "tolerance", "verdict")
    ),
    # ---- group B, session 5 (helper mut5b) ----
    # forward_goldens now has a mirrored file (the pieces, compare_regenerated on hand-built trees); the oracle files
    # it was audited with before (its whole-area regeneration, the stages it writes) stay with it
    "parity_jax/oracle/forward_goldens.py": (
        "tests/oracle/test_hf_forward.py",
        "tests/oracle/test_regeneration.py",
        "tests/oracle/test_svf_goldens.py",
    ),
    # svf/io now has a mirrored file (its refusals on tiny bundles); the replay tests still read the goldens through it
    "parity_jax/svf/io.py": ("tests/svf/test_gate_goldens.py", "tests/svf/test_gate_devices.py"),
}


def tests_for(path: str, exclude: tuple[str, ...] = ()) -> tuple[list[str], str]:
  """The test files covering ``path`` by the mirrored layout (less ``exclude``), and how they were found."""
  found, how = _mapped_tests(path)
  also = [t for t in ALSO_TESTED_BY.get(path, ()) if os.path.isfile(os.path.join(ROOT, t))]
  if also and how.startswith("no mirrored test file"):  # the files named for it, not a whole directory
    found, how = sorted(also), "ALSO_TESTED_BY (no mirrored test file)"
  elif also:
    found, how = sorted({*found, *also}), f"{how} + {' '.join(also)}" if found else "ALSO_TESTED_BY"
  found = [t for t in found if not any(fnmatch.fnmatch(t, pat) for pat in exclude)]
  return found, how if found else "no tests"


def _mapped_tests(path: str) -> tuple[list[str], str]:
  parts = path[: -len(".py")].split("/")
  if parts[0] != "parity_jax" or len(parts) < 2:
    return [], "not a parity_jax module"
  subs, mod = parts[1:-1], parts[-1]
  if mod == "__init__" and subs:  # a package's __init__: the tests of the package's own name, one level up
    subs, mod = subs[:-1], subs[-1]
  test_dir = os.path.join("tests", *subs)
  found = sorted({*_glob(f"{test_dir}/test_{mod}.py"), *_glob(f"{test_dir}/test_{mod}_*.py")})
  if not found and os.path.isdir(os.path.join(ROOT, test_dir, mod)):  # a package: its mirrored test directory
    found = _glob(f"{test_dir}/{mod}/**/test_*.py")
  how = "mirrored"
  if subs and subs[0] == "cli":
    found, how = found + [t for t in _tool_tests(mod) if t not in found], "mirrored + tests/tools"
  elif not found and subs:
    while subs and not found:  # the nearest mirrored test directory above the module
      test_dir = os.path.join("tests", *subs)
      found = _glob(f"{test_dir}/**/test_*.py")
      subs = subs[:-1]
    how = f"no mirrored test file: all of {test_dir}/"
  return found, how if found else "no tests"


_TOOL_NAMES = re.compile(r"(?<![A-Za-z_])(?:tools\.)?([a-z]+(?:_[a-z]+)+)(?![A-Za-z_])")


def _tool_tests(mod: str) -> list[str]:
  """The end-to-end tool tests for ``cli/<mod>.py``: the files of tests/tools that name that tool, those about it
  alone first (so a kill comes early under ``-x``); for the shared ``app`` (and the package), all of them."""
  files = _glob("tests/tools/test_*.py")
  tools = {os.path.basename(f)[: -len(".py")] for f in _glob("parity_jax/cli/*.py")} - {"__init__", "app"}
  if mod not in tools:
    return files
  named = {}
  for f in files:
    with open(os.path.join(ROOT, f)) as fh:
      found = set(_TOOL_NAMES.findall(fh.read())) & tools
    if mod in found:
      named[f] = len(found)
  return sorted(named, key=lambda f: (named[f], f))


def _glob(pattern: str) -> list[str]:
  return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


# ------------------------------------------------------------------------------------------------ running


def make_scratch(dest: str | None) -> str:
  """A copy of the working tree's tracked and untracked-not-ignored files; returns its path."""
  dest = dest or tempfile.mkdtemp(prefix="parity_jax_mutants_")
  if os.path.exists(dest) and os.listdir(dest):
    raise SystemExit(f"error: --scratch={dest} exists and is not empty")
  files = subprocess.run(
      ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
  ).stdout.split(b"\0")
  for rel in filter(None, (f.decode() for f in files)):
    src = os.path.join(ROOT, rel)
    if not os.path.isfile(src):
      continue  # a deleted, not yet committed file
    os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
    shutil.copy2(src, os.path.join(dest, rel), follow_symlinks=False)
  return dest


def run_tests(
    scratch: str, tests: list[str], timeout: float, python: str, deselect: tuple[str, ...] = ()
) -> tuple[str, float, str]:
  """('passed' | 'failed' | 'timeout', seconds, the last lines of output) of the tests in the scratch copy."""
  env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
  cmd = [python, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
  cmd += [f"--deselect={d}" for d in deselect]
  t0 = time.monotonic()
  p = subprocess.Popen(
      cmd, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
  )
  try:
    out, _ = p.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    out, _ = p.communicate()
    return "timeout", time.monotonic() - t0, out[-2000:]
  status = "passed" if p.returncode == 0 else "failed"
  return status, time.monotonic() - t0, out[-2000:]


def check_scratch_imports(scratch: str, python: str) -> None:
  """The scratch copy's parity_jax must be the one imported there (not an installed or editable one)."""
  p = subprocess.run(
      [python, "-c", "import parity_jax, os; print(os.path.realpath(parity_jax.__file__))"],
      cwd=scratch,
      capture_output=True,
      text=True,
  )
  where = p.stdout.strip()
  if not where.startswith(os.path.realpath(scratch) + os.sep):
    raise SystemExit(f"error: parity_jax imports from {where or p.stderr.strip()} in the scratch copy, not from it")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("modules", nargs="+", help="module files (parity_jax/...py) or directories of them")
  ap.add_argument("--n", type=int, default=80, help="number of mutants (default 80)")
  ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one, printed)")
  ap.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's test run (default 120)")
  ap.add_argument("--tests", nargs="+", default=None, help="these test files for every module instead of the map")
  ap.add_argument("--exclude", nargs="+", default=(), help="drop test files matching these globs from the map")
  ap.add_argument(
      "--deselect",
      nargs="+",
      default=(),
      help="pytest node ids left out of every run (a test that fails without a mutant; say so when reporting)",
  )
  ap.add_argument(
      "--rerun",
      default=None,
      help="a previous --json: rerun its mutants, carrying over its kills "
      "where the module's tests are a superset of those that killed it",
  )
  ap.add_argument("--scratch", default=None, help="empty or missing directory for the copy (default: a temp dir)")
  ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
  ap.add_argument("--list", action="store_true", help="print the chosen mutants and their tests, run nothing")
  ap.add_argument("--json", default=None, help="also write the results to this JSON file")
  ap.add_argument("--target", type=float, default=0.0, help="exit 1 when the kill rate is below this (0..1)")
  ap.add_argument("--python", default=sys.executable, help="interpreter for the test runs (default: this one)")
  args = ap.parse_args(argv)
  if args.n < 1 or args.timeout <= 0 or not 0 <= args.target <= 1:
    ap.error("--n must be >= 1, --timeout > 0, --target in [0, 1]")
  seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)

  paths: list[str] = []
  for m in args.modules:
    full = os.path.abspath(m)
    found = sorted(glob.glob(os.path.join(full, "*.py"))) if os.path.isdir(full) else [full]
    for f in found:
      if not (f.endswith(".py") and os.path.isfile(f) and f.startswith(ROOT + os.sep)):
        ap.error(f"not a Python file inside the repository: {m}")
      paths.append(os.path.relpath(f, ROOT))
  paths = sorted(set(paths))
  candidates = [m for p in paths for m in mutants_of(p)]
  tests = {p: (sorted(args.tests), "--tests") if args.tests else tests_for(p, tuple(args.exclude)) for p in paths}
  carried: dict[Mutant, dict] = {}
  gone: list[dict] = []
  if args.rerun:
    with open(args.rerun, encoding="utf-8") as f:
      before = json.load(f)
    seed = before["seed"]
    # the original line is part of the key: every deletion reads "pass", so another statement now on that line
    # number must not stand in for one that was removed
    index = {(m.path, m.line, m.op, m.original, m.mutated): m for m in candidates}
    moved: dict[tuple[str, str, str, str], list[Mutant]] = {}
    for m in candidates:
      moved.setdefault((m.path, m.op, m.original, m.mutated), []).append(m)
    chosen = []
    for r in before["mutants"]:
      m = index.get((r["path"], r["line"], r["op"], r["original"], r["mutated"]))
      if m is None:  # the same edit of the same line, moved by edits above it
        same = moved.get((r["path"], r["op"], r["original"], r["mutated"]), [])
        m = same[0] if len(same) == 1 else None
      if m is None:  # the mutated code is gone (rewritten or removed): reported apart, never counted as killed
        gone.append({**r, "status": "gone", "seconds": 0.0})
        continue
      chosen.append(m)
      if r["status"] == "killed" and set(r["tests"]) <= set(tests[m.path][0]):
        carried[m] = r
  else:
    chosen = pick(candidates, args.n, seed)
  print(f"mutation audit: seed {seed}, {len(chosen)} mutants of {len(candidates)} candidates in {len(paths)} modules")
  for p in paths:
    t, how = tests[p]
    print(f"  {p}: {how}: {' '.join(t) if t else '-'}")
  if args.list:
    for m in chosen:
      print(f"{m.path}:{m.line} [{m.op}] {m.original}  ->  {m.mutated}")
    return 0

  scratch = make_scratch(args.scratch)
  results = []
  try:
    check_scratch_imports(scratch, args.python)
    for tset in sorted({tuple(tests[m.path][0]) for m in chosen if tests[m.path][0] and m not in carried}):
      status, secs, out = run_tests(scratch, list(tset), max(args.timeout, 600), args.python, tuple(args.deselect))
      print(f"baseline {status} in {secs:.0f}s: {' '.join(tset)}", flush=True)
      if status != "passed":
        print(out)
        raise SystemExit("error: the tests fail without any mutant; fix them first")
      if secs > args.timeout:
        print(f"  warning: the baseline takes longer than --timeout={args.timeout:.0f}s", flush=True)
    for i, m in enumerate(chosen, 1):
      t = tests[m.path][0]
      target = os.path.join(scratch, m.path)
      with open(target, encoding="utf-8") as f:
        original = f.read()
      if m in carried:
        status, secs, t = "killed", 0.0, carried[m]["tests"]
        note = " (carried over from --rerun)"
      elif not t:
        status, secs = "survived", 0.0
        note = " (no tests)"
      else:
        with open(target, "w", encoding="utf-8") as f:
          f.write(m.source())
        try:
          ran, secs, _ = run_tests(scratch, t, args.timeout, args.python, tuple(args.deselect))
        finally:
          with open(target, "w", encoding="utf-8") as f:
            f.write(original)
        status = {"failed": "killed", "passed": "survived", "timeout": "timeout"}[ran]
        note = ""
      results.append({**dataclasses.asdict(m), "status": status, "seconds": round(secs, 1), "tests": t})
      for k in ("first", "last", "replacement"):
        results[-1].pop(k)
      print(
          f"[{i}/{len(chosen)}] {status.upper():8s} {m.path}:{m.line} [{m.op}] {m.mutated}{note}  ({secs:.0f}s)",
          flush=True,
      )
  finally:
    if not args.keep:
      shutil.rmtree(scratch, ignore_errors=True)
    else:
      print(f"scratch copy kept: {scratch}")

  for r in gone:
    print(f"GONE     {r['path']}:{r['line']} [{r['op']}] {r['mutated']} (that code is no longer in the module)")
  results += gone
  counts = {s: sum(r["status"] == s for r in results) for s in ("killed", "survived", "timeout", "gone")}
  rate = counts["killed"] / max(len(results), 1)
  rate_t = (counts["killed"] + counts["timeout"]) / max(len(results), 1)
  print("\nsurvivors:")
  for r in results:
    if r["status"] == "survived":
      print(f"  {r['path']}:{r['line']} [{r['op']}] {r['original']}  ->  {r['mutated']}")
  print(
      f"\nkilled {counts['killed']}, survived {counts['survived']}, timeout {counts['timeout']}, "
      f"gone {counts['gone']} of {len(results)}: "
      f"kill rate {100 * rate:.0f}% ({100 * rate_t:.0f}% counting timeouts as killed; seed {seed})"
  )
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"seed": seed, "counts": counts, "kill_rate": rate, "mutants": results}, f, indent=1)
  return 0 if rate >= args.target else 1


if __name__ == "__main__":
  sys.exit(main())
