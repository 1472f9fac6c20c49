"""Build and check Parameter Golf submissions: the shipped file is exactly the configuration that runs.

    python build_submission.py extract --config configs/skc_competition.env --out DIR [--dce] [--minify] [--compress-code]
    python build_submission.py finalize DIR --logs LOG [LOG ...] [--track 10min_16mb|non_record_16mb]
    python build_submission.py check DIR

The workflow the official rules want (the logs come from the file in the folder): extract, run the
extracted file (`./run_skc_competition_8xh100.sh --script DIR/train_gpt.py`), finalize, check.
"""
from __future__ import annotations

import argparse
import ast
import base64
import copy
import hashlib
import importlib.util
import json
import lzma
import math
import operator
import os
import py_compile
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parent
TRAINER = REPO_ROOT / "train_gpt.py"


# -----------------------------------------------------------------------------
# Feature blocks (the convention in the README's "Contributing" section)
# -----------------------------------------------------------------------------
BLOCK_START = re.compile(r"^# --- feature: (?P<name>[\w.-]+) \((?P<flags>[^)]*)\) ---$")
BLOCK_END = re.compile(r"^# --- end feature: (?P<name>[\w.-]+) ---$")
SETTINGS_GROUP = re.compile(r"^\s*# feature: (?P<name>[\w.-]+)\s*$")
FLAG_SPEC = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)(?:(?P<op>!=|=)(?P<value>\S+))?$")


class FlagSpec(NamedTuple):
    """`NAME` (on when truthy), `NAME=value` (on when equal) or `NAME!=value` (on when different)."""
    name: str
    op: str | None
    value: str | None

    def is_on(self, value: object) -> bool:
        if self.op is None:
            return bool(value)
        shown = _env_text(value)
        return (shown == self.value) == (self.op == "=")


class FeatureBlock(NamedTuple):
    name: str
    flags: tuple[FlagSpec, ...]
    first_line: int  # 1-based, the start marker
    last_line: int  # the end marker


def _env_text(value: object) -> str:
    """A typed setting value as an env file would spell it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def feature_blocks(source: str) -> tuple[list[FeatureBlock], list[str]]:
    """The feature blocks of a trainer's source, and the convention problems found while reading them."""
    blocks, problems, open_block = [], [], None
    for lineno, line in enumerate(source.splitlines(), start=1):
        if start := BLOCK_START.match(line):
            if open_block:
                problems.append(f"line {lineno}: feature {start['name']} starts inside feature {open_block[0]}")
            specs = []
            for text in (part.strip() for part in start["flags"].split(",")):
                spec = FLAG_SPEC.match(text)
                if not spec:
                    problems.append(f"line {lineno}: flag {text!r} of feature {start['name']} is not NAME, NAME=v or NAME!=v")
                    continue
                specs.append(FlagSpec(spec["name"], spec["op"], spec["value"]))
            open_block = (start["name"], tuple(specs), lineno)
        elif end := BLOCK_END.match(line):
            if not open_block or open_block[0] != end["name"]:
                problems.append(f"line {lineno}: end of feature {end['name']} without its start")
                continue
            blocks.append(FeatureBlock(open_block[0], open_block[1], open_block[2], lineno))
            open_block = None
        elif line.lstrip().startswith("# ---") and "featur" in line:
            problems.append(f"line {lineno}: malformed feature marker {line.strip()!r}")
    if open_block:
        problems.append(f"feature {open_block[0]} (line {open_block[2]}) has no end marker")
    names = [block.name for block in blocks]
    problems += [f"feature {name} has more than one block" for name in sorted({n for n in names if names.count(n) > 1})]
    return blocks, problems


def settings_groups(source: str, settings: dict) -> dict[str, list[str]]:
    """Feature name -> the SETTINGS rows under its `# feature: <name>` comment (up to the next comment)."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in source.splitlines():
        if group := SETTINGS_GROUP.match(line):
            current = groups.setdefault(group["name"], [])
        elif line.strip().startswith("#"):
            current = None
        elif current is not None and (row := re.match(r'^\s*"([A-Z][A-Z0-9_]*)":\s*Setting\(', line)):
            current.append(row.group(1))
    return {name: rows for name, rows in groups.items() if all(row in settings for row in rows)}


def convention_problems(source: str, settings: dict) -> list[str]:
    """What breaks the feature-block convention: unknown flags, a block without its settings group."""
    blocks, problems = feature_blocks(source)
    groups = settings_groups(source, settings)
    for block in blocks:
        for flag in block.flags:
            if flag.name not in settings:
                problems.append(f"feature {block.name}: flag {flag.name} is not a setting")
        own_switches = {flag.name for flag in block.flags if flag.op is None}  # NAME=v flags pick a shared choice
        if own_switches - set(groups.get(block.name, ())):
            problems.append(f"feature {block.name}: {', '.join(sorted(own_switches))} must sit in SETTINGS under "
                            f"`# feature: {block.name}`")
    return problems


# -----------------------------------------------------------------------------
# Dead-code elimination
# -----------------------------------------------------------------------------
# Settings never folded: those a user sets per invocation (validating a config, naming a run, overwriting it,
# evaluating an existing artifact, dumping per-token losses: the legality suite needs it on the shipped file)
# and those the trainer resolves at start-up (RUN_ID, VOCAB_SIZE from the tokenizer).
RUNTIME_SETTINGS = ("DRY_RUN", "RUN_ID", "VOCAB_SIZE", "EVAL_ARTIFACT", "EVAL_DUMP_TOKEN_LOSSES", "RUN_OVERWRITE")
COMPARE_OPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
               ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
               ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}
BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


class Known(NamedTuple):
    """An expression's value under the config, and the settings it read."""
    value: object
    reads: frozenset


class Folded(NamedTuple):
    """A condition replaced by its value: where it was (top-level definition), its source over `args`, its value,
    and the settings (lower-case attributes) it read."""
    owner: str | None
    source: str
    value: bool
    reads: frozenset


class DceResult(NamedTuple):
    source: str
    removed_definitions: list[str]
    removed_settings: dict[str, str]
    folded: list[Folded]
    features: list[str]  # one report line per feature block


