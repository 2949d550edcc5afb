"""The import contract (issue 13): layers import only downward, and no cycles.

Every import of an hpc_serverless module counts: at module level, inside functions, and
under ``if TYPE_CHECKING:``; only imports of third-party packages may be lazy. A lower
layer that needs something from above defines a small protocol instead (see
docs/architecture.md). Within a layer, modules may import each other, without cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hpc_serverless"

#: bottom to top; a module is in the layer of its subpackage, or of its name at the root
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("core", "version")),
    ("runtime", ("runtime",)),
    ("config", ("config",)),
    ("adapters", ("adapters",)),
    ("engines", ("engines",)),
    ("providers", ("providers",)),
    ("api", ("api", "programs", "errors", "__init__")),
    ("entry points", ("cli", "agent", "agent_daemon")),
]


def layer_of(module: str) -> int:
    """The layer index of a dotted module name below hpc_serverless ('' for the root)."""
    first = module.split(".")[0] if module else "__init__"
    for index, (_, prefixes) in enumerate(LAYERS):
        if first in prefixes:
            return index
    raise AssertionError(f"hpc_serverless.{module} belongs to no layer: add it to LAYERS")


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported hpc_serverless module, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["hpc_serverless", *module.split(".")] if module else ["hpc_serverless"]
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" for a in node.names] + [source]
        for target in targets:
            if target != "hpc_serverless" and not target.startswith("hpc_serverless."):
                continue
            name = target[len("hpc_serverless."):] if target != "hpc_serverless" else ""
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name in known and name != module:
                found.append((name, node.lineno))
                break
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def upward(g: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for module, deps in g.items():
        if module == "":  # the package root re-exports the api: it is the top of the api layer
            continue
        for dep, line in deps:
            if layer_of(dep) > layer_of(module):
                bad.append(f"hpc_serverless.{module} (layer {LAYERS[layer_of(module)][0]}) imports "
                           f"hpc_serverless.{dep or '__init__'} (layer {LAYERS[layer_of(dep)][0]}) at line {line}")
    return bad


def cycles(g: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in g.get(v, []):
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

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_layer():
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    bad = upward(graph())
    assert not bad, "upward imports (see docs/architecture.md for the cures):\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_contract_catches_an_upward_import(tmp_path):
    """The check itself works: a core module importing the api is reported, also when the
    import hides in a function (a lazy import to dodge a cycle)."""
    root = tmp_path / "hpc_serverless"
    (root / "core").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "api.py").write_text("from hpc_serverless.core import refs\n")
    (root / "core" / "__init__.py").write_text("")
    (root / "core" / "refs.py").write_text("def f():\n    from ..api import x\n")
    known = modules(root)
    g = {m: imports(m, p, known) for m, p in known.items()}
    assert upward(g) == ["hpc_serverless.core.refs (layer core) imports hpc_serverless.api (layer api) at line 2"]
    assert cycles(g) == [["api", "core.refs"]]


@pytest.mark.parametrize("package", sorted({".".join(["hpc_serverless", *p.relative_to(PACKAGE).parent.parts]).rstrip(".")
                                            for p in PACKAGE.rglob("__init__.py")}))
def test_every_package_ships(package):
    """pyproject.toml lists packages by name: a new layer package must be listed too."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    assert f'"{package}"' in text, f"{package} is missing from [tool.setuptools] packages"
