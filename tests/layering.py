"""The import rules of a source tree, read from its modules' source with `ast` (nothing is
imported): which layer may import which, which packages only some layers may use, and no
import cycle. `test_layout.py` applies proxytune's rules and shows that a bad import fails.

A layer is a module prefix (`proxytune.core`, `components`); a module belongs to the longest
layer that prefixes it, except that a package with layers inside it (`proxytune`) is a root
layer of its own `__init__` only: every module under it must be in one of its layers. Every
import counts, at the top of a module or inside a function (a lazy import is still a
dependency), including those under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}"


def modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of `packages` under `root` by dotted name (a package by its `__init__`)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: Mapping[str, Path]) -> list[Import]:
    """What module `name` imports: `from X import y` is X.y when that is a module of the tree."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, path, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append(Import(name, child if child in known else base, path, node.lineno))
    return found


def layer_of(module: str, layers: Iterable[str], roots: Iterable[str]) -> str | None:
    """The longest layer prefixing `module`; a root package is a layer of its `__init__` only."""
    if module in roots:
        return module
    matches = [layer for layer in layers if layer not in roots and (module + ".").startswith(layer + ".")]
    return max(matches, key=len, default=None)


def violations(
    root: Path,
    rules: Mapping[str, Iterable[str]],
    restricted: Mapping[str, Iterable[str]] | None = None,
) -> list[str]:
    """Every import that breaks `rules` (layer -> the layers it may import besides itself) or
    `restricted` (outside package -> the layers that may import it), and every module of the
    tree in no layer. The tree is the top-level packages the layers name; every layer may
    import a package root (`from proxytune import __version__`)."""
    restricted = restricted or {}
    packages = sorted({layer.split(".")[0] for layer in rules})
    known = modules(root, packages)
    roots = [layer for layer in rules if "." not in layer and any(o.startswith(layer + ".") for o in rules)]
    problems = [
        f"{path}: {name} is in no layer" for name, path in known.items() if not layer_of(name, rules, roots)
    ]
    for name, path in known.items():
        here = layer_of(name, rules, roots)
        if here is None:
            continue
        allowed = {here, *rules[here], *roots}
        for imported in imports(name, path, known):
            top = imported.imported.split(".")[0]
            if top in restricted and here not in restricted[top]:
                problems.append(f"{imported}: only {', '.join(sorted(restricted[top]))} may import {top}")
            elif top in packages and layer_of(imported.imported, rules, roots) not in allowed:
                target = layer_of(imported.imported, rules, roots)
                problems.append(f"{imported}: {here} may not import {target}")
    return problems


def cycles(root: Path, packages: Iterable[str]) -> list[list[str]]:
    """The import cycles among the modules of `packages` (strongly connected groups), each as
    its sorted module names."""
    known = modules(root, packages)
    graph = {
        name: sorted({i.imported for i in imports(name, path, known) if i.imported in known} - {name})
        for name, path in known.items()
    }
    return [sorted(group) for group in _strongly_connected(graph) if len(group) > 1]


def _strongly_connected(graph: Mapping[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (deep import chains would exhaust Python's recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups
