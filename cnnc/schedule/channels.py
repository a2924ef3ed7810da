"""Per-channel kernels (batch norm's statistics, normalization and gradients): their plain
loops, `For c` over the channels with loops over samples and positions inside, with the
loops over a sample's contiguous positions vectorized and the channel loop shared by a
call's thread team.

A training call with batch norm runs in one piece (the statistics are over the whole
batch), so a kernel without a parallel loop runs on one thread while the others wait.
Each channel's iteration reads and writes only that channel (its locals are its own in a
parallel loop), so the channel loop may be parallel as it stands. The batch is known only
at run time: below `min_batch` samples the serial loop runs, as the hand-off would cost
what a second core saves.

A loop over positions `s` (the last, contiguous index of every access that uses it) is
vectorized where its body is one of two statements:
- a sum `part = part + e(s)`: ACCUMULATORS vector partial sums over whole steps (so the
  adds do not wait on each other), the remainder scalar, the lanes added to `part` once.
  The terms are added in another order than the plain loop's, within a float sum's
  rounding of the same terms.
- a store `y[..., s] = e(s)`: vector stores over whole vectors, the remainder scalar.
Loads `b[..., s]` become vector loads and scalars are broadcast; a loop that uses `s`
otherwise (in an index other than the last, in arithmetic) is left as it is.
"""

from __future__ import annotations

import dataclasses
import math

from cnnc.graph.ir import BATCH
from cnnc.loops.build import add, const, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Broadcast,
    Const,
    Expr,
    For,
    If,
    Load,
    Local,
    LoopFunction,
    LoopKind,
    Stmt,
    Store,
    Unary,
    Var,
    VecLoad,
    VecStore,
)
from cnnc.loops.walk import rewrite, walk
from cnnc.schedule.blocks import ZERO, Lowered, plus_lanes
from cnnc.schedule.cost import PARALLEL_MIN_FLOPS, Block, Machine, Schedule

ACCUMULATORS = 4  # independent vector partial sums of one sum loop


def per_channel(function: LoopFunction, machine: Machine, flops_per_sample: int,
                positions: int) -> Lowered | None:
    """`function` (plain loops ending in the channel loop) vectorized over positions and
    shared over channels; None (the plain loops) where a channel of a sample has fewer
    positions than a vector has lanes."""
    dtype = function.buffers[-1].dtype
    lanes = machine.lanes(dtype)
    if positions < lanes:
        return None
    vectorizer = _Vectorizer(lanes, dtype)
    body = vectorizer.body(function.body)
    channels = body[-1]
    assert isinstance(channels, For) and channels.kind is LoopKind.SERIAL, function.name
    samples = min_batch(flops_per_sample)
    body = (*body[:-1], *shared_channels(channels, samples))
    function = dataclasses.replace(function, body=body,
                                   locals=function.locals + tuple(vectorizer.locals))
    block = Block(1, ACCUMULATORS, lanes)
    extent = channels.extent.value if isinstance(channels.extent, Const) else 0
    schedule = Schedule(
        function.name, "per channel", block, "channel", int(extent), "position", positions,
        ("sample", "position"), (),
        reason=f"the sums over each channel's positions in {ACCUMULATORS} partial sums of "
               f"{lanes} lanes, the element-wise passes {lanes} positions a vector",
        shared=shared_text(samples))
    return Lowered(function, (), schedule)


def min_batch(flops_per_sample: int) -> int:
    """The batch from which a kernel of `flops_per_sample` pays for a thread team's hand-off."""
    return max(1, math.ceil(PARALLEL_MIN_FLOPS / max(flops_per_sample, 1)))


def shared_channels(channels: For, samples: int) -> tuple[Stmt, ...]:
    """The channel loop parallel from `samples` samples up, serial below."""
    parallel = dataclasses.replace(channels, kind=LoopKind.PARALLEL)
    if samples == 1:
        return (parallel,)
    enough = Binary(BinOp.GE, Var(BATCH), const(samples))
    few = Binary(BinOp.LT, Var(BATCH), const(samples))
    return (If(enough, (parallel,)), If(few, (channels,)))


def shared_text(samples: int) -> str:
    """What --explain-schedule says the thread team shares."""
    return f"channels (from {samples} samples up; fewer run on one thread)"


