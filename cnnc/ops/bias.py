"""A per-channel (axis 1) bias and its gradient, the sum of δ over all but axis 1. After a
conv or dense op the bias starts that kernel's sums (bias + Σ ...)."""

from __future__ import annotations

import math

import numpy as np

from cnnc.graph.ir import BATCH, Node
from cnnc.loops.build import add, const, loop_nest
from cnnc.loops.ir import Assign, Const, For, Load, Local, LoopFunction, Store, Var
from cnnc.ops import registry
from cnnc.ops.lowering import view
from cnnc.ops.registry import Fusion, OpDef, ParamDef, ShapeContext, Slot
from cnnc.schedule import reduction


def _shape(ctx: ShapeContext) -> dict:
    return {ctx.node.output: ctx.x, ctx.node.inputs[1]: (ctx.x[1],)}


def _reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x, bias = args
    return x + bias.reshape((1, -1) + (1,) * (x.ndim - 2))


def _gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x, bias = node.inputs
    return [(x, dy), (bias, b.op("bias_grad", (dy,), bias, node))]


def _channel_view(program, name: str, is_output: bool = False):
    """N x C x (everything after C): the per-channel positions of one sample in a row."""
    shape = program.graph.tensor(name).shape
    return view(program, name, (shape[0], shape[1], math.prod(shape[2:])), is_output)


def _lower(kernel, program) -> LoopFunction:
    """A bias that follows no conv or dense op: a kernel of its own."""
    x, bias = _channel_view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    out = _channel_view(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("c"), Var("s"))
    value = add(Load(x.name, where), Load(bias.name, (Var("c"),)))
    nest = loop_nest(["n", "c", "s"], [Var(BATCH), x.shape[1], x.shape[2]],
                     (Store(out.name, where, value),))
    return LoopFunction(kernel.name, (x, bias, out), (), (nest,))


def _lower_grad(kernel, program) -> LoopFunction:
    """db[f] = Σ over the batch and every position of dy[n, f, ...]."""
    dy = _channel_view(program, kernel.inputs[0])
    db = view(program, kernel.outputs[0], is_output=True)
    reduce = loop_nest(["n", "s"], [Var(BATCH), dy.shape[2]],
                       (Assign("acc", add(Var("acc"),
                                          Load(dy.name, (Var("n"), Var("f"), Var("s"))))),))
    body = (Assign("acc", Const(0.0, True)), reduce, Store(db.name, (Var("f"),), Var("acc")))
    return LoopFunction(kernel.name, (dy, db), (Local("acc", db.dtype),),
                        (For("f", const(dy.shape[1]), body),))


registry.register(OpDef(
    "bias_add", "x + b, b per channel (axis 1)", inputs=("x",),
    params=(ParamDef("bias", registry.zeros),), shape=_shape, reference=_reference,
    gradient=_gradient, fusion=Fusion.EPILOGUE, slot=Slot.BIAS, kernel_tag="bias",
    lower=_lower,
    example="input: 3x4x4\nconv c: 2 3x3\ndense d: 3\nloss mse"))
registry.register(OpDef(
    "bias_grad", "(dy,) -> db: dy summed over all but axis 1", inputs=("dy",),
    shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: args[0].sum(
        axis=tuple(a for a in range(args[0].ndim) if a != 1)),
    lower=_lower_grad, schedule=reduction.bias_grad))
