"""2-D convolution (cross-correlation, no kernel flip) and its two gradients: the `conv`
statement, shape rule, reference, gradient rule, loop lowering, schedules and FLOPs.

δ^{l-1} = δ^l * rot180(W) is lowered as a gather: each input position sums the δ values
whose windows covered it, found with the divisibility test (ih + P − kh) mod S = 0, so no
dilated δ is ever materialised (cnn-algorithm.md section 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnc.frontend.options import OptionSpec, boolean, padding, stride
from cnnc.graph.ir import Node, Window
from cnnc.loops.build import add, const, extent_expr, guarded, loop_nest, mul
from cnnc.loops.ir import Assign, Binary, BinOp, Const, If, Load, Local, LoopFunction, Store, Var
from cnnc.ops import registry
from cnnc.ops.lowering import activate, buffer, view
from cnnc.ops.registry import Fusion, LayerDef, OpDef, ParamDef, ShapeContext, Step
from cnnc.ops.window import format_window, patches, window_position, windowed_shape
from cnnc.schedule import correlation, filter_gradient


@dataclass(frozen=True, slots=True)
class ConvAttrs:
    filters: int
    window: Window

    def text(self) -> str:
        return f" filters={self.filters} {format_window(self.window)}"


OPTIONS = {"stride": OptionSpec(stride, (1, 1)), "pad": OptionSpec(padding, (0, 0)),
           "bias": OptionSpec(boolean, True)}


def _steps(stmt, ctx) -> list[Step]:
    filters = ctx.count(stmt.filters, "the filter count")
    kernel = ctx.kernel(stmt.kernel, "the kernel")
    values = ctx.options(stmt.options, OPTIONS)
    pad = _same_padding(values["pad"], kernel, values["stride"], ctx)
    steps = [Step("conv2d", ConvAttrs(filters, Window(kernel, values["stride"], pad)), "conv")]
    if values["bias"]:
        steps.append(Step("bias_add", suffix="pre"))
    return steps


def _same_padding(pad, kernel: tuple[int, int], stride: tuple[int, int], ctx
                  ) -> tuple[int, int]:
    """`pad=same` keeps H and W, which needs stride 1 and an odd kernel."""
    if pad != "same":
        return pad
    problem = None
    if stride != (1, 1):
        problem = f"stride 1, but {ctx.owner} has stride {stride[0]}x{stride[1]}"
    elif kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
        problem = f"an odd kernel, but {ctx.owner} has {kernel[0]}x{kernel[1]}"
    if problem:
        ctx.error(f"pad=same needs {problem}", ctx.option_span("pad"))
    return (kernel[0] - 1) // 2, (kernel[1] - 1) // 2


# -- conv2d: (x, weight) -> y ------------------------------------------------------------------

def _shape(ctx: ShapeContext) -> dict:
    attrs = ctx.node.attrs
    out = windowed_shape(ctx, attrs.window, attrs.filters)
    return {ctx.node.output: out,
            ctx.node.inputs[1]: (attrs.filters, ctx.x[1], *attrs.window.kernel)}


def conv2d(x: np.ndarray, weight: np.ndarray, window: Window) -> np.ndarray:
    """s(i, j) = Σ_c Σ_m Σ_n X_c(i·S + m, j·S + n) · W_c(m, n): cross-correlation, no flip."""
    out = None
    for kh, kw, patch in patches(x, window, 0.0):
        term = np.einsum("nchw,fc->nfhw", patch, weight[:, :, kh, kw])
        out = term if out is None else out + term
    return out


def _gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x, w = node.inputs
    return [(x, b.op("conv2d_grad_input", (dy, w), x, node, node.attrs)),
            (w, b.op("conv2d_grad_weight", (x, dy), w, node, node.attrs))]


def _flops(graph, node: Node) -> int:
    """2 per multiply-add, one sample."""
    weight = graph.tensor(node.inputs[1]).shape
    out = graph.tensor(node.output).shape
    return 2 * math.prod(weight) * out[2] * out[3]


def _lower(kernel, program) -> LoopFunction:
    x, weight = (buffer(program, n) for n in kernel.inputs[:2])
    out = buffer(program, kernel.outputs[0], is_output=True)
    zero = Const(0.0, True)
    ih, iw, inside = window_position(kernel.window, x.shape[2], x.shape[3])
    product = mul(Load(x.name, (Var("n"), Var("c"), ih, iw)),
                  Load(weight.name, (Var("f"), Var("c"), Var("kh"), Var("kw"))))
    reduce = loop_nest(["c", "kh", "kw"], list(weight.shape[1:]),
                       guarded(inside, (Assign("acc", add(Var("acc"), product)),)))
    start = Load(kernel.inputs[2], (Var("f"),)) if kernel.has_bias else zero
    body = (Assign("acc", start), reduce,
            Store(out.name, (Var("n"), Var("f"), Var("oh"), Var("ow")),
                  activate(kernel.activation, Var("acc"))))
    nest = loop_nest(["n", "f", "oh", "ow"], [extent_expr(d) for d in out.shape], body)
    buffers = (x, weight) + ((buffer(program, kernel.inputs[2]),) if kernel.has_bias else ())
    return LoopFunction(kernel.name, (*buffers, out), (Local("acc", out.dtype),), (nest,))


# -- conv2d_grad_input: (dy, weight) -> dx ---------------------------------------------------

def conv2d_grad_input(dy: np.ndarray, weight: np.ndarray, window: Window,
                      input_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """δ^{l-1} = δ^l * rot180(W) as a full correlation: each δ goes back through the window
    positions it came from (δ dilated by the stride, padding cropped off)."""
    from cnnc.ops.window import input_size

    (kh_size, kw_size), (sh, sw), (ph, pw) = window.kernel, window.stride, window.pad
    n, _, out_h, out_w = dy.shape
    channels = weight.shape[1]
    height, width = input_shape[2:] if input_shape else input_size(dy, window)
    padded = np.zeros((n, channels, height + 2 * ph, width + 2 * pw), dtype=dy.dtype)
    for kh in range(kh_size):
        for kw in range(kw_size):
            rows = slice(kh, kh + sh * (out_h - 1) + 1, sh)
            cols = slice(kw, kw + sw * (out_w - 1) + 1, sw)
            padded[:, :, rows, cols] += np.einsum("nfhw,fc->nchw", dy, weight[:, :, kh, kw])
    return padded[:, :, ph:ph + height, pw:pw + width]


def _lower_grad_input(kernel, program) -> LoopFunction:
    dy_name, w_name = kernel.inputs
    dy, weight = view(program, dy_name), view(program, w_name)
    dx = view(program, kernel.outputs[0], is_output=True)
    window = kernel.window
    (sh, sw), (ph, pw) = window.stride, window.pad
    th = Binary(BinOp.SUB, add(Var("ih"), const(ph)), Var("kh"))
    tw = Binary(BinOp.SUB, add(Var("iw"), const(pw)), Var("kw"))
    oh, ow = Binary(BinOp.FLOOR_DIV, th, const(sh)), Binary(BinOp.FLOOR_DIV, tw, const(sw))
    conditions = [Binary(BinOp.GE, th, const(0)), Binary(BinOp.GE, tw, const(0)),
                  Binary(BinOp.LT, oh, const(dy.shape[2])),
                  Binary(BinOp.LT, ow, const(dy.shape[3]))]
    if sh > 1:
        conditions.append(Binary(BinOp.EQ, Binary(BinOp.MOD, th, const(sh)), const(0)))
    if sw > 1:
        conditions.append(Binary(BinOp.EQ, Binary(BinOp.MOD, tw, const(sw)), const(0)))
    covered = conditions[0]
    for condition in conditions[1:]:
        covered = Binary(BinOp.AND, covered, condition)
    term = mul(Load(dy.name, (Var("n"), Var("f"), oh, ow)),
               Load(weight.name, (Var("f"), Var("c"), Var("kh"), Var("kw"))))
    gather = loop_nest(["f", "kh", "kw"], list(weight.shape[:1]) + list(window.kernel),
                       (If(covered, (Assign("acc", add(Var("acc"), term)),)),))
    body = (Assign("acc", Const(0.0, True)), gather,
            Store(dx.name, (Var("n"), Var("c"), Var("ih"), Var("iw")), Var("acc")))
    nest = loop_nest(["n", "c", "ih", "iw"], [extent_expr(d) for d in dx.shape], body)
    return LoopFunction(kernel.name, (dy, weight, dx), (Local("acc", dx.dtype),), (nest,))


# -- conv2d_grad_weight: (x, dy) -> dw --------------------------------------------------------

def conv2d_grad_weight(x: np.ndarray, dy: np.ndarray, window: Window) -> np.ndarray:
    """∂J/∂W(p, q) = Σ a(i·S + p, j·S + q) · δ(i, j): the input correlated with δ."""
    grad = np.zeros((dy.shape[1], x.shape[1], *window.kernel), dtype=x.dtype)
    for kh, kw, patch in patches(x, window, 0.0):
        grad[:, :, kh, kw] = np.einsum("nchw,nfhw->fc", patch, dy)
    return grad


def _lower_grad_weight(kernel, program) -> LoopFunction:
    from cnnc.graph.ir import BATCH

    x_name, dy_name = kernel.inputs
    x, dy = view(program, x_name), view(program, dy_name)
    dw = view(program, kernel.outputs[0], is_output=True)
    ih, iw, inside = window_position(kernel.window, x.shape[2], x.shape[3])
    term = mul(Load(dy.name, (Var("n"), Var("f"), Var("oh"), Var("ow"))),
               Load(x.name, (Var("n"), Var("c"), ih, iw)))
    reduce = loop_nest(["n", "oh", "ow"], [Var(BATCH), dy.shape[2], dy.shape[3]],
                       guarded(inside, (Assign("acc", add(Var("acc"), term)),)))
    body = (Assign("acc", Const(0.0, True)), reduce,
            Store(dw.name, (Var("f"), Var("c"), Var("kh"), Var("kw")), Var("acc")))
    nest = loop_nest(["f", "c", "kh", "kw"], list(dw.shape), body)
    return LoopFunction(kernel.name, (x, dy, dw), (Local("acc", dw.dtype),), (nest,))


registry.register_layer(LayerDef("conv", _steps, (("INT", "a filter count like 6"),
                                                   ("DIMS", "a kernel size like 5x5"))))
registry.register(OpDef(
    "conv2d", "x correlated with each filter: N x C x H x W -> N x F x H' x W'",
    inputs=("x",), params=(ParamDef("weight", registry.fan_scaled),), shape=_shape,
    reference=lambda node, args, shape, mode: conv2d(args[0], args[1], node.attrs.window),
    gradient=_gradient, fusion=Fusion.ANCHOR, takes_pool=True, kernel_tag="conv",
    lower=_lower, schedule=correlation.conv_forward, flops=_flops,
    example="input: 2x7x6\nconv c: 3 3x3 stride=2 pad=1 bias=false\ndense d: 2\nloss mse"))
registry.register(OpDef(
    "conv2d_grad_input", "(dy, w) -> dx: full correlation of δ with the rotated filters",
    inputs=("dy", "w"), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: conv2d_grad_input(
        args[0], args[1], node.attrs.window, shape),
    lower=_lower_grad_input, schedule=correlation.conv_grad_input))
registry.register(OpDef(
    "conv2d_grad_weight", "(x, dy) -> dw: x correlated with δ",
    inputs=("x", "dy"), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: conv2d_grad_weight(
        args[0], args[1], node.attrs.window),
    lower=_lower_grad_weight, schedule=filter_gradient.conv_grad_weight))
