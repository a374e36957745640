"""The package's shape: no import cycles, no SpikingJelly, small files.

Read from the source (``ast``), nothing imported beyond ``spikingformer`` itself (which is light):

* An import cycle is one among *module-level* imports, the ones that run when a module is first
  imported (class bodies and ``try``/``if`` blocks included, ``if TYPE_CHECKING:`` blocks excluded).
  Imports inside functions run later, when the function is called: they are the allowed way for a
  module to use one that imports it.
* ``from package import name`` depends on the submodule ``package.name`` when that is a module of the
  package, otherwise on ``package`` itself.
* SpikingJelly is what the benchmarks compare against; no file of the package may import it, in any
  way (``import``, ``from``, ``importlib.import_module``, ``__import__``), at module level or not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import spikingformer

PACKAGE = Path(spikingformer.__file__).resolve().parent
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(node: ast.AST):
    """Import statements executed when the module is imported: not inside functions or lambdas."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, ast.If) and _is_type_checking(child):
            yield from (n for stmt in child.orelse for n in _module_level_imports_of(stmt))
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        else:
            yield from _module_level_imports(child)


def _module_level_imports_of(stmt: ast.stmt):
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        yield stmt
    elif not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield from _module_level_imports(stmt)


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <...> import``, relative levels resolved."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package modules an import statement makes ``module`` depend on."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    source = _absolute(module, node)
    out = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in MODULES:
            out.add(sub)
        elif source in MODULES:
            out.add(source)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module-level import edges among the package's modules."""
    graph = {name: set() for name in MODULES}
    for name, tree in _trees().items():
        for node in _module_level_imports(tree):
            graph[name] |= _targets(name, node) - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected group of modules (Tarjan)."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_within(graph, group) for group in groups]


def _cycle_within(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module (breadth-first search back to it)."""
    start = min(group)
    parent = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its strongly connected group {sorted(group)}")


def test_cycle_finder_reports_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_module_level_imports_leave_out_function_bodies_and_type_checking():
    code = ("import a\ntry:\n    import b\nexcept ImportError:\n    b = None\n"
            "if TYPE_CHECKING:\n    import c\nelse:\n    import d\n"
            "class K:\n    import e\n    def method(self):\n        import f\n"
            "def g():\n    import h\n")
    found = [alias.name for node in _module_level_imports(ast.parse(code)) for alias in node.names]
    assert found == ["a", "b", "d", "e"]


def test_import_graph_sees_the_package_imports():
    graph = import_graph()
    assert "spikingformer.kernels.params" in graph["spikingformer.neuron"]  # from spikingformer.kernels.params import ...
    assert "spikingformer.kernels" in graph["spikingformer.neuron"]  # from spikingformer import kernels
    assert all(t.startswith("spikingformer") for targets in graph.values() for t in targets)


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles (move one import into the function that needs it, or " \
        "move the shared code below both):\n" + "\n".join(" -> ".join(c) for c in cycles)


def _imports_spikingjelly(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        if any(n == "spikingjelly" or n.startswith("spikingjelly.") for n in names):
            lines.append(node.lineno)
    return sorted(lines)


def test_spikingjelly_detector_sees_every_form():
    code = ("import spikingjelly\nfrom spikingjelly.activation_based import neuron\n"
            "def f():\n    import importlib\n    return importlib.import_module('spikingjelly.clock_driven')\n"
            "x = __import__('spikingjelly')\nimport spikingjellyfish\n")
    assert _imports_spikingjelly(ast.parse(code)) == [1, 2, 5, 6]


def test_no_package_file_imports_spikingjelly():
    offenders = [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}"
                 for name, tree in _trees().items() for line in _imports_spikingjelly(tree)]
    assert not offenders, "the package imports SpikingJelly at: " + ", ".join(offenders)


def test_no_package_file_exceeds_the_line_limit():
    sizes = {p.relative_to(PACKAGE.parent): len(p.read_text().splitlines())
             for p in sorted(PACKAGE.rglob("*")) if p.is_file() and p.suffix in (".py", ".cpp", ".yaml")}
    assert len(sizes) >= len(MODULES)
    offenders = [f"{path} ({lines} lines)" for path, lines in sizes.items() if lines > MAX_LINES]
    assert not offenders, f"files over {MAX_LINES} lines (split them into smaller modules): " + ", ".join(offenders)



def test_torch_release_check_names_the_oldest_release_and_the_fix():
    import pytest

    from spikingformer import torch_release

    for newer in ("2.8.0", "2.11.0+cu130", "2.14.1", "2.15.0a0+git1234", "3.0.0", "not a version"):
        torch_release.check(newer)
    with pytest.raises(ImportError) as old:
        torch_release.check("2.6.0+cu124")
    assert "needs PyTorch 2.8 or newer, found 2.6.0+cu124" in str(old.value)
    assert "pip install 'torch>=2.8'" in str(old.value)


def test_an_older_pytorch_stops_the_kernels_import_with_that_error():
    """PyTorch 2.6 refuses the operators' signatures with an error about ``list[bool]``; the package
    says what is wrong first (run with ``torch.__version__`` set back, in a fresh process)."""
    import subprocess
    import sys

    code = ("import torch; torch.__version__ = '2.6.0'\n"
            "try:\n    import spikingformer.kernels\nexcept ImportError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("refused: spikingformer needs PyTorch 2.8 or newer, found 2.6.0")


def test_pyproject_asks_for_the_oldest_release_the_package_accepts():
    import re

    from spikingformer import torch_release

    import pytest

    pyproject = PACKAGE.parents[1] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("no pyproject.toml above the package (an installed wheel, not a checkout)")
    text = pyproject.read_text()
    assert re.search(r'"torch>=(\d+)\.(\d+)"', text).groups() == tuple(map(str, torch_release.OLDEST))


def test_every_data_file_of_the_package_ships_in_its_wheel():
    # a non-editable install (`pip install .`, a wheel) carries only .py files and the package-data
    # globs; a file they miss (a new recipe, a C++ header the kernels include) is absent there alone
    import fnmatch

    import pytest

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11 and later")
    pyproject = PACKAGE.parent.parent / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("the package is not imported from a source checkout (no pyproject.toml beside src/)")
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["spikingformer"]
    data = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert len(data) >= 16, data  # the recipes and the kernels' sources
    missed = [f for f in data if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missed, f"not in [tool.setuptools.package-data]: {missed}"
