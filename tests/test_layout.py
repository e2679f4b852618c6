"""The package's shape (docs/design.md): the analysis core imports nothing above it, passes
never import each other, and no module imports one that imports it back."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "normopt"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """normopt module -> the normopt modules it imports (anywhere in the file, lazily too)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("normopt")
            ):
                # `from normopt.passes import base` imports normopt.passes.base; `from
                # normopt.rewriter.graph import rank` imports normopt.rewriter.graph
                names = [f"{node.module}.{a.name}" for a in node.names]
                deps.update(n for n in names if n in modules)
                if not any(n in modules for n in names) and node.module in modules:
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
        found[name] = deps - {name}
    return found


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for dep in graph[module]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_passes_import_no_pass_and_the_core_imports_nothing_above_it():
    graph = _imports()
    passes = {m for m in graph if m.startswith("normopt.passes.")} - {
        "normopt.passes.base",
        "normopt.passes.pipeline",
    }
    assert passes, "no pass modules found"
    for module in passes:
        assert not graph[module] & passes, (
            f"{module} imports another pass: {graph[module] & passes}"
        )
        assert "normopt.passes.pipeline" not in graph[module]
    for module, deps in graph.items():
        if module.startswith("normopt.rewriter"):
            bad = {d for d in deps if not d.startswith("normopt.rewriter")} - CORE_MAY_IMPORT
            assert not bad, f"{module} (the analysis core) imports {bad}"


# The analysis core stands on these alone; the plugins on nothing of normopt but themselves.
CORE_MAY_IMPORT = {"normopt.errors", "normopt.timings"}


def test_plugins_import_nothing_from_the_core():
    for module, deps in _imports().items():
        if module.startswith("normopt.plugins"):
            bad = {d for d in deps if not d.startswith("normopt.plugins")}
            assert not bad, f"{module} imports {bad}"


def test_the_cli_imports_only_the_api_and_rendering():
    allowed = {"normopt", "normopt.api", "normopt.errors", "normopt.schema"}
    for module, deps in _imports().items():
        if module.startswith("normopt.cli"):
            bad = {d for d in deps if not d.startswith("normopt.cli")} - allowed
            assert not bad, f"{module} imports {bad}: the CLI calls the API"


def test_modules_and_functions_stay_small():
    """No module over 450 lines, no function over 60 (docs/design.md: split by job)."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert text.count("\n") <= 450, f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, (
                    f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length}"
                )
