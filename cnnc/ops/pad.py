"""Constant padding of height and width, the `pad NAME: P|PHxPW|TxLxBxR [value=V]` statement:
a C x H x W tensor becomes C x (T + H + B) x (L + W + R), the new rows and columns V (0 by
default), as torch's F.pad(x, (L, R, T, B), value=V) and ONNX's Pad in constant mode. The
sizes are written as conv's `pad=` option writes them. Its gradient is the interior of δ."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnc.frontend.options import MAX_SIZE, OptionError, OptionSpec
from cnnc.graph.ir import BATCH, Node
from cnnc.loops.build import add, extent_expr, loop_nest
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Const,
    Expr,
    If,
    Load,
    Local,
    LoopFunction,
    Store,
    Var,
)
from cnnc.ops import registry
from cnnc.ops.lowering import view
from cnnc.ops.registry import Fusion, LayerDef, OpDef, ShapeContext, ShapeProblem, Step
from cnnc.ops.window import sample


@dataclass(frozen=True, slots=True)
class PadAttrs:
    """The rows and columns added on each side, (top, left, bottom, right) as a Window's pad,
    and the value they hold."""

    pads: tuple[int, int, int, int]
    value: float = 0.0

    def text(self) -> str:
        return f" pad={'x'.join(map(str, self.pads))} value={self.value!r}"


def _finite_number(value) -> float:
    number = getattr(value, "value", None)  # a Number of the syntax tree, not a word
    if not isinstance(number, (int, float)):
        raise OptionError(f"a number like 0 or -1.5, got {value.text}")
    if not math.isfinite(number):
        raise OptionError(f"a finite number, got {value.text}")
    return float(number)


OPTIONS = {"value": OptionSpec(_finite_number, 0.0)}


def _steps(stmt, ctx) -> list[Step]:
    values = ctx.options(stmt.options, OPTIONS)
    return [Step("pad2d", PadAttrs(_pads(stmt.pads, ctx), values["value"]), "pad")]


def _pads(written, ctx) -> tuple[int, int, int, int]:
    """P (every side), PHxPW (top and bottom, left and right) or TxLxBxR; a bad one is
    reported and taken as no padding."""
    number, dims = getattr(written, "value", None), getattr(written, "values", None)
    if isinstance(number, int):  # `pad p: 1`
        sizes = (number,) * 4
    elif dims is not None and len(dims) in (2, 4):  # 1x2, 0x0x1x1
        sizes = tuple(dims) * (4 // len(dims))
    else:
        ctx.error(f"{ctx.owner}: the padding must be P, PHxPW or TxLxBxR (top, left, bottom, "
                  f"right) like 1, 1x2 or 0x0x1x1, got {written.text}", written.span)
        return 0, 0, 0, 0
    if min(sizes) < 0:
        ctx.error(f"{ctx.owner}: each pad must be at least 0, got {written.text}", written.span)
    elif max(sizes) > MAX_SIZE:
        ctx.error(f"{ctx.owner}: each pad must be at most {MAX_SIZE}, got {written.text}",
                  written.span)
    else:
        return sizes[0], sizes[1], sizes[2], sizes[3]
    return 0, 0, 0, 0


def _shape(ctx: ShapeContext) -> dict:
    x, (top, left, bottom, right) = ctx.x, ctx.node.attrs.pads
    if len(x) != 4:
        raise ShapeProblem(f"{ctx.subject} needs a CxHxW input, but {ctx.sources[0]} gives "
                           f"{sample(x)}")
    if min(ctx.node.attrs.pads) < 0:
        raise ShapeProblem(f"{ctx.subject}: each pad must be at least 0, got "
                           f"{'x'.join(map(str, ctx.node.attrs.pads))}")
    return {ctx.node.output: (BATCH, x[1], top + x[2] + bottom, left + x[3] + right)}


def _reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x, (top, left, bottom, right) = args[0], node.attrs.pads
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)),
                  constant_values=x.dtype.type(node.attrs.value))


def _shifted(var: str, by: int) -> Expr:
    return Binary(BinOp.SUB, Var(var), Const(by, False)) if by else Var(var)


def _lower(kernel, program) -> LoopFunction:
    """out[n, c, oh, ow] = x[n, c, oh − T, ow − L] where that is inside x, else V: a guarded
    load, so no index outside x is read."""
    x = view(program, kernel.inputs[0])
    out = view(program, kernel.outputs[0], is_output=True)
    attrs = kernel.node.attrs
    top, left = attrs.pads[:2]
    ih, iw = _shifted("oh", top), _shifted("ow", left)
    tests = [Binary(BinOp.AND, Binary(BinOp.GE, index, Const(0, False)),
                    Binary(BinOp.LT, index, Const(size, False)))
             for index, size, padded in ((ih, x.shape[2], top or attrs.pads[2]),
                                         (iw, x.shape[3], left or attrs.pads[3])) if padded]
    where = (Var("n"), Var("c"), Var("oh"), Var("ow"))
    read = Assign("v", Load(x.name, (Var("n"), Var("c"), ih, iw)))
    body: tuple = (read,)
    if tests:
        inside = tests[0] if len(tests) == 1 else Binary(BinOp.AND, *tests)
        body = (Assign("v", Const(float(attrs.value), True)), If(inside, (read,)))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in out.shape],
                     (*body, Store(out.name, where, Var("v"))))
    return LoopFunction(kernel.name, (x, out), (Local("v", out.dtype),), (nest,))


def _gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x = node.inputs[0]
    return [(x, b.op("pad2d_grad", (dy,), x, node, node.attrs))]


def _grad_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    top, left = node.attrs.pads[:2]
    return args[0][:, :, top:top + shape[2], left:left + shape[3]].copy()


def _lower_grad(kernel, program) -> LoopFunction:
    """dx[n, c, h, w] = dy[n, c, h + T, w + L]."""
    dy = view(program, kernel.inputs[0])
    dx = view(program, kernel.outputs[0], is_output=True)
    top, left = kernel.node.attrs.pads[:2]
    source = (Var("n"), Var("c"), add(Var("h"), Const(top, False)),
              add(Var("w"), Const(left, False)))
    nest = loop_nest(["n", "c", "h", "w"], [extent_expr(d) for d in dx.shape],
                     (Store(dx.name, (Var("n"), Var("c"), Var("h"), Var("w")),
                            Load(dy.name, source)),))
    return LoopFunction(kernel.name, (dy, dx), (), (nest,))


registry.register_layer(LayerDef("pad", _steps, (("INT", "a padding like 1, 1x2 or 0x0x1x1"),
                                                 ("DIMS", "a padding like 1, 1x2 or 0x0x1x1"))))
registry.register(OpDef(
    "pad2d", "V added around H and W: T rows on top, L columns left, B below, R right",
    inputs=("x",), shape=_shape, reference=_reference, gradient=_gradient,
    fusion=Fusion.ALONE, kernel_tag="pad", lower=_lower,
    example="input x: 2x3x4\npad p: 1x0x2x1 value=0.5\nconv c: 2 2x2\nloss mse"))
registry.register(OpDef(
    "pad2d_grad", "(dy,) -> dx: the interior of dy, where x was",
    inputs=("dy",), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_grad_reference, lower=_lower_grad))
