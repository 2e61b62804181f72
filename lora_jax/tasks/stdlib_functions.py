"""(docstring, code) pairs extracted with `ast` from a directory of Python sources.

The default source is the standard library of the running interpreter: it is always present, needs
no download, and is real, well-documented code. A pair's query is the first paragraph of a
function's docstring; its document is the function's source with that docstring cut out, so the
answer is never contained verbatim in the document.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import textwrap
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass

# Directories whose code is tests, demos, vendored or third-party: not "library functions".
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "distutils",
        "site-packages",
        "__pycache__",
    }
)
MIN_QUERY_WORDS = 3
MIN_QUERY_CHARS = 20

_FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass(frozen=True)
class Pair:
    """One retrieval example: `query` (docstring summary) should retrieve `code`."""

    module: str  # dotted module name, e.g. "email.utils"
    name: str  # qualified name inside the module, e.g. "Message.get_all" or "outer.inner"
    query: str
    code: str


def stdlib_dir() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def _is_test_file(stem: str) -> bool:
    return stem.startswith("test_") or stem.endswith("_test") or stem == "conftest"


def iter_module_files(root: str) -> Iterator[tuple[str, str]]:
    """(dotted module name, path) of every non-test .py file under `root`, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and d.isidentifier())
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        for filename in sorted(filenames):
            stem, ext = os.path.splitext(filename)
            if ext != ".py" or not stem.isidentifier() or _is_test_file(stem):
                continue
            names = parts if stem == "__init__" else [*parts, stem]
            if names:
                yield ".".join(names), os.path.join(dirpath, filename)


def first_paragraph(docstring: str) -> str:
    """Text up to the first blank line, whitespace-normalised: the docstring's summary."""
    lines: list[str] = []
    for line in docstring.strip().splitlines():
        if not line.strip():
            break
        lines.append(line)
    return " ".join(" ".join(lines).split())


def is_trivial_query(query: str) -> bool:
    """Too short to describe behaviour ("Docstring.", "Return x"), so not a fair query."""
    return len(query.split()) < MIN_QUERY_WORDS or len(query) < MIN_QUERY_CHARS


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _byte_slice(line: str, start: int, stop: int | None = None) -> str:
    """`line[start:stop]` with `ast`'s column offsets, which count UTF-8 bytes, not characters."""
    return line.encode("utf-8")[start:stop].decode("utf-8", errors="replace")


def function_source_without_docstring(lines: list[str], node: _FunctionNode) -> str:
    """The `def` through the end of the body (no decorators), dedented, docstring removed.

    `lines` are the file's lines with line endings; `node.body[0]` must be the docstring.
    """
    doc = node.body[0]
    assert doc.end_lineno is not None and doc.end_col_offset is not None
    start, end = node.lineno - 1, node.end_lineno or node.lineno
    doc_first, doc_last = doc.lineno - 1, doc.end_lineno - 1
    # What shares the docstring's first/last line (the `def` in one-liners, or `; stmt`) stays.
    before = _byte_slice(lines[doc_first], 0, doc.col_offset)
    after = _byte_slice(lines[doc_last], doc.end_col_offset).strip().removeprefix(";").strip()
    joined = (before + after).rstrip()
    kept = lines[start:doc_first] + ([joined + "\n"] if joined.strip() else [])
    kept += lines[doc_last + 1 : end]
    text = textwrap.dedent("".join(kept).expandtabs(8))
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def _functions(node: ast.AST, prefix: str) -> Iterator[tuple[str, _FunctionNode]]:
    """(qualified name, node) of every function and method below `node`, nested ones included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + child.name, child
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:  # functions defined under `if`/`try`/`with`/... keep the enclosing prefix
            yield from _functions(child, prefix)


def pairs_from_source(source: str, module: str) -> list[Pair]:
    """All pairs of one module's source; non-dunder functions with a non-trivial docstring."""
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    tree = ast.parse(source)
    # Split on "\n" only: str.splitlines also breaks at form feeds, misaligning ast line numbers.
    lines = [line + "\n" for line in source.split("\n")]
    pairs = []
    for name, node in _functions(tree, ""):
        if _is_dunder(node.name):
            continue
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        query = first_paragraph(docstring)
        if is_trivial_query(query):
            continue
        code = function_source_without_docstring(lines, node)
        pairs.append(Pair(module=module, name=name, query=query, code=code))
    return pairs


def extract_pairs(root: str | None = None) -> list[Pair]:
    """Pairs from every parseable module under `root` (default: the stdlib); bad files skipped."""
    pairs: list[Pair] = []
    for module, path in iter_module_files(root or stdlib_dir()):
        try:
            with tokenize.open(path) as f:  # honours `# -*- coding: ... -*-` cookies
                source = f.read()
            pairs.extend(pairs_from_source(source, module))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
    return pairs
