"""What the lower stage makes of a kernel program: each kernel's loop functions, the buffer
table, the entry points and which kernels each runs, and, with a loss line, one optimizer
update a parameter with the state it keeps."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cnnc.ops import registry

if TYPE_CHECKING:
    from cnnc.driver.packing import Packing
    from cnnc.graph.ir import Graph, Tensor
    from cnnc.graph.kernels import KernelProgram
    from cnnc.loops.ir import LoopFunction
    from cnnc.schedule.cost import Machine, Schedule


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

    @functools.cached_property
    def texts(self) -> tuple[str, ...]:
        """Each function as `--emit loops` prints it, in order: the module's loops section,
        and the sizes LLVM's modules are balanced by."""
        from cnnc.loops.printer import format_function

        return tuple(format_function(f) for f in self.functions)

    @property
    def functions(self) -> tuple[LoopFunction, ...]:
        return tuple(f for _, group in self.kernels for f in group)


ENTRY_NAMES = {"forward": "cnnc_forward", "loss": "cnnc_loss", "gradients": "cnnc_gradients",
               "input_gradient": "cnnc_input_gradient", "train_step": "cnnc_train_step",
               "update": "cnnc_update",
               # where training computes otherwise (batch norm, dropout): forward and loss
               # as a training call computes them
               "forward_train": "cnnc_forward_train", "loss_train": "cnnc_loss_train",
               # the weights repacked for the kernels (schedule.prepack), run by the runtime
               # when the parameters have changed
               "pack": "cnnc_pack"}


def lower_for_cpu(program: KernelProgram, machine: Machine, scheduled: bool) -> Lowered:
    """One function a kernel, register-blocked for `machine` where a schedule applies (and
    `scheduled`), then (with a loss line) one update a parameter."""
    from cnnc.driver.packing import packed_once

    kernels, scratch, schedules = _scheduled(program, machine, scheduled)
    kernels, scratch, packing = packed_once(program, kernels, scratch)
    return _assembled(program, kernels, scratch, schedules, packing)


def lower_for_cuda(program: KernelProgram) -> Lowered:
    """The plain loop nests of each kernel's parts, then (with a loss line) the updates."""
    return _assembled(program, _parts(program), [], [])


def _assembled(program: KernelProgram, kernels: list, scratch: list, schedules: list,
               packing: Packing | None = None) -> Lowered:
    """The kernels' functions with the entry points, and the updates of a training module;
    with `packing`, the pack entry point and the buffers it fills."""
    storage = [*program.storage, *scratch]
    entries = entry_points(program)
    if packing is not None and packing.entry:
        storage = [packing.role_of(t) for t in storage]
        entries = {symbol: [k for k in names if k not in packing.entry]
                   for symbol, names in entries.items()}
        entries[ENTRY_NAMES["pack"]] = list(packing.entry)
    optimizer = None
    if program.graph.loss is not None:
        optimizer = program.graph.train.optimizer if program.graph.train else \
            registry.DEFAULT_OPTIMIZER
        updates, extra = _update_functions(program.graph, program, optimizer)
        statistics = _buffer_updates(program)
        kernels += [(f.name, (f,)) for f in updates + statistics]
        storage += extra
        entries[ENTRY_NAMES["update"]] = [f.name for f in updates]
        entries[ENTRY_NAMES["train_step"]] = entries[ENTRY_NAMES["gradients"]] + \
            entries[ENTRY_NAMES["update"]] + [f.name for f in statistics]
    return Lowered(tuple(kernels), tuple(storage), entries, tuple(schedules), optimizer)


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


def entry_points(program: KernelProgram) -> dict[str, list[str]]:
    """Which kernels each entry point runs, in order. Training needs no gradient of the
    network's input, so only `cnnc_input_gradient` runs the kernel that makes it."""
    def names(phase: str) -> list[str]:
        return [k.name for k in program.kernels if k.phase == phase]

    training, inference = program.forward_kernels(True), program.forward_kernels(False)
    entries = {ENTRY_NAMES["forward"]: inference}
    if program.inference:
        entries[ENTRY_NAMES["forward_train"]] = training
    if program.graph.loss is not None:
        graph = program.graph
        input_gradient = program.storage_of(dict(graph.gradients).get(graph.input, ""))
        needed = [k.name for k in program.kernels
                  if k.phase == "backward" and input_gradient not in k.outputs]
        entries[ENTRY_NAMES["loss"]] = inference + names("loss")
        if program.inference:
            entries[ENTRY_NAMES["loss_train"]] = training + names("loss")
        entries[ENTRY_NAMES["gradients"]] = training + names("loss") + needed
        entries[ENTRY_NAMES["input_gradient"]] = training + names("loss") + names("backward")
    return entries


def _buffer_updates(program: KernelProgram) -> list[LoopFunction]:
    """The functions a training step ends with that update buffers in place (batch norm's
    running statistics from the batch's), one a node whose op has them."""
    functions = []
    for node in program.graph.nodes:
        rule = registry.get(node.op).update_buffers
        if rule is not None:
            functions.append(rule(node, program, f"{node.layer.replace('.', '_')}_"
                                                 f"{node.op}_update_buffers"))
    return functions


def _update_functions(graph: Graph, program: KernelProgram, optimizer: str):
    """One update function a parameter, its optimizer state and the shared scalars buffer."""
    from cnnc.graph.ir import Role, Tensor
    from cnnc.loops.ir import Buffer
    definition = registry.optimizers()[optimizer]
    hyper = Tensor("optimizer.hyper", Role.HYPER, graph.dtype, (len(registry.HYPER_FIELDS),))
    state_names = definition.states
    settings = dict(graph.train.settings) if graph.train else dict(registry.DEFAULT_SETTINGS)
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
            Buffer(hyper.name, hyper.shape, graph.dtype), settings))
    return functions, extra
