"""The ordered stages of the front end, with `stop_after` for `--emit` and golden tests."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnc import __version__
from cnnc.artifact.format import ModuleFile, code_hash, params_to_bytes
from cnnc.diagnostics import CnncInputError, CnncSemanticError, Source
from cnnc.frontend import irgen
from cnnc.frontend.parse import parse
from cnnc.frontend.syntax import Program
from cnnc.graph.ir import Graph
from cnnc.passes import shapes
from cnnc.passes.limits import check_sizes
from cnnc.passes.summary import rows_to_json, summarize


class Stage(enum.Enum):
    AST = "ast"
    IR = "ir"


# A .cnn program is a few kilobytes; anything this large is not one (and /dev/zero never ends).
MAX_SOURCE_BYTES = 16 * 2**20


def read_source(path: str | Path) -> Source:
    """A .cnn file as text; a file that cannot be a program gets a one-line CnncInputError."""
    path = Path(path)
    name = str(path)

    def refuse(reason: str) -> CnncInputError:
        return CnncInputError.single(f"cannot read {name}: {reason}")

    try:
        if path.is_dir():
            raise refuse("it is a directory, not a .cnn file")
        if not path.exists():
            raise refuse("no such file")
        if not path.is_file():
            raise refuse("it is not a regular file")
        with path.open("rb") as handle:
            data = handle.read(MAX_SOURCE_BYTES + 1)
    except OSError as error:
        raise refuse((error.strerror or str(error)).lower()) from None
    if len(data) > MAX_SOURCE_BYTES:
        raise refuse(f"it is larger than {MAX_SOURCE_BYTES // 2**20} MiB, not a .cnn program")
    if b"\0" in data:
        raise refuse("it is a binary file, not a .cnn program")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise refuse(f"it is not valid UTF-8 (line {line}, byte offset {error.start})") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise refuse("the file is empty")
    return Source(text, name)


def to_source(program: str | Path | Source) -> Source:
    """Program text, or a path: a Path, or a one-line string naming a file or ending in .cnn."""
    if isinstance(program, Source):
        return program
    if not isinstance(program, (str, Path)):
        raise CnncInputError.single("a program is its text or a path to a .cnn file, not "
                                    f"{type(program).__name__}")
    if isinstance(program, Path):
        return read_source(program)
    if "\n" not in program and (program.endswith(".cnn") or _is_file(program)):
        return read_source(program)
    return Source(program.removeprefix("\ufeff"), "<string>")


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # not a usable path, e.g. too long or with a NUL byte
        return False


def front_end(source: Source, dtype: str | None = None) -> Graph:
    """Parse, build the graph and infer every shape; all errors of the file in one CnncError."""
    if dtype not in (None, "f32", "f64"):
        raise CnncInputError.single(f"dtype must be f32 or f64, got {dtype!r}")
    program = parse(source)
    return typed_graph(program, source, dtype)


def typed_graph(program: Program, source: Source, dtype: str | None = None) -> Graph:
    result = irgen.generate(program, dtype)
    typed, shape_errors = shapes.infer_collect(result.graph, result.broken_layers)
    diagnostics = sorted([*result.diagnostics, *shape_errors], key=_position)
    if diagnostics:
        raise CnncSemanticError(diagnostics, source)
    check_sizes(typed, source)
    return typed


def _position(diagnostic) -> tuple[int, int]:
    span = diagnostic.span
    return (0, 0) if span is None else (span.line, span.col)


def module_kernels(graph: Graph):
    """The kernels a module of `graph` holds: with a loss line, the backward ones too."""
    from cnnc.passes.autodiff import differentiate
    from cnnc.passes.fuse import fuse

    return fuse(differentiate(graph) if graph.loss is not None else graph)


def lower_program(program, scheduled: bool = True, machine=None):
    """Loop functions of every kernel, the scratch tensors they add to the buffer table, and
    the schedules applied; `scheduled=False` gives the plain loop nests everywhere.
    `machine` (the schedule's CPU model) is the host's unless given: a module file records
    the one it was scheduled for, so its buffer table can be derived again anywhere."""
    from cnnc.backends.target import host_cpu
    from cnnc.loops.ir import lower_kernel
    from cnnc.schedule.blocked import lower_blocked

    machine = machine or host_cpu().machine
    functions, scratch, schedules = [], [], []
    for kernel in program.kernels:
        blocked = lower_blocked(kernel, program, machine) if scheduled else None
        if blocked is None:
            functions.append(lower_kernel(kernel, program))
            continue
        functions.append(blocked.function)
        scratch += blocked.scratch
        schedules.append(blocked.schedule)
    return functions, scratch, schedules


@dataclass(frozen=True)
class ModulePlan:
    """Everything a CPU module holds but its native code: the loop functions, the buffer
    table, the entry points and the manifest without the code's fields."""

    functions: tuple
    storage: tuple
    entries: dict[str, list[str]]
    manifest: dict[str, Any]


def plan_module(graph: Graph, source: Source, opt_level: int = 3, scheduled: bool = True,
                machine=None) -> ModulePlan:
    """The module of `graph` (the program `source` describes) up to its code generation.

    A network with a loss line also gets its backward pass (autodiff) and the update of its
    optimizer, with entry points for the loss, the gradients and a whole training step.
    Loading a module file plans its stored program again and compares (`verify`).
    """
    from cnnc.backends.llvm.codegen import ENTRY
    from cnnc.backends.target import host_cpu

    machine = machine or host_cpu().machine
    program = module_kernels(graph)
    functions, scratch, _ = lower_program(program, scheduled, machine)
    storage = list(program.storage) + scratch
    entries = entry_points(program)
    optimizer = None
    if graph.loss is not None:
        optimizer = graph.train.optimizer if graph.train else "sgd"
        updates, extra = _update_functions(program.graph, program, optimizer)
        functions += updates
        storage += extra
        entries[ENTRY_NAMES["update"]] = [f.name for f in updates]
        entries[ENTRY_NAMES["train_step"]] = entries[ENTRY_NAMES["gradients"]] + \
            entries[ENTRY_NAMES["update"]]
    entry_table = dict(ENTRY_NAMES) if graph.loss is not None else {"forward": ENTRY}
    build = build_record(source, scheduled, machine)
    manifest = _manifest(program.graph, program, storage, entry_table, opt_level, optimizer,
                         build, rows_to_json(summarize(graph)))
    return ModulePlan(tuple(functions), tuple(storage), entries, manifest)


def build_record(source: Source, scheduled: bool, machine) -> dict[str, Any]:
    """How the module was built, beyond its program and opt level: what `verify` needs to
    derive the same buffer table on another machine."""
    return {"program": source.name, "scheduled": bool(scheduled),
            "machine": dataclasses.asdict(machine)}


def compile_module(graph: Graph, source: Source, opt_level: int = 3,
                   scheduled: bool = True) -> ModuleFile:
    """The back end: kernels, loops, native code and initial parameters in a module file,
    which also keeps the program it was compiled from (`trust="rebuild"` compiles that)."""
    from cnnc.backends.llvm.codegen import compile_functions
    from cnnc.loops.ir import format_functions
    from cnnc.passes.initialise import initial_parameters

    plan = plan_module(graph, source, opt_level, scheduled)
    code = compile_functions(plan.functions, [t.name for t in plan.storage], opt_level,
                             plan.entries)
    target = {"kind": "cpu", "triple": code.target.triple, "cpu": code.target.cpu,
              "features": [f[1:] for f in code.target.features.split(",") if f.startswith("+")]}
    manifest = dict(plan.manifest, target=target)
    manifest["code_sha256"] = code_hash(code.object_code, manifest, source.text.encode())
    sections = {"object": code.object_code, "llvm_ir": code.llvm_ir.encode(),
                "loops": format_functions(plan.functions).encode(),
                "params": params_to_bytes(initial_parameters(graph)),
                "program": source.text.encode("utf-8")}
    return ModuleFile(manifest, sections)


ENTRY_NAMES = {"forward": "cnnc_forward", "loss": "cnnc_loss", "gradients": "cnnc_gradients",
               "input_gradient": "cnnc_input_gradient", "train_step": "cnnc_train_step",
               "update": "cnnc_update"}


def entry_points(program) -> dict[str, list[str]]:
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


def _update_functions(graph: Graph, program, optimizer: str):
    """One update function a parameter, its optimizer state and the shared scalars buffer."""
    from cnnc.graph.ir import Role, Tensor
    from cnnc.loops.ir import Buffer
    from cnnc.loops.lower_backward import HYPER_FIELDS, lower_update

    hyper = Tensor("optimizer.hyper", Role.HYPER, graph.dtype, (len(HYPER_FIELDS),))
    state_names = ("velocity",) if optimizer == "sgd" else ("adam_m", "adam_v")
    gradient_of = dict(graph.gradients)
    functions, extra = [], [hyper]
    for param in graph.params:
        size = (param.size,)
        states = [Tensor(f"{param.name}.{s}", Role.STATE, graph.dtype, param.shape)
                  for s in state_names]
        extra += states
        flat_view = [Buffer(t.name, size, graph.dtype) for t in states]
        grad = Buffer(program.storage_of(gradient_of[param.name]), size, graph.dtype)
        name = f"{param.name.replace('.', '_')}_{optimizer}_update"
        functions.append(lower_update(name, optimizer, Buffer(param.name, size, graph.dtype),
                                      grad, tuple(flat_view),
                                      Buffer(hyper.name, hyper.shape, graph.dtype)))
    return functions, extra


def compile_cuda_module(graph: Graph, source: Source) -> ModuleFile:
    """A module for NVIDIA GPUs: the plain loop nests of every kernel as Numba CUDA source,
    which the runtime compiles when it loads the module. A max pool fused into its
    convolution on the CPU is two launches here (the grid covers each one's outputs)."""
    from cnnc.backends.cuda.codegen import generate
    from cnnc.backends.cuda.launch import launches_to_json
    from cnnc.loops.ir import format_functions, lower_kernel
    from cnnc.passes.initialise import initial_parameters

    program = module_kernels(graph)
    full = program.graph
    kernels = [(k.name, tuple(lower_kernel(part, program) for part in k.unfused()))
               for k in program.kernels]
    storage = list(program.storage)
    entries = entry_points(program)
    optimizer = None
    if graph.loss is not None:
        optimizer = graph.train.optimizer if graph.train else "sgd"
        updates, extra = _update_functions(full, program, optimizer)
        kernels += [(f.name, (f,)) for f in updates]
        storage += extra
        entries[ENTRY_NAMES["update"]] = [f.name for f in updates]
        entries[ENTRY_NAMES["train_step"]] = entries[ENTRY_NAMES["gradients"]] + \
            entries[ENTRY_NAMES["update"]]
    code = generate(kernels, full.dtype)
    launches = launches_to_json(code.launches)
    # each entry point is its launches, in order: what the runtime runs for it
    entry_table = {role: [launch for name in entries[symbol] for launch in launches[name]]
                   for role, symbol in ENTRY_NAMES.items() if symbol in entries}
    manifest = _manifest(full, program, storage, entry_table, 0, optimizer,
                         {"program": source.name}, rows_to_json(summarize(graph)))
    manifest["target"] = CUDA_TARGET
    cuda_source = code.source.encode()
    manifest["code_sha256"] = code_hash(cuda_source, manifest, source.text.encode())
    functions = tuple(f for _, group in kernels for f in group)
    sections = {"cuda": cuda_source, "loops": format_functions(functions).encode(),
                "params": params_to_bytes(initial_parameters(graph)),
                "program": source.text.encode("utf-8")}
    return ModuleFile(manifest, sections)


CUDA_TARGET = {"kind": "cuda", "triple": "nvptx64-nvidia-cuda", "cpu": "numba", "features": []}


def _manifest(graph: Graph, program, storage, entry_table: dict, opt_level: int,
              optimizer: str | None, build: dict[str, Any], layers: list) -> dict:
    """Every manifest field but the code's own (target, code_sha256, sections)."""
    table = [{"name": t.name, "role": t.role.value, "dtype": t.dtype.value,
              "shape": list(t.shape)} for t in storage]
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
        manifest["loss"] = {"kind": graph.producer(graph.loss).op.value,
                            "target": graph.target, "value": graph.loss}
        manifest["gradients"] = {name: program.storage_of(g) for name, g in graph.gradients}
        settings = dict(graph.train.settings) if graph.train else {"lr": 0.01, "momentum": 0.0}
        manifest["optimizer"] = {"kind": optimizer, **settings}
    return manifest
