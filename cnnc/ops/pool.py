"""Max and average pooling and their gradients: the `maxpool` and `avgpool` statements.

Max pooling pads with −∞, lets NaN through, and records in `LAYER.argmax` (int32) the flat
position h·W + w of each maximum, which its gradient scatters δ to; the first in-bounds
position of a window is always taken, a later one only where it is larger or NaN. Average
pooling divides by the whole window, padding counted as zeros (PyTorch's default), or with
`count_pad=false` by the input positions it covers alone (count_include_pad=False).

`ceil=true` rounds the output size up as PyTorch's ceil_mode: a last window may hang over
the bottom or right edge (it must start inside the input or its top/left padding), and, as
in PyTorch, the part past the padding never counts, so average pooling divides such a
window by its clipped size even where padding counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnc.frontend.options import OptionSpec, boolean, stride, window_padding
from cnnc.graph.ir import DType, Node, Window
from cnnc.loops.build import add, const, extent_expr, guarded, loop_nest, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Const,
    Expr,
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
from cnnc.ops.window import (
    format_window,
    input_size,
    output_size,
    pads,
    patches,
    resolve,
    window_of,
    window_position,
    windowed_shape,
)
from cnnc.schedule import pooling


@dataclass(frozen=True, slots=True)
class PoolAttrs:
    window: Window
    count_pad: bool = True  # average pooling: padding counts in the divisor

    def text(self) -> str:
        return f" {format_window(self.window)}" + ("" if self.count_pad else " count_pad=false")


MAX_OPTIONS = {"stride": OptionSpec(stride, None),
               "pad": OptionSpec(window_padding, (0, 0, 0, 0)),
               "ceil": OptionSpec(boolean, False)}
AVG_OPTIONS = {**MAX_OPTIONS, "count_pad": OptionSpec(boolean, True)}


def _steps_of(op: str, options: dict[str, OptionSpec]):
    def steps(stmt, ctx) -> list[Step]:
        kernel = ctx.kernel(stmt.window, "the window")
        values = ctx.options(stmt.options, options)
        pad = values["pad"]
        if isinstance(pad, tuple) and _more_than_half(pad, kernel):
            pair = f"{pad[0]}x{pad[1]}" if pad[:2] == pad[2:] else "x".join(map(str, pad))
            sides = "" if pad[:2] == pad[2:] else " on each side"
            ctx.error(f"{ctx.owner}: pad={pair} is more than half the window "
                      f"{kernel[0]}x{kernel[1]}; at most {kernel[0] // 2}x{kernel[1] // 2}"
                      f"{sides}", ctx.option_span("pad"))
            pad = (0, 0, 0, 0)
        window = window_of(kernel, values["stride"] or kernel, pad, ceil=values["ceil"])
        return [Step(op, PoolAttrs(window, values.get("count_pad", True)), "pool")]

    return steps


def _more_than_half(pad: tuple[int, int, int, int], kernel: tuple[int, int]) -> bool:
    """PyTorch's rule: a pad beyond half the window would make windows of padding alone."""
    top, left, bottom, right = pad
    return max(top, bottom) > kernel[0] // 2 or max(left, right) > kernel[1] // 2


def _shape(ctx: ShapeContext) -> dict:
    out = windowed_shape(ctx, ctx.node.attrs.window, ctx.x[1])
    return dict.fromkeys(ctx.node.outputs, out)  # max pooling's argmax is shaped alike


# -- maxpool2d: x -> (y, argmax) ------------------------------------------------------------

