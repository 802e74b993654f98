"""The package's import graph, read from the source (module-level and function-level imports alike): no
cycles, and the layers of the architecture import only downward (DESIGN.md: `surgery/` knows nothing about
attention types or plugins, `layers/` nothing about fx or plugins)."""
import ast
import pathlib
import subprocess
import sys

import networkx as nx
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "surgeon"

# Importers whose function-level imports may close a cycle, and why. Nothing else may.
LAZY_IMPORTERS = {
    "surgeon": "surgeon/__init__.py resolves its public names on first use (module __getattr__), so that "
               "`import surgeon` and `surgeon --help` import no torch; every submodule imports the package first",
}

# What each layer of the architecture may import from surgeon (besides itself).
ALLOWED_BELOW = {
    "surgeon.surgery": ("surgeon.errors", "surgeon.record"),
    "surgeon.layers": ("surgeon.errors",),
}


def _modules(root: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(tree: ast.AST, modules: dict[str, pathlib.Path]):
    """(imported module, line, at function level) for every import of a surgeon module in `tree`."""
    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, in_function
            elif isinstance(child, ast.ImportFrom) and child.module:
                assert child.level == 0, f"relative import at line {child.lineno}: surgeon imports absolutely"
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    yield (full if full in modules else child.module), child.lineno, in_function
            yield from walk(child, inner)

    return [(name, line, lazy) for name, line, lazy in walk(tree, False) if name in modules]


def import_graph(root: pathlib.Path = PACKAGE) -> nx.DiGraph:
    """surgeon's modules and who imports whom; edges carry where (file:line) and whether inside a function."""
    modules = _modules(root)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target, line, lazy in _imports(ast.parse(path.read_text(), str(path)), modules):
            if target != name:
                graph.add_edge(name, target, where=f"{path.name}:{line}", lazy=lazy)
    return graph


def cycles(graph: nx.DiGraph) -> list[list[str]]:
    """The import cycles, without the allowed lazy edges."""
    kept = nx.DiGraph([(a, b) for a, b, d in graph.edges(data=True) if not (d["lazy"] and a in LAZY_IMPORTERS)])
    return [c for c in nx.simple_cycles(kept)]


def _describe(graph: nx.DiGraph, cycle: list[str]) -> str:
    hops = zip(cycle, cycle[1:] + cycle[:1])
    return " -> ".join(f"{a} ({graph.edges[a, b]['where']})" for a, b in hops) + f" -> {cycle[0]}"


def test_the_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert graph.has_edge("surgeon.api", "surgeon.planning")  # module level
    assert graph.edges["surgeon.cli", "surgeon.registry"]["lazy"]  # inside a function
    assert graph.has_edge("surgeon.api", "surgeon.registry")


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(graph, c) for c in found)


def test_a_cycle_is_found(tmp_path):
    pkg = tmp_path / "surgeon"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from surgeon import a\n")
    (pkg / "a.py").write_text("from surgeon.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    import surgeon.a\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["surgeon.a", "surgeon.sub.b"]] or cycles(graph) == [["surgeon.sub.b", "surgeon.a"]]
    (pkg / "sub" / "b.py").write_text("def f():\n    import surgeon\n")  # back to the lazy package: allowed
    assert cycles(import_graph(pkg)) == []


@pytest.mark.parametrize("layer", sorted(ALLOWED_BELOW))
def test_layers_import_only_downward(layer):
    graph = import_graph()
    allowed = ALLOWED_BELOW[layer]
    wrong = [f"{a} imports {b} ({d['where']})" for a, b, d in graph.edges(data=True)
             if (a == layer or a.startswith(layer + ".")) and not (b == layer or b.startswith(layer + "."))
             and b not in allowed]
    assert not wrong, f"{layer} may import only {', '.join(allowed)} from surgeon:\n" + "\n".join(wrong)


def test_a_torchvision_model_is_patched_saved_and_loaded_without_importing_timm(tmp_path):
    """timm takes half a second to import: a model of another library never needs it."""
    code = ("import sys, warnings, torchvision, surgeon\n"
            "warnings.simplefilter('ignore')\n"
            "patched = surgeon.add(torchvision.models.resnet18(), 'se', input_size=(3, 64, 64))\n"
            f"surgeon.save(patched, {str(tmp_path / 'out')!r})\n"
            f"surgeon.load({str(tmp_path / 'out')!r})\n"
            "sys.exit(3 if 'timm' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
