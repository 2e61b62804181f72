"""The allowed values of every config field, read from the `[...]` that opens its comment in
configs/base.py, so each field's meaning and its constraint sit on one line, declared once.

A rule is alternatives joined by " or ", each one of:
  a type with optional bounds   `int`, `bool`, `float > 0`, `int >= 1`, `0 <= float < 1`
  choices                       `lora|full`
  a literal                     `-1`, `""`
  a named kind                  one of KINDS below, e.g. `regex`, `task`, `hf model`
`float` takes ints too but never bools or non-finite numbers; `int` never takes a bool. Kinds
that depend on the task or the filesystem (`hf model`, `jsonl file`, `config file`) are only
strings here; lora_jax/config_check.py checks the rest of them once it knows the task.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import io
import math
import operator
import os
import pkgutil
import re
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_jax.errors import LoraError
from lora_jax.spec import known_init

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.py"
_TYPED = re.compile(r"(?:(-?[\d.]+)\s*(<=|<)\s*)?(int|float|bool|str)(?:\s*(<=|<|>=|>)\s*(-?[\d.]+))?")
_NOUNS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string"}
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _is_regex(v: Any) -> bool:
    try:
        re.compile(v)
    except (re.error, TypeError):
        return False
    return isinstance(v, str) and v != ""


@functools.cache
def task_names() -> tuple[str, ...]:
    """Modules of lora_jax/tasks that provide `build` (the helpers beside them do not)."""
    import lora_jax.tasks

    names = [m.name for m in pkgutil.iter_modules(lora_jax.tasks.__path__)]
    return tuple(n for n in sorted(names) if hasattr(importlib.import_module(f"lora_jax.tasks.{n}"), "build"))


def _is_task(v: Any) -> bool:
    return isinstance(v, str) and v in task_names()


def _is_corpus(v: Any) -> bool:
    """As lora_jax/tasks/corpora.documents reads it; find_spec does not import the package."""
    if v in ("stdlib", "pydoc_topics"):
        return True
    spec = importlib.util.find_spec(v) if isinstance(v, str) and v.isidentifier() else None
    return spec is not None and bool(spec.submodule_search_locations)


def _is_labels(v: Any) -> bool:
    labels = [s.strip() for s in v.split(",")] if isinstance(v, str) else []
    return bool(labels) and "" not in labels and len(set(labels)) == len(labels)


def _is_dir_path(v: Any) -> bool:
    return isinstance(v, str) and v != "" and not os.path.isfile(os.path.expanduser(v))


# name: (test of the value alone, what it allows: text, or a function making it)
KINDS: dict[str, tuple[Callable[[Any], bool], str | Callable[[], str]]] = {
    "regex": (_is_regex, "a valid, non-empty regular expression"),
    "lora init": (known_init, "one of 'kaiming', 'gaussian', 'pissa', 'pissa_niter_K' (K >= 0), 'olora'"),
    "task": (_is_task, lambda: "a task in lora_jax/tasks: " + ", ".join(repr(t) for t in task_names())),
    "corpus": (_is_corpus, "stdlib, pydoc_topics or an installed package's name"),
    "labels": (_is_labels, "distinct, non-empty comma-separated labels"),
    "dir": (_is_dir_path, "a directory path (not a file)"),
    "hf model": (lambda v: isinstance(v, str), "an HF model directory or hub id"),
    "jsonl file": (lambda v: isinstance(v, str), "a .jsonl file"),
    "config file": (lambda v: isinstance(v, str), "a config file, FILE.py or FILE.py:VARIANT"),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One field's constraint: `allows(value)`, and `expected` for the error line."""

    text: str
    tests: tuple[Callable[[Any], bool], ...]
    expected: str
    kinds: tuple[str, ...]  # the named kinds among the alternatives

    def allows(self, value: Any) -> bool:
        return any(test(value) for test in self.tests)


def _typed(match: re.Match) -> tuple[Callable[[Any], bool], str]:
    lo, lo_op, kind, hi_op, hi = match.groups()
    is_type = {"int": _is_int, "float": _is_number, "bool": lambda v: isinstance(v, bool),
               "str": lambda v: isinstance(v, str)}[kind]
    bounds = []  # (op, bound) read as `value op bound`
    if lo is not None:
        bounds.append(({"<": ">", "<=": ">="}[lo_op], float(lo)))
    if hi is not None:
        bounds.append((hi_op, float(hi)))
    test = lambda v: is_type(v) and all(_OPS[op](v, b) for op, b in bounds)
    noun = _NOUNS[kind]
    if lo is not None and hi is not None:
        return test, f"{noun} in {'[' if lo_op == '<=' else '('}{lo}, {hi}{']' if hi_op == '<=' else ')'}"
    if hi is not None:
        return test, f"{noun} {hi_op} {hi}"
    return test, noun


def parse_rule(text: str) -> Rule:
    tests, described, kinds = [], [], []
    for alt in (a.strip() for a in text.split(" or ")):
        if alt == '""':
            tests.append(lambda v: v == "")
            described.append('""')
        elif re.fullmatch(r"-?\d+", alt):
            tests.append(lambda v, n=int(alt): _is_int(v) and v == n)
            described.append(alt)
        elif "|" in alt:
            choices = tuple(c.strip() for c in alt.split("|"))
            tests.append(lambda v, cs=choices: isinstance(v, str) and v in cs)
            described.append("one of " + ", ".join(repr(c) for c in choices))
        elif alt in KINDS:
            test, what = KINDS[alt]
            tests.append(test)
            described.append(what() if callable(what) else what)
            kinds.append(alt)
        elif match := _TYPED.fullmatch(alt):
            test, what = _typed(match)
            tests.append(test)
            described.append(what)
        else:
            raise LoraError(f"rule [{text}]: cannot read {alt!r} (see lora_jax/config_rules.py)")
    return Rule(text, tuple(tests), " or ".join(described), tuple(kinds))


@dataclasses.dataclass(frozen=True)
class Field:
    name: str  # dotted, e.g. "optimizer.lr"
    rule: Rule


@functools.cache
def declared_fields(path: Path = BASE_CONFIG) -> dict[str, Field]:
    """{dotted name: Field} for each `c.a.b = value  # [rule] meaning` line of get_config."""
    if not path.is_file():
        raise LoraError(f"no config declarations at {path}; expected the repository's configs/base.py")
    source = path.read_text(encoding="utf-8")
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    get_config = next(n for n in ast.parse(source).body
                      if isinstance(n, ast.FunctionDef) and n.name == "get_config")
    fields = {}
    for node in ast.walk(get_config):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        name = _dotted(node.targets[0])
        if name is None or (isinstance(node.value, ast.Call) and ast.unparse(node.value.func).endswith(
                "ConfigDict")):
            continue  # a local, or a section
        rule = re.match(r"#\s*\[([^\]]*)\]", comments.get(node.lineno, ""))
        if rule is None or node.end_lineno != node.lineno:
            raise LoraError(f"{path}:{node.lineno}: field {name} needs one line with [allowed values] "
                            "opening its comment")
        if name in fields:
            raise LoraError(f"{path}:{node.lineno}: field {name} is declared twice")
        fields[name] = Field(name, parse_rule(rule.group(1)))
    return fields


def _dotted(target: ast.expr) -> str | None:
    """"a.b" for the target `c.a.b`; None for anything else."""
    parts = []
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if not (isinstance(target, ast.Name) and target.id == "c") or not parts:
        return None
    return ".".join(reversed(parts))
