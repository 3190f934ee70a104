"""The package layout rules (DESIGN.md §4), read from the source with ``ast``: no module imports
another module's private names, and the module-level imports form no cycle."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "kdkernels"


def _modules():
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str, toplevel_only: bool):
    """(target module, imported names, line) of each in-package import of ``mod``; with
    ``toplevel_only`` only the imports that run when the module is imported."""
    path, is_pkg = MODULES[mod]
    tree = ast.parse(path.read_text())
    nodes = tree.body if toplevel_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            target = _resolve(mod, is_pkg, node)
            if target.split(".")[0] == "kdkernels":
                yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "kdkernels":
                    yield a.name, [], node.lineno


def test_every_module_is_found():
    assert {"kdkernels", "kdkernels.checks", "kdkernels.reduction", "kdkernels.backends",
            "kdkernels.losses.kd", "kdkernels.ops.dense"} <= set(MODULES)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_private_cross_imports(mod):
    """``from X import _name`` and ``X._name`` for another kdkernels module X are not allowed:
    shared helpers are public in the module that owns them."""
    path, is_pkg = MODULES[mod]
    bad = []
    module_aliases = {}
    for target, names, line in _imports(mod, toplevel_only=False):
        for n in names:
            if n.startswith("_") and not n.startswith("__"):
                bad.append(f"line {line}: from {target} import {n}")
            if f"{target}.{n}" in MODULES:
                module_aliases[n] = f"{target}.{n}"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                full = f"{_resolve(mod, is_pkg, node)}.{a.name}"
                if full in MODULES:
                    module_aliases[a.asname or a.name] = full
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases and node.attr.startswith("_")
                and not node.attr.startswith("__") and module_aliases[node.value.id] != mod):
            bad.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, f"{mod} uses private names of other modules: {bad}"


def _graph():
    graph = {m: set() for m in MODULES}
    for mod in MODULES:
        for target, names, _ in _imports(mod, toplevel_only=True):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                graph[mod].update(subs)
            if target in MODULES and (not names or len(subs) < len(names)):
                graph[mod].add(target)  # names defined in the target module itself
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_the_private_import_rule_can_fail(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("from .reference import _masked\nfrom . import backends\nbackends._probe\n")
    monkeypatch.setitem(MODULES, "kdkernels.bad", (bad, False))
    with pytest.raises(AssertionError, match="_masked.*backends._probe"):
        test_no_private_cross_imports("kdkernels.bad")
