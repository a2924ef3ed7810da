"""Kernel → loop IR: the plain, unscheduled loop nest of each kernel, by its op's lowering
(`OpDef.lower`); a pool fused into an anchor's kernel runs in the anchor's batch loop, or
after it where the anchor's thread team shares its samples."""

from __future__ import annotations

from cnnc.graph.ir import BATCH
from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.ir import For, LoopFunction, LoopKind, Var
from cnnc.ops import registry


def lower(program: KernelProgram) -> tuple[LoopFunction, ...]:
    """Every kernel as its plain, unscheduled loop nest."""
    return tuple(lower_kernel(k, program) for k in program.kernels)


def lower_kernel(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    if kernel.pool is not None:
        anchor, pool = kernel.unfused()
        return fuse_batch_loops(lower_kernel(anchor, program), lower_kernel(pool, program))
    rule = registry.get(kernel.op).lower
    assert rule is not None, f"the op {kernel.op} has no loop lowering"
    return rule(kernel, program)


def fuse_batch_loops(first: LoopFunction, second: LoopFunction) -> LoopFunction:
    """One function that runs `second` on each sample right after `first` made it.

    Both functions must end in their loop over the batch; whatever comes before it (packing,
    padding) runs first, once. Sample n of `first`'s output is still in cache when `second`
    reads it. Loop variables may repeat: the two loop nests run one after the other.
    Where `first`'s batch loop is collapsed with the loops inside it into one range that a
    thread team shares (`shares_samples`), a sample is done only when the whole range is:
    `second` runs after it, over the whole batch.
    """
    first_loop, second_loop = first.body[-1], second.body[-1]
    for loop in (first_loop, second_loop):
        assert isinstance(loop, For) and loop.var == "n" and loop.extent == Var(BATCH), \
            f"{first.name}: only functions that end in their batch loop can be fused"
    if shares_samples(first):
        body = first.body + second.body
    else:
        batch = For("n", Var(BATCH), first_loop.body + second_loop.body, first_loop.kind,
                    first_loop.private)
        body = first.body[:-1] + second.body[:-1] + (batch,)
    names = {b.name for b in first.buffers}
    known = {local.name: local for local in first.locals}
    for local in second.locals:
        assert known.get(local.name, local) == local, f"local {local.name} has two types"
    return LoopFunction(
        first.name, first.buffers + tuple(b for b in second.buffers if b.name not in names),
        first.locals + tuple(lo for lo in second.locals if lo.name not in known), body)


def shares_samples(function: LoopFunction) -> bool:
    """Whether `function`'s batch loop (its last statement) is parallel and collapsed with
    the parallel loop that is its only statement: its iterations are not whole samples."""
    loop = function.body[-1]
    return isinstance(loop, For) and loop.kind is LoopKind.PARALLEL and \
        len(loop.body) == 1 and isinstance(loop.body[0], For) and \
        loop.body[0].kind is LoopKind.PARALLEL
