"""How the runtime is built: it never imports the compiler (checked on its source and in a
process that runs a module file), and a GPU module is a Module through and through, with
every attribute and method a CPU module has."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cnnc
from conftest import REPO

PACKAGE = REPO / "cnnc"
# what the runtime and the module file format may import, at the top of a module
RUNTIME_ALLOWED = ("cnnc.diagnostics", "cnnc.support", "cnnc.artifact", "cnnc.runtime",
                   "cnnc.backends.llvm.host", "cnnc.backends.llvm.objects",
                   "cnnc.backends.cuda.launch")
ARTIFACT_ALLOWED = ("cnnc.diagnostics", "cnnc.support", "cnnc.artifact",
                    "cnnc.backends.cuda.launch")
LAZY_ALLOWED = ("cnnc.training",)  # fit and evaluate, inside the methods


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names, inside a function) of every import of cnnc, but those only a type
    checker reads (under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names], lazy))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return [item for item in found if item[0].split(".")[0] == "cnnc"]


def _within(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in allowed)


def _outside(folder: str, allowed: tuple[str, ...]) -> list[str]:
    wrong = []
    for path in sorted((PACKAGE / folder).glob("*.py")):
        for module, names, lazy in _imports(path):
            if module == "cnnc" and names == ["__version__"]:
                continue  # the package's version, no code
            if not _within(module, allowed + (LAZY_ALLOWED if lazy else ())):
                wrong.append(f"{path.name} imports {module}")
    return wrong


def test_the_runtime_imports_nothing_of_the_compiler():
    assert _outside("runtime", RUNTIME_ALLOWED) == []


def test_the_module_file_format_imports_nothing_of_the_compiler():
    assert _outside("artifact", ARTIFACT_ALLOWED) == []


COMPILER = ("cnnc.frontend", "cnnc.passes", "cnnc.loops", "cnnc.schedule", "cnnc.ops",
            "cnnc.driver.trust", "cnnc.driver.pipeline", "cnnc.backends.llvm.codegen",
            "cnnc.backends.cuda.codegen")
RUN_A_FILE = """
import sys
import numpy as np
from cnnc.artifact import format as artifact
from cnnc.runtime.module import Module

module = Module(artifact.read(sys.argv[1]), sys.argv[1])
module(np.zeros((2, *module.input_shape), np.float32))
module.summary()
print(" ".join(sorted(m for m in sys.modules if m.startswith("cnnc."))))
"""


def test_a_module_file_runs_without_the_compiler_in_the_process(tmp_path):
    cnnc.compile(REPO / "examples" / "mlp.cnn", opt_level=0).save(tmp_path / "m.cnnm")
    run = subprocess.run([sys.executable, "-c", RUN_A_FILE, str(tmp_path / "m.cnnm")],
                         capture_output=True, text=True, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    loaded = run.stdout.split()
    assert "cnnc.runtime.module" in loaded
    assert [m for m in loaded if _within(m, COMPILER)] == []


def test_import_cnnc_stays_light():
    """`import cnnc` loads the runtime, never the compiler (that comes with compile or
    load)."""
    script = "import sys, cnnc; print(' '.join(m for m in sys.modules if m.startswith('cnnc.')))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert [m for m in run.stdout.split() if _within(m, COMPILER)] == []
