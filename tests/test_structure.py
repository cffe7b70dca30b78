"""The shape of the code a newcomer reads: rooms of bounded size, no cycles, no private imports.

Limits (``docs/design.md`` is the long story; modules stay readable in one go):
a class under 300 lines, a function under 80, docstrings included (options
shared by several functions are documented once, in :mod:`dxfield.options`),
a module under 600 lines (the CUDA source aside); no import cycle inside a
package; no name with a leading underscore imported from another module of
the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dxfield", "dxtrain")
MAX_CLASS, MAX_FUNCTION, MAX_FILE = 300, 80, 600


def modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            yield pkg, path


def sizes():
    """``(kind, qualified name, lines)`` of every module, class and function (from ``def``/``class`` to its end)."""
    out = []
    for pkg, path in modules():
        tree = ast.parse(path.read_text())
        out.append(("file", f"{pkg}/{path.name}", len(path.read_text().splitlines())))

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    kind = "class" if isinstance(child, ast.ClassDef) else "function"
                    n = child.end_lineno - child.lineno + 1
                    name = f"{prefix}{child.name}"
                    out.append((kind, f"{pkg}/{path.name}:{name}", n))
                    walk(child, name + ".")
        walk(tree, "")
    return out


def imports():
    """``(module, imported module, names)`` for every project-internal import."""
    out = []
    for pkg, path in modules():
        mod = f"{pkg}.{path.stem}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg if node.module is None else f"{pkg}.{node.module}"
                else:
                    base = node.module or ""
                if base.split(".")[0] not in PACKAGES:
                    continue
                names = [a.name for a in node.names]
                if node.module is None or (node.level and base == pkg):  # from . import x
                    for a in names:
                        out.append((mod, f"{base}.{a}", [a]))
                else:
                    out.append((mod, base, names))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PACKAGES:
                        out.append((mod, a.name, [a.name.split(".")[-1]]))
    return out


@pytest.mark.parametrize("kind,limit", [("class", MAX_CLASS), ("function", MAX_FUNCTION), ("file", MAX_FILE)])
def test_rooms_are_small(kind, limit):
    too_big = [(name, n) for k, name, n in sizes() if k == kind and n > limit]
    assert not too_big, f"{kind}s over {limit} lines: {too_big}"


def test_no_private_name_crosses_a_module_border():
    crossing = []
    for mod, target, names in imports():
        parts = target.split(".")
        if any(p.startswith("_") and p != "__init__" for p in parts[1:]):
            crossing.append((mod, target))
        crossing += [(mod, f"{target}.{a}") for a in names if a.startswith("_") and target != mod]
    assert not crossing, f"private names imported from another module: {crossing}"


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for mod, target, _ in imports():
        known = {f"{p}.{path.stem}" for p, path in modules()}
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in known and target != mod and not target.endswith("__init__"):
            graph.setdefault(mod, set()).add(target)
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif state.get(nxt) is None:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in list(graph):
        if state.get(node) is None:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_see_the_code():
    # the walkers must find the rooms they judge, or every check above passes vacuously
    found = sizes()
    assert any(k == "class" and name.endswith(":ProjectedField") for k, name, _ in found)
    assert any(k == "function" and name.endswith(":drift_field") for k, name, _ in found)
    assert any(target.startswith("dxfield.") for _, target, _ in imports())


def test_shared_options_reach_the_docstrings():
    import dxfield

    for fn, name in ((dxfield.drift_field, "precision : {\"float32\", \"tf32x3\""),
                     (dxfield.ProjectedField.field, "repulsion : {\"exact\", \"nystrom\"}"),
                     (dxfield.ProjectedField.build, "ridge, eig_clamp"),
                     (dxfield.kernel_matvec, "block_size : (int, int)")):
        assert name in fn.__doc__ and "{options}" not in fn.__doc__, fn.__qualname__


def test_documented_needs_its_placeholder():
    from dxfield.options import documented

    def no_placeholder():
        """Nothing to fill."""

    with pytest.raises(ValueError, match="options"):
        documented("kernel")(no_placeholder)
