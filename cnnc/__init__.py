"""cnnc: a compiler for small convolutional neural networks."""

from __future__ import annotations

from pathlib import Path

from cnnc.artifact.format import CnncModuleError
from cnnc.diagnostics import (
    CnncError,
    CnncInputError,
    CnncSemanticError,
    CnncSyntaxError,
    Source,
)
from cnnc.driver.load import load
from cnnc.graph.ir import Graph
from cnnc.runtime.module import CnncRuntimeError, Module
from cnnc.version import __version__


def check(program: str | Path, dtype: str | None = None) -> Graph:
    """Parse and shape-check a program (its text, or a path to a .cnn or .onnx file).

    Returns the typed graph; raises a CnncError holding every error of the program.
    """
    from cnnc.driver.pipeline import front_end

    return front_end(_source_and_weights(program)[0], dtype)


def _source_and_weights(program: str | Path) -> tuple[Source, dict | None]:
    """The program's source; for an ONNX model, the program it imports as, and its weights."""
    from cnnc.frontend.source import is_onnx, to_source

    if is_onnx(program):
        from cnnc.onnx.importer import imported_source

        return imported_source(program)
    return to_source(program), None


def compile(program: str | Path, target: str = "cpu", dtype: str | None = None,
            opt_level: int = 3, threads: int | None = None, schedule: bool = True,
            cache: bool = True, winograd: bool = True) -> Module:
    """Compile a program (its text, or a path to a .cnn file) to a runnable Module. An
    .onnx path is imported first (as `cnnc import` does) and the module has its weights.

    `target="cuda"` makes a module whose kernels run on an NVIDIA GPU through Numba (or in
    Numba's CUDA simulator, NUMBA_ENABLE_CUDASIM=1); `opt_level` and `schedule` are the
    CPU's.

    `schedule=False` keeps every kernel a plain loop nest: slow, but the simplest code, for
    comparing with the scheduled kernels.

    `winograd=False` runs every convolution directly: none of the stride-1 3x3 ones (or
    their input gradients) as Winograd F(2x2, 3x3), which the cost model otherwise picks
    where it expects a gain; its rounding differs slightly from the direct sum's.

    `cache=False` neither reads nor writes the compile cache (`driver.cache`: a module
    compiled before from the same program and options, in `CNNC_CACHE_DIR` or
    ~/.cache/cnnc). The front end runs either way, so errors and warnings are the same."""
    from cnnc.driver.cache import module_file
    from cnnc.driver.pipeline import Options, from_graph, front_end

    if target not in ("cpu", "cuda"):
        raise CnncInputError.single(f"target {target!r} is not available; the targets are "
                                    "cpu and cuda")
    if type(opt_level) is not int or opt_level not in (0, 1, 2, 3):
        raise CnncInputError.single(f"opt_level must be 0, 1, 2 or 3, got {opt_level!r}")
    source, weights = _source_and_weights(program)
    front = from_graph(front_end(source, dtype), source)
    if target == "cuda":
        from cnnc.runtime.cuda import CudaModule

        module = CudaModule(module_file(front, Options(backend="cuda"), bool(cache))[0])
    else:
        from cnnc.backends.target import host_cpu

        options = Options(host_cpu().with_winograd(bool(winograd)), opt_level=opt_level,
                          scheduled=bool(schedule))
        module = Module(module_file(front, options, bool(cache))[0], threads=threads)
    if weights:  # the model's own, in the dtype the module computes in (dtype="f64")
        module.set_params({name: value.astype(module.dtype) for name, value in weights.items()})
    return module


__all__ = ["CnncError", "CnncInputError", "CnncModuleError", "CnncRuntimeError",
           "CnncSemanticError", "CnncSyntaxError", "Graph", "Module", "__version__", "check",
           "compile", "load"]
