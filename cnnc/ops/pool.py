"""Max and average pooling and their gradients: the `maxpool` and `avgpool` statements.

Max pooling pads with −∞, lets NaN through, and records in `LAYER.argmax` (int32) the flat
position h·W + w of each maximum, which its gradient scatters δ to; the first in-bounds
position of a window is always taken, a later one only where it is larger or NaN. Average
pooling divides by the whole window, padding counted as zeros (PyTorch's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnc.frontend.options import OptionSpec, padding, stride
from cnnc.graph.ir import DType, Node, Window
from cnnc.loops.build import add, const, extent_expr, guarded, loop_nest, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Const,
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
from cnnc.ops.lowering import buffer, view, zero_fill
from cnnc.ops.registry import Fusion, LayerDef, OpDef, OutputDef, ShapeContext, Step
from cnnc.ops.window import format_window, input_size, patches, window_position, windowed_shape
from cnnc.schedule import pooling


@dataclass(frozen=True, slots=True)
class PoolAttrs:
    window: Window

    def text(self) -> str:
        return f" {format_window(self.window)}"


OPTIONS = {"stride": OptionSpec(stride, None), "pad": OptionSpec(padding, (0, 0))}


def _steps_of(op: str):
    def steps(stmt, ctx) -> list[Step]:
        window = ctx.kernel(stmt.window, "the window")
        values = ctx.options(stmt.options, OPTIONS)
        pad = values["pad"]
        if pad == "same":
            ctx.error(f"{ctx.owner}: pad=same is for conv layers; give a pooling layer pad=P",
                      ctx.option_span("pad"))
            pad = (0, 0)
        elif pad[0] > window[0] // 2 or pad[1] > window[1] // 2:
            ctx.error(f"{ctx.owner}: pad={pad[0]}x{pad[1]} is more than half the window "
                      f"{window[0]}x{window[1]}; at most {window[0] // 2}x{window[1] // 2}",
                      ctx.option_span("pad"))
        return [Step(op, PoolAttrs(Window(window, values["stride"] or window, pad)), "pool")]

    return steps


def _shape(ctx: ShapeContext) -> dict:
    out = windowed_shape(ctx, ctx.node.attrs.window, ctx.x[1])
    return dict.fromkeys(ctx.node.outputs, out)  # max pooling's argmax is shaped alike


# -- maxpool2d: x -> (y, argmax) ------------------------------------------------------------

def maxpool2d(x: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """(maxima, argmax): argmax is the flat index h·W + w of the maximum in its input plane.

    Window positions are visited row by row; a later position wins only if strictly larger
    or NaN, and the first in-bounds position is always taken (so a window of −∞ has one).
    """
    (sh, sw), (ph, pw) = window.stride, window.pad
    height, width = x.shape[2], x.shape[3]
    best = argmax = None
    for kh, kw, patch in patches(x, window, -np.inf):
        rows = np.arange(patch.shape[2]) * sh + kh - ph
        cols = np.arange(patch.shape[3]) * sw + kw - pw
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None]
        index = rows[:, None] * width + cols[None, :]
        if best is None:
            best = np.full(patch.shape, -np.inf, dtype=x.dtype)
            argmax = np.full(patch.shape, -1, dtype=np.int32)
        take = inside & ((argmax < 0) | (patch > best) | np.isnan(patch))
        best = np.where(take, patch, best)
        argmax = np.where(take, np.broadcast_to(index, patch.shape), argmax).astype(np.int32)
    return best, argmax


def _maxpool_gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x = node.inputs[0]
    return [(x, b.op("maxpool2d_grad", (dy, node.outputs[1]), x, node, node.attrs))]


def _lower_maxpool(kernel, program) -> LoopFunction:
    """The first in-bounds position is always taken, later ones when larger or NaN; the
    value is the NaN-propagating maximum, which is the value at that position."""
    x = buffer(program, kernel.inputs[0])
    out = buffer(program, kernel.outputs[0], is_output=True)
    argmax = buffer(program, kernel.outputs[1], is_output=True)
    ih, iw, inside = window_position(kernel.window, x.shape[2], x.shape[3])
    value = Var("value")
    take = Binary(BinOp.OR, Binary(BinOp.OR, Binary(BinOp.LT, Var("index"), const(0)),
                                   Binary(BinOp.GT, value, Var("best"))),
                  Unary(UnaryOp.ISNAN, value))
    # selects, not a branch: which element wins is data, and mispredicted branches cost
    # more than the comparison
    visit = (Assign("value", Load(x.name, (Var("n"), Var("c"), ih, iw))),
             Assign("index", Select(take, add(mul(ih, const(x.shape[3])), iw), Var("index"))),
             Assign("best", Binary(BinOp.MAX, Var("best"), value)))
    window = loop_nest(["kh", "kw"], list(kernel.window.kernel), guarded(inside, visit))
    where = (Var("n"), Var("c"), Var("oh"), Var("ow"))
    body = (Assign("best", Const(-math.inf, True)), Assign("index", const(-1)), window,
            Store(out.name, where, Var("best")), Store(argmax.name, where, Var("index")))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in out.shape], body)
    locals_ = (Local("best", out.dtype), Local("value", out.dtype), Local("index", DType.I64))
    return LoopFunction(kernel.name, (x, out, argmax), locals_, (nest,))


def maxpool2d_grad(dy: np.ndarray, argmax: np.ndarray, window: Window,
                   input_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Each δ goes to where the forward pass found the maximum; the rest of the window gets 0."""
    n, c = dy.shape[:2]
    height, width = input_shape[2:] if input_shape else input_size(dy, window)
    grad = np.zeros((n, c, height * width), dtype=dy.dtype)
    rows = np.arange(n)[:, None, None]
    chans = np.arange(c)[None, :, None]
    np.add.at(grad, (rows, chans, argmax.reshape(n, c, -1)), dy.reshape(n, c, -1))
    return grad.reshape(n, c, height, width)


