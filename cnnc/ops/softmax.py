"""Softmax over the classes of an N x classes tensor, and its gradient. It ends a layer
(`-> softmax`) but runs as a kernel of its own: each row needs its maximum and its sum. The
cross-entropy of logits (loss.py) finds each row's maximum with the same loop, `row_max`."""

from __future__ import annotations

import math

import numpy as np

from cnnc.graph.ir import BATCH, Node
from cnnc.loops.build import add, const, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Const,
    Expr,
    For,
    Load,
    Local,
    LoopFunction,
    Select,
    Stmt,
    Store,
    Unary,
    UnaryOp,
    Var,
)
from cnnc.ops import registry
from cnnc.ops.lowering import buffer, flat
from cnnc.ops.registry import Fusion, OpDef, ShapeContext, ShapeProblem
from cnnc.ops.window import sample


def _shape(ctx: ShapeContext) -> dict:
    if len(ctx.x) != 2:
        raise ShapeProblem(f"softmax needs a vector of class scores, but {ctx.subject} gives "
                           f"{sample(ctx.x)}; add a dense layer before it")
    return {ctx.node.output: ctx.x}


def _reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x = args[0]
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x = node.inputs[0]
    return [(x, b.op("softmax_grad", (dy, node.output), x, node))]


def row_max(x: str, classes: Expr) -> tuple[Stmt, ...]:
    """top = the largest value of row n of buffer `x` (over k), NaN where the row holds a NaN,
    so that a NaN reaches the result instead of being skipped."""
    item = Load(x, (Var("n"), Var("k")))
    larger = Binary(BinOp.OR, Binary(BinOp.GT, item, Var("top")), Unary(UnaryOp.ISNAN, item))
    return (Assign("top", Const(-math.inf, True)),
            For("k", classes, (Assign("top", Select(larger, item, Var("top"))),)))


def _lower(kernel, program) -> LoopFunction:
    """Subtract the row maximum before exp, so logits of ±1e4 cannot overflow."""
    x = buffer(program, kernel.inputs[0], flat=True)  # a flatten's input may be N x C x H x W
    out = buffer(program, kernel.outputs[0], is_output=True, flat=True)
    classes = const(x.shape[1])
    item = Load(x.name, (Var("n"), Var("k")))
    exponent = Unary(UnaryOp.EXP, Binary(BinOp.SUB, item, Var("top")))
    exponentiate = For("k", classes, (Store(out.name, (Var("n"), Var("k")), exponent),
                                      Assign("total", add(Var("total"),
                                                          Load(out.name, (Var("n"), Var("k")))))))
    normalise = For("k", classes, (Store(out.name, (Var("n"), Var("k")),
                                         Binary(BinOp.DIV, Load(out.name, (Var("n"), Var("k"))),
                                                Var("total"))),))
    body = (*row_max(x.name, classes), Assign("total", Const(0.0, True)), exponentiate,
            normalise)
    nest = For("n", Var(BATCH), body)
    return LoopFunction(kernel.name, (x, out),
                        (Local("top", out.dtype), Local("total", out.dtype)), (nest,))


def _grad_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    dy, y = args
    return y * (dy - (dy * y).sum(axis=1, keepdims=True))


def _lower_grad(kernel, program) -> LoopFunction:
    dy, y = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    dx = flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("k"))
    classes = const(dy.shape[1])
    dot = For("k", classes, (Assign("dot", add(Var("dot"), mul(Load(dy.name, where),
                                                               Load(y.name, where)))),))
    scale = For("k", classes, (Store(dx.name, where, mul(Load(y.name, where), Binary(
        BinOp.SUB, Load(dy.name, where), Var("dot")))),))
    body = (Assign("dot", Const(0.0, True)), dot, scale)
    return LoopFunction(kernel.name, (dy, y, dx), (Local("dot", dx.dtype),),
                        (For("n", Var(BATCH), body),))


registry.register(OpDef(
    "softmax", "exp(x − max) / Σ exp(x − max) over axis 1", inputs=("x",), shape=_shape,
    reference=_reference, gradient=_gradient, fusion=Fusion.ALONE, activation=True,
    kernel_tag="softmax", lower=_lower,
    example="input: 6\ndense d: 4 -> softmax\ndense e: 2\nloss mse"))
registry.register(OpDef(
    "softmax_grad", "(dy, y) -> y · (dy − Σ dy·y)", inputs=("dy", "y"), shape=lambda ctx: {},
    differentiable=False, fusion=Fusion.ALONE, reference=_grad_reference, lower=_lower_grad))
