"""Inverted dropout, as torch.nn.Dropout: when training, each value is kept with probability
1 − P and scaled by 1 / (1 − P), else zeroed; at inference it is the identity.

The kernels draw no random numbers: the runtime fills the layer's `noise` tensor with
uniform numbers in [0, 1) for each training call, from a counter-based generator keyed by
the train line's seed and the step (runtime/noise.py), so the mask is the same for any
thread count and on the GPU. A value is kept where its number is at least P.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnc.graph.ir import BATCH, Node, Phase
from cnnc.loops.build import const, loop_nest, mul
from cnnc.loops.ir import Binary, BinOp, Const, Load, LoopFunction, Select, Store, Var
from cnnc.ops import registry
from cnnc.ops.lowering import flat
from cnnc.ops.registry import Fusion, LayerDef, OpDef, ParamDef, ShapeContext, Step


@dataclass(frozen=True, slots=True)
class DropoutAttrs:
    rate: float

    def text(self) -> str:
        return f" p={self.rate!r}"


def _steps(stmt, ctx) -> list[Step]:
    ctx.options(stmt.options, {})
    rate = stmt.rate
    value = getattr(rate, "value", None)  # a number, not a block's $parameter left over
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        ctx.error(f"{ctx.owner}: the dropout rate must be a number from 0 up to (not "
                  f"including) 1, got {rate.text}", rate.span)
        value = 0.0
    return [Step("dropout", DropoutAttrs(float(value)), "drop")]


def _shape(ctx: ShapeContext) -> dict:
    return {ctx.node.output: ctx.x, ctx.node.inputs[1]: ctx.x}


def _keep(noise: np.ndarray, rate: float) -> np.ndarray:
    return (noise >= rate) / (1 - rate)


def _reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    """Training: x where the noise is at least P, scaled by 1 / (1 − P)."""
    x, noise = args
    return x * _keep(noise, node.attrs.rate).astype(x.dtype)


def _reference_grad(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    dy, noise = args
    return dy * _keep(noise, node.attrs.rate).astype(dy.dtype)


def _gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x, noise = node.inputs
    return [(x, b.op("dropout_grad", (dy, noise), x, node, node.attrs))]


def _inference(node: Node, builder) -> list[Node]:
    return [Node("copy", node.inputs[:1], (node.output,), node.layer, node.span, None,
                 Phase.INFERENCE)]


def _lower(kernel, program) -> LoopFunction:
    """y = x · (1 / (1 − P)) where noise ≥ P, else 0: for dropout and its gradient alike."""
    x, noise = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    out = flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("i"))
    rate = kernel.node.attrs.rate
    kept = Binary(BinOp.GE, Load(noise.name, where), const(float(rate)))
    value = Select(kept, mul(Load(x.name, where), const(1.0 / (1.0 - rate))), Const(0.0, True))
    nest = loop_nest(["n", "i"], [Var(BATCH), x.shape[1]], (Store(out.name, where, value),))
    return LoopFunction(kernel.name, (x, noise, out), (), (nest,))


def _lower_copy(kernel, program) -> LoopFunction:
    x, out = flat(program, kernel.inputs[0]), flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("i"))
    nest = loop_nest(["n", "i"], [Var(BATCH), x.shape[1]],
                     (Store(out.name, where, Load(x.name, where)),))
    return LoopFunction(kernel.name, (x, out), (), (nest,))


registry.register_layer(LayerDef("dropout", _steps, (("FLOAT", "a rate like 0.5"),
                                                     ("INT", "a rate like 0.5"))))
registry.register(OpDef(
    "dropout", "training: x / (1 − P) where the noise is at least P, else 0", inputs=("x",),
    params=(ParamDef("noise", None, "noise"),), shape=_shape, reference=_reference,
    gradient=_gradient, fusion=Fusion.ALONE, kernel_tag="dropout", lower=_lower,
    inference=_inference,
    example="input: 2x3x3\nconv c: 2 2x2\ndropout 0.5\nflatten\ndense d: 3\nloss mse"))
registry.register(OpDef(
    "dropout_grad", "(dy, noise) -> dx: dy where the value was kept, scaled alike",
    inputs=("dy", "noise"), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_reference_grad, lower=_lower))
registry.register(OpDef(
    "copy", "x: a value as it is (dropout at inference)", inputs=("x",),
    shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE, kernel_tag="copy",
    reference=lambda node, args, shape, mode: args[0].copy(), lower=_lower_copy))