def maxpool2d(x: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """(maxima, argmax): argmax is the flat index h·W + w of the maximum in its input plane.

    Window positions are visited row by row; a later position wins only if strictly larger
    or NaN, and the first in-bounds position is always taken (so a window of −∞ has one).
    """
    height, width = x.shape[2], x.shape[3]
    (sh, sw), (top, left) = window.stride, resolve(window, height, width).pad[:2]
    best = argmax = None
    for kh, kw, patch in patches(x, window, -np.inf):
        rows = np.arange(patch.shape[2]) * sh + kh - top
        cols = np.arange(patch.shape[3]) * sw + kw - left
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

def _counts(size: int, kernel: int, stride: int, before: int, after: int, out: int,
            count_pad: bool) -> list[int]:
    """Per output position of one axis, how many of its window's positions the divisor
    counts: those inside the padded input (PyTorch's count_include_pad), or inside the input
    alone; never those of a ceil-mode window past the padding."""
    low, high = (-before, size + after) if count_pad else (0, size)
    return [min(o * stride - before + kernel, high) - max(o * stride - before, low)
            for o in range(out)]


def _axis_counts(window: Window, height: int, width: int, count_pad: bool) -> list[list[int]]:
    """_counts of the rows and of the columns."""
    out = output_size(height, width, window)
    top, left, bottom, right = pads(window, height, width)
    return [_counts(size, window.kernel[axis], window.stride[axis], before, after,
                    out[axis], count_pad)
            for axis, (size, before, after) in enumerate(((height, top, bottom),
                                                           (width, left, right)))]


def _divisor(window: Window, height: int, width: int, count_pad: bool, dtype) -> np.ndarray:
    rows, cols = _axis_counts(window, height, width, count_pad)
    return np.outer(rows, cols).astype(dtype)


def avgpool2d(x: np.ndarray, window: Window, count_pad: bool = True) -> np.ndarray:
    """The mean over each window: its sum, padding counted as zeros, over the positions it
    counts (the whole window where padding counts and it does not hang past the padding)."""
    total = None
    for _, _, patch in patches(x, window, 0.0):
        total = patch.copy() if total is None else total + patch
    return total / _divisor(window, x.shape[2], x.shape[3], count_pad, x.dtype)


def _avgpool_gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x = node.inputs[0]
    return [(x, b.op("avgpool2d_grad", (dy,), x, node, node.attrs))]


def _axis_count_expr(counts: list[int], var: str, kernel: int, stride: int, before: int,
                     low: int, high: int) -> Expr:
    """The count of output position `var`, as a constant where every position has one."""
    if len(set(counts)) == 1:
        return const(counts[0])
    start = Binary(BinOp.SUB, mul(Var(var), const(stride)), const(before))
    end = add(start, const(kernel))
    clipped_end = Select(Binary(BinOp.LT, end, const(high)), end, const(high))
    clipped_start = Select(Binary(BinOp.LT, start, const(low)), const(low), start)
    return Binary(BinOp.SUB, clipped_end, clipped_start)


def _divisor_expr(window: Window, height: int, width: int, count_pad: bool) -> Expr:
    """The divisor of output (oh, ow): k·k as before where every window has it, else the
    product of the clipped row and column counts."""
    rows, cols = _axis_counts(window, height, width, count_pad)
    if len(set(rows)) == 1 and len(set(cols)) == 1:
        return Const(float(rows[0] * cols[0]), True)
    top, left, bottom, right = pads(window, height, width)
    axes = []
    for counts, var, axis, before, after, size in ((rows, "oh", 0, top, bottom, height),
                                                   (cols, "ow", 1, left, right, width)):
        low, high = (-before, size + after) if count_pad else (0, size)
        axes.append(_axis_count_expr(counts, var, window.kernel[axis], window.stride[axis],
                                     before, low, high))
    return Unary(UnaryOp.FLOAT, mul(axes[0], axes[1]))


def _lower_avgpool(kernel, program) -> LoopFunction:
    x = buffer(program, kernel.inputs[0])
    out = buffer(program, kernel.outputs[0], is_output=True)
    ih, iw, inside = window_position(kernel.window, x.shape[2], x.shape[3])
    accumulate = Assign("acc", add(Var("acc"), Load(x.name, (Var("n"), Var("c"), ih, iw))))
    window = loop_nest(["kh", "kw"], list(kernel.window.kernel), guarded(inside, (accumulate,)))
    area = _divisor_expr(kernel.window, x.shape[2], x.shape[3], kernel.node.attrs.count_pad)
    body = (Assign("acc", Const(0.0, True)), window,
            Store(out.name, (Var("n"), Var("c"), Var("oh"), Var("ow")),
                  Binary(BinOp.DIV, Var("acc"), area)))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in out.shape], body)
    return LoopFunction(kernel.name, (x, out), (Local("acc", out.dtype),), (nest,))


