"""The package's layout stays true: no import cycle between modules (imports inside functions
counted, only ``if TYPE_CHECKING:`` blocks excepted), and the leaf modules stay leaves."""

from __future__ import annotations

import ast
from pathlib import Path

import embedder

ROOT = Path(embedder.__file__).parent

# Modules other themes share; each may import only these (and nothing else of the package).
LEAVES = {
    "embedder.errors", "embedder.choices", "embedder.native_output",
    "embedder.index.faiss_util", "embedder.index.gpu",
    "embedder.models.heads", "embedder.models.devices", "embedder.models.origin",
    "embedder.models.preprocessing", "embedder.models._registry_meta",
}
LEAF_MAY_IMPORT = {"embedder.errors", "embedder.choices", "embedder.native_output"}


def module_files(root: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that NAME imports, anywhere in the file but TYPE_CHECKING blocks.
    ``from pkg import sub`` counts the submodule, not the package."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node.test):
            for n in node.orelse:
                visit(n)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known and m != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 60  # the walk found the package, subpackages included
    assert "embedder.index.faiss_util" in graph["embedder.index.build"]
    assert cycles(graph) == []


def test_leaf_modules_stay_leaves() -> None:
    graph = import_graph(ROOT)
    assert LEAVES <= set(graph), f"a leaf module moved: {sorted(LEAVES - set(graph))}"
    wrong = {m: sorted(graph[m] - LEAF_MAY_IMPORT) for m in LEAVES if graph[m] - LEAF_MAY_IMPORT}
    assert wrong == {}


def test_the_walk_sees_cycles_through_function_bodies_and_skips_type_checking(tmp_path: Path) -> None:
    """What the two tests above would miss if the walk were wrong."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_every_embedder_import_in_the_scripts_resolves() -> None:
    """The benchmarks and the demo are not imported by the suite: their `from embedder… import
    name` lines are checked here (a module moved or a name renamed is caught before a user runs them)."""
    import importlib

    scripts = Path(__file__).parent.parent / "scripts"
    missing = []
    for path in sorted(scripts.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("embedder"):
                module = importlib.import_module(node.module or "")
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and not _is_module(f"{node.module}.{a.name}")]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("embedder") and not _is_module(a.name):
                        missing.append(f"{path.name}: {a.name}")
    assert len(list(scripts.glob("*.py"))) > 10 and missing == []


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
