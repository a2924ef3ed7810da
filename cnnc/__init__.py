"""cnnc: a compiler for small convolutional neural networks."""

from __future__ import annotations

from pathlib import Path

from cnnc.artifact.format import CnncModuleError
from cnnc.diagnostics import (
    CnncError,
    CnncInputError,
    CnncSemanticError,
    CnncSyntaxError,
)
from cnnc.driver.load import load
from cnnc.graph.ir import Graph
from cnnc.runtime.module import CnncRuntimeError, Module
from cnnc.version import __version__


def check(program: str | Path, dtype: str | None = None) -> Graph:
    """Parse and shape-check a program (its text, or a path to a .cnn file).

    Returns the typed graph; raises a CnncError holding every error of the program.
    """
    from cnnc.driver.pipeline import front_end
    from cnnc.frontend.source import to_source

    return front_end(to_source(program), dtype)


def compile(program: str | Path, target: str = "cpu", dtype: str | None = None,
            opt_level: int = 3, threads: int | None = None, schedule: bool = True) -> Module:
    """Compile a program (its text, or a path to a .cnn file) to a runnable Module.

    `target="cuda"` makes a module whose kernels run on an NVIDIA GPU through Numba (or in
    Numba's CUDA simulator, NUMBA_ENABLE_CUDASIM=1); `opt_level` and `schedule` are the
    CPU's.

    `schedule=False` keeps every kernel a plain loop nest: slow, but the simplest code, for
    comparing with the scheduled kernels."""
    from cnnc.driver.modules import compile_cuda_module, compile_module
    from cnnc.driver.pipeline import front_end
    from cnnc.frontend.source import to_source

    if target not in ("cpu", "cuda"):
        raise CnncInputError.single(f"target {target!r} is not available; the targets are "
                                    "cpu and cuda")
    if type(opt_level) is not int or opt_level not in (0, 1, 2, 3):
        raise CnncInputError.single(f"opt_level must be 0, 1, 2 or 3, got {opt_level!r}")
    source = to_source(program)
    graph = front_end(source, dtype)
    if target == "cuda":
        from cnnc.runtime.cuda import CudaModule

        return CudaModule(compile_cuda_module(graph, source))
    return Module(compile_module(graph, source, opt_level, bool(schedule)), threads=threads)


__all__ = ["CnncError", "CnncInputError", "CnncModuleError", "CnncRuntimeError",
           "CnncSemanticError", "CnncSyntaxError", "Graph", "Module", "__version__", "check",
           "compile", "load"]
