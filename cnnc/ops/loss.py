"""The losses — cross-entropy of class probabilities against integer labels, and the mean
squared error — with the `loss` statement's options and their gradients.

Softmax followed by cross-entropy is differentiated as one: δ = (p − onehot) / N, which is
exact and never divides by a probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnc.frontend.options import OptionSpec, positive_int, shape
from cnnc.graph.ir import BATCH, DType, Node, format_shape
from cnnc.loops.build import add, const, loop_nest, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Const,
    For,
    Load,
    Local,
    LoopFunction,
    Select,
    Store,
    Unary,
    UnaryOp,
    Var,
)
from cnnc.ops import registry
from cnnc.ops.lowering import batch_float, flat, view
from cnnc.ops.registry import Fusion, LossDef, OpDef, ShapeContext, ShapeProblem
from cnnc.ops.window import sample


@dataclass(frozen=True, slots=True)
class LossAttrs:
    """A target shape the program declared (`loss mse targets=10`), checked against the output."""

    declared: tuple[int, ...] | None = None

    def text(self) -> str:
        return "" if self.declared is None else f" declared={format_shape(self.declared, 'x')}"


def _check_declared(ctx: ShapeContext, key: str) -> None:
    declared = ctx.node.attrs.declared
    if declared is not None and tuple(ctx.x[1:]) != declared:
        raise ShapeProblem(f"loss {ctx.node.op} declares {key}={format_shape(declared, 'x')}, "
                           f"but the network output {ctx.sources[0]} gives {sample(ctx.x)}")


# -- cross_entropy: (probabilities, labels) -> mean of −log p[label] -----------------------------

def _cross_entropy_shape(ctx: ShapeContext) -> dict:
    if len(ctx.x) != 2:
        raise ShapeProblem(f"loss cross_entropy needs class probabilities, but "
                           f"{ctx.sources[0]} gives {sample(ctx.x)}")
    _check_declared(ctx, "classes")
    return {ctx.node.output: (), ctx.node.inputs[1]: (BATCH,)}


def _cross_entropy(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x, labels = args
    picked = x[np.arange(x.shape[0]), labels]
    return np.asarray(-np.mean(np.log(picked)), dtype=x.dtype)


def _cross_entropy_gradient(node: Node, dy: str | None, b) -> list[tuple[str, str]]:
    probabilities, labels = node.inputs
    softmax = b.graph.producer(probabilities)
    assert softmax is not None and softmax.op == "softmax", "irgen guarantees a softmax"
    logits = softmax.inputs[0]
    return [(logits, b.op("softmax_cross_entropy_grad", (probabilities, labels), logits,
                          node))]


def _lower_cross_entropy(kernel, program) -> LoopFunction:
    """loss = −Σ log p[n, label[n]] / N (labels were checked to be in range)."""
    p, labels = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    loss = view(program, kernel.outputs[0], is_output=True)
    picked = Load(p.name, (Var("n"), Load(labels.name, (Var("n"),))))
    total = For("n", Var(BATCH), (Assign("acc", add(Var("acc"), Unary(UnaryOp.LOG, picked))),))
    body = (Assign("acc", Const(0.0, True)), total,
            Store(loss.name, (const(0),), Binary(BinOp.DIV, Unary(UnaryOp.NEG, Var("acc")),
                                                 batch_float())))
    return LoopFunction(kernel.name, (p, labels, loss), (Local("acc", loss.dtype),), body)


def _softmax_cross_entropy_grad(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    p, labels = args
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), labels] = 1
    return (p - onehot) / p.shape[0]


def _lower_softmax_cross_entropy_grad(kernel, program) -> LoopFunction:
    """δ = (p − onehot(label)) / N."""
    p, labels = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dz = flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("k"))
    hit = Select(Binary(BinOp.EQ, Var("k"), Load(labels.name, (Var("n"),))), Const(1.0, True),
                 Const(0.0, True))
    value = Binary(BinOp.DIV, Binary(BinOp.SUB, Load(p.name, where), hit), batch_float())
    nest = loop_nest(["n", "k"], [Var(BATCH), p.shape[1]], (Store(dz.name, where, value),))
    return LoopFunction(kernel.name, (p, labels, dz), (), (nest,))


# -- mse: (y, targets) -> mean of (y − t)² ------------------------------------------------------

def _mse_shape(ctx: ShapeContext) -> dict:
    _check_declared(ctx, "targets")
    return {ctx.node.output: (), ctx.node.inputs[1]: ctx.x}


def _mse(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x, targets = args
    return np.asarray(np.mean((x - targets) ** 2), dtype=x.dtype)


def _mse_gradient(node: Node, dy: str | None, b) -> list[tuple[str, str]]:
    y, targets = node.inputs
    return [(y, b.op("mse_grad", (y, targets), y, node))]


def _mse_size(y) -> object:
    return mul(batch_float(), Const(float(y.shape[1]), True))


def _lower_mse(kernel, program) -> LoopFunction:
    y, t = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    loss = view(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("i"))
    difference = Binary(BinOp.SUB, Load(y.name, where), Load(t.name, where))
    total = loop_nest(["n", "i"], [Var(BATCH), y.shape[1]],
                      (Assign("acc", add(Var("acc"), mul(difference, difference))),))
    body = (Assign("acc", Const(0.0, True)), total,
            Store(loss.name, (const(0),), Binary(BinOp.DIV, Var("acc"), _mse_size(y))))
    return LoopFunction(kernel.name, (y, t, loss), (Local("acc", loss.dtype),), body)


def _lower_mse_grad(kernel, program) -> LoopFunction:
    y, t = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    dy = flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("i"))
    value = Binary(BinOp.DIV, mul(Const(2.0, True), Binary(BinOp.SUB, Load(y.name, where),
                                                           Load(t.name, where))), _mse_size(y))
    nest = loop_nest(["n", "i"], [Var(BATCH), y.shape[1]], (Store(dy.name, where, value),))
    return LoopFunction(kernel.name, (y, t, dy), (), (nest,))


registry.register_loss(LossDef(
    "cross_entropy", {"classes": OptionSpec(positive_int, None)}, "loss.labels", DType.I64,
    lambda values: LossAttrs(None if values["classes"] is None else (values["classes"],)),
    needs_output="softmax"))
registry.register_loss(LossDef(
    "mse", {"targets": OptionSpec(shape, None)}, "loss.targets", None,
    lambda values: LossAttrs(values["targets"])))
registry.register(OpDef(
    "cross_entropy", "mean over the batch of −log p[label]", inputs=("p", "labels"),
    shape=_cross_entropy_shape, reference=_cross_entropy, gradient=_cross_entropy_gradient,
    fusion=Fusion.ALONE, lower=_lower_cross_entropy,
    example="input: 6\ndense d: 4 -> softmax\nloss cross_entropy"))
registry.register(OpDef(
    "softmax_cross_entropy_grad", "(p, labels) -> (p − onehot) / N", inputs=("p", "labels"),
    shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_softmax_cross_entropy_grad, lower=_lower_softmax_cross_entropy_grad))
registry.register(OpDef(
    "mse", "mean over all elements of (y − t)²", inputs=("y", "targets"), shape=_mse_shape,
    reference=_mse, gradient=_mse_gradient, fusion=Fusion.ALONE, lower=_lower_mse,
    example="input: 2x2x2\nconv c: 3 1x1\nloss mse"))
registry.register(OpDef(
    "mse_grad", "(y, t) -> 2 (y − t) / size", inputs=("y", "t"), shape=lambda ctx: {},
    differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: 2 * (args[0] - args[1]) / args[0].size,
    lower=_lower_mse_grad))
