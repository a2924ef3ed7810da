"""The build as one ordered list of passes, each from the build so far to the build with its
own result added, and each result checked before the next pass reads it:

    parse → graph → shapes → autodiff (with a loss line) → fuse → lower (the schedules and
    the optimizer's updates) → codegen (LLVM or CUDA) → artifact

`run(source, options, until=stage)` stops after any stage, so `--emit`, `--explain-schedule`,
the golden tests and `cnnc.compile` all see the one build a module is made of: what
`--emit loops` prints is the module's `loops` section. A broken invariant (AssertionError)
in a pass or in the check after it becomes a CnncInternalError that names the stage.

What the lower stage assembles is `lowering.py`'s, the module file `module_file.py`'s;
callers that hold a typed graph build through `modules.py`.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cnnc.diagnostics import (
    CnncInputError,
    CnncInternalError,
    CnncSemanticError,
    CnncWarning,
    Source,
    render_diagnostic,
)
from cnnc.driver.lowering import Lowered, lower_for_cpu, lower_for_cuda
from cnnc.driver.module_file import check_manifest, make_module_file
from cnnc.frontend import irgen
from cnnc.frontend.parse import parse
from cnnc.frontend.syntax import Program
from cnnc.graph.ir import Graph, verify
from cnnc.graph.verify_kernels import verify_kernels
from cnnc.passes import inference, shapes
from cnnc.passes.limits import check_sizes

if TYPE_CHECKING:
    from cnnc.artifact.format import ModuleFile
    from cnnc.backends.cuda.codegen import CudaCode
    from cnnc.backends.llvm.codegen import NativeCode
    from cnnc.backends.target import CpuTarget
    from cnnc.graph.kernels import KernelProgram


class Stage(enum.Enum):
    """The passes in the order they run; the value is the name an internal error gives."""

    PARSE = "parse"
    GRAPH = "graph"
    SHAPES = "shapes"
    AUTODIFF = "autodiff"
    FUSE = "fuse"
    LOWER = "lower"
    CODEGEN = "codegen"
    ARTIFACT = "artifact"


BACKENDS = ("llvm", "cuda")


@dataclass(frozen=True)
class Options:
    """How to build. `target` is the CPU the kernels are scheduled and compiled for: the
    llvm backend needs it from `lower` on; the front end and the cuda backend never ask."""

    target: CpuTarget | None = None
    backend: str = "llvm"  # native code for `target`, or Numba CUDA source
    dtype: str | None = None  # overrides the input line's
    opt_level: int = 3
    scheduled: bool = True  # False: plain loop nests for every kernel

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not "
                             f"{self.backend!r}")

    def cpu(self) -> CpuTarget:
        """`target`, which every stage of the llvm backend from `lower` on needs."""
        if self.target is None:
            raise ValueError("a build for the llvm backend needs options.target, the CPU")
        return self.target


@dataclass(frozen=True)
class Build:
    """Each stage's result, as far as the build has run (`last`)."""

    source: Source
    last: Stage | None = None
    syntax: Program | None = None
    generated: irgen.IrgenResult | None = None  # the graph before shapes, with its errors
    graph: Graph | None = None  # the typed forward graph
    differentiated: Graph | None = None  # with its backward pass; None without a loss line
    kernels: KernelProgram | None = None
    lowered: Lowered | None = None
    code: NativeCode | CudaCode | None = None
    module: ModuleFile | None = None


def run(source: Source, options: Options, until: Stage = Stage.ARTIFACT) -> Build:
    """The build of `source` up to and including the stage `until`."""
    return advance(Build(source), options, until)


def advance(build: Build, options: Options, until: Stage = Stage.ARTIFACT) -> Build:
    """`build` taken on through each stage after its last one, up to and including `until`."""
    order = list(Stage)
    start = 0 if build.last is None else order.index(build.last) + 1
    for stage in order[start:order.index(until) + 1]:
        build = _run_stage(stage, build, options)
    return build


def from_graph(graph: Graph, source: Source) -> Build:
    """A build whose front end has run: `graph` is the typed graph of `source`."""
    return Build(source, Stage.SHAPES, graph=graph)


def _run_stage(stage: Stage, build: Build, options: Options) -> Build:
    step, check = PASSES[stage]
    try:
        done = step(build, options)
        check(done)
    except AssertionError as broken:
        detail = str(broken) or "an invariant does not hold"
        raise CnncInternalError.in_stage(stage.value, detail) from broken
    return dataclasses.replace(done, last=stage)


# --- the front end ---------------------------------------------------------------------

def _parse(build: Build, options: Options) -> Build:
    if options.dtype not in (None, "f32", "f64"):
        raise CnncInputError.single(f"dtype must be f32 or f64, got {options.dtype!r}")
    return dataclasses.replace(build, syntax=parse(build.source))


