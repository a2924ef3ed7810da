"""Nearest-neighbour upsampling by whole factors, the `upsample FHxFW` statement: each value
becomes an FH x FW block of copies (torch.nn.Upsample(scale_factor=..., mode='nearest')).
Its gradient sums δ over each block."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnc.frontend.options import MAX_SIZE
from cnnc.graph.ir import BATCH, Node
from cnnc.loops.build import add, const, extent_expr, loop_nest, mul
from cnnc.loops.ir import Assign, Binary, BinOp, Const, Expr, Load, Local, LoopFunction, Store, Var
from cnnc.ops import registry
from cnnc.ops.lowering import view
from cnnc.ops.registry import Fusion, LayerDef, OpDef, ShapeContext, ShapeProblem, Step
from cnnc.ops.window import sample


@dataclass(frozen=True, slots=True)
class UpsampleAttrs:
    factor: tuple[int, int]  # rows, columns

    def text(self) -> str:
        return f" factor={self.factor[0]}x{self.factor[1]}"


def _steps(stmt, ctx) -> list[Step]:
    ctx.options(stmt.options, {})
    return [Step("upsample_nearest", UpsampleAttrs(_factor(stmt.factor, ctx)), "up")]


def _factor(dims, ctx) -> tuple[int, int]:
    """FH x FW, two whole numbers of at least 1; a bad factor is reported and taken as 1x1."""
    values = dims.values
    if len(values) != 2:
        ctx.error(f"{ctx.owner}: the factor must be two numbers FHxFW like 2x2, got "
                  f"{dims.text}", dims.span)
    elif min(values) < 1:
        ctx.error(f"{ctx.owner}: each factor must be at least 1, got {dims.text}", dims.span)
    elif max(values) > MAX_SIZE:
        ctx.error(f"{ctx.owner}: each factor must be at most {MAX_SIZE}, got {dims.text}",
                  dims.span)
    else:
        return values[0], values[1]
    return 1, 1


def _shape(ctx: ShapeContext) -> dict:
    x, (fh, fw) = ctx.x, ctx.node.attrs.factor
    if len(x) != 4:
        raise ShapeProblem(f"{ctx.subject} needs a CxHxW input, but {ctx.sources[0]} gives "
                           f"{sample(x)}")
    return {ctx.node.output: (BATCH, x[1], x[2] * fh, x[3] * fw)}


def _reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    fh, fw = node.attrs.factor
    return args[0].repeat(fh, axis=2).repeat(fw, axis=3)


def _source(var: str, factor: int) -> Expr:
    """The input row (column) output row `var` copies: var // factor."""
    return Var(var) if factor == 1 else Binary(BinOp.FLOOR_DIV, Var(var), const(factor))


def _lower(kernel, program) -> LoopFunction:
    """out[n, c, oh, ow] = x[n, c, oh // FH, ow // FW]: every store independent."""
    x = view(program, kernel.inputs[0])
    out = view(program, kernel.outputs[0], is_output=True)
    fh, fw = kernel.node.attrs.factor
    value = Load(x.name, (Var("n"), Var("c"), _source("oh", fh), _source("ow", fw)))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in out.shape],
                     (Store(out.name, (Var("n"), Var("c"), Var("oh"), Var("ow")), value),))
    return LoopFunction(kernel.name, (x, out), (), (nest,))


def _gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x = node.inputs[0]
    return [(x, b.op("upsample_nearest_grad", (dy,), x, node, node.attrs))]


def _grad_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    (fh, fw), dy = node.attrs.factor, args[0]
    n, c, height, width = shape
    return dy.reshape(n, c, height, fh, width, fw).sum(axis=(3, 5))


def _lower_grad(kernel, program) -> LoopFunction:
    """dx[n, c, h, w] = Σ over the block's i, j of dy[n, c, h·FH + i, w·FW + j]."""
    dy = view(program, kernel.inputs[0])
    dx = view(program, kernel.outputs[0], is_output=True)
    fh, fw = kernel.node.attrs.factor
    row = add(mul(Var("h"), const(fh)), Var("i")) if fh > 1 else Var("h")
    col = add(mul(Var("w"), const(fw)), Var("j")) if fw > 1 else Var("w")
    term = Load(dy.name, (Var("n"), Var("c"), row, col))
    block = loop_nest(["i", "j"], [fh, fw], (Assign("acc", add(Var("acc"), term)),))
    body = (Assign("acc", Const(0.0, True)), block,
            Store(dx.name, (Var("n"), Var("c"), Var("h"), Var("w")), Var("acc")))
    nest = loop_nest(["n", "c", "h", "w"], [extent_expr(d) for d in dx.shape], body)
    return LoopFunction(kernel.name, (dy, dx), (Local("acc", dx.dtype),), (nest,))


registry.register_layer(LayerDef("upsample", _steps, (("DIMS", "a factor like 2x2"),)))
registry.register(OpDef(
    "upsample_nearest", "each value copied to an FH x FW block (nearest neighbour)",
    inputs=("x",), shape=_shape, reference=_reference, gradient=_gradient,
    fusion=Fusion.ALONE, kernel_tag="upsample", lower=_lower,
    example="input x: 2x3x2\nconv c: 2 1x1\nupsample 2x3\nconv d: 2 3x3\nloss mse"))
registry.register(OpDef(
    "upsample_nearest_grad", "(dy,) -> dx: the sum of dy over each FH x FW block",
    inputs=("dy",), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_grad_reference, lower=_lower_grad))