def settings_class(tree: ast.Module) -> tuple[ast.ClassDef, ast.Dict]:
    """The class that holds SETTINGS (Hyperparameters) and its SETTINGS dict."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                target = item.target if isinstance(item, ast.AnnAssign) else (
                    item.targets[0] if isinstance(item, ast.Assign) and len(item.targets) == 1 else None)
                if isinstance(target, ast.Name) and target.id == "SETTINGS" and isinstance(item.value, ast.Dict):
                    return node, item.value
    raise ValueError("the trainer has no class with a SETTINGS dict literal: nothing to extract")


def rewritten_settings(settings_class: ast.ClassDef) -> set[str]:
    """Attributes the settings class sets by name with object.__setattr__(self, "name", value) after parsing."""
    return {call.args[1].value for call in ast.walk(settings_class)
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "__setattr__"
            and isinstance(call.func.value, ast.Name) and call.func.value.id == "object" and len(call.args) == 3
            and isinstance(call.args[1], ast.Constant) and isinstance(call.args[1].value, str)}


class ConditionFolder(ast.NodeTransformer):
    """Replaces conditions that are constant under the config by their value and drops the dead branches.

    A setting is read as `args.x`, `self.args.x`, or `self.x` inside the settings class. Only conditions are
    folded (if tests, conditional expressions, their and/or/not operands); other reads stay as they are. A
    setting that the settings class itself rewrites (`object.__setattr__(self, "x", ...)`) is not folded inside
    that class: its checks there read the value as parsed, before the rewrite, and the config holds the value after.
    """

    def __init__(self, values: dict[str, object], settings_class_name: str):
        self.values = values  # lower-case attribute -> value, for the foldable settings
        self.settings_class_name = settings_class_name
        self.folded: list[Folded] = []
        self.owner: str | None = None
        self.in_settings_class = False
        self.rewritten: set[str] = set()  # settings the settings class rewrites after parsing them

    def fold_module(self, tree: ast.Module) -> ast.Module:
        body = []
        for node in tree.body:
            self.owner = getattr(node, "name", None)
            self.in_settings_class = isinstance(node, ast.ClassDef) and node.name == self.settings_class_name
            self.rewritten = rewritten_settings(node) if self.in_settings_class else set()
            result = self.visit(node)
            body.extend(result if isinstance(result, list) else [result] if result is not None else [])
        tree.body = body
        return tree

    # -- reading settings
    def setting_of(self, node: ast.AST) -> str | None:
        if not isinstance(node, ast.Attribute) or node.attr not in self.values:
            return None
        receiver = node.value
        if isinstance(receiver, ast.Name) and (receiver.id == "args" or (
                receiver.id == "self" and self.in_settings_class and node.attr not in self.rewritten)):
            return node.attr
        if isinstance(receiver, ast.Attribute) and receiver.attr == "args" and isinstance(receiver.value, ast.Name) \
                and receiver.value.id == "self":
            return node.attr
        return None

    def known(self, node: ast.AST) -> Known | None:
        """The value of a fully constant expression, else None."""
        if isinstance(node, ast.Constant):
            return Known(node.value, frozenset())
        if (attr := self.setting_of(node)) is not None:
            return Known(self.values[attr], frozenset({attr}))
        if isinstance(node, (ast.Tuple, ast.List)):
            parts = [self.known(elt) for elt in node.elts]
            if all(parts):
                return Known(tuple(p.value for p in parts), frozenset().union(*(p.reads for p in parts)))
            return None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            inner = self.known(node.operand)
            if inner is None:
                return None
            op = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}[type(node.op)]
            return Known(op(inner.value), inner.reads)
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
            left, right = self.known(node.left), self.known(node.right)
            if left is None or right is None:
                return None
            try:
                return Known(BINARY_OPS[type(node.op)](left.value, right.value), left.reads | right.reads)
            except (ArithmeticError, TypeError):
                return None
        if isinstance(node, ast.Compare) and all(type(op) in COMPARE_OPS for op in node.ops):
            parts = [self.known(n) for n in (node.left, *node.comparators)]
            if not all(parts):
                return None
            try:
                value = all(COMPARE_OPS[type(op)](a.value, b.value) for op, a, b in zip(node.ops, parts, parts[1:]))
            except TypeError:
                return None
            return Known(value, frozenset().union(*(p.reads for p in parts)))
        if isinstance(node, ast.BoolOp):
            parts = [self.known(v) for v in node.values]
            if not all(parts):
                return None
            value = parts[0].value
            for part in parts[1:]:
                value = (value and part.value) if isinstance(node.op, ast.And) else (value or part.value)
            return Known(value, frozenset().union(*(p.reads for p in parts)))
        if isinstance(node, ast.IfExp):
            test = self.known(node.test)
            if test is None:
                return None
            branch = self.known(node.body if test.value else node.orelse)
            return None if branch is None else Known(branch.value, test.reads | branch.reads)
        return None

    def record(self, node: ast.AST, known: Known) -> None:
        source = ast.unparse(ArgsReceiver(self).visit(copy.deepcopy(node)))
        self.folded.append(Folded(self.owner, source, bool(known.value), known.reads))

    # -- folding conditions (truthiness is all that matters there)
    def fold_condition(self, node: ast.AST) -> tuple[bool | None, ast.AST]:
        """(constant truth value or None, the condition with its constant operands dropped)."""
        known = self.known(node)
        if known is not None:
            if known.reads:
                self.record(node, known)
            return bool(known.value), node
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            value, inner = self.fold_condition(node.operand)
            return (None, ast.UnaryOp(ast.Not(), inner)) if value is None else (not value, node)
        if isinstance(node, ast.BoolOp):
            decisive = isinstance(node.op, ast.Or)  # the operand value that decides the whole condition
            kept = []
            for operand in node.values:
                value, residual = self.fold_condition(operand)
                if value is None:
                    kept.append(self.visit(residual))
                elif value == decisive:
                    if not kept:  # nothing with side effects ran before it: the whole condition is decided
                        return decisive, node
                    kept.append(operand)
                    break
            if not kept:
                return not decisive, node
            return None, kept[0] if len(kept) == 1 else ast.BoolOp(node.op, kept)
        if isinstance(node, ast.IfExp):
            value, test = self.fold_condition(node.test)
            if value is not None:
                return self.fold_condition(node.body if value else node.orelse)
        return None, self.visit(node)

    def visit_If(self, node: ast.If):
        value, test = self.fold_condition(node.test)
        if value is None:
            node.test = test
            node.body = self.visit_block(node.body)
            node.orelse = self.visit_block(node.orelse, allow_empty=True)
            return node
        return self.visit_block(node.body if value else node.orelse, allow_empty=True) or None

    def visit_IfExp(self, node: ast.IfExp):
        value, test = self.fold_condition(node.test)
        if value is None:
            node.test = test
            node.body, node.orelse = self.visit(node.body), self.visit(node.orelse)
            return node
        return self.visit(node.body if value else node.orelse)

    def visit_block(self, statements: list[ast.stmt], allow_empty: bool = False) -> list[ast.stmt]:
        out = []
        for statement in statements:
            result = self.visit(statement)
            out.extend(result if isinstance(result, list) else [result] if result is not None else [])
        return out if out or allow_empty else [ast.Pass()]

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for field, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                setattr(node, field, self.visit_block(value, allow_empty=field in ("orelse", "finalbody")))
            elif isinstance(value, list):
                setattr(node, field, [self.visit(v) if isinstance(v, ast.AST) else v for v in value])
            elif isinstance(value, ast.AST):
                setattr(node, field, self.visit(value))
        return node


class ArgsReceiver(ast.NodeTransformer):
    """Rewrites every read of a setting to `args.<setting>` (the form folded_branches(args) evaluates)."""

    def __init__(self, folder: ConditionFolder):
        self.folder = folder

    def visit_Attribute(self, node: ast.Attribute):
        if self.folder.setting_of(node) is not None:
            return ast.Attribute(ast.Name("args", ast.Load()), node.attr, ast.Load())
        return self.generic_visit(node)


def _stdlib_module(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names and name != "__future__"


PURE_CALLS = {("re", "compile")}  # module functions without side effects: a constant built by one may go


def _pure_call(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and (func.value.id, func.attr) in PURE_CALLS and all(isinstance(a, ast.Constant) for a in call.args)
            and not call.keywords)


def _bound_names(node: ast.stmt) -> list[str]:
    """Names a removable top-level statement defines; [] when it is not removable."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        pure = node.value is None or not any(isinstance(n, (ast.Await, ast.Yield, ast.NamedExpr))
                                             or isinstance(n, ast.Call) and not _pure_call(n) for n in ast.walk(node.value))
        if pure and all(isinstance(t, ast.Name) for t in targets):
            return [t.id for t in targets]
    return []


class LoadCollector(ast.NodeVisitor):
    """Names loaded, attributes read and strings mentioned; annotations are skipped under PEP 563."""

    def __init__(self, skip_annotations: bool):
        self.skip_annotations = skip_annotations
        self.names: set[str] = set()
        self.attrs: set[str] = set()
        self.strings: Counter[str] = Counter()

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.names.add(node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attrs.add(node.attr)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            self.strings[node.value] += 1

    def visit_Expr(self, node: ast.Expr) -> None:  # a docstring names nothing the code needs
        if not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> None:
        if not self.skip_annotations:
            self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)
        if not self.skip_annotations:
            self.visit(node.annotation)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for item in (*node.decorator_list, node.args, *node.body):
            self.visit(item)
        if node.returns is not None and not self.skip_annotations:
            self.visit(node.returns)

    visit_AsyncFunctionDef = visit_FunctionDef


def loads_of(node: ast.AST, skip_annotations: bool) -> LoadCollector:
    collector = LoadCollector(skip_annotations)
    collector.visit(node)
    return collector


def _settings_rows(settings: ast.Dict) -> list[str]:
    return [key.value for key in settings.keys if isinstance(key, ast.Constant)]