def _lower_maxpool_grad(kernel, program) -> LoopFunction:
    """dx = 0, then each δ added at its window's argmax (overlapping windows accumulate)."""
    dy, argmax = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    out_shape = program.graph.tensor(kernel.outputs[0]).shape
    dx = view(program, kernel.outputs[0], (out_shape[0], out_shape[1],
                                           out_shape[2] * out_shape[3]), is_output=True)
    where = (Var("n"), Var("c"), Var("oh"), Var("ow"))
    target = (Var("n"), Var("c"), Load(argmax.name, where))
    scatter = Store(dx.name, target, add(Load(dx.name, target), Load(dy.name, where)))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in dy.shape], (scatter,))
    return LoopFunction(kernel.name, (dy, argmax, dx), (), (zero_fill(dx), nest))


# -- avgpool2d: x -> y ----------------------------------------------------------------------

def avgpool2d(x: np.ndarray, window: Window) -> np.ndarray:
    """The mean over the whole window, padding counted as zeros (PyTorch's default)."""
    total = None
    for _, _, patch in patches(x, window, 0.0):
        total = patch.copy() if total is None else total + patch
    return total / (window.kernel[0] * window.kernel[1])


def _avgpool_gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x = node.inputs[0]
    return [(x, b.op("avgpool2d_grad", (dy,), x, node, node.attrs))]


def _lower_avgpool(kernel, program) -> LoopFunction:
    x = buffer(program, kernel.inputs[0])
    out = buffer(program, kernel.outputs[0], is_output=True)
    ih, iw, inside = window_position(kernel.window, x.shape[2], x.shape[3])
    accumulate = Assign("acc", add(Var("acc"), Load(x.name, (Var("n"), Var("c"), ih, iw))))
    window = loop_nest(["kh", "kw"], list(kernel.window.kernel), guarded(inside, (accumulate,)))
    area = Const(float(kernel.window.kernel[0] * kernel.window.kernel[1]), True)
    body = (Assign("acc", Const(0.0, True)), window,
            Store(out.name, (Var("n"), Var("c"), Var("oh"), Var("ow")),
                  Binary(BinOp.DIV, Var("acc"), area)))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in out.shape], body)
    return LoopFunction(kernel.name, (x, out), (Local("acc", out.dtype),), (nest,))


