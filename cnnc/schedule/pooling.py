"""Max pooling run inside a scheduled convolution's batch loop, vectorized over output
columns."""

from __future__ import annotations

from cnnc.graph.ir import BATCH, DType
from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.build import add, const, loop_nest, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Expr,
    For,
    Local,
    LoopFunction,
    Ramp,
    Select,
    Stmt,
    Unary,
    UnaryOp,
    Var,
    VecLoad,
    VecStore,
)
from cnnc.ops.lowering import view
from cnnc.ops.window import resolve
from cnnc.schedule.blocks import affine
from cnnc.schedule.cost import Machine


def maxpool_by_columns(kernel: Kernel, program: KernelProgram,
                        machine: Machine) -> LoopFunction | None:
    """Max pooling vectorized over output columns, with strided vector loads; None where the
    window is padded (lanes would need bounds tests; a ceil-mode window that hangs over the
    edge is padded too) or the output has one column.

    The first tap is always taken, a later one where it is larger or NaN, as in the plain
    loops. A last block that would run past the row starts earlier instead and recomputes a
    few columns: every column gets the same value either way, and no scalar tail is needed.
    """
    x = view(program, kernel.inputs[0])
    window = resolve(kernel.window, x.shape[2], x.shape[3])
    out, argmax = (view(program, name, is_output=True) for name in kernel.outputs)
    _, channels, rows, columns = out.shape
    lanes = min(machine.lanes(out.dtype), 1 << (columns.bit_length() - 1))
    if any(window.pad) or window.dilation != (1, 1) or lanes < 2:
        return None
    (kh, kw), (sh, sw) = window.kernel, window.stride
    best, value, index = "pool_best", "pool_value", "pool_index"

    def block(start: Expr) -> tuple[Stmt, ...]:
        def tap(i: int, j: int) -> tuple[Expr, Expr]:
            row, column = affine(Var("oh"), sh, const(i)), affine(start, sw, const(j))
            position = add(mul(row, const(x.shape[3])), column)
            return (VecLoad(x.name, (Var("n"), Var("c"), row, column), lanes, sw),
                    Ramp(position, sw, lanes))

        first, first_position = tap(0, 0)
        stmts: list[Stmt] = [Assign(best, first), Assign(index, first_position)]
        for i, j in ((i, j) for i in range(kh) for j in range(kw) if (i, j) != (0, 0)):
            load, position = tap(i, j)
            take = Binary(BinOp.OR, Binary(BinOp.GT, Var(value), Var(best)),
                          Unary(UnaryOp.ISNAN, Var(value)))
            stmts += [Assign(value, load), Assign(index, Select(take, position, Var(index))),
                      Assign(best, Binary(BinOp.MAX, Var(best), Var(value)))]
        where = (Var("n"), Var("c"), Var("oh"), start)
        return (*stmts, VecStore(out.name, where, Var(best)),
                VecStore(argmax.name, where, Var(index)))

    full, rest = divmod(columns, lanes)
    body = (For("ob", const(full), block(mul(Var("ob"), const(lanes)))),
            *(block(const(columns - lanes)) if rest else ()))
    nest = loop_nest(["n", "c", "oh"], [Var(BATCH), channels, rows], body)
    locals_ = (Local(best, out.dtype, lanes), Local(value, out.dtype, lanes),
               Local(index, DType.I64, lanes))
    return LoopFunction(kernel.name, (x, out, argmax), locals_, (nest,))


def maxpool_in_anchor(kernel: Kernel, program: KernelProgram, machine: Machine,
                      per_sample: bool) -> tuple[LoopFunction | None, str]:
    """The max pool of a scheduled anchor's kernel, vectorized where it can be (else None,
    for the plain loops), and what --explain-schedule says of it; `per_sample`: it runs in
    the anchor's batch loop, else after the anchor's loops over all samples."""
    window = kernel.window
    where = ("of each sample, inside the batch loop" if per_sample else
             "after the anchor's loops, which its threads share across samples")
    note = (f"max pool {window.kernel[0]}x{window.kernel[1]} stride "
            f"{window.stride[0]}x{window.stride[1]} {where}")
    pooled = maxpool_by_columns(kernel, program, machine)
    if pooled is None:
        return None, note + " (scalar: it is padded or its output has a single column)"
    return pooled, note + f", {pooled.locals[0].lanes} output columns a vector"
