"""The package layout of ``doc/how_pqsk_is_built.rst``: imports point one
way (no circle among pqsk's modules, counting imports inside functions),
no estimator module is imported by storage, persistence or the sharded
index, the oracles import nothing of pqsk, and no module grows past 900
lines."""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pqsk")
ESTIMATOR_MODULES = {"_pq", "_ivfpq", "_hnswpq"}
MAX_LINES = 900


def _modules():
    """{module name: path} of pqsk's Python modules and Cython kernels."""
    out = {}
    for f in sorted(os.listdir(PKG)):
        name, ext = os.path.splitext(f)
        if ext == ".py":
            out[name] = os.path.join(PKG, f)
    return out


def _imports(path):
    """pqsk modules a Python file imports, anywhere in it (module level or
    inside a function)."""
    tree = ast.parse(open(path).read(), path)
    mods = _modules()
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from ._x import y
                out.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import _x, _y
                out.update(a.name for a in node.names if a.name in mods)
            elif node.module and node.module.startswith("pqsk"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    out.add(parts[1])
                else:
                    out.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pqsk."):
                    out.add(a.name.split(".")[1])
    return out - {"__init__"}


GRAPH = {name: _imports(path) & set(_modules()) for name, path in _modules().items()
         if name != "__init__"}


def _cycle():
    """One import circle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_the_import_graph_is_read():
    # The checks below mean something only if imports are found.
    assert "_quantizer" in GRAPH["_pq"]
    assert "_graph" in GRAPH["_hnswpq"]


def test_no_import_circle():
    assert _cycle() is None, " -> ".join(_cycle())


@pytest.mark.parametrize("module", ["_persist", "dask", "_checks", "_segments", "_lists",
                                    "_store", "_graph", "_scorers", "_partition",
                                    "_reorder", "_quantizer", "_tune", "_runtime",
                                    "_manifest", "_sharded_ops", "_sharded_io", "_routing"])
def test_lower_layers_import_no_estimator(module):
    assert not GRAPH[module] & ESTIMATOR_MODULES, GRAPH[module] & ESTIMATOR_MODULES


def test_oracles_import_nothing_of_pqsk():
    assert GRAPH["_naive"] == set()


def test_manifest_primitives_import_nothing_of_pqsk():
    assert GRAPH["_manifest"] == set()


@pytest.mark.parametrize("name,path", sorted(_modules().items()))
def test_no_module_over_900_lines(name, path):
    with open(path) as f:
        n = sum(1 for _ in f)
    assert n <= MAX_LINES, f"{name}.py has {n} lines"