def avgpool2d_grad(dy: np.ndarray, window: Window,
                   input_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Each δ, divided by k·k, goes to every position of its window."""
    (kh_size, kw_size), (sh, sw), (ph, pw) = window.kernel, window.stride, window.pad
    n, c, out_h, out_w = dy.shape
    height, width = input_shape[2:] if input_shape else input_size(dy, window)
    padded = np.zeros((n, c, height + 2 * ph, width + 2 * pw), dtype=dy.dtype)
    share = dy / (kh_size * kw_size)
    for kh in range(kh_size):
        for kw in range(kw_size):
            padded[:, :, kh:kh + sh * (out_h - 1) + 1:sh, kw:kw + sw * (out_w - 1) + 1:sw] += share
    return padded[:, :, ph:ph + height, pw:pw + width]


def _lower_avgpool_grad(kernel, program) -> LoopFunction:
    dy = view(program, kernel.inputs[0])
    dx = view(program, kernel.outputs[0], is_output=True)
    window = kernel.window
    ih, iw, inside = window_position(window, dx.shape[2], dx.shape[3])
    area = Const(float(window.kernel[0] * window.kernel[1]), True)
    target = (Var("n"), Var("c"), ih, iw)
    share = Binary(BinOp.DIV, Load(dy.name, (Var("n"), Var("c"), Var("oh"), Var("ow"))), area)
    accumulate = Store(dx.name, target, add(Load(dx.name, target), share))
    spread = loop_nest(["kh", "kw"], list(window.kernel), guarded(inside, (accumulate,)))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in dy.shape], (spread,))
    return LoopFunction(kernel.name, (dy, dx), (), (zero_fill(dx), nest))


WINDOW_WORDS = (("DIMS", "a window size like 2x2"),)
registry.register_layer(LayerDef("maxpool", _steps_of("maxpool2d"), WINDOW_WORDS))
registry.register_layer(LayerDef("avgpool", _steps_of("avgpool2d"), WINDOW_WORDS))
registry.register(OpDef(
    "maxpool2d", "the maximum of each window, and where it was", inputs=("x",),
    outputs=(OutputDef("argmax", DType.I32),), shape=_shape,
    reference=lambda node, args, shape, mode: maxpool2d(args[0], node.attrs.window),
    gradient=_maxpool_gradient, fusion=Fusion.POOL, pool_tag="maxpool", lower=_lower_maxpool,
    pool_schedule=pooling.maxpool_in_anchor,
    example="input: 2x7x7\nconv c: 2 1x1\nmaxpool p: 3x3 stride=2 pad=1\nloss mse"))
registry.register(OpDef(
    "maxpool2d_grad", "(dy, argmax) -> dx: each δ to where its window's maximum was",
    inputs=("dy", "argmax"), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: maxpool2d_grad(
        args[0], args[1], node.attrs.window, shape),
    lower=_lower_maxpool_grad))
registry.register(OpDef(
    "avgpool2d", "the mean of each window, padding counted as zeros", inputs=("x",),
    shape=_shape, reference=lambda node, args, shape, mode: avgpool2d(args[0], node.attrs.window),
    gradient=_avgpool_gradient, fusion=Fusion.ALONE, lower=_lower_avgpool,
    example="input: 2x7x7\nconv c: 2 1x1\navgpool p: 3x2 stride=2x1 pad=1\nloss mse"))
registry.register(OpDef(
    "avgpool2d_grad", "(dy,) -> dx: δ / (kh·kw) to every position of its window",
    inputs=("dy",), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: avgpool2d_grad(args[0], node.attrs.window, shape),
    lower=_lower_avgpool_grad))
