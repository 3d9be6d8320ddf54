"""The import layering of DESIGN.md §1, and a docstring on every module.

Walks every ``.py`` file under ``distexec/`` with :mod:`ast` (nothing is imported, so the
check works on a half-written tree) and checks that each module imports from ``distexec``
only modules of its own layer or of an earlier one::

    errors < protocol < transport < runtime < cluster < pools < progress < pmap < ordered_map
           < executor_futures < executor_workers < executor_routes < executor_load < executor < mp_results
           < mp_pool < api < integrations < testing < cli

``distexec/__init__.py`` and ``distexec/__main__.py`` may import anything; ``testing`` anything
below ``cli``. Importing the package root itself (``import distexec``, ``from distexec import
Name`` where ``Name`` is not a module) counts as importing ``__init__``, which only those may do.
Imports under ``if TYPE_CHECKING:`` are skipped: they never run, so they cannot create a cycle.
Every module has a docstring saying what it owns and may import (an empty ``__init__.py`` is
exempt).

Inside ``cluster/`` the modules import each other without a cycle (imports inside functions
count too), and the generic ones (``membership``, ``manager``) reach, directly or through
others, no particular manager and no worker-side module: a new launch mechanism is one new
module beside ``local.py``, not another strand of a circle.

A new top-level module must be given a layer in ``LAYERS`` below.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "distexec"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE

LAYERS = [
    "errors",
    "protocol",
    "transport",
    "runtime",
    "cluster",
    "pools",
    "progress",
    "pmap",
    "ordered_map",
    "executor_futures",
    "executor_workers",
    "executor_routes",
    "executor_load",
    "executor",
    "mp_results",
    "mp_pool",
    "api",
    "integrations",
    "testing",
    "cli",
]
RANK = {name: i for i, name in enumerate(LAYERS)}
ROOT = "__init__"
RANK[ROOT] = len(LAYERS)          # the package root re-exports everything: the top layer
MAY_IMPORT_ANYTHING = {"__init__", "__main__"}
MAY_IMPORT_ROOT = MAY_IMPORT_ANYTHING | {"testing"}


@dataclass(frozen=True)
class Import:
    target: str     # dotted module name, e.g. "distexec.protocol.frames"
    lineno: int


# -- resolving names ----------------------------------------------------------------------------


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    """``distexec/protocol/frames.py`` -> ``distexec.protocol.frames``, without ``__init__``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> str | None:
    """The layer of a dotted module name inside the package (None when unmapped)."""
    parts = name.split(".")
    assert parts[0] == PACKAGE, name
    if len(parts) == 1:
        return ROOT
    head = parts[1]
    if head == "__main__":
        return "__main__"
    return head if head in RANK else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (their ``else:`` branch is kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _from_base(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (resolving ``.``/``..``)."""
    if node.level == 0:
        return node.module or ""
    package = current.split(".") if is_package else current.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        raise ValueError(f"relative import beyond the top-level package in {current}")
    base = package[: len(package) - (node.level - 1)]
    if node.module:
        base += node.module.split(".")
    return ".".join(base)


def imports_of(source: str, current: str, is_package: bool, known: set[str]) -> list[Import]:
    """The ``distexec`` modules a module's source imports at run time.

    Args:
        source: the module's source text.
        current: its dotted name.
        is_package: whether it is a package's ``__init__.py`` (relative imports start there).
        known: dotted names of every module in the tree, to tell ``from pkg import submodule``
            from ``from pkg import name``.
    """
    found = []
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, current, is_package)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                target = candidate if candidate in known or _names_subpackage(candidate) else base
                found.append(Import(target, node.lineno))
    return [i for i in found if i.target == PACKAGE or i.target.startswith(PACKAGE + ".")]


def _names_subpackage(candidate: str) -> bool:
    """``from distexec import errors`` names a layer even before ``errors.py`` exists."""
    parts = candidate.split(".")
    return len(parts) == 2 and parts[0] == PACKAGE and parts[1] in RANK


def violation(importer: str, target: str) -> str | None:
    """Why ``importer`` may not import ``target``, or None when it may."""
    src, dst = layer_of(importer), layer_of(target)
    if src in MAY_IMPORT_ANYTHING:
        return None
    if src is None:
        return f"{importer} has no layer: add it to LAYERS in {Path(__file__).name}"
    if dst is None:
        return f"{target} has no layer: add it to LAYERS in {Path(__file__).name}"
    if dst == ROOT:
        return None if src in MAY_IMPORT_ROOT else (
            f"{importer} ({src}) imports the package root; import the defining module instead"
        )
    if src == "errors" and dst != "errors":
        return f"errors imports nothing from {PACKAGE}, but imports {target}"
    if RANK[dst] > RANK[src]:
        return f"{importer} ({src}) imports {target} ({dst}), a later layer"
    return None


# -- the tree -----------------------------------------------------------------------------------


def _source_files() -> list[Path]:
    if not PACKAGE_DIR.is_dir():
        return []
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def test_imports_follow_the_layers():
    files = _source_files()
    known = {module_name(p) for p in files}
    problems = []
    for path in files:
        current = module_name(path)
        source = path.read_text(encoding="utf-8")
        if layer_of(current) is None:
            problems.append(f"{path}: {violation(current, current)}")
            continue
        for imp in imports_of(source, current, path.name == "__init__.py", known):
            why = violation(current, imp.target)
            if why:
                problems.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{imp.lineno}: {why}")
    assert not problems, "layering violations (DESIGN.md §1):\n" + "\n".join(problems)


def _needs_docstring(path: Path, source: str) -> bool:
    """Every module does, except an empty ``__init__.py``: a bare package marker owns nothing."""
    return bool(source.strip()) or path.name != "__init__.py"


def test_every_module_has_a_docstring():
    missing = []
    for path in _source_files():
        source = path.read_text(encoding="utf-8")
        docstring = ast.get_docstring(ast.parse(source)) or ""
        if _needs_docstring(path, source) and not docstring.strip():
            missing.append(str(path.relative_to(PACKAGE_DIR.parent)))
    assert not missing, (
        "modules without a docstring saying what they own and what they may import:\n"
        + "\n".join(missing)
    )


# -- inside cluster/ ----------------------------------------------------------------------------

CLUSTER = f"{PACKAGE}.cluster"
GENERIC_CLUSTER = ("membership", "manager")
PARTICULAR_CLUSTER = ("local", "template", "template_server", "ssh", "ssh_commands", "slurm",
                      "worker")
"""What the generic modules must not reach: the launch mechanisms and the worker's side."""


def cluster_graph(files: list[Path] | None = None) -> dict[str, set[str]]:
    """``cluster`` module -> the ``cluster`` modules it imports (by short name), function-level
    imports included, ``TYPE_CHECKING`` ones not."""
    files = _source_files() if files is None else files
    known = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        current = module_name(path)
        if not current.startswith(CLUSTER + ".") or path.name == "__init__.py":
            continue
        imported = imports_of(path.read_text(encoding="utf-8"), current, False, known)
        graph[current.split(".")[-1]] = {
            i.target.split(".")[2] for i in imported
            if i.target.startswith(CLUSTER + ".") and i.target != current}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` reaches, with one import path to it."""
    paths = {start: [start]}
    stack = [start]
    while stack:
        node = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                stack.append(nxt)
    return paths


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (as an import path back to itself)."""
    found = []
    for start in sorted(graph):
        for node, path in reachable(graph, start).items():
            if start in graph.get(node, ()) and not any(start in c for c in found):
                found.append(path + [start])
    return found


def test_cluster_modules_import_each_other_without_a_cycle():
    found = cycles(cluster_graph())
    assert not found, "import cycles inside cluster/:\n" + "\n".join(
        " -> ".join(c) for c in found)


@pytest.mark.parametrize("generic", GENERIC_CLUSTER)
def test_generic_cluster_modules_reach_no_particular_manager(generic):
    paths = reachable(cluster_graph(), generic)
    bad = [" -> ".join(paths[m]) for m in PARTICULAR_CLUSTER if m in paths]
    assert not bad, (f"cluster/{generic}.py must not import a particular manager or the worker "
                     "side, even through other modules:\n" + "\n".join(bad))


def test_cycle_finder_on_a_synthetic_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert reachable(graph, "d")["c"] == ["d", "a", "b", "c"]


# -- the checker itself, on synthetic sources ---------------------------------------------------

KNOWN = {
    "distexec",
    "distexec.errors",
    "distexec.protocol",
    "distexec.protocol.frames",
    "distexec.protocol.handshake",
    "distexec.runtime",
    "distexec.runtime.context",
    "distexec.executor",
}


def _targets(source, current, is_package=False):
    return [i.target for i in imports_of(source, current, is_package, KNOWN)]


@pytest.mark.parametrize(
    ("source", "current", "is_package", "expected"),
    [
        ("from ..errors import ProtocolError", "distexec.protocol.frames", False,
         ["distexec.errors"]),
        ("from . import frames", "distexec.protocol.handshake", False,
         ["distexec.protocol.frames"]),
        ("from .frames import HEADER", "distexec.protocol.handshake", False,
         ["distexec.protocol.frames"]),
        ("from . import frames", "distexec.protocol", True, ["distexec.protocol.frames"]),
        ("from .errors import X", "distexec", True, ["distexec.errors"]),
        ("from .. import errors", "distexec.runtime.context", False, ["distexec.errors"]),
        ("from .. import Future", "distexec.runtime.context", False, ["distexec"]),
        ("import distexec.protocol.frames as f", "distexec.runtime.context", False,
         ["distexec.protocol.frames"]),
        ("from distexec import pools", "distexec.executor", False, ["distexec.pools"]),
        ("import os, json\nfrom typing import TYPE_CHECKING", "distexec.errors", False, []),
        ("if TYPE_CHECKING:\n    from ..executor import E\nelse:\n    from ..errors import X",
         "distexec.runtime.context", False, ["distexec.errors"]),
        ("def f():\n    from ..executor import E", "distexec.runtime.context", False,
         ["distexec.executor"]),
    ],
)
def test_import_resolution(source, current, is_package, expected):
    assert _targets(source, current, is_package) == expected


@pytest.mark.parametrize(
    ("importer", "target", "allowed"),
    [
        ("distexec.protocol.frames", "distexec.errors", True),
        ("distexec.protocol.frames", "distexec.protocol.handshake", True),
        ("distexec.protocol.frames", "distexec.transport.sockets", False),
        ("distexec.runtime.context", "distexec.cluster.manager", False),
        ("distexec.cluster.manager", "distexec.runtime.context", True),
        ("distexec.errors", "distexec.protocol", False),
        ("distexec.errors", "distexec.errors", True),
        ("distexec.api", "distexec.executor", True),
        ("distexec.executor", "distexec.api", False),
        ("distexec.integrations.joblib_backend", "distexec.api", True),
        ("distexec.cli", "distexec.integrations.progress", True),
        ("distexec.testing", "distexec.cli", False),
        ("distexec.testing", "distexec", True),
        ("distexec.api", "distexec", False),
        ("distexec", "distexec.cli", True),
        ("distexec.__main__", "distexec.cli", True),
        ("distexec.runtime.context", "distexec.mystery", False),
    ],
)
def test_layer_rule(importer, target, allowed):
    assert (violation(importer, target) is None) is allowed
