"""Fully connected layers: y = x · Wᵀ on the input flattened to N x features (channel, row,
column order), the `dense` statement, and the two gradients dx = δ · W and dW = δᵀ · x."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnc.frontend.options import OptionSpec, boolean
from cnnc.graph.ir import BATCH, Node
from cnnc.loops.build import add, const, extent_expr, loop_nest, mul
from cnnc.loops.ir import Assign, Const, For, Load, Local, LoopFunction, Store, Var
from cnnc.ops import registry
from cnnc.ops.lowering import activate, buffer, flat, view
from cnnc.ops.registry import Fusion, LayerDef, OpDef, ParamDef, ShapeContext, Step
from cnnc.schedule import product


@dataclass(frozen=True, slots=True)
class DenseAttrs:
    units: int

    def text(self) -> str:
        return f" units={self.units}"


OPTIONS = {"bias": OptionSpec(boolean, True)}


def _steps(stmt, ctx) -> list[Step]:
    units = ctx.count(stmt.units, "the unit count")
    values = ctx.options(stmt.options, OPTIONS)
    steps = [Step("dense", DenseAttrs(units), "matmul")]
    if values["bias"]:
        steps.append(Step("bias_add", suffix="pre"))
    return steps


def _shape(ctx: ShapeContext) -> dict:
    units = ctx.node.attrs.units
    features = math.prod(ctx.x[1:])
    return {ctx.node.output: (BATCH, units), ctx.node.inputs[1]: (units, features)}


def _reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x, weight = args
    return x.reshape(x.shape[0], -1) @ weight.T


def _gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x, w = node.inputs
    return [(x, b.op("dense_grad_input", (dy, w), x, node)),
            (w, b.op("dense_grad_weight", (x, dy), w, node))]


def _flops(graph, node: Node) -> int:
    """2 per multiply-add, one sample."""
    return 2 * math.prod(graph.tensor(node.inputs[1]).shape)


def _lower(kernel, program) -> LoopFunction:
    x = buffer(program, kernel.inputs[0], flat=True)
    weight = buffer(program, kernel.inputs[1])
    out = buffer(program, kernel.outputs[0], is_output=True)
    zero = Const(0.0, True)
    term = mul(Load(x.name, (Var("n"), Var("k"))), Load(weight.name, (Var("u"), Var("k"))))
    reduce = For("k", const(x.shape[1]), (Assign("acc", add(Var("acc"), term)),))
    start = Load(kernel.inputs[2], (Var("u"),)) if kernel.has_bias else zero
    body = (Assign("acc", start), reduce,
            Store(out.name, (Var("n"), Var("u")),
                  activate(kernel.activation, Var("acc"), kernel.activation_attrs)))
    nest = loop_nest(["n", "u"], [extent_expr(d) for d in out.shape], body)
    buffers = (x, weight) + ((buffer(program, kernel.inputs[2]),) if kernel.has_bias else ())
    return LoopFunction(kernel.name, (*buffers, out), (Local("acc", out.dtype),), (nest,))


def _grad_input_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    dy, weight = args
    return (dy @ weight).reshape(shape)


def _lower_grad_input(kernel, program) -> LoopFunction:
    dy, weight = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dx = flat(program, kernel.outputs[0], is_output=True)
    term = mul(Load(dy.name, (Var("n"), Var("u"))), Load(weight.name, (Var("u"), Var("k"))))
    body = (Assign("acc", Const(0.0, True)),
            For("u", const(weight.shape[0]), (Assign("acc", add(Var("acc"), term)),)),
            Store(dx.name, (Var("n"), Var("k")), Var("acc")))
    nest = loop_nest(["n", "k"], [Var(BATCH), dx.shape[1]], body)
    return LoopFunction(kernel.name, (dy, weight, dx), (Local("acc", dx.dtype),), (nest,))


def _grad_weight_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x, dy = args
    return dy.T @ x.reshape(x.shape[0], -1)


def _lower_grad_weight(kernel, program) -> LoopFunction:
    x, dy = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dw = view(program, kernel.outputs[0], is_output=True)
    term = mul(Load(dy.name, (Var("n"), Var("u"))), Load(x.name, (Var("n"), Var("k"))))
    body = (Assign("acc", Const(0.0, True)),
            For("n", Var(BATCH), (Assign("acc", add(Var("acc"), term)),)),
            Store(dw.name, (Var("u"), Var("k")), Var("acc")))
    nest = loop_nest(["u", "k"], list(dw.shape), body)
    return LoopFunction(kernel.name, (x, dy, dw), (Local("acc", dw.dtype),), (nest,))


registry.register_layer(LayerDef("dense", _steps, (("INT", "a unit count like 120"),)))
registry.register(OpDef(
    "dense", "x · Wᵀ on x flattened to N x features", inputs=("x",),
    params=(ParamDef("weight", registry.fan_scaled),), shape=_shape, reference=_reference,
    gradient=_gradient, fusion=Fusion.ANCHOR, kernel_tag="dense", lower=_lower,
    schedule=product.dense_forward, flops=_flops,
    example="input: 2x3x3\ndense d: 4 bias=false\nloss mse"))
registry.register(OpDef(
    "dense_grad_input", "(dy, w) -> dx = dy · W, shaped like x", inputs=("dy", "w"),
    shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_grad_input_reference, lower=_lower_grad_input,
    schedule=product.dense_grad_input))
registry.register(OpDef(
    "dense_grad_weight", "(x, dy) -> dw = dyᵀ · x", inputs=("x", "dy"),
    shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_grad_weight_reference, lower=_lower_grad_weight,
    schedule=product.dense_grad_weight))
