"""Kernel + machine → scheduled loop IR: each kernel by its op's schedule pattern
(`OpDef.schedule`), or None where its op has none (it keeps its plain loops). A pool fused
into a scheduled anchor runs in the anchor's batch loop, vectorized by the pool op's
`pool_schedule` where that applies."""

from __future__ import annotations

import dataclasses

from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.lower import fuse_batch_loops, lower_kernel, shares_samples
from cnnc.ops import registry
from cnnc.schedule.blocks import Lowered
from cnnc.schedule.cost import Machine


def lower_blocked(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered | None:
    """The scheduled loop function of `kernel`, or None for kernels without a schedule."""
    if kernel.pool is not None:
        return _with_pool(kernel, program, machine)
    rule = registry.get(kernel.op).schedule
    return None if rule is None else rule(kernel, program, machine)


def _with_pool(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered | None:
    anchor, pool = kernel.unfused()
    lowered = lower_blocked(anchor, program, machine)
    if lowered is None:
        return None
    rule = registry.get(pool.op).pool_schedule
    per_sample = not shares_samples(lowered.function)
    pooled, note = rule(pool, program, machine, per_sample) if rule else (None, "")
    if pooled is None:
        pooled = lower_kernel(pool, program)
    return Lowered(fuse_batch_loops(lowered.function, pooled), lowered.scratch,
                   dataclasses.replace(lowered.schedule, fused=note))
