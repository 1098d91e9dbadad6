"""The package's layout: no import circle, and the commands sit at the top, above the library they use."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_lab"
COMMANDS = {"train", "sample", "evaluate", "sampler_lab", "compare", "metric_check", "autoencoder", "export"}


def module_names() -> dict:
    """{dotted module name: path} of every module of the package (a package is named by its folder)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(module: str, path: Path, known: dict) -> set:
    """The package's modules that `module` imports anywhere in its body (function-level imports included);
    importing one's own parent package is not an edge (Python has it loaded already)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found |= {target, *(f"{target}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in known and m != module and not module.startswith(m + ".")}


def cycles(edges: dict) -> list:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def package_edges() -> dict:
    known = module_names()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_the_cycle_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    edges = package_edges()
    assert len(edges) > 40 and edges["diffusion_lab.train"], "the import graph was not read"
    assert cycles(edges) == []


def test_the_library_never_imports_a_command():
    commands = {f"diffusion_lab.{name}" for name in COMMANDS}
    assert commands <= set(module_names())
    library = {m: e for m, e in package_edges().items() if m not in commands and m != "diffusion_lab"}
    offenders = {m: sorted(e & commands) for m, e in library.items() if e & commands}
    assert not offenders, f"library modules that import a command: {offenders}"
