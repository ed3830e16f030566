"""The layers point down, and no two modules import each other, even from inside a function.

Every module of the project's packages is parsed (not imported) and every import statement
counted: at the top of the file, inside a function or method, under `try`. A function-level
import runs later, but a cycle through it is still a cycle a reader has to untangle, so it
counts. Only `if TYPE_CHECKING:` blocks are left out: they never run.

Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so it is an edge to those
packages too — except to the importer's own packages, which are already running.

    cli/      the command line: may import anything below it
    serve/    the HTTP server: engine/ (and the shared flags in cli/flags.py for its command)
    tui/      the app: engine/ and themes/, never the command line or the server
    engine/   imports none of the above
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "tui", "serve", "cli", "themes")
FORBIDDEN = {                  # package → the project packages it must never import
    "engine": {"tui", "serve", "cli", "themes"},
    "tui": {"cli", "serve"},
    "serve": {"tui"},
    "themes": {"engine", "tui", "serve", "cli"},
}


def project_modules() -> dict[str, Path]:
    """Dotted module name → file, for every .py file of the packages (a package is its
    __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                getattr(node.test, "id", None) == "TYPE_CHECKING"
                or getattr(node.test, "attr", None) == "TYPE_CHECKING"):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The project modules `name` imports → the line of the first such import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _type_checking_only(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):         # a.b.c runs a, then a.b, then a.b.c
            prefix = ".".join(parts[:i])
            mine = name == prefix or name.startswith(prefix + ".")
            if prefix in modules and not mine:
                found.setdefault(prefix, line)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:                          # relative: from the module's package up
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:                # `from a import b`: b may be a module
                sub = f"{module}.{alias.name}"
                add(sub if sub in modules else module, node.lineno)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm,
    iterative so that a deep chain cannot overflow the stack)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def one_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    """A readable loop through the component: a (line 3) → b (line 9) → a."""
    members = set(component)
    path, seen = [component[0]], {component[0]: 0}
    while True:
        here = path[-1]
        nxt = next(w for w in sorted(graph[here]) if w in members)
        if nxt in seen:
            loop = path[seen[nxt]:] + [nxt]
            return " → ".join(f"{a} (line {graph[a][b]})" for a, b in zip(loop, loop[1:])) \
                + f" → {nxt}"
        seen[nxt] = len(path)
        path.append(nxt)


def test_every_package_is_parsed(graph):
    """The walk sees the files it must judge (a test that finds nothing passes nothing)."""
    for name in ("engine.decoding", "engine.fast", "engine.bench", "tui.app", "serve.cli",
                 "cli.main", "cli.parser"):
        assert name in graph
    assert "tui.launch" in graph["cli.main"]          # an import inside a function counts
    assert "engine.fast.c_step" in graph["engine.fast"]


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(one_cycle(graph, c) for c in found)


@pytest.mark.parametrize("package", FORBIDDEN)
def test_layers_point_down(graph, package):
    wrong = [f"{name} imports {target} (line {line})"
             for name, targets in graph.items() if name.split(".")[0] == package
             for target, line in targets.items() if target.split(".")[0] in FORBIDDEN[package]]
    assert not wrong, "\n".join(wrong)


def test_the_checker_finds_a_cycle_and_names_it():
    """The checker itself, on a made-up graph: a → b → c → a is found and spelled out."""
    fake = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert cycles(fake) == [["a", "b", "c"]]
    assert one_cycle(fake, ["a", "b", "c"]) == "a (line 1) → b (line 2) → c (line 3) → a"
