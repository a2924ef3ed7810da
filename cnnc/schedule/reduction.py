"""Reductions over contiguous positions: the bias gradient db[f] = Σ_{n, position}
dy[n, f, position], with vector partial sums."""

from __future__ import annotations

import math

from cnnc.graph.ir import BATCH
from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.build import add, const, mul
from cnnc.loops.ir import (
    Assign,
    Expr,
    For,
    Load,
    Local,
    Store,
    Var,
    VecLoad,
)
from cnnc.ops.lowering import view
from cnnc.schedule.blocks import ZERO, Function, Lowered, plus_lanes
from cnnc.schedule.channels import min_batch, shared_channels, shared_text
from cnnc.schedule.cost import Block, Machine, Schedule

BIAS_ACCUMULATORS = 4  # independent partial sums, so the adds do not wait on each other


def bias_grad(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered | None:
    """db[f] = Σ_{n, position} dy[n, f, position], with vector partial sums over the
    contiguous positions; None (plain loops) where a channel has too few positions."""
    shape = program.graph.tensor(kernel.inputs[0]).shape
    positions = math.prod(shape[2:])
    dy = view(program, kernel.inputs[0], (shape[0], shape[1], positions))
    db = view(program, kernel.outputs[0], is_output=True)
    lanes = machine.lanes(db.dtype)
    step = BIAS_ACCUMULATORS * lanes
    if positions < step:
        return None
    f = Function(kernel.name, db.dtype, [dy, db], [], [], [])
    sums = [f"sum{k}" for k in range(BIAS_ACCUMULATORS)]
    f.locals += [Local(name, db.dtype, lanes) for name in sums] + [Local("rest", db.dtype)]
    where = (Var("n"), Var("f"))
    vectors = For("i", const(positions // step), tuple(
        Assign(name, add(Var(name), VecLoad(dy.name, (*where, add(mul(Var("i"), const(step)),
                                                                  const(k * lanes))), lanes)))
        for k, name in enumerate(sums)))
    tail_start = positions // step * step
    tail = For("t", const(positions - tail_start), (Assign("rest", add(Var("rest"), Load(
        dy.name, (*where, add(Var("t"), const(tail_start)))))),))
    combined: Expr = Var(sums[0])
    for name in sums[1:]:
        combined = add(combined, Var(name))
    total = plus_lanes(Var("rest"), combined, lanes)
    body = (*(Assign(name, ZERO) for name in sums), Assign("rest", ZERO),
            For("n", Var(BATCH), (vectors, tail)) if tail_start < positions else
            For("n", Var(BATCH), (vectors,)),
            Store(db.name, (Var("f"),), total))
    # a training call with batch norm runs in one piece: its channels shared by the team
    samples = min_batch(shape[1] * positions)
    f.body.extend(shared_channels(For("f", const(shape[1]), body), samples))
    block = Block(1, BIAS_ACCUMULATORS, lanes)
    schedule = Schedule(kernel.name, "sum over positions", block, "channel", shape[1],
                        "position", positions, ("sample", "position block"), (),
                        reason=f"{BIAS_ACCUMULATORS} partial sums of {lanes} "
                        "lanes hide the add latency; the lanes are added once per channel",
                        shared=shared_text(samples))
    return Lowered(f.finished(), (), schedule)
