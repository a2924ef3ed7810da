"""The build as one ordered list of passes, each from the build so far to the build with its
own result added, and each result checked before the next pass reads it:

    parse → graph → shapes → autodiff (with a loss line) → fuse → lower (the schedules and
    the optimizer's updates) → codegen (LLVM or CUDA) → artifact

`run(source, options, until=stage)` stops after any stage, so `--emit`, `--explain-schedule`,
the golden tests and `cnnc.compile` all see the one build a module is made of: what
`--emit loops` prints is the module's `loops` section. A broken invariant (AssertionError)
in a pass or in the check after it becomes a CnncInternalError that names the stage.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cnnc.artifact.format import ModuleFile, code_hash, params_to_bytes
from cnnc.diagnostics import CnncInputError, CnncInternalError, CnncSemanticError, Source
from cnnc.frontend import irgen
from cnnc.frontend.parse import parse
from cnnc.frontend.syntax import Program
from cnnc.graph.ir import Graph, verify
from cnnc.graph.verify_kernels import verify_kernels
from cnnc.passes import shapes
from cnnc.passes.limits import check_sizes
from cnnc.passes.summary import rows_to_json, summarize
from cnnc.version import __version__

if TYPE_CHECKING:
    from cnnc.backends.cuda.codegen import CudaCode
    from cnnc.backends.llvm.codegen import NativeCode
    from cnnc.backends.target import CpuTarget
    from cnnc.graph.ir import Tensor
    from cnnc.graph.kernels import KernelProgram
    from cnnc.loops.ir import LoopFunction
    from cnnc.schedule.cost import Machine, Schedule


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


@dataclass(frozen=True)
class Lowered:
    """The loop functions of a module and what running them needs: the buffer table, which
    kernels each entry point runs, and the schedules the kernels got."""

    # each kernel's functions in order: one on the CPU; on CUDA, a fused kernel's parts
    kernels: tuple[tuple[str, tuple[LoopFunction, ...]], ...]
    storage: tuple[Tensor, ...]
    entries: dict[str, list[str]]  # entry symbol -> kernel names
    schedules: tuple[Schedule, ...]
    optimizer: str | None  # with a loss line, the optimizer the update functions apply

    @property
    def functions(self) -> tuple[LoopFunction, ...]:
        return tuple(f for _, group in self.kernels for f in group)


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
    check_sizes(typed, build.source)
    return dataclasses.replace(build, graph=typed)


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


# --- lowering ----------------------------------------------------------------------------

def _lower(build: Build, options: Options) -> Build:
    """Loop functions of every kernel, then (with a loss line) one update a parameter."""
    program = build.kernels
    if options.backend == "cuda":
        kernels, scratch, schedules = _parts(program), [], []
    else:
        kernels, scratch, schedules = _scheduled(program, _cpu(options).machine,
                                                 options.scheduled)
    storage = [*program.storage, *scratch]
    entries = entry_points(program)
    optimizer = None
    if program.graph.loss is not None:
        optimizer = program.graph.train.optimizer if program.graph.train else "sgd"
        updates, extra = _update_functions(program.graph, program, optimizer)
        kernels += [(f.name, (f,)) for f in updates]
        storage += extra
        entries[ENTRY_NAMES["update"]] = [f.name for f in updates]
        entries[ENTRY_NAMES["train_step"]] = entries[ENTRY_NAMES["gradients"]] + \
            entries[ENTRY_NAMES["update"]]
    lowered = Lowered(tuple(kernels), tuple(storage), entries, tuple(schedules), optimizer)
    return dataclasses.replace(build, lowered=lowered)


def _scheduled(program: KernelProgram, machine: Machine, scheduled: bool):
    """One function a kernel, blocked for `machine` where a schedule applies (and
    `scheduled`), the scratch tensors the schedules add to the buffer table, the schedules."""
    from cnnc.loops.lower import lower_kernel
    from cnnc.schedule.apply import lower_blocked

    kernels, scratch, schedules = [], [], []
    for kernel in program.kernels:
        blocked = lower_blocked(kernel, program, machine) if scheduled else None
        if blocked is None:
            kernels.append((kernel.name, (lower_kernel(kernel, program),)))
            continue
        kernels.append((kernel.name, (blocked.function,)))
        scratch += blocked.scratch
        schedules.append(blocked.schedule)
    return kernels, scratch, schedules


def _parts(program: KernelProgram) -> list:
    """The plain loop nests of each kernel's parts: on a GPU, a max pool fused into its
    convolution on the CPU is a launch of its own (the grid covers each one's outputs)."""
    from cnnc.loops.lower import lower_kernel

    return [(k.name, tuple(lower_kernel(part, program) for part in k.unfused()))
            for k in program.kernels]


def _cpu(options: Options) -> CpuTarget:
    if options.target is None:
        raise ValueError("a build for the llvm backend needs options.target, the CPU")
    return options.target


ENTRY_NAMES = {"forward": "cnnc_forward", "loss": "cnnc_loss", "gradients": "cnnc_gradients",
               "input_gradient": "cnnc_input_gradient", "train_step": "cnnc_train_step",
               "update": "cnnc_update"}


def entry_points(program: KernelProgram) -> dict[str, list[str]]:
    """Which kernels each entry point runs, in order. Training needs no gradient of the
    network's input, so only `cnnc_input_gradient` runs the kernel that makes it."""
    def names(*phases: str) -> list[str]:
        return [k.name for k in program.kernels if k.phase in phases]

    entries = {ENTRY_NAMES["forward"]: names("forward")}
    if program.graph.loss is not None:
        graph = program.graph
        input_gradient = program.storage_of(dict(graph.gradients).get(graph.input, ""))
        needed = [k.name for k in program.kernels
                  if k.phase == "backward" and input_gradient not in k.outputs]
        entries[ENTRY_NAMES["loss"]] = names("forward", "loss")
        entries[ENTRY_NAMES["gradients"]] = names("forward", "loss") + needed
        entries[ENTRY_NAMES["input_gradient"]] = names("forward", "loss", "backward")
    return entries


def _update_functions(graph: Graph, program: KernelProgram, optimizer: str):
    """One update function a parameter, its optimizer state and the shared scalars buffer."""
    from cnnc.graph.ir import Role, Tensor
    from cnnc.loops.ir import Buffer
    from cnnc.ops import registry

    definition = registry.optimizers()[optimizer]
    hyper = Tensor("optimizer.hyper", Role.HYPER, graph.dtype, (len(registry.HYPER_FIELDS),))
    state_names = definition.states
    gradient_of = dict(graph.gradients)
    functions, extra = [], [hyper]
    for param in graph.params:
        size = (param.size,)
        states = [Tensor(f"{param.name}.{s}", Role.STATE, graph.dtype, param.shape)
                  for s in state_names]
        extra += states
        # the update writes the parameter and its state in place
        flat_view = [Buffer(t.name, size, graph.dtype, is_output=True) for t in states]
        grad = Buffer(program.storage_of(gradient_of[param.name]), size, graph.dtype)
        name = f"{param.name.replace('.', '_')}_{optimizer}_update"
        functions.append(definition.lower_update(
            name, Buffer(param.name, size, graph.dtype, is_output=True), grad, tuple(flat_view),
            Buffer(hyper.name, hyper.shape, graph.dtype)))
    return functions, extra


# --- code generation and the module file -----------------------------------------------

def _codegen(build: Build, options: Options) -> Build:
    lowered = build.lowered
    if options.backend == "cuda":
        from cnnc.backends.cuda.codegen import generate

        code = generate(list(lowered.kernels), build.kernels.graph.dtype)
    else:
        from cnnc.backends.llvm.codegen import compile_functions

        code = compile_functions(lowered.functions, [t.name for t in lowered.storage],
                                 options.opt_level, lowered.entries, target=_cpu(options))
    return dataclasses.replace(build, code=code)


def _artifact(build: Build, options: Options) -> Build:
    """The module file, which also keeps the program it was compiled from (`trust="rebuild"`
    compiles that) and the loop functions as text."""
    from cnnc.loops.printer import format_functions
    from cnnc.passes.initialise import initial_parameters

    manifest = module_manifest(build, options)
    if options.backend == "cuda":
        manifest["target"] = CUDA_TARGET
        hashed = build.code.source.encode()
        code = {"cuda": hashed}
    else:
        manifest["target"] = _cpu_target_record(_cpu(options))
        hashed = build.code.object_code
        code = {"object": hashed, "llvm_ir": build.code.llvm_ir.encode()}
    program = build.source.text.encode("utf-8")
    manifest["code_sha256"] = code_hash(hashed, manifest, program)
    sections = {**code, "loops": format_functions(build.lowered.functions).encode(),
                "params": params_to_bytes(initial_parameters(build.graph)),
                "program": program}
    return dataclasses.replace(build, module=ModuleFile(manifest, sections))


CUDA_TARGET = {"kind": "cuda", "triple": "nvptx64-nvidia-cuda", "cpu": "numba", "features": []}


def _cpu_target_record(target: CpuTarget) -> dict[str, Any]:
    """The manifest's `target` of a CPU module: the features LLVM turned on."""
    features = [f[1:] for f in target.features.split(",") if f.startswith("+")]
    return {"kind": "cpu", "triple": target.triple, "cpu": target.cpu, "features": features}


def module_manifest(build: Build, options: Options) -> dict[str, Any]:
    """Every manifest field but the code's own (target, code_sha256): on the CPU known once
    the build is lowered; a CUDA module's entry points are its launches, known from codegen."""
    from cnnc.backends.llvm.codegen import ENTRY

    lowered, graph = build.lowered, build.graph
    if options.backend == "cuda":
        from cnnc.backends.cuda.launch import launches_to_json

        launches = launches_to_json(build.code.launches)
        # each entry point is its launches, in order: what the runtime runs for it
        entry_table = {role: [launch for name in lowered.entries[symbol]
                              for launch in launches[name]]
                       for role, symbol in ENTRY_NAMES.items() if symbol in lowered.entries}
        opt_level, record = 0, {"program": build.source.name}
    else:
        entry_table = dict(ENTRY_NAMES) if graph.loss is not None else {"forward": ENTRY}
        opt_level = options.opt_level
        record = build_record(build.source, options.scheduled, _cpu(options).machine)
    return _manifest(build.kernels, lowered, entry_table, opt_level, record,
                     rows_to_json(summarize(graph)))


def build_record(source: Source, scheduled: bool, machine: Machine) -> dict[str, Any]:
    """How the module was built, beyond its program and opt level: what `verify` needs to
    derive the same buffer table on another machine."""
    return {"program": source.name, "scheduled": bool(scheduled),
            "machine": dataclasses.asdict(machine)}


def _manifest(program: KernelProgram, lowered: Lowered, entry_table: dict, opt_level: int,
              build: dict[str, Any], layers: list) -> dict:
    graph = program.graph
    table = [{"name": t.name, "role": t.role.value, "dtype": t.dtype.value,
              "shape": list(t.shape)} for t in lowered.storage]
    io_shape = {name: list(graph.tensor(name).shape[1:]) for name in (graph.input, graph.output)}
    manifest = {
        "cnnc_version": __version__,
        "network": graph.name,
        "dtype": graph.dtype.value,
        "input": {"name": graph.input, "shape": io_shape[graph.input]},
        "output": {"name": program.output, "shape": io_shape[graph.output]},
        "storage": table,
        "entry_points": entry_table,
        "kernels": [k.name for k in program.kernels],
        "activations": [program.storage_of(out) for k in program.kernels if k.phase == "forward"
                        for out in k.outputs],
        "opt_level": opt_level,
        "build": build,
        "layers": layers,
    }
    if graph.loss is not None:
        manifest["loss"] = {"kind": graph.producer(graph.loss).op,
                            "target": graph.target, "value": graph.loss}
        manifest["gradients"] = {name: program.storage_of(g) for name, g in graph.gradients}
        settings = dict(graph.train.settings) if graph.train else {"lr": 0.01, "momentum": 0.0}
        manifest["optimizer"] = {"kind": lowered.optimizer, **settings}
    return manifest


# --- the checks between stages -----------------------------------------------------------

def _nothing(build: Build) -> None:
    """Parsing, code generation and packing have no invariant of their own to check: LLVM
    verifies its modules, and a module file is checked when it is loaded."""


def _check_generated(build: Build) -> None:
    if not build.generated.diagnostics:  # a graph with errors is never used
        verify(build.generated.graph)


def _check_graph(build: Build) -> None:
    verify(build.graph)


def _check_differentiated(build: Build) -> None:
    if build.differentiated is not None:
        verify(build.differentiated)


def _check_kernels(build: Build) -> None:
    verify_kernels(build.kernels)


def _check_lowered(build: Build) -> None:
    try:
        from cnnc.loops.verify import verify_function
    except ModuleNotFoundError as missing:  # a tree without the loop-IR verifier
        if missing.name != "cnnc.loops.verify":
            raise
        return
    for function in build.lowered.functions:
        verify_function(function)


PASSES: dict[Stage, tuple[Callable[[Build, Options], Build], Callable[[Build], None]]] = {
    Stage.PARSE: (_parse, _nothing),
    Stage.GRAPH: (_graph, _check_generated),
    Stage.SHAPES: (_shapes, _check_graph),
    Stage.AUTODIFF: (_autodiff, _check_differentiated),
    Stage.FUSE: (_fuse, _check_kernels),
    Stage.LOWER: (_lower, _check_lowered),
    Stage.CODEGEN: (_codegen, _nothing),
    Stage.ARTIFACT: (_artifact, _nothing),
}


# --- the entry points of callers that hold a typed graph ----------------------------------

@dataclass(frozen=True)
class ModulePlan:
    """Everything a CPU module holds but its native code: the loop functions, the buffer
    table, the entry points and the manifest without the code's fields."""

    functions: tuple
    storage: tuple
    entries: dict[str, list[str]]
    manifest: dict[str, Any]


def plan_module(graph: Graph, source: Source, opt_level: int = 3, scheduled: bool = True,
                machine: Machine | None = None, target: CpuTarget | None = None) -> ModulePlan:
    """The CPU module of `graph` (the program `source` describes) up to its code generation,
    scheduled for `machine` where given (a module file's recorded one): loading a module
    file plans its stored program again and compares (`verify`)."""
    options = _cpu_options(opt_level, scheduled, target, machine)
    build = advance(from_graph(graph, source), options, Stage.LOWER)
    lowered = build.lowered
    return ModulePlan(lowered.functions, lowered.storage, lowered.entries,
                      module_manifest(build, options))


def compile_module(graph: Graph, source: Source, opt_level: int = 3, scheduled: bool = True,
                   target: CpuTarget | None = None) -> ModuleFile:
    """The CPU module file of `graph`, for `target` (default: this host)."""
    options = _cpu_options(opt_level, scheduled, target)
    return advance(from_graph(graph, source), options).module


def compile_cuda_module(graph: Graph, source: Source) -> ModuleFile:
    """A module for NVIDIA GPUs: the plain loop nests of every kernel as Numba CUDA source,
    which the runtime compiles when it loads the module."""
    return advance(from_graph(graph, source), Options(backend="cuda")).module


def _cpu_options(opt_level: int, scheduled: bool, target: CpuTarget | None,
                 machine: Machine | None = None) -> Options:
    from cnnc.backends.target import host_cpu

    target = target or host_cpu()
    if machine is not None:
        target = target.with_machine(machine)
    return Options(target=target, opt_level=opt_level, scheduled=scheduled)
