"""The import rules of docs/architecture.md, read from the source with `ast`: stages import
the op registry and never one op's file, op files import no stage, the runtime never
imports the compiler, and no module imports itself around a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cnnc"
OP_HELPERS = {"cnnc.ops", "cnnc.ops.registry", "cnnc.ops.lowering", "cnnc.ops.window"}
COMPILER = ("cnnc.frontend", "cnnc.graph", "cnnc.ops", "cnnc.passes", "cnnc.loops",
            "cnnc.schedule", "cnnc.driver", "cnnc.backends.llvm.codegen",
            "cnnc.backends.cuda.codegen", "cnnc.backends.cuda.shared", "cnnc.cli")
STAGES = ("cnnc.frontend", "cnnc.passes", "cnnc.loops", "cnnc.schedule", "cnnc.backends",
          "cnnc.driver", "cnnc.cli", "cnnc.graph")
OP_FILE_MAY_IMPORT = ("cnnc.ops", "cnnc.graph.ir", "cnnc.graph.kernels", "cnnc.loops.ir",
                      "cnnc.loops.build", "cnnc.schedule", "cnnc.frontend.options",
                      "cnnc.diagnostics")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The cnnc modules `name` imports when it runs, at any depth of its code (imports under
    `if TYPE_CHECKING:` are for type checkers only and do not count); `from cnnc.pkg import
    mod` counts as importing cnnc.pkg.mod where that is a module."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cnnc"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnc"):
            subs = {f"{node.module}.{alias.name}" for alias in node.names}
            found.update((subs & MODULES.keys()) or {node.module})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(MODULES[name].read_text(encoding="utf-8")))
    return found - {name}


def within(module: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def op_files() -> list[str]:
    return [m for m in MODULES if m.startswith("cnnc.ops.") and m not in OP_HELPERS]


def test_the_op_files_are_found():
    assert {"cnnc.ops.conv", "cnnc.ops.pool", "cnnc.ops.dense"} <= set(op_files())


@pytest.mark.parametrize("name", [m for m in MODULES if within(m, STAGES)])
def test_stages_import_the_registry_never_an_op_file(name):
    assert not imports(name) & set(op_files())


@pytest.mark.parametrize("name", op_files())
def test_op_files_import_only_the_irs_and_helpers(name):
    outside = {m for m in imports(name) if not within(m, OP_FILE_MAY_IMPORT)}
    assert not outside


@pytest.mark.parametrize("name", [m for m in MODULES if within(m, ("cnnc.runtime",))])
def test_the_runtime_never_imports_the_compiler(name):
    assert not {m for m in imports(name) if within(m, COMPILER)}


# the module file format is read by the runtime: it is data, and imports only what the
# runtime may import
ARTIFACT_MAY_IMPORT = ("cnnc.diagnostics", "cnnc.support", "cnnc.artifact", "cnnc.version",
                       "cnnc.backends.cuda.launch")


@pytest.mark.parametrize("name", [m for m in MODULES if within(m, ("cnnc.artifact",))])
def test_the_module_file_format_imports_only_data(name):
    assert not {m for m in imports(name) if not within(m, ARTIFACT_MAY_IMPORT)}


def test_no_import_cycles():
    """No module imports itself around a cycle, not even through an import inside a
    function (a cycle makes import order matter, and the layers blur)."""
    graph = {name: {m for m in imports(name) if m in MODULES} for name in MODULES}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                cycle = [*path[path.index(other):], other] if other in path else [name, other]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other, [*path, other])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
