"""The pass list for callers that hold a typed graph: `cnnc.compile`, `check --grad`, and
loading a module file, which plans its stored program again to compare (`trust.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cnnc.driver.module_file import module_manifest
from cnnc.driver.pipeline import Options, Stage, advance, from_graph

if TYPE_CHECKING:
    from cnnc.artifact.format import ModuleFile
    from cnnc.backends.target import CpuTarget
    from cnnc.diagnostics import Source
    from cnnc.graph.ir import Graph
    from cnnc.schedule.cost import Machine


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
    file plans its stored program again and compares (`driver.trust`)."""
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