def _graph(build: Build, options: Options) -> Build:
    return dataclasses.replace(build, generated=irgen.generate(build.syntax, options.dtype))


def _shapes(build: Build, options: Options) -> Build:
    """Every shape inferred; the errors of the graph and of its shapes in one CnncError."""
    generated = build.generated
    typed, shape_errors = shapes.infer_collect(generated.graph, generated.broken_layers)
    diagnostics = sorted([*generated.diagnostics, *shape_errors], key=_position)
    if diagnostics:
        raise CnncSemanticError(diagnostics, build.source)
    for warning in generated.warnings:
        warnings.warn(CnncWarning(render_diagnostic(warning, build.source)), stacklevel=2)
    check_sizes(typed, build.source)
    return dataclasses.replace(build, graph=inference.derive(typed))


def _position(diagnostic) -> tuple[int, int]:
    span = diagnostic.span
    return (0, 0) if span is None else (span.line, span.col)


def _autodiff(build: Build, options: Options) -> Build:
    from cnnc.passes.autodiff import differentiate

    graph = build.graph
    return dataclasses.replace(
        build, differentiated=differentiate(graph) if graph.loss is not None else None)


def _fuse(build: Build, options: Options) -> Build:
    from cnnc.passes.fuse import fuse

    return dataclasses.replace(build, kernels=fuse(build.differentiated or build.graph))


def front_end(source: Source, dtype: str | None = None) -> Graph:
    """Parse, build the graph and infer every shape; all errors of the file in one CnncError."""
    return run(source, Options(dtype=dtype), until=Stage.SHAPES).graph


# --- lowering, code generation and the module file -------------------------------------

def _lower(build: Build, options: Options) -> Build:
    """Loop functions of every kernel, then (with a loss line) one update a parameter."""
    if options.backend == "cuda":
        lowered = lower_for_cuda(build.kernels)
    else:
        lowered = lower_for_cpu(build.kernels, options.cpu().machine, options.scheduled)
    return dataclasses.replace(build, lowered=lowered)


def _codegen(build: Build, options: Options) -> Build:
    lowered = build.lowered
    if options.backend == "cuda":
        from cnnc.backends.cuda.codegen import generate

        code = generate(list(lowered.kernels), build.kernels.graph.dtype)
    else:
        from cnnc.backends.llvm.codegen import compile_functions
        from cnnc.driver.lowering import ENTRY_NAMES

        sizes = {f.name: len(text) for f, text in zip(lowered.functions, lowered.texts,
                                                      strict=True)}
        code = compile_functions(lowered.functions, [t.name for t in lowered.storage],
                                 options.opt_level, lowered.entries, target=options.cpu(),
                                 sizes=sizes,
                                 rarely=frozenset(lowered.entries.get(ENTRY_NAMES["pack"], ())))
    return dataclasses.replace(build, code=code)


def _artifact(build: Build, options: Options) -> Build:
    return dataclasses.replace(build, module=make_module_file(build, options))


# --- the checks between stages -----------------------------------------------------------

def _nothing(build: Build) -> None:
    """Parsing and code generation have no invariant of their own to check: LLVM verifies
    its modules."""


def _check_generated(build: Build) -> None:
    if not build.generated.diagnostics:  # a graph with errors is never used
        _check(build.generated.graph)


def _check_graph(build: Build) -> None:
    _check(build.graph)


def _check_differentiated(build: Build) -> None:
    if build.differentiated is not None:
        _check(build.differentiated)


def _check(graph: Graph) -> None:
    """The graph's own invariants, and every node's inputs and outputs as its op declares."""
    from cnnc.ops import registry

    verify(graph)
    for node in graph.nodes:
        registry.check_node(node)


def _check_kernels(build: Build) -> None:
    verify_kernels(build.kernels)


def _check_lowered(build: Build) -> None:
    from cnnc.loops.verify import verify_function

    for function in build.lowered.functions:
        verify_function(function)


def _check_module(build: Build) -> None:
    check_manifest(build.module.manifest)


PASSES: dict[Stage, tuple[Callable[[Build, Options], Build], Callable[[Build], None]]] = {
    Stage.PARSE: (_parse, _nothing),
    Stage.GRAPH: (_graph, _check_generated),
    Stage.SHAPES: (_shapes, _check_graph),
    Stage.AUTODIFF: (_autodiff, _check_differentiated),
    Stage.FUSE: (_fuse, _check_kernels),
    Stage.LOWER: (_lower, _check_lowered),
    Stage.CODEGEN: (_codegen, _nothing),
    Stage.ARTIFACT: (_artifact, _check_module),
}