def remove_unreferenced(tree: ast.Module, settings: ast.Dict, keep_settings: set[str]) -> tuple[list[str], list[str]]:
    """Remove top-level definitions, stdlib imports and SETTINGS rows nothing refers to, to a fixed point.
    Returns (removed definitions, removed settings)."""
    pep563 = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                 for n in tree.body)
    removed, removed_settings = [], []
    changed = True
    while changed:
        changed = False
        per_statement = [loads_of(node, pep563) for node in tree.body]
        body = []
        for index, node in enumerate(tree.body):
            others = set().union(*(c.names for i, c in enumerate(per_statement) if i != index))
            names = _bound_names(node)
            if names and not set(names) & others:
                removed += names
                changed = True
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                module_of = (lambda alias: alias.name) if isinstance(node, ast.Import) else (lambda alias: node.module or "")
                kept = [alias for alias in node.names
                        if not _stdlib_module(module_of(alias))
                        or (alias.asname or alias.name.split(".")[0]) in others]
                if len(kept) != len(node.names):
                    removed += [a.asname or a.name for a in node.names if a not in kept]
                    changed = True
                    if not kept:
                        continue
                    node.names = kept
            body.append(node)
        tree.body = body
        everything = loads_of(tree, pep563)
        for key in list(settings.keys):
            name = key.value
            if name in keep_settings or name.lower() in everything.attrs or everything.strings[name] > 1:
                continue  # read as args.<name>, or named in a string beside its own SETTINGS row
            index = settings.keys.index(key)
            del settings.keys[index], settings.values[index]
            removed_settings.append(name)
            changed = True
    return removed, removed_settings


def _replace_hooks(tree: ast.Module, folded: list[Folded], removed_settings: dict[str, str]) -> None:
    """Fill the trainer's REMOVED_SETTINGS and folded_branches(args) for the extracted file."""
    found = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if isinstance(target, ast.Name) and target.id == "REMOVED_SETTINGS":
                node.value = ast.Dict([ast.Constant(k) for k in removed_settings],
                                      [ast.Constant(v) for v in removed_settings.values()])
                found.add("REMOVED_SETTINGS")
        elif isinstance(node, ast.FunctionDef) and node.name == "folded_branches":
            rows = [ast.Tuple([ast.parse(f.source, mode="eval").body, ast.Constant(f.value), ast.Constant(f.source)],
                              ast.Load()) for f in folded]
            node.body = [ast.Return(ast.Tuple(rows, ast.Load()))]
            found.add("folded_branches")
    missing = {"REMOVED_SETTINGS", "folded_branches"} - found
    if missing:
        raise ValueError(f"the trainer lacks {', '.join(sorted(missing))}: an extracted file could not refuse settings "
                         "that its folded code ignores")


def _drop_dangling_annotations(tree: ast.Module, removed: set[str]) -> None:
    """Annotations are never evaluated (PEP 563); drop those naming a removed definition so readers never meet one."""
    def names(node: ast.AST | None) -> set[str]:
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node is not None else set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if names(node.returns) & removed:
                node.returns = None
            for arg in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg):
                if arg is not None and names(arg.annotation) & removed:
                    arg.annotation = None


def _defined_names(tree: ast.Module) -> set[str]:
    return {name for node in tree.body for name in _bound_names(node)}


def feature_report(original: ast.Module, source: str, extracted: ast.Module, values: dict[str, object]) -> list[str]:
    """One line per feature block: on or off under the config, and whether its code left the extracted file."""
    blocks, _ = feature_blocks(source)
    survivors = _defined_names(extracted)
    users = {}
    for node in extracted.body:
        for name in loads_of(node, skip_annotations=True).names:
            users.setdefault(name, set()).add(getattr(node, "name", "module code"))
    lines = []
    for block in blocks:
        names = [n for node in original.body if block.first_line < node.lineno < block.last_line for n in _bound_names(node)]
        flags = ", ".join(f"{f.name}={_env_text(values[f.name])}" for f in block.flags if f.name in values)
        on = any(f.is_on(values[f.name]) for f in block.flags if f.name in values)
        kept = [n for n in names if n in survivors]
        stranded = [node.lineno for node in extracted.body  # statements DCE never removes (no name to trace)
                    if block.first_line < node.lineno < block.last_line and not _bound_names(node)]
        if on:
            lines.append(f"feature {block.name} ({flags}): on, code kept")
        elif not kept and not stranded:
            lines.append(f"feature {block.name} ({flags}): off, removed {', '.join(names)}")
        else:
            why = "; ".join([f"{n} used by {', '.join(sorted(users.get(n, {'?'}) - {n}))}" for n in kept]
                            + [f"the statement at line {line} (not removable: it may have side effects)"
                               for line in stranded])
            lines.append(f"feature {block.name} ({flags}): off, BUT KEPT {why} (guard those uses with a condition "
                         "over settings, see the README's feature-block convention)")
    return lines


def dead_code_eliminate(source: str, values: dict[str, object], raw_config: dict[str, str]) -> DceResult:
    """The trainer specialised to a config: its values as defaults, constant conditions folded, unreferenced code
    removed to a fixed point, and the hooks filled so that the file refuses settings it can no longer honour."""
    original = ast.parse(source)
    tree = ast.parse(source)
    cls, settings = settings_class(tree)
    for key, call in zip(settings.keys, settings.values):
        call.args[0] = ast.Constant(values[key.value])
    foldable = {name.lower(): value for name, value in values.items() if name not in RUNTIME_SETTINGS}
    folder = ConditionFolder(foldable, cls.name)
    folder.fold_module(tree)
    removed_definitions, removed_rows = [], []
    while True:
        defined = _defined_names(tree)
        live = [f for f in folder.folded if f.owner is None or f.owner in defined]
        keep = {attr.upper() for f in live for attr in f.reads} | set(RUNTIME_SETTINGS)
        definitions, rows = remove_unreferenced(tree, settings, keep)
        if not definitions and not rows:
            break
        removed_definitions += definitions
        removed_rows += rows
    defined = _defined_names(tree)
    live = list({f.source: f for f in folder.folded if f.owner is None or f.owner in defined}.values())
    removed_settings = {name: raw_config.get(name, _env_text(values[name])) for name in removed_rows}
    _replace_hooks(tree, live, removed_settings)
    _drop_dangling_annotations(tree, set(removed_definitions))
    ast.fix_missing_locations(tree)
    return DceResult(ast.unparse(tree) + "\n", removed_definitions, removed_settings, live,
                     feature_report(original, source, tree, values))


# -----------------------------------------------------------------------------
# Minification and the self-extracting wrapper
# -----------------------------------------------------------------------------
def minify(source: str) -> str:
    """python-minifier with behaviour-keeping settings: asserts and `if __debug__` stay, module-level names keep
    their spelling (the legality suite and the checker import them), NamedTuple field annotations stay."""
    import python_minifier
    return python_minifier.minify(source, remove_literal_statements=True, remove_asserts=False, remove_debug=False,
                                  rename_globals=False, rename_locals=True, preserve_shebang=True)


# What the wrapper breaks and how it is handled: the code runs from a string, so inspect.getsource (triton's
# @jit, torch.jit.script, tracebacks) would find no file; the wrapper registers the source in linecache under
# a name of its own, which inspect and traceback read. __file__ stays the wrapper, so the code bytes the
# trainer counts (its own file size) are the shipped bytes.
WRAPPER = ('import base64,linecache,lzma\n'
           's=lzma.decompress(base64.b85decode("{blob}")).decode()\n'
           'f=__file__+"#source"\n'
           'linecache.cache[f]=(len(s),None,s.splitlines(True),f)\n'
           'exec(compile(s,f,"exec"))\n')


def compress_code(source: str) -> str:
    blob = base64.b85encode(lzma.compress(source.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)).decode("ascii")
    return WRAPPER.format(blob=blob)


def code_source(path: Path) -> str:
    """The Python source a shipped file runs: the file itself, or what its self-extracting wrapper holds."""
    text = path.read_text(encoding="utf-8")
    match = re.search(r'b85decode\("([^"]+)"\)', text)
    if text.startswith("import base64,linecache,lzma") and match:
        return lzma.decompress(base64.b85decode(match.group(1))).decode("utf-8")
    return text


def code_lines(source: str) -> int:
    """Lines of a source without its comments, blank lines and docstrings (what the line budget counts)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree).count("\n") + 1


SECTION_BANNER = re.compile(r"^# -{20,}\n# (?P<title>[^\n]+)\n# -{20,}$", re.M)


def largest_sections(source: str) -> list[str]:
    """The trainer's banner sections, largest first, as 'title: N lines'."""
    starts = [(m.start(), m.group("title")) for m in SECTION_BANNER.finditer(source)] + [(len(source), "")]
    sizes = [(source.count("\n", a, b), title) for (a, title), (b, _) in zip(starts, starts[1:])]
    return [f"{title}: {lines} lines" for lines, title in sorted(sizes, reverse=True)]


