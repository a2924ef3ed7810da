"""Small helpers that build loop IR: constants, sums and products without the terms that
change nothing, loop nests and guarded bodies."""

from __future__ import annotations

from cnnc.graph.ir import BATCH
from cnnc.loops.ir import Binary, BinOp, Const, Expr, For, If, Stmt, Var


def const(value: float | int) -> Const:
    return Const(value, isinstance(value, float))


def add(a: Expr, b: Expr) -> Expr:
    """a + b, or just one of them where the other is the integer 0."""
    if isinstance(b, Const) and not b.is_float and b.value == 0:
        return a
    if isinstance(a, Const) and not a.is_float and a.value == 0:
        return b
    return Binary(BinOp.ADD, a, b)


def mul(a: Expr, b: Expr) -> Expr:
    return Binary(BinOp.MUL, a, b)


def loop_nest(names: list[str], extents: list[Expr | int], body: tuple[Stmt, ...]) -> Stmt:
    for name, extent in reversed(list(zip(names, extents, strict=True))):
        body = (For(name, extent if not isinstance(extent, int) else const(extent), body),)
    return body[0]


def extent_expr(dim: int | str) -> Expr:
    return Var(BATCH) if dim == BATCH else const(dim)


def guarded(cond: Expr | None, body: tuple[Stmt, ...]) -> tuple[Stmt, ...]:
    return body if cond is None else (If(cond, body),)
