"""Kernel + machine → scheduled loop IR: each kernel by its op's schedule pattern
(`OpDef.schedule`), or None where its op has none (it keeps its plain loops). A pool fused
into a scheduled anchor runs in the anchor's batch loop, vectorized by the pool op's
`pool_schedule` where that applies."""

from __future__ import annotations

import dataclasses
import math

from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.ir import For, LoopFunction, LoopKind
from cnnc.loops.lower import fuse_batch_loops, lower_kernel, shares_samples
from cnnc.ops import registry
from cnnc.schedule.blocks import Lowered
from cnnc.schedule.cost import Machine, shares_sample


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
    if shares_sample(_pool_work(pool, program)):
        pooled, shared = _channels_shared(pooled, per_sample)
        if shared:
            note += "; its channels shared by a call's thread team"
    return Lowered(fuse_batch_loops(lowered.function, pooled), lowered.scratch,
                   dataclasses.replace(lowered.schedule, fused=note))


def _pool_work(pool: Kernel, program: KernelProgram) -> int:
    """A sample's comparisons of the pool: its outputs times its window's taps."""
    shape = program.tensor(pool.outputs[0]).shape
    kh, kw = pool.window.kernel
    return math.prod(d for d in shape if isinstance(d, int)) * kh * kw


def _channels_shared(function: LoopFunction, per_sample: bool) -> tuple[LoopFunction, bool]:
    """The pool with its loop over channels parallel, and whether it could be: in a call
    run in one piece (a batch of one) the team's threads then share the channels, as they
    share the anchor's blocks, instead of one thread pooling them all (ResNet-18's stem at
    batch 1: a padded 3x3 pool of 64 x 112 x 112, 0.8 ms on one thread). Each channel's
    iteration writes only its own outputs. Inside the anchor's batch loop (`per_sample`)
    only the channels are parallel; over the whole batch, the samples too (one range)."""
    *before, batch = function.body
    if not (isinstance(batch, For) and batch.kind is LoopKind.SERIAL and len(batch.body) == 1
            and isinstance(batch.body[0], For) and batch.body[0].var == "c"
            and batch.body[0].kind is LoopKind.SERIAL):
        return function, False
    channels = dataclasses.replace(batch.body[0], kind=LoopKind.PARALLEL)
    kind = LoopKind.SERIAL if per_sample else LoopKind.PARALLEL
    batch = dataclasses.replace(batch, body=(channels,), kind=kind)
    return dataclasses.replace(function, body=(*before, batch)), True