# -----------------------------------------------------------------------------
# Tiny runs: the equivalence check and the legality suite
# -----------------------------------------------------------------------------
# Scaled-down values, applied only where they keep the config's truthiness (so every folded condition keeps its
# value) and only to settings the file still has.
TINY_SCALE = {"NUM_LAYERS": 2, "MODEL_DIM": 64, "NUM_HEADS": 2, "NUM_KV_HEADS": 1, "MLP_MULT": 2.0, "EMBED_DIM": 32,
              "ROPE_DIMS": 16, "TERNARY_GROUP_SIZE": 32, "TRAIN_SEQ_LEN": 32, "EVAL_SEQ_LEN": 48,
              "TRAIN_BATCH_TOKENS": 1024, "TRAIN_MICRO_BATCH_TOKENS": 1024, "WARMUP_STEPS": 1, "LR_WARMUP_STEPS": 2,
              "WARMDOWN_ITERS": 3, "VAL_LOSS_EVERY": 3, "VAL_BATCH_SIZE": 4096, "VAL_MAX_TOKENS": 4096,
              "TRAIN_LOG_EVERY": 1, "SLIDING_EVAL_STRIDE": 8, "EVAL_CHUNK_TOKENS": 1024, "CALIB_TOKENS": 256,
              "CALIB_MAX_EVALS": 4, "CALIB_MIN_PARAMS": 0, "EVAL_ENGRAM_BUCKETS": 64, "MUON_MOMENTUM_WARMUP_STEPS": 3}
TINY_SEED = 1337


class TinyRunError(RuntimeError):
    """A tiny run that could not be set up or did not finish."""


class EquivalenceError(RuntimeError):
    """The extracted file does not behave exactly like the full trainer."""


def load_module(path: Path, name: str):
    """Import a trainer file (plain or self-extracting) as a module without running its main()."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_data(root: Path):
    from skcgolf.tinydata import TinyData
    root.mkdir(parents=True, exist_ok=True)
    return TinyData(root)


def tiny_env(module, raw_config: dict[str, str], data, steps: int, run_dir: Path) -> dict[str, str]:
    """The config, scaled down and pointed at the tiny data, as the shipped file `module` accepts it."""
    settings = module.Hyperparameters.SETTINGS
    configured = module.Hyperparameters(raw_config)
    env = dict(raw_config)
    for name, tiny in TINY_SCALE.items():
        if name in settings and bool(tiny) == bool(getattr(configured, name.lower())):
            env[name] = _env_text(tiny)
    env.update(DATA_PATH=str(data.data_path), TOKENIZER_PATH=str(data.tokenizer_path), ITERATIONS=str(steps),
               SEED=str(TINY_SEED), RUN_ID="tiny", LOG_DIR=str(run_dir), ARTIFACT_DIR="", MODEL_COMPILE="0",
               EVAL_ARTIFACT="", EVAL_DUMP_TOKEN_LOSSES="")
    if configured.vocab_size:
        env["VOCAB_SIZE"] = str(data.sp.vocab_size())
    if getattr(configured, "engram_enabled", False):  # its layer must stay an encoder block of the tiny model
        env["ENGRAM_LAYER"] = str(min(configured.engram_layer, int(env["NUM_LAYERS"]) // 2 - 1))
    if configured.attn_backend != "auto":
        env["ATTN_BACKEND"] = "sdpa"
    env = {name: value for name, value in env.items() if name in settings or name in module.REMOVED_SETTINGS}
    while True:  # a scaled value that flips a folded condition goes back to the config's value
        try:
            module.Hyperparameters(env)
            return env
        except module.ConfigError as error:
            flipped = {name.upper() for name in re.findall(r"args\.(\w+)", str(error).split("`")[1])} \
                if str(error).count("`") >= 2 else set()
            reverted = {name for name in flipped if name in TINY_SCALE and env.get(name) != raw_config.get(name)}
            if not reverted:
                raise TinyRunError(f"cannot scale the config down for a tiny CPU run: {error}") from None
            for name in reverted:
                if name in raw_config:
                    env[name] = raw_config[name]
                else:
                    env.pop(name, None)


def clean_environment(module, env: dict[str, str]) -> dict[str, str]:
    """os.environ without any setting of ours, plus `env`, single-threaded (bitwise reproducible)."""
    ours = set(module.Hyperparameters.SETTINGS) | set(module.REMOVED_SETTINGS)
    base = {k: v for k, v in os.environ.items()
            if k not in ours and not k.startswith(module.ENV_PREFIXES) and not k.endswith(module.ENV_SUFFIXES)}
    return {**base, **env, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def start_run(script: Path, env: dict[str, str], module, cwd: Path) -> subprocess.Popen:
    Path(env["LOG_DIR"]).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(script.resolve())], cwd=cwd, env=clean_environment(module, env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_run(process: subprocess.Popen, env: dict[str, str], label: str) -> str:
    output, _ = process.communicate(timeout=1800)
    log_path = Path(env["LOG_DIR"]) / f"{env['RUN_ID']}.txt"
    if process.returncode != 0 or not log_path.is_file():
        raise TinyRunError(f"the tiny run of the {label} failed (exit {process.returncode}):\n{output[-3000:]}")
    return log_path.read_text()


COMPARED_PREFIXES = ("step:", "params ", "param_group:", "grad_accum_steps:", "warmup_steps:", "train_done ", "ema:",
                     "calibration ", "temperature_fit ", "trit_packing ", "artifact ", "artifact_components_", "final_")
VOLATILE_FIELD = re.compile(r"\s*\b(?:train_time|step_avg|step_ms|tok_s|remaining|eval_time|time|export_time|elapsed|eta|"
                            r"code_bytes|total_bytes|headroom_bytes)[:=]\S+")


def comparable_lines(log_text: str) -> list[str]:
    """The lines that must match between two runs of one config: losses, scores, sizes; timings removed."""
    return [VOLATILE_FIELD.sub("", line).strip() for line in log_text.splitlines()
            if line.startswith(COMPARED_PREFIXES) and " progress:" not in line]  # progress lines come by the clock


def compare_runs(original_log: str, extracted_log: str, original_artifact: bytes, extracted_artifact: bytes) -> int:
    """Number of compared lines; raises EquivalenceError at the first difference."""
    a, b = comparable_lines(original_log), comparable_lines(extracted_log)
    for index in range(max(len(a), len(b))):
        left = a[index] if index < len(a) else "<no line>"
        right = b[index] if index < len(b) else "<no line>"
        if left != right:
            raise EquivalenceError(f"first diverging line ({index + 1} of the compared lines):\n"
                                   f"  full trainer: {left}\n  extracted:    {right}")
    if not any(line.startswith("final_") and "_exact " in line for line in a):
        raise EquivalenceError("the tiny runs printed no final _exact score: nothing was compared")
    if original_artifact != extracted_artifact:
        raise EquivalenceError(f"the model artifacts differ: full trainer {len(original_artifact)} bytes "
                               f"(sha256 {hashlib.sha256(original_artifact).hexdigest()[:16]}), extracted "
                               f"{len(extracted_artifact)} bytes (sha256 {hashlib.sha256(extracted_artifact).hexdigest()[:16]})")
    return len(a)


def equivalence_check(original: Path, extracted: Path, raw_config: dict[str, str], workdir: Path, steps: int) -> str:
    """py_compile, then both files train the same tiny config with the same seed: the compared log lines (losses,
    scores, sizes) and the artifact bytes must be identical. Returns a one-line summary; raises EquivalenceError."""
    try:
        py_compile.compile(str(extracted), cfile=str(workdir / "compiled.pyc"), doraise=True)
    except py_compile.PyCompileError as error:
        raise EquivalenceError(f"the extracted file does not compile: {error}") from None
    module = load_module(extracted, "extracted_trainer")
    data = tiny_data(workdir / "data")
    envs = {label: tiny_env(module, raw_config, data, steps, workdir / label) for label in ("original", "extracted")}
    processes = {label: start_run(script, envs[label], module, workdir)
                 for label, script in (("original", original), ("extracted", extracted))}
    logs = {label: finish_run(process, envs[label], f"{label} file") for label, process in processes.items()}
    artifacts = {label: (Path(envs[label]["LOG_DIR"]) / "tiny_model.skc").read_bytes() for label in envs}
    count = compare_runs(logs["original"], logs["extracted"], artifacts["original"], artifacts["extracted"])
    exact = [line for line in comparable_lines(logs["extracted"]) if "_exact " in line]
    return (f"equivalent: {steps} steps of the config scaled down, seed {TINY_SEED}: {count} loss/score/size lines "
            f"identical, artifact bytes identical ({len(artifacts['original'])} bytes, sha256 "
            f"{hashlib.sha256(artifacts['original']).hexdigest()[:16]}); {exact[-1]}")


# -----------------------------------------------------------------------------
# extract
# -----------------------------------------------------------------------------
def config_settings(module, raw_config: dict[str, str], config: Path) -> dict[str, str]:
    """An env file's settings under the trainer's own names. Every name in an env file is meant for the trainer,
    so a name it does not know is an error here (the trainer itself lets unknown process variables pass);
    the design's names become ours, so that the tiny runs and the extracted defaults see the same config."""
    hyper = module.Hyperparameters
    unknown = [name for name in raw_config if name not in hyper.SETTINGS and name not in hyper.DESIGN_ALIASES
               and name not in hyper.DESIGN_REFUSED and name not in module.FOREIGN_ENV_NAMES
               and not name.startswith(module.FOREIGN_ENV_PREFIXES)]
    if unknown:
        hints = [f"{name} (did you mean {close}?)" if (close := module.close_setting(name, hyper.SETTINGS)) else name
                 for name in unknown]
        raise ValueError(f"{config} sets {', '.join(hints)}, which the trainer does not read: fix or remove "
                         "the line (an unread setting would ship as its default)")
    return hyper._resolve_design_names(raw_config)


