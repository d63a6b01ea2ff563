"""The package's layout stays true: no import cycle between modules (imports inside functions and
``if TYPE_CHECKING:`` blocks counted), the leaf modules stay leaves, a name shared across modules is
public (no module imports another's ``_private`` name), and no file keeps runs of blank lines."""

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


def imports_of(name: str, path: Path, known: set[str], type_checking: bool = False) -> set[str]:
    """Modules of the package that NAME imports, anywhere in the file; TYPE_CHECKING blocks only
    with TYPE_CHECKING. ``from pkg import sub`` counts the submodule, not the package."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node.test) and not type_checking:
            for n in node.orelse:
                visit(n)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = _absolute(name, is_pkg, node)
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known and m != name}


def _absolute(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The module a ``from … import`` in module NAME reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path, type_checking: bool = False) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, path, set(files), type_checking) for name, path in files.items()}


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


def test_no_import_cycle_even_through_type_checking_imports() -> None:
    """Types two modules share live in a leaf both import, not in one of them under TYPE_CHECKING."""
    assert cycles(import_graph(ROOT, type_checking=True)) == []


def test_leaf_modules_stay_leaves() -> None:
    graph = import_graph(ROOT)
    assert LEAVES <= set(graph), f"a leaf module moved: {sorted(LEAVES - set(graph))}"
    wrong = {m: sorted(graph[m] - LEAF_MAY_IMPORT) for m in LEAVES if graph[m] - LEAF_MAY_IMPORT}
    assert wrong == {}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(root: Path) -> list[str]:
    """Every use, in a module of the package, of another module's ``_private`` name: ``from mod
    import _name``, or ``mod._name`` on a module of the package imported under a name. A private
    module (``_registry_meta``) is the package's own: importing it is not such a use."""
    files = module_files(root)
    pkg = root.name
    found: list[str] = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        modules: dict[str, str] = {}  # a local name → the package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = _absolute(name, path.name == "__init__.py", node)
                if mod != pkg and not mod.startswith(pkg + "."):
                    continue
                for a in node.names:
                    if f"{mod}.{a.name}" in files:
                        modules[a.asname or a.name] = f"{mod}.{a.name}"
                    elif _private(a.name):
                        found.append(f"{name}:{node.lineno}: from {mod} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == pkg or a.name.startswith(pkg + "."):
                        modules[a.asname or pkg] = a.name if a.asname else pkg
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                target = _dotted(node.value, modules)
                if target in files and target != name:
                    found.append(f"{name}:{node.lineno}: {target}.{node.attr}")
    return found


def _dotted(node: ast.expr, modules: dict[str, str]) -> str | None:
    """The package module an expression like ``m`` or ``embedder.index.build`` names, if any."""
    if isinstance(node, ast.Name):
        return modules.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, modules)
        return f"{base}.{node.attr}" if base else None
    return None


def blank_runs(root: Path, most: int = 2) -> list[str]:
    """Every run of more than MOST consecutive blank (whitespace only) lines in the package's files,
    the file's end included."""
    found = []
    for path in sorted(root.rglob("*.py")):
        run = 0
        lines = path.read_text().split("\n")
        for i, line in enumerate(lines + ["end"], 1):
            if line.strip():
                if run > most:
                    found.append(f"{path.relative_to(root.parent)}:{i - run}: {run} blank lines")
                run = 0
            else:
                run += 1
    return found


def test_no_module_uses_another_modules_private_name() -> None:
    """A name shared across modules is public: a leading underscore means "this module only"."""
    assert private_imports(ROOT) == []


def test_no_runs_of_blank_lines() -> None:
    """At most two blank lines in a row (PEP 8's between top-level definitions): longer runs are
    what moving code out of a file leaves behind."""
    assert blank_runs(ROOT) == []


def test_the_private_and_blank_checks_see_what_they_should(tmp_path: Path) -> None:
    """What the two tests above would miss if the walks were wrong."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from ._impl import public\n")
    (pkg / "sub" / "_impl.py").write_text("def public():\n    pass\n\n\ndef _helper():\n    pass\n")
    (pkg / "a.py").write_text("from pkg.sub._impl import _helper\nfrom .sub import _impl as impl\n"
                              "import pkg.sub._impl\n\n\n\ndef f(x):\n    return impl._helper(), x._y\n")
    (pkg / "b.py").write_text("import pkg.sub._impl as m\nimport os\n\n\nm._helper()\nos._exit\n"
                              "pkg = m\n")
    (pkg / "c.py").write_text("x = 1\n\n\n\n")
    found = private_imports(pkg)
    assert found == ["pkg.a:1: from pkg.sub._impl import _helper", "pkg.a:8: pkg.sub._impl._helper",
                     "pkg.b:5: pkg.sub._impl._helper"]
    assert blank_runs(pkg) == ["pkg/a.py:4: 3 blank lines", "pkg/c.py:2: 4 blank lines"]


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
    (pkg / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import f\n")
    (pkg / "f.py").write_text("from pkg import e\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]
    assert cycles(import_graph(pkg, type_checking=True)) == [["pkg.a", "pkg.sub.b"], ["pkg.e", "pkg.f"]]


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