class _Vectorizer:
    """Rewrites the loops over positions of a body; `locals` are the vector partial sums
    it added."""

    def __init__(self, lanes: int, dtype) -> None:
        self.lanes = lanes
        self.dtype = dtype
        self.locals: list[Local] = []

    def body(self, stmts: tuple[Stmt, ...]) -> tuple[Stmt, ...]:
        out: list[Stmt] = []
        for stmt in stmts:
            if isinstance(stmt, For):
                out.extend(self.loop(stmt))
            elif isinstance(stmt, If):
                out.append(dataclasses.replace(stmt, body=self.body(stmt.body)))
            else:
                out.append(stmt)
        return tuple(out)

    def loop(self, loop: For) -> tuple[Stmt, ...]:
        extent = loop.extent.value if isinstance(loop.extent, Const) else 0
        if len(loop.body) == 1 and loop.kind is LoopKind.SERIAL and extent >= self.lanes:
            stmt = loop.body[0]
            if isinstance(stmt, Assign):
                done = self.sum(loop.var, int(extent), stmt)
            elif isinstance(stmt, Store):
                done = self.store(loop.var, int(extent), stmt)
            else:
                done = None
            if done is not None:
                return done
        return (dataclasses.replace(loop, body=self.body(loop.body)),)

    def sum(self, var: str, extent: int, stmt: Assign) -> tuple[Stmt, ...] | None:
        """`stmt` is part = part + e(var): vector partial sums, then the remainder."""
        value = stmt.value
        if not (isinstance(value, Binary) and value.op is BinOp.ADD
                and value.left == Var(stmt.var)) or _uses((value.right,), stmt.var):
            return None  # not a sum, or its terms read the running sum
        count = min(ACCUMULATORS, extent // self.lanes)
        step = count * self.lanes
        terms = [_vector(value.right, var, add(mul(Var(var), const(step)),
                                                const(k * self.lanes)), self.lanes)
                 for k in range(count)]
        if any(term is None for term in terms):
            return None
        sums = [f"{stmt.var}_v{k}" for k in range(count)]
        for name in sums:
            if all(lo.name != name for lo in self.locals):
                self.locals.append(Local(name, self.dtype, self.lanes))
        vectors = For(var, const(extent // step), tuple(
            Assign(name, add(Var(name), term)) for name, term in zip(sums, terms, strict=True)))
        combined: Expr = Var(sums[0])
        for name in sums[1:]:
            combined = add(combined, Var(name))
        return (*(Assign(name, ZERO) for name in sums), vectors,
                *_remainder(var, extent, extent // step * step, stmt),
                Assign(sums[0], combined),
                Assign(stmt.var, plus_lanes(Var(stmt.var), Var(sums[0]), self.lanes)))

    def store(self, var: str, extent: int, stmt: Store) -> tuple[Stmt, ...] | None:
        """`stmt` is y[..., var] = e(var): vector stores, then the remainder."""
        if stmt.index[-1] != Var(var) or _uses(stmt.index[:-1], var):
            return None
        base = mul(Var(var), const(self.lanes))
        value = _vector(stmt.value, var, base, self.lanes)
        if value is None:
            return None
        if not _uses((stmt.value,), var):  # the same value at every position
            value = Broadcast(stmt.value, self.lanes)
        vectors = For(var, const(extent // self.lanes),
                      (VecStore(stmt.buffer, (*stmt.index[:-1], base), value),))
        return (vectors, *_remainder(var, extent, extent // self.lanes * self.lanes, stmt))


def _remainder(var: str, extent: int, start: int, stmt: Stmt) -> tuple[Stmt, ...]:
    """`stmt` for var from `start` to `extent`, scalar."""
    if start == extent:
        return ()
    shifted = rewrite(stmt, lambda node: add(Var(var), const(start))
                      if node == Var(var) else node)
    return (For(var, const(extent - start), (shifted,)),)


def _uses(exprs: tuple[Expr, ...], var: str) -> bool:
    return any(node == Var(var) for e in exprs for node in walk(e))


def _vector(expr: Expr, var: str, base: Expr, lanes: int) -> Expr | None:
    """`expr` at var = base .. base + lanes − 1 as a vector (its scalars broadcast where it
    meets vectors), or None where `var` is used otherwise than as a last index."""
    if isinstance(expr, Var):
        return None if expr.name == var else expr
    if isinstance(expr, Const):
        return expr
    if isinstance(expr, Load):
        if not _uses(expr.index, var):
            return expr
        if expr.index[-1] == Var(var) and not _uses(expr.index[:-1], var):
            return VecLoad(expr.buffer, (*expr.index[:-1], base), lanes)
        return None
    if isinstance(expr, Binary):
        left, right = _vector(expr.left, var, base, lanes), _vector(expr.right, var, base, lanes)
        return None if left is None or right is None else Binary(expr.op, left, right)
    if isinstance(expr, Unary):
        operand = _vector(expr.operand, var, base, lanes)
        return None if operand is None else Unary(expr.op, operand)
    return None  # a select's mask, a vector already: left to the plain loop
