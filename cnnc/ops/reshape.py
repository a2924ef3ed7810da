"""flatten (the `flatten` statement: N x C x H x W -> N x C·H·W) and reshape (its gradient,
back to the input's shape). Neither is a kernel: NCHW is contiguous, so each output is a
second name for its input's memory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnc.graph.ir import BATCH, Node
from cnnc.ops import registry
from cnnc.ops.registry import Fusion, LayerDef, OpDef, ShapeContext, Step


@dataclass(frozen=True, slots=True)
class ReshapeAttrs:
    """The per-sample shape a reshape produces (the backward of flatten)."""

    shape: tuple[int, ...]

    def text(self) -> str:
        return ""  # the result's shape is printed with it anyway


def _flatten_gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x = node.inputs[0]
    shape = tuple(b.graph.tensor(x).shape[1:])
    return [(x, b.op("reshape", (dy,), x, node, ReshapeAttrs(shape)))]


def _flatten_shape(ctx: ShapeContext) -> dict:
    return {ctx.node.output: (BATCH, math.prod(ctx.x[1:]))}


registry.register_layer(LayerDef("flatten", lambda stmt, ctx: [Step("flatten", suffix="flat")]))
registry.register(OpDef(
    "flatten", "N x C x H x W -> N x C·H·W", inputs=("x",), shape=_flatten_shape,
    reference=lambda node, args, shape, mode: args[0].reshape(args[0].shape[0], -1),
    gradient=_flatten_gradient, fusion=Fusion.ALIAS,
    example="input: 2x3x3\nconv c: 2 2x2\nflatten\ndense d: 3\nloss mse"))
registry.register(OpDef(
    "reshape", "(dy,) -> dy shaped like the flatten's input", inputs=("dy",),
    shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALIAS,
    reference=lambda node, args, shape, mode: np.reshape(args[0], shape)))
