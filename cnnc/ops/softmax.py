"""Softmax and log-softmax over the classes of an N x classes tensor (or over the whole of
each sample of a 2-D one, N x A x B), and their gradients. Each ends a layer (`-> softmax`)
but runs as a kernel of its own: each row needs its maximum and its sum. The cross-entropy of
logits (loss.py) finds each row's maximum with the same loop, `row_max`.

log_softmax is x − max − log Σ exp(x − max), so no exp overflows; its gradient is
dy − softmax(x) · Σ dy, with softmax(x) = exp(y). Before `loss cross_entropy` it is read as
logits: log_softmax(log_softmax(z)) = log_softmax(z), so the loss is −log p[label] of its
probabilities, torch's nll_loss(log_softmax(z)).
"""

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
    """A vector of class scores, or a 2-D sample (the whole sample is one distribution); a
    CxHxW one would need an axis, which the language has no word for."""
    if len(ctx.x) not in (2, 3):
        # the layer that made its input: this one for `-> softmax`, the line above for an
        # activation layer
        raise ShapeProblem(f"{ctx.node.op} needs a vector of class scores, but "
                           f"{ctx.sources[0]} gives {sample(ctx.x)}; add a dense layer before it")
    return {ctx.node.output: ctx.x}


def _rows(x: np.ndarray) -> np.ndarray:
    """N x (the elements of a sample)."""
    return x.reshape(x.shape[0], -1)


def _reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x = _rows(args[0])
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).reshape(args[0].shape)


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
    dy, y = (_rows(a) for a in args)
    return (y * (dy - (dy * y).sum(axis=1, keepdims=True))).reshape(args[0].shape)


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


# -- log_softmax ------------------------------------------------------------------------------

def _log_softmax_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x = _rows(args[0])
    shifted = x - x.max(axis=1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).reshape(args[0].shape)


def _log_softmax_gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x = node.inputs[0]
    return [(x, b.op("log_softmax_grad", (dy, node.output), x, node))]


def _lower_log_softmax(kernel, program) -> LoopFunction:
    """out = x − top − log Σ exp(x − top), top the row's maximum."""
    x = buffer(program, kernel.inputs[0], flat=True)
    out = buffer(program, kernel.outputs[0], is_output=True, flat=True)
    classes, where = const(x.shape[1]), (Var("n"), Var("k"))
    shifted = Binary(BinOp.SUB, Load(x.name, where), Var("top"))
    total = For("k", classes, (Assign("total", add(Var("total"), Unary(UnaryOp.EXP, shifted))),))
    value = Binary(BinOp.SUB, shifted, Var("log_total"))
    store = For("k", classes, (Store(out.name, where, value),))
    body = (*row_max(x.name, classes), Assign("total", Const(0.0, True)), total,
            Assign("log_total", Unary(UnaryOp.LOG, Var("total"))), store)
    locals_ = tuple(Local(name, out.dtype) for name in ("top", "total", "log_total"))
    return LoopFunction(kernel.name, (x, out), locals_, (For("n", Var(BATCH), body),))


def _log_softmax_grad_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    dy, y = (_rows(a) for a in args)
    return (dy - np.exp(y) * dy.sum(axis=1, keepdims=True)).reshape(args[0].shape)


def _lower_log_softmax_grad(kernel, program) -> LoopFunction:
    """dx = dy − exp(y) · Σ dy, a row at a time."""
    dy, y = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    dx = flat(program, kernel.outputs[0], is_output=True)
    where, classes = (Var("n"), Var("k")), const(dy.shape[1])
    total = For("k", classes, (Assign("total", add(Var("total"), Load(dy.name, where))),))
    value = Binary(BinOp.SUB, Load(dy.name, where),
                   mul(Unary(UnaryOp.EXP, Load(y.name, where)), Var("total")))
    body = (Assign("total", Const(0.0, True)), total,
            For("k", classes, (Store(dx.name, where, value),)))
    return LoopFunction(kernel.name, (dy, y, dx), (Local("total", dx.dtype),),
                        (For("n", Var(BATCH), body),))


registry.register(OpDef(
    "softmax", "exp(x − max) / Σ exp(x − max) over axis 1", inputs=("x",), shape=_shape,
    reference=_reference, gradient=_gradient, fusion=Fusion.ALONE, activation=True,
    kernel_tag="softmax", lower=_lower,
    example="input: 6\ndense d: 4 -> softmax\ndense e: 2\nloss mse"))
registry.register(OpDef(
    "softmax_grad", "(dy, y) -> y · (dy − Σ dy·y)", inputs=("dy", "y"), shape=lambda ctx: {},
    differentiable=False, fusion=Fusion.ALONE, reference=_grad_reference, lower=_lower_grad))
registry.register(OpDef(
    "log_softmax", "x − max − log Σ exp(x − max) over each sample", inputs=("x",), shape=_shape,
    reference=_log_softmax_reference, gradient=_log_softmax_gradient, fusion=Fusion.ALONE,
    activation=True, kernel_tag="log_softmax", lower=_lower_log_softmax,
    example="input: 6\ndense d: 4 -> log_softmax\ndense e: 2\nloss mse"))
registry.register(OpDef(
    "log_softmax_grad", "(dy, y) -> dy − exp(y) · Σ dy", inputs=("dy", "y"),
    shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_log_softmax_grad_reference, lower=_lower_log_softmax_grad))