def extract(config: Path, out: Path, dce: bool, minified: bool, compressed: bool, trainer: Path = TRAINER,
            steps: int = 6, log=print) -> dict:
    """Write out/train_gpt.py (and the config beside it), prove it equivalent to the trainer, return the report."""
    from skcgolf import trainrun
    trainer, out = trainer.resolve(), out.resolve()
    module = load_module(trainer, "trainer_for_extraction")
    raw_config = config_settings(module, trainrun.read_env_file(config), config)
    args = module.Hyperparameters(raw_config)
    values = {name: getattr(args, name.lower()) for name in module.Hyperparameters.SETTINGS}
    source = trainer.read_text(encoding="utf-8")
    sizes = {"full": len(source.encode())}
    report = {"config": config.name, "trainer_sha256": hashlib.sha256(source.encode()).hexdigest(), "sizes": sizes}
    text = source
    if dce:
        problems = convention_problems(source, module.Hyperparameters.SETTINGS)
        if problems:
            raise ValueError(f"{trainer} breaks the feature-block convention (README, Contributing), so its feature "
                             "report could not be trusted: " + "; ".join(problems))
        result = dead_code_eliminate(source, values, raw_config)
        text = result.source
        sizes["dce"] = len(text.encode())
        report.update(removed_definitions=result.removed_definitions, removed_settings=result.removed_settings,
                      folded=[f"{f.source} -> {f.value}" for f in result.folded], features=result.features)
    if minified:
        text = minify(text)
        sizes["minify"] = len(text.encode())
    flags = " ".join(flag for flag, on in (("--dce", dce), ("--minify", minified), ("--compress-code", compressed)) if on)
    text = f"# {config.name} via build_submission.py extract {flags}\n" + text
    packed = compress_code(text)
    sizes["compress_code"] = len(packed.encode())
    shipped = packed if compressed else text
    out.mkdir(parents=True, exist_ok=True)
    (out / "extraction.json").unlink(missing_ok=True)  # a failed check must not leave an earlier file's record
    shipped_bytes = shipped.encode("utf-8")
    (out / "train_gpt.py").write_bytes(shipped_bytes)
    report["shipped_sha256"] = hashlib.sha256(shipped_bytes).hexdigest()
    shutil.copyfile(config, out / config.name)
    sizes["shipped"] = len(shipped_bytes)
    for line in report.get("features", []):
        log(line)
    log("code bytes: " + ", ".join(f"{stage} {size:,}" for stage, size in sizes.items())
        + ("" if compressed else " (compress_code: what --compress-code would ship)"))
    with tempfile.TemporaryDirectory(prefix="equivalence_") as work:
        report["equivalence"] = equivalence_check(trainer, out / "train_gpt.py", raw_config, Path(work), steps)
    log(report["equivalence"])
    (out / "extraction.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# -----------------------------------------------------------------------------
# Logs of a submission (ours and the official baseline's format)
# -----------------------------------------------------------------------------
TRAIN_BUDGET_S = 600.0
EVAL_BUDGET_S = 600.0
SIZE_CAP = 16_000_000
EXACT_LINE = re.compile(r"^(final_\w+)_exact val_loss:(\S+) val_bpb:(\S+)")
SUBMISSION_FIELDS = ("name", "author", "github_id", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code")


class RunResult(NamedTuple):
    """What one training log says about its run."""
    log: Path
    seed: int | None
    score_key: str | None  # the last _exact line's key: the submission's score
    val_loss: float | None
    val_bpb: float | None
    code_bytes: int | None  # as the run counted them
    model_bytes: int | None
    train_s: float | None  # step loop plus the post-training fits that read training data
    eval_s: float | None  # the scored mode, including artifact load and warm-up
    last_step_s: float  # one step's time: the step that crosses the cap may finish after it
    steps: int | None
    bad_scores: list[str]  # score lines that do not parse to finite numbers
    hardware: list[str]
    config: dict[str, str]


def _number(pattern: str, text: str, cast=float, last: bool = True):
    found = re.findall(pattern, text, re.M)
    return cast(found[-1] if last else found[0]) if found else None


def read_run(path: Path) -> RunResult:
    from skcgolf import runlog
    text = path.read_text(errors="replace")
    exact = [EXACT_LINE.match(line) for line in text.splitlines()]
    exact = [m for m in exact if m]
    bad = [line for line in text.splitlines() if re.search(r"\bval_bpb:", line)
           and not all(math.isfinite(float(v)) for v in re.findall(r"\bval_(?:bpb|loss):(-?\d+(?:\.\d*)?(?:e[-+]?\d+)?)", line))
           or re.search(r"\bval_(?:bpb|loss):(?!-?\d)", line)]
    key = exact[-1].group(1) if exact else None
    train_ms = _number(r"total_training_time:(\d+(?:\.\d+)?)ms", text)
    if train_ms is None:
        train_ms = _number(r"^train_done .*?train_time:(\d+(?:\.\d+)?)ms", text)
    if train_ms is None:  # the official script: its stop line, else its last step line
        train_ms = _number(r"^(?:stopping_early:|step:).*?train_time:(\d+(?:\.\d+)?)ms", text)
    eval_ms = _number(rf"^{re.escape(key)} .*?eval_time:(\d+(?:\.\d+)?)ms", text) if key else None
    code = _number(r"^artifact code_bytes:(\d+)", text, int)
    if code is None:
        code = _number(r"^Code size: (\d+) bytes", text, int)
    model = _number(r"^artifact code_bytes:\d+ model_bytes:(\d+)", text, int)
    if model is None:
        model = _number(r"^Serialized model \S+: (\d+) bytes", text, int) or _number(r"^Serialized model: (\d+) bytes", text, int)
    seed = _number(r"^config SEED=(\d+)", text, int)
    if seed is None:
        seed = _number(r"^seed:(\d+)", text, int)
    steps = _number(r"^train_done steps:(\d+)", text, int) or _number(r"^step:(\d+)/\d+ ", text, int)
    step_ms = _number(r"step_avg:(\d+(?:\.\d+)?)ms", text) or 0.0
    hardware = [line for line in text.splitlines() if line.startswith(("python:", "platform:", "gpu:", "world_size:"))]
    return RunResult(path, seed, key, float(exact[-1].group(2)) if exact else None,
                     float(exact[-1].group(3)) if exact else None, code, model,
                     train_ms / 1000.0 if train_ms is not None else None, eval_ms / 1000.0 if eval_ms is not None else None,
                     step_ms / 1000.0, steps, bad, hardware, runlog.parse_log(text).config)


def submission_logs(folder: Path) -> list[Path]:
    """The folder's training logs: text files with a final _exact score line."""
    return sorted(p for p in folder.iterdir() if p.suffix in (".log", ".txt") and p.is_file()
                  and any(EXACT_LINE.match(line) for line in p.read_text(errors="replace").splitlines()))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# -----------------------------------------------------------------------------
# finalize
# -----------------------------------------------------------------------------
TRACKS = {"10min_16mb": "record track: 10 minutes of training on 8xH100, 16,000,000 bytes",
          "non_record_16mb": "non-record track: 16,000,000 bytes, any hardware or training time"}


class SubmissionError(RuntimeError):
    """A records folder that cannot be finalized as it is."""


def requirements_for(code: str) -> list[str]:
    """The repository's requirement lines for the third-party modules the shipped code imports."""
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(code))
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    lines = []
    for file in ("requirements.txt", "requirements-gpu.txt"):
        for line in (REPO_ROOT / file).read_text().splitlines():
            package = re.split(r"[=<>;\[ ]", line.strip(), maxsplit=1)[0]
            if package and not line.startswith("#") and package.replace("-", "_") in imported:
                lines.append(line.strip() + ("  # optional: CUDA flash attention" if file != "requirements.txt" else ""))
    return lines


def architecture_lines(config: dict[str, str], features: list[str]) -> list[str]:
    get = config.get
    lines = [f"- {get('NUM_LAYERS')} layers x {get('MODEL_DIM')} dim, {get('NUM_HEADS')} heads ({get('NUM_KV_HEADS')} KV), "
             f"MLP x{get('MLP_MULT')} ({get('MLP_ACT')}), vocabulary {get('VOCAB_SIZE')} (0: from the tokenizer), "
             f"tied embedding {get('TIE_EMBEDDINGS')}, U-Net skips",
             f"- weights: {get('WEIGHT_QUANT')}, export {get('EXPORT_FORMAT')} (codec {get('EXPORT_CODEC')}), "
             f"training sequence {get('TRAIN_SEQ_LEN')}, batch {get('TRAIN_BATCH_TOKENS')} tokens"]
    lines += [f"- {line}" for line in features]
    return lines


def _same_setting(a: str, b: str) -> bool:
    """Whether an env-file value and a logged value are the same setting value (the log prints typed values)."""
    truth = {"1": "1", "true": "1", "0": "0", "false": "0"}
    if a == b or (a.lower() in truth and truth[a.lower()] == truth.get(b.lower())):
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def run_overrides(config: dict[str, str], logged: dict[str, str]) -> dict[str, str]:
    """Settings a run set beyond its env file (run identity and paths aside): they belong in the reproduction command."""
    ignored = {"RUN_ID", "SEED", "LOG_DIR", "ARTIFACT_DIR", "DATA_PATH", "TOKENIZER_PATH", "DRY_RUN"}
    return {name: value for name, value in logged.items()
            if name in config and name not in ignored and not _same_setting(config[name], value)}


def read_extraction(folder: Path) -> dict:
    """The folder's extraction.json, {} when it has none."""
    path = folder / "extraction.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def verify_extraction(folder: Path, record: dict) -> None:
    """Refuse an extraction record that does not describe the folder's train_gpt.py: its equivalence line is
    copied into the README."""
    shipped = hashlib.sha256((folder / "train_gpt.py").read_bytes()).hexdigest()
    if record.get("shipped_sha256") != shipped:
        raise SubmissionError(f"{folder / 'extraction.json'} does not describe {folder / 'train_gpt.py'} (sha256 "
                              f"{shipped[:16]}, recorded {str(record.get('shipped_sha256'))[:16]}): extract again "
                              "(build_submission.py extract)")


def folder_config(folder: Path, record: dict) -> Path | None:
    """The env file the folder's runs used: the one extraction.json names, else the folder's only one."""
    if record.get("config"):
        path = folder / record["config"]
        if not path.is_file():
            raise SubmissionError(f"extraction.json names {record['config']}, which is not in {folder}")
        return path
    configs = sorted(folder.glob("*.env"))
    if len(configs) > 1:
        raise SubmissionError(f"{folder} holds several env files ({', '.join(p.name for p in configs)}) and no "
                              "extraction.json naming one: keep only the one the runs used")
    return configs[0] if configs else None


def finalize(folder: Path, logs: list[Path], track: str, name: str, author: str, github_id: str, blurb: str | None) -> dict:
    code_path = folder / "train_gpt.py"
    if not code_path.is_file():
        raise SubmissionError(f"{code_path} does not exist: extract first (build_submission.py extract --out {folder})")
    code_bytes = code_path.stat().st_size
    runs = [read_run(path) for path in logs]
    for run in runs:
        if run.val_bpb is None:
            raise SubmissionError(f"{run.log} has no final _exact score line: the run did not finish")
        if run.code_bytes != code_bytes:
            raise SubmissionError(f"{run.log} counted {run.code_bytes} code bytes but {code_path} is {code_bytes} bytes: "
                                  "the log did not come from this file (run the extracted file, then finalize)")
        if run.model_bytes is None:
            raise SubmissionError(f"{run.log} reports no model bytes")
    seeds = [run.seed for run in runs]
    if len(set(seeds)) != len(seeds) or None in seeds:
        raise SubmissionError(f"seeds must be known and distinct, got {seeds}")
    keys = {run.score_key for run in runs}
    if len(keys) != 1:
        raise SubmissionError(f"the logs score different modes: {sorted(keys)}")
    bpb, bpb_std = mean_std([run.val_bpb for run in runs])
    loss, loss_std = mean_std([run.val_loss for run in runs])
    model_bytes = max(run.model_bytes for run in runs)
    if code_bytes + model_bytes > SIZE_CAP:
        raise SubmissionError(f"code {code_bytes:,} + model {model_bytes:,} (largest over seeds) = "
                              f"{code_bytes + model_bytes:,} bytes, over the cap of {SIZE_CAP:,}: shrink the model or "
                              "the code (build_submission.py extract --dce --minify --compress-code)")
    extraction = read_extraction(folder)
    if extraction:
        verify_extraction(folder, extraction)
    env_file = folder_config(folder, extraction)
    config = runs[0].config
    hardware = runs[0].hardware
    cpu = not any(line.startswith("gpu:") for line in hardware)
    summary = (f"{config.get('NUM_LAYERS')}x{config.get('MODEL_DIM')} {config.get('WEIGHT_QUANT')} U-Net GPT, "
               f"export {config.get('EXPORT_FORMAT')}, scored by {runs[0].score_key}")
    if cpu:
        summary = "CPU smoke record (not a competition result): " + summary
    submission = {
        "name": name, "author": author, "github_id": github_id, "blurb": blurb or summary,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "val_loss": round(loss, 8), "val_bpb": round(bpb, 8), "val_bpb_std": round(bpb_std, 8),
        "bytes_total": code_bytes + model_bytes, "bytes_code": code_bytes, "bytes_model": model_bytes,
        "track": track, "score_key": runs[0].score_key, "builder": "skc-golf build_submission.py",
        "seeds": [{"seed": r.seed, "val_loss": r.val_loss, "val_bpb": r.val_bpb, "bytes_model": r.model_bytes,
                   "steps": r.steps, "train_s": r.train_s, "eval_s": r.eval_s, "log": f"train_seed{r.seed}.log"} for r in runs],
    }
    for run in runs:
        target = folder / f"train_seed{run.seed}.log"
        if run.log.resolve() != target.resolve():
            shutil.copyfile(run.log, target)
    (folder / "submission.json").write_text(json.dumps(submission, indent=2) + "\n")
    (folder / "requirements.txt").write_text("\n".join(requirements_for(code_source(code_path))) + "\n")
    if env_file is None:
        env_file = folder / "config_from_log.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
    from skcgolf import trainrun
    overrides = run_overrides(trainrun.read_env_file(env_file), config)
    launch = " ".join(f"{k}={v}" for k, v in overrides.items())
    rows = "\n".join(f"| {r.seed} | {r.val_loss:.8f} | {r.val_bpb:.8f} | {r.steps} | {r.train_s:.1f} | {r.eval_s:.1f} | "
                     f"{r.model_bytes:,} | {code_bytes + r.model_bytes:,} |" for r in runs)
    sizes = extraction.get("sizes", {})
    readme = [f"# {name}", "", submission["blurb"], "",
              f"Track: {TRACKS[track]}." + (" These runs used a CPU, so this folder records a smoke test of the "
                                            "pipeline, not a competition score." if cpu else ""), "",
              "## Results", "", f"val_bpb **{bpb:.8f} ± {bpb_std:.8f}** (mean ± std over {len(runs)} seed(s)), "
              f"val_loss {loss:.8f} ± {loss_std:.8f}; score line `{runs[0].score_key}_exact`.", "",
              "| seed | val_loss | val_bpb | steps | train s | eval s | model bytes | total bytes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |", rows, "",
              f"Bytes: code {code_bytes:,} (this folder's `train_gpt.py`) + model {model_bytes:,} (largest over seeds) = "
              f"{code_bytes + model_bytes:,} of {SIZE_CAP:,}.", "",
              "Timings (from the logs): training counts the step loop plus calibration and temperature fitting, which "
              "read training data; evaluation counts the scored mode including artifact loading and warm-up.", "",
              "## Architecture", "", *architecture_lines(config, extraction.get("features", [])), "",
              "## Configuration", "", f"`{env_file.name}` (every setting; the logs' `config` lines are the resolved values).", ""]
    if sizes:
        readme += ["## Code", "", "`train_gpt.py` was extracted from the skc-golf trainer for this config "
                   f"(code bytes: {', '.join(f'{k} {v:,}' for k, v in sizes.items())}).",
                   f"Equivalence with the full trainer: {extraction.get('equivalence', 'not recorded')}", ""]
    readme += ["## Reproduction", "", "From the repository root, once per seed (`train_gpt.py` carries the config as "
               f"its defaults; the settings shown are those the runs set beyond `{env_file.name}`):", "", "```",
               f"SEED=<seed> {launch + ' ' if launch else ''}./run_skc_competition_8xh100.sh --script "
               f"{folder.as_posix()}/train_gpt.py" if not cpu else
               f"SEED=<seed> {launch + ' ' if launch else ''}python {folder.as_posix()}/train_gpt.py",
               "```", "", "## Hardware", "", *[f"- `{line}`" for line in hardware], ""]
    (folder / "README.md").write_text("\n".join(readme))
    return submission


# -----------------------------------------------------------------------------
# check
# -----------------------------------------------------------------------------
class Finding(NamedTuple):
    ok: bool
    what: str
    detail: str


def check_folder(folder: Path, legality: bool = True, log=print) -> list[Finding]:
    findings: list[Finding] = []

    def note(ok: bool, what: str, detail: str) -> None:
        findings.append(Finding(ok, what, detail))
        log(f"[{'PASS' if ok else 'FAIL'}] {what}: {detail}")

    code_path, json_path = folder / "train_gpt.py", folder / "submission.json"
    logs = submission_logs(folder) if folder.is_dir() else []
    missing = [p.name for p in (code_path, json_path, folder / "README.md") if not p.is_file()]
    note(not missing and bool(logs), "files", f"missing {', '.join(missing)}" if missing else
         f"train_gpt.py, submission.json, README.md, {len(logs)} log(s) with a final score" if logs else "no log with a final _exact score line")
    if missing or not logs:
        return findings
    runs = [read_run(path) for path in logs]
    code_bytes = code_path.stat().st_size
    counted = {run.log.name: run.code_bytes for run in runs if run.code_bytes != code_bytes}
    note(not counted, "code bytes", f"train_gpt.py is {code_bytes:,} bytes" + (
        "; the logs counted " + ", ".join(f"{n}: {'no code bytes' if c is None else f'{c:,}'}" for n, c in counted.items())
        + " (the logs did not come from this file)" if counted else ", as every log counted"))
    model_sizes = [run.model_bytes for run in runs if run.model_bytes is not None]
    total = code_bytes + max(model_sizes, default=0)
    if len(model_sizes) != len(runs):
        note(False, "size cap", f"{len(runs) - len(model_sizes)} log(s) report no model bytes: the total is unknown")
    else:
        note(total <= SIZE_CAP, "size cap", f"code {code_bytes:,} + model {max(model_sizes):,} (largest over seeds) = "
             f"{total:,} {'<=' if total <= SIZE_CAP else '>'} {SIZE_CAP:,} (headroom {SIZE_CAP - total:,})")
    code_files = sorted(p.name for p in folder.iterdir() if p.suffix == ".py" and p.name != "train_gpt.py")
    note(not code_files, "code files", f"code outside train_gpt.py is not counted: {', '.join(code_files)}"
         if code_files else "train_gpt.py holds all the code")
    try:
        record = read_extraction(folder)
    except json.JSONDecodeError as error:
        note(False, "extraction record", f"extraction.json is not valid JSON: {error}")
        record = {}
    if record and "shipped_sha256" not in record:
        log("[INFO] extraction record: written before extraction.json held the shipped file's sha256; not verified")
    elif record:
        try:
            verify_extraction(folder, record)
            note(True, "extraction record", "extraction.json describes this train_gpt.py")
        except SubmissionError as error:
            note(False, "extraction record", str(error))
    try:
        submission = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        note(False, "submission.json", f"not valid JSON: {error}")
        submission = {}
    absent = [field for field in SUBMISSION_FIELDS if field not in submission]
    note(not absent, "submission.json fields", f"missing {', '.join(absent)}" if absent else "all official fields present")
    scores = [run.val_bpb for run in runs if run.val_bpb is not None]
    if submission and scores:
        bpb, _ = mean_std(scores)
        loss, _ = mean_std([run.val_loss for run in runs])
        problems = []
        for field, actual in (("val_bpb", bpb), ("val_loss", loss)):
            claimed = submission.get(field)
            if not isinstance(claimed, (int, float)) or abs(claimed - actual) > 5e-8 + 1e-4 * (len(str(claimed)) < 8):
                problems.append(f"{field} claims {claimed}, the logs' mean is {actual:.8f}")
        for field, actual in (("bytes_code", code_bytes), ("bytes_total", total)):
            if field in submission and submission[field] != actual:
                problems.append(f"{field} claims {submission[field]}, the folder says {actual}")
        note(not problems, "claims vs logs", "; ".join(problems) or
             f"val_bpb {submission.get('val_bpb')} is the mean of {len(scores)} log(s); byte counts match")
    seeds = [run.seed for run in runs]
    note(None not in seeds and len(set(seeds)) == len(seeds), "seeds", f"{seeds}")
    bad = [f"{run.log.name}: {line.strip()}" for run in runs for line in run.bad_scores]
    keys = {run.score_key for run in runs}
    note(not bad and len(keys) == 1, "score lines", "; ".join(bad[:3]) if bad else
         f"every score line parses; scored by {keys.pop()}_exact" if len(keys) == 1 else f"the logs score different modes: {sorted(keys)}")
    track = submission.get("track") or next((t for t in TRACKS if folder.resolve().parent.name == f"track_{t}"), None)
    if track == "non_record_16mb":
        log(f"[INFO] time limits: not applied ({TRACKS[track]})")
    else:
        for run in runs:
            limit = TRAIN_BUDGET_S + run.last_step_s
            note(run.train_s is not None and run.train_s <= limit, f"training time {run.log.name}",
                 "no training time in the log" if run.train_s is None else
                 f"{run.train_s:.1f} s (step loop + post-training fits) {'<=' if run.train_s <= limit else '>'} "
                 f"{TRAIN_BUDGET_S:.0f} s (+{run.last_step_s:.2f} s for the step that crosses the cap)")
            note(run.eval_s is not None and run.eval_s <= EVAL_BUDGET_S, f"evaluation time {run.log.name}",
                 "no eval_time on the score line" if run.eval_s is None else
                 f"{run.eval_s:.1f} s for {run.score_key} (artifact load and warm-up included) "
                 f"{'<=' if run.eval_s <= EVAL_BUDGET_S else '>'} {EVAL_BUDGET_S:.0f} s")
    if legality and str(submission.get("builder", "")).startswith("skc-golf"):
        from skcgolf import trainrun
        try:
            env_file = folder_config(folder, record)
        except SubmissionError as error:
            note(False, "legality suite", f"no config to run it with: {error}")
            return findings
        raw_config = trainrun.read_env_file(env_file) if env_file else runs[0].config
        with tempfile.TemporaryDirectory(prefix="legality_") as work:
            for ok, what, detail in legality_suite(code_path, raw_config, Path(work)):
                note(ok, f"legality: {what}", detail)
    elif legality:
        log("[INFO] legality suite: skipped (not built by skc-golf: its train_gpt.py has no per-token loss dump)")
    return findings


# -----------------------------------------------------------------------------
# The legality suite on a shipped file (folders built by this project)
# -----------------------------------------------------------------------------
LEGALITY_STEPS = 3


def _perturbed_data(data, workdir: Path, position: int) -> tuple[Path, int]:
    """A copy of the tiny data whose validation stream differs in one token; returns (its DATA_PATH, new token)."""
    import numpy as np
    from skcgolf.tinydata import train_gpt as reference
    root = workdir / "perturbed"
    root.mkdir(parents=True, exist_ok=True)
    for shard in Path(data.data_path).glob("fineweb_train_*.bin"):
        shutil.copyfile(shard, root / shard.name)
    val = reference.read_shard(Path(data.data_path) / "fineweb_val_000000.bin").astype(np.int64)
    while val[position] == reference.BOS_ID:
        position += 1
    token = (int(val[position]) + 7) % (data.sp.vocab_size() - 4) + 4
    val[position] = token
    reference.write_shard(root / "fineweb_val_000000.bin", val.astype(np.uint16))
    return root, position


def legality_suite(code_path: Path, raw_config: dict[str, str], workdir: Path) -> list[tuple[bool, str, str]]:
    """The competition's evaluation rules, checked on the shipped file at tiny scale with its own flags.

    Through the per-token loss dumps of two runs of the file (the trained artifact scored on the validation stream,
    and on the same stream with one token changed at position p): every target is scored exactly once; no target
    up to p moves (causality: a prediction sees only earlier tokens, TTT trains only on scored chunks); in window
    modes no target more than one window after p moves (no state crosses windows or documents). With the file's
    own functions: every scored distribution is normalised, and TTT updates follow the scoring of their chunk."""
    import numpy as np
    import torch
    module = load_module(code_path, "shipped_trainer")
    data = tiny_data(workdir / "data")
    env = tiny_env(module, raw_config, data, LEGALITY_STEPS, workdir / "train")
    env["EVAL_DUMP_TOKEN_LOSSES"] = str(workdir / "dump_original" / "losses.npz")
    finish_run(start_run(code_path, env, module, workdir), env, "shipped file")
    artifact = workdir / "train" / "tiny_model.skc"
    args = module.Hyperparameters(env)
    position = 300
    perturbed, position = _perturbed_data(data, workdir, position)
    env_b = {**env, "DATA_PATH": str(perturbed), "EVAL_ARTIFACT": str(artifact), "RUN_ID": "perturbed",
             "LOG_DIR": str(workdir / "eval"), "EVAL_DUMP_TOKEN_LOSSES": str(workdir / "dump_perturbed" / "losses.npz")}
    finish_run(start_run(code_path, env_b, module, workdir), env_b, "shipped file (eval only)")
    results = []
    for dump_b in sorted((workdir / "dump_perturbed").glob("losses_*.npz")):
        key = dump_b.stem.removeprefix("losses_")
        a, b = np.load(workdir / "dump_original" / dump_b.name), np.load(dump_b)
        n = a["targets"].size
        once = all(np.array_equal(d["targets"], np.arange(1, d["targets"].size + 1)) for d in (a, b)) and b["targets"].size == n
        results.append((once, f"scored once ({key})", f"targets 1..{n}, each once" if once else "a target is missing or repeated"))
        moved = np.flatnonzero(a["loss_nats"][:position - 1] != b["loss_nats"][:position - 1])  # targets 1..p-1
        results.append((moved.size == 0, f"causality ({key})", f"token {position} changed: targets 1..{position - 1} "
                        "unchanged" if moved.size == 0 else f"token {position} changed the loss of target {moved[0] + 1}, "
                        "which comes before it: a prediction saw a later token"))
        reached = a["loss_nats"][position - 1] != b["loss_nats"][position - 1]
        results.append((reached, f"perturbation reaches its target ({key})", f"target {position} changed" if reached else
                        f"changing token {position} did not change its own loss: the comparison above saw nothing"))
        if "ttt" not in key and "engram" not in key:  # score-first memories legitimately carry scored tokens forward
            reach = position + args.eval_len
            far = np.flatnonzero(a["loss_nats"][reach:] != b["loss_nats"][reach:])
            results.append((far.size == 0, f"no state across windows or documents ({key})",
                            f"targets after {reach} unchanged" if far.size == 0 else
                            f"target {reach + far[0] + 1} changed although token {position} is more than a window before it"))
    rt = module.Runtime(0, 1, 0, torch.device("cpu"), False)
    vocab = data.sp.vocab_size()
    if hasattr(module, "read_artifact"):  # the current trainer; earlier ones loaded through load_artifact
        model = module.model_from_records(*module.read_artifact(artifact), args)
    else:
        model = module.load_artifact(artifact.read_bytes(), str(artifact), args)
    try:  # the data folder; trainers before the reliability work took a glob pattern
        tokens = module.load_validation_tokens(str(data.data_path), args.train_seq_len, vocab, args.val_max_tokens)
    except (module.ShardError, OSError):
        tokens = module.load_validation_tokens(str(Path(data.data_path) / "fineweb_val_*.bin"), args.train_seq_len, vocab,
                                               args.val_max_tokens)
    ctx = module.stream_context(tokens, module.build_byte_tables(data.sp, vocab, rt.device), args.eval_len,
                                args.val_batch_size, rt)
    for key, options in [("final_roundtrip", dict(kind="windows", stride=args.eval_len)), *module.eval_modes(args)]:
        worst, events = [0.0], []

        def observer(targets, logp):
            worst[0] = max(worst[0], float(logp.double().logsumexp(-1).abs().max()))
        module.run_eval_mode(model, ctx, options, args, rt, observer, events)
        results.append((worst[0] < 1e-4, f"normalised ({key})", f"largest |log sum of probabilities| {worst[0]:.2e}"))
        trains = [e for e in events if e[0] == "train"]
        if trains:
            scored_up_to, ok = 1, True
            for event in events:
                if event[0] == "score":
                    scored_up_to = event[2]
                else:
                    ok &= event[2] == scored_up_to and event[4] < scored_up_to
            results.append((ok, f"score before update ({key})", f"{len(trains)} TTT updates, each on already-scored targets"
                            if ok else "a TTT update used targets not yet scored"))
    return results


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ext = commands.add_parser("extract", help="the trainer specialised to a config, proven equivalent on a tiny run")
    ext.add_argument("--config", required=True, type=Path, help="env file, e.g. configs/skc_competition.env")
    ext.add_argument("--out", required=True, type=Path, help="folder to write train_gpt.py and the config into")
    ext.add_argument("--dce", action="store_true", help="fold constant conditions and remove unreferenced code")
    ext.add_argument("--minify", action="store_true", help="python-minifier (asserts and module names kept)")
    ext.add_argument("--compress-code", action="store_true", help="ship a self-extracting lzma wrapper")
    ext.add_argument("--trainer", type=Path, default=TRAINER, help="the full trainer (default: train_gpt.py)")
    ext.add_argument("--steps", type=int, default=6, help="training steps of the equivalence runs")
    fin = commands.add_parser("finalize", help="submission.json, README.md, requirements.txt from the run's logs")
    fin.add_argument("folder", type=Path)
    fin.add_argument("--logs", required=True, nargs="+", type=Path)
    fin.add_argument("--track", choices=sorted(TRACKS), default="non_record_16mb")
    fin.add_argument("--name", help="submission name (default: the folder's name)")
    fin.add_argument("--author", required=True)
    fin.add_argument("--github-id", required=True)
    fin.add_argument("--blurb", help="one line (default: generated from the config)")
    chk = commands.add_parser("check", help="check any records folder against the rules")
    chk.add_argument("folder", type=Path)
    chk.add_argument("--no-legality", action="store_true", help="skip the legality suite (it trains a tiny model)")
    args = parser.parse_args(argv)
    try:
        if args.command == "extract":
            extract(args.config, args.out, args.dce, args.minify, args.compress_code, args.trainer, args.steps)
            print(f"wrote {args.out / 'train_gpt.py'}; next: run it (e.g. ./run_skc_competition_8xh100.sh --script "
                  f"{args.out / 'train_gpt.py'}), then build_submission.py finalize {args.out} --logs ...")
        elif args.command == "finalize":
            submission = finalize(args.folder, args.logs, args.track, args.name or args.folder.name, args.author,
                                  args.github_id, args.blurb)
            print(f"wrote {args.folder}/submission.json: val_bpb {submission['val_bpb']} ± {submission['val_bpb_std']}, "
                  f"{submission['bytes_total']:,} bytes; now run build_submission.py check {args.folder}")
        else:
            findings = check_folder(args.folder, legality=not args.no_legality)
            failed = [f for f in findings if not f.ok]
            print(f"check {args.folder}: {len(findings) - len(failed)} passed, {len(failed)} failed"
                  + (" -> NOT SUBMITTABLE" if failed else " -> OK"))
            return 1 if failed else 0
    except (EquivalenceError, TinyRunError, SubmissionError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