def avgpool2d_grad(dy: np.ndarray, window: Window,
                   input_shape: tuple[int, ...] | None = None,
                   count_pad: bool = True) -> np.ndarray:
    """Each δ, divided by its window's divisor, goes to every position of its window."""
    n, c, out_h, out_w = dy.shape
    height, width = input_shape[2:] if input_shape else input_size(dy, window)
    share = dy / _divisor(window, height, width, count_pad, dy.dtype)
    window = resolve(window, height, width)
    (kh_size, kw_size), (sh, sw) = window.kernel, window.stride
    top, left, bottom, right = window.pad
    padded = np.zeros((n, c, height + top + bottom, width + left + right), dtype=dy.dtype)
    for kh in range(kh_size):
        for kw in range(kw_size):
            padded[:, :, kh:kh + sh * (out_h - 1) + 1:sh, kw:kw + sw * (out_w - 1) + 1:sw] += share
    return padded[:, :, top:top + height, left:left + width]


def _lower_avgpool_grad(kernel, program) -> LoopFunction:
    dy = view(program, kernel.inputs[0])
    dx = view(program, kernel.outputs[0], is_output=True)
    window = kernel.window
    ih, iw, inside = window_position(window, dx.shape[2], dx.shape[3])
    area = _divisor_expr(window, dx.shape[2], dx.shape[3], kernel.node.attrs.count_pad)
    target = (Var("n"), Var("c"), ih, iw)
    share = Binary(BinOp.DIV, Load(dy.name, (Var("n"), Var("c"), Var("oh"), Var("ow"))), area)
    accumulate = Store(dx.name, target, add(Load(dx.name, target), share))
    spread = loop_nest(["kh", "kw"], list(window.kernel), guarded(inside, (accumulate,)))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in dy.shape], (spread,))
    return LoopFunction(kernel.name, (dy, dx), (), (zero_fill(dx), nest))


WINDOW_WORDS = (("DIMS", "a window size like 2x2"),)
registry.register_layer(LayerDef("maxpool", _steps_of("maxpool2d", MAX_OPTIONS), WINDOW_WORDS))
registry.register_layer(LayerDef("avgpool", _steps_of("avgpool2d", AVG_OPTIONS), WINDOW_WORDS))
registry.register(OpDef(
    "maxpool2d", "the maximum of each window, and where it was", inputs=("x",),
    outputs=(OutputDef("argmax", DType.I32),), shape=_shape,
    reference=lambda node, args, shape, mode: maxpool2d(args[0], node.attrs.window),
    gradient=_maxpool_gradient, fusion=Fusion.POOL, pool_tag="maxpool", lower=_lower_maxpool,
    pool_schedule=pooling.maxpool_in_anchor,
    example="input: 2x7x7\nconv c: 2 1x1\nmaxpool p: 3x3 stride=2 pad=1\n"
            "maxpool q: 3x3 stride=2 ceil=true\nloss mse"))
registry.register(OpDef(
    "maxpool2d_grad", "(dy, argmax) -> dx: each δ to where its window's maximum was",
    inputs=("dy", "argmax"), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: maxpool2d_grad(
        args[0], args[1], node.attrs.window, shape),
    lower=_lower_maxpool_grad))
registry.register(OpDef(
    "avgpool2d", "the mean of each window, padding counted as zeros", inputs=("x",),
    shape=_shape, reference=lambda node, args, shape, mode: avgpool2d(
        args[0], node.attrs.window, node.attrs.count_pad),
    gradient=_avgpool_gradient, fusion=Fusion.ALONE, lower=_lower_avgpool,
    example="input: 2x7x7\nconv c: 2 1x1\navgpool p: 3x2 stride=2x1 pad=1\n"
            "avgpool q: 3x3 stride=2 pad=0x1x0x0 ceil=true count_pad=false\nloss mse"))
registry.register(OpDef(
    "avgpool2d_grad", "(dy,) -> dx: δ / its window's divisor to every position of its window",
    inputs=("dy",), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: avgpool2d_grad(
        args[0], node.attrs.window, shape, node.attrs.count_pad),
    lower=_lower_avgpool_grad))
