"""How the runtime is built: a process that runs a module file, or imports cnnc, loads no
compiler module (the import rules on the source are in tests/test_architecture.py)."""

from __future__ import annotations

import subprocess
import sys

import cnnc
from conftest import REPO

# what a process that only runs modules must not load: import cnnc itself loads cnnc.graph.ir
# (for the API's types) and cnnc.driver.load, so this list is narrower than the source rule's
COMPILER = ("cnnc.frontend", "cnnc.passes", "cnnc.loops", "cnnc.schedule", "cnnc.ops",
            "cnnc.driver.trust", "cnnc.driver.pipeline", "cnnc.driver.lowering",
            "cnnc.driver.module_file", "cnnc.driver.modules", "cnnc.backends.llvm.codegen",
            "cnnc.backends.cuda.codegen")


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)
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
    assert [m for m in loaded if within(m, COMPILER)] == []


def test_import_cnnc_stays_light():
    """`import cnnc` loads the runtime, never the compiler (that comes with compile or
    load)."""
    script = "import sys, cnnc; print(' '.join(m for m in sys.modules if m.startswith('cnnc.')))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert [m for m in run.stdout.split() if within(m, COMPILER)] == []
