"""The elementwise activations relu, sigmoid and tanh and their gradients. Each may end a
layer (`-> relu`) and then runs inside that layer's kernel, applied to each result as it is
stored; relu lets NaN through, as the reference does."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cnnc.graph.ir import BATCH, Node
from cnnc.loops.build import add, loop_nest, mul
from cnnc.loops.ir import (
    Binary,
    BinOp,
    Const,
    Expr,
    Load,
    LoopFunction,
    Select,
    Store,
    Unary,
    UnaryOp,
    Var,
)
from cnnc.ops import registry
from cnnc.ops.lowering import buffer, flat
from cnnc.ops.registry import Fusion, OpDef, ShapeContext, Slot

ZERO = Const(0.0, True)
ONE = Const(1.0, True)


def _same_shape(ctx: ShapeContext) -> dict:
    return {ctx.node.output: ctx.x}


def _relu(value: Expr) -> Expr:
    return Select(Binary(BinOp.LT, value, ZERO), ZERO, value)


def _sigmoid(value: Expr) -> Expr:
    return Binary(BinOp.DIV, ONE, add(ONE, Unary(UnaryOp.EXP, Unary(UnaryOp.NEG, value))))


def _tanh(value: Expr) -> Expr:
    return Unary(UnaryOp.TANH, value)


def _lower_alone(kernel, program) -> LoopFunction:
    """An activation that follows no anchor (a pool, say): a kernel of its own."""
    x = buffer(program, kernel.inputs[0], flat=True)
    out = buffer(program, kernel.outputs[0], is_output=True, flat=True)
    where = (Var("n"), Var("i"))
    value = registry.get(kernel.op).elementwise(Load(x.name, where))
    nest = loop_nest(["n", "i"], [Var(BATCH), x.shape[1]], (Store(out.name, where, value),))
    return LoopFunction(kernel.name, (x, out), (), (nest,))


def _gradient_through_output(grad_op: str):
    """The gradient of y = f(x) written with y: (dy, y) -> dx."""
    def rule(node: Node, dy: str, b) -> list[tuple[str, str]]:
        x = node.inputs[0]
        return [(x, b.op(grad_op, (dy, node.output), x, node))]

    return rule


def lower_binary(formula: Callable[[Expr, Expr], Expr]):
    """The lowering of an elementwise op of two tensors shaped alike, over flat views."""
    def lower(kernel, program) -> LoopFunction:
        first, second = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
        dx = flat(program, kernel.outputs[0], is_output=True)
        where = (Var("n"), Var("i"))
        value = formula(Load(first.name, where), Load(second.name, where))
        nest = loop_nest(["n", "i"], [Var(BATCH), dx.shape[1]], (Store(dx.name, where, value),))
        return LoopFunction(kernel.name, (first, second, dx), (), (nest,))

    return lower


def _activation(name: str, doc: str, value: Callable[[Expr], Expr],
                reference: Callable[[np.ndarray], np.ndarray]) -> None:
    registry.register(OpDef(
        name, doc, inputs=("x",), shape=_same_shape,
        reference=lambda node, args, shape, mode: reference(args[0]),
        gradient=_gradient_through_output(f"{name}_grad"), fusion=Fusion.EPILOGUE,
        slot=Slot.ACTIVATION, elementwise=value, activation=True, kernel_tag=name,
        lower=_lower_alone,
        # once in a convolution's kernel, once after a pool (a kernel of its own)
        example=f"input: 2x4x4\nconv c: 3 3x3 -> {name}\nmaxpool 1x1\n{name}\nflatten\n"
                "dense e: 3\nloss mse"))


def _activation_grad(name: str, doc: str, formula: Callable[[Expr, Expr], Expr],
                     reference: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    registry.register(OpDef(
        name, doc, inputs=("dy", "y"), shape=lambda ctx: {}, differentiable=False,
        fusion=Fusion.ALONE, reference=lambda node, args, shape, mode: reference(*args),
        lower=lower_binary(formula)))


_activation("relu", "max(x, 0); NaN stays NaN", _relu,
            lambda x: np.where(x < 0, np.zeros_like(x), x))
_activation("sigmoid", "1 / (1 + exp(−x))", _sigmoid, lambda x: 1 / (1 + np.exp(-x)))
_activation("tanh", "tanh(x)", _tanh, np.tanh)
_activation_grad("relu_grad", "(dy, y) -> dy where y > 0",
                 lambda dy, y: Select(Binary(BinOp.GT, y, ZERO), dy, ZERO),
                 lambda dy, y: np.where(y > 0, dy, np.zeros_like(dy)))
_activation_grad("sigmoid_grad", "(dy, y) -> dy · y · (1 − y)",
                 lambda dy, y: mul(mul(dy, y), Binary(BinOp.SUB, ONE, y)),
                 lambda dy, y: dy * y * (1 - y))
_activation_grad("tanh_grad", "(dy, y) -> dy · (1 − y²)",
                 lambda dy, y: mul(dy, Binary(BinOp.SUB, ONE, mul(y, y))),
                 lambda dy, y: dy * (1 - y * y))
