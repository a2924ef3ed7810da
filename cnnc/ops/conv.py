"""2-D convolution (cross-correlation, no kernel flip) and its two gradients: the `conv`
statement, shape rule, reference, gradient rule, loop lowering, schedules and FLOPs.

Options as PyTorch's Conv2d: `groups=G` splits the C input channels and the F filters into
G groups, filter f reading only the C/G channels of its group (weight F x C/G x KH x KW;
G = C is a depthwise convolution); `dilation=D` spreads the taps D apart, so the kernel
spans (K − 1)·D + 1 input rows; `pad` may differ on each side (see ops/window.py).

δ^{l-1} = δ^l * rot180(W) is lowered as a gather: each input position sums the δ values
whose windows covered it, found with the divisibility test (ih + P − kh·D) mod S = 0, so no
dilated δ is ever materialised (cnn-algorithm.md section 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnc.frontend.options import (
    OptionSpec,
    boolean,
    dilation,
    positive_int,
    stride,
    window_padding,
)
from cnnc.graph.ir import Node, Window
from cnnc.loops.build import add, const, extent_expr, guarded, loop_nest, mul
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
from cnnc.ops.lowering import activate, buffer, view
from cnnc.ops.registry import Fusion, LayerDef, OpDef, ParamDef, ShapeContext, ShapeProblem, Step
from cnnc.ops.window import (
    format_window,
    input_size,
    patches,
    resolve,
    sample,
    window_of,
    window_position,
    windowed_shape,
)
from cnnc.schedule import correlation, filter_gradient


@dataclass(frozen=True, slots=True)
class ConvAttrs:
    filters: int
    window: Window
    groups: int = 1

    def text(self) -> str:
        groups = f" groups={self.groups}" if self.groups > 1 else ""
        return f" filters={self.filters} {format_window(self.window)}{groups}"


OPTIONS = {"stride": OptionSpec(stride, (1, 1)),
           "pad": OptionSpec(window_padding, (0, 0, 0, 0)),
           "dilation": OptionSpec(dilation, (1, 1)), "groups": OptionSpec(positive_int, 1),
           "bias": OptionSpec(boolean, True)}


def _steps(stmt, ctx) -> list[Step]:
    filters = ctx.count(stmt.filters, "the filter count")
    kernel = ctx.kernel(stmt.kernel, "the kernel")
    values = ctx.options(stmt.options, OPTIONS)
    window = window_of(kernel, values["stride"], values["pad"], values["dilation"])
    groups = values["groups"]
    if filters % groups:
        ctx.error(f"{ctx.owner}: groups={groups} does not divide the {filters} filters "
                  f"({_division(filters, groups)})", ctx.option_span("groups"))
        groups = 1
    steps = [Step("conv2d", ConvAttrs(filters, window, groups), "conv")]
    if values["bias"]:
        steps.append(Step("bias_add", suffix="pre"))
    return steps


def _division(count: int, groups: int) -> str:
    """`16 = 3 x 5 + 1`: why a count does not split into equal groups."""
    return f"{count} = {groups} x {count // groups} + {count % groups}"


# -- conv2d: (x, weight) -> y ------------------------------------------------------------------

def _shape(ctx: ShapeContext) -> dict:
    attrs = ctx.node.attrs
    out = windowed_shape(ctx, attrs.window, attrs.filters)
    channels = ctx.x[1]
    if channels % attrs.groups:
        raise ShapeProblem(f"{ctx.subject}: groups={attrs.groups} does not divide the "
                           f"{channels} input channels ({_division(channels, attrs.groups)}) "
                           f"that {ctx.sources[0]} gives ({sample(ctx.x)})")
    return {ctx.node.output: out,
            ctx.node.inputs[1]: (attrs.filters, channels // attrs.groups, *attrs.window.kernel)}


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:
    """[n, C, ...] as [n, G, C/G, ...]."""
    return a.reshape(a.shape[0], groups, a.shape[1] // groups, *a.shape[2:])


def _weight_taps(weight: np.ndarray, kh: int, kw: int, groups: int) -> np.ndarray:
    """Tap (kh, kw) of the F x C/G filters as [G, F/G, C/G]."""
    return weight[:, :, kh, kw].reshape(groups, weight.shape[0] // groups, weight.shape[1])


def conv2d(x: np.ndarray, weight: np.ndarray, window: Window, groups: int = 1) -> np.ndarray:
    """s(i, j) = Σ_c Σ_m Σ_n X_c(i·S + m·D, j·S + n·D) · W_c(m, n): cross-correlation, no
    flip, each filter over the channels of its group."""
    out = None
    for kh, kw, patch in patches(x, window, 0.0):
        term = np.einsum("ngchw,gfc->ngfhw", _grouped(patch, groups),
                         _weight_taps(weight, kh, kw, groups))
        term = term.reshape(term.shape[0], -1, *term.shape[3:])
        out = term if out is None else out + term
    return out


def _gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x, w = node.inputs
    return [(x, b.op("conv2d_grad_input", (dy, w), x, node, node.attrs)),
            (w, b.op("conv2d_grad_weight", (x, dy), w, node, node.attrs))]


def _flops(graph, node: Node) -> int:
    """2 per multiply-add, one sample (a grouped weight has C/G channels: G times fewer)."""
    weight = graph.tensor(node.inputs[1]).shape
    out = graph.tensor(node.output).shape
    return 2 * math.prod(weight) * out[2] * out[3]


def in_group(index: Expr, per_group: int, other_per_group: int, groups: int,
             local: Expr) -> Expr:
    """Member `local` of the group of channel `index` on the other side of the filters:
    (index // per_group) · other_per_group + local, or `local` itself without groups."""
    if groups == 1:
        return local
    first = mul(Binary(BinOp.FLOOR_DIV, index, const(per_group)), const(other_per_group))
    return add(first, local)


def _lower(kernel, program) -> LoopFunction:
    x, weight = (buffer(program, n) for n in kernel.inputs[:2])
    out = buffer(program, kernel.outputs[0], is_output=True)
    groups = kernel.node.attrs.groups
    zero = Const(0.0, True)
    ih, iw, inside = window_position(kernel.window, x.shape[2], x.shape[3])
    channel = in_group(Var("f"), out.shape[1] // groups, weight.shape[1], groups, Var("c"))
    product = mul(Load(x.name, (Var("n"), channel, ih, iw)),
                  Load(weight.name, (Var("f"), Var("c"), Var("kh"), Var("kw"))))
    reduce = loop_nest(["c", "kh", "kw"], list(weight.shape[1:]),
                       guarded(inside, (Assign("acc", add(Var("acc"), product)),)))
    start = Load(kernel.inputs[2], (Var("f"),)) if kernel.has_bias else zero
    body = (Assign("acc", start), reduce,
            Store(out.name, (Var("n"), Var("f"), Var("oh"), Var("ow")),
                  activate(kernel.activation, Var("acc"), kernel.activation_attrs)))
    nest = loop_nest(["n", "f", "oh", "ow"], [extent_expr(d) for d in out.shape], body)
    buffers = (x, weight) + ((buffer(program, kernel.inputs[2]),) if kernel.has_bias else ())
    return LoopFunction(kernel.name, (*buffers, out), (Local("acc", out.dtype),), (nest,))


# -- conv2d_grad_input: (dy, weight) -> dx ---------------------------------------------------

def conv2d_grad_input(dy: np.ndarray, weight: np.ndarray, window: Window,
                      input_shape: tuple[int, ...] | None = None,
                      groups: int = 1) -> np.ndarray:
    """δ^{l-1} = δ^l * rot180(W) as a full correlation: each δ goes back through the window
    positions it came from (δ dilated by the stride, padding cropped off)."""
    n, _, out_h, out_w = dy.shape
    channels = weight.shape[1] * groups
    height, width = input_shape[2:] if input_shape else input_size(dy, window)
    window = resolve(window, height, width)
    (kh_size, kw_size), (sh, sw), (dh, dw) = window.kernel, window.stride, window.dilation
    top, left, bottom, right = window.pad
    padded = np.zeros((n, groups, channels // groups, height + top + bottom,
                       width + left + right), dtype=dy.dtype)
    for kh in range(kh_size):
        for kw in range(kw_size):
            rows = slice(kh * dh, kh * dh + sh * (out_h - 1) + 1, sh)
            cols = slice(kw * dw, kw * dw + sw * (out_w - 1) + 1, sw)
            padded[:, :, :, rows, cols] += np.einsum(
                "ngfhw,gfc->ngchw", _grouped(dy, groups), _weight_taps(weight, kh, kw, groups))
    return padded.reshape(n, channels, *padded.shape[3:])[:, :, top:top + height,
                                                          left:left + width]


def _tap(var: str, dilation: int) -> Expr:
    return Var(var) if dilation == 1 else mul(Var(var), const(dilation))


def _lower_grad_input(kernel, program) -> LoopFunction:
    dy_name, w_name = kernel.inputs
    dy, weight = view(program, dy_name), view(program, w_name)
    dx = view(program, kernel.outputs[0], is_output=True)
    groups = kernel.node.attrs.groups
    window = resolve(kernel.window, dx.shape[2], dx.shape[3])
    (sh, sw), (dh, dw), (top, left) = window.stride, window.dilation, window.pad[:2]
    th = Binary(BinOp.SUB, add(Var("ih"), const(top)), _tap("kh", dh))
    tw = Binary(BinOp.SUB, add(Var("iw"), const(left)), _tap("kw", dw))
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
    per_group = weight.shape[1]
    filters = weight.shape[0] // groups
    f = in_group(Var("c"), per_group, filters, groups, Var("f"))
    c = Var("c") if groups == 1 else Binary(BinOp.MOD, Var("c"), const(per_group))
    term = mul(Load(dy.name, (Var("n"), f, oh, ow)),
               Load(weight.name, (f, c, Var("kh"), Var("kw"))))
    gather = loop_nest(["f", "kh", "kw"], [filters, *window.kernel],
                       (If(covered, (Assign("acc", add(Var("acc"), term)),)),))
    body = (Assign("acc", Const(0.0, True)), gather,
            Store(dx.name, (Var("n"), Var("c"), Var("ih"), Var("iw")), Var("acc")))
    nest = loop_nest(["n", "c", "ih", "iw"], [extent_expr(d) for d in dx.shape], body)
    return LoopFunction(kernel.name, (dy, weight, dx), (Local("acc", dx.dtype),), (nest,))


# -- conv2d_grad_weight: (x, dy) -> dw --------------------------------------------------------

def conv2d_grad_weight(x: np.ndarray, dy: np.ndarray, window: Window,
                       groups: int = 1) -> np.ndarray:
    """∂J/∂W(p, q) = Σ a(i·S + p·D, j·S + q·D) · δ(i, j): the input correlated with δ, each
    filter with the channels of its group."""
    filters, channels = dy.shape[1], x.shape[1] // groups
    grad = np.zeros((filters, channels, *window.kernel), dtype=x.dtype)
    for kh, kw, patch in patches(x, window, 0.0):
        taps = np.einsum("ngchw,ngfhw->gfc", _grouped(patch, groups), _grouped(dy, groups))
        grad[:, :, kh, kw] = taps.reshape(filters, channels)
    return grad


def _lower_grad_weight(kernel, program) -> LoopFunction:
    from cnnc.graph.ir import BATCH

    x_name, dy_name = kernel.inputs
    x, dy = view(program, x_name), view(program, dy_name)
    dw = view(program, kernel.outputs[0], is_output=True)
    groups = kernel.node.attrs.groups
    ih, iw, inside = window_position(kernel.window, x.shape[2], x.shape[3])
    channel = in_group(Var("f"), dw.shape[0] // groups, dw.shape[1], groups, Var("c"))
    term = mul(Load(dy.name, (Var("n"), Var("f"), Var("oh"), Var("ow"))),
               Load(x.name, (Var("n"), channel, ih, iw)))
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
    reference=lambda node, args, shape, mode: conv2d(args[0], args[1], node.attrs.window,
                                                     node.attrs.groups),
    gradient=_gradient, fusion=Fusion.ANCHOR, takes_pool=True, kernel_tag="conv",
    lower=_lower, schedule=correlation.conv_forward, flops=_flops,
    example="input: 2x9x8\nconv c: 4 3x3 stride=2 pad=1 bias=false\n"
            "conv g: 4 3x2 pad=0x1x1x0 dilation=2x1 groups=2\ndense d: 2\nloss mse"))
registry.register(OpDef(
    "conv2d_grad_input", "(dy, w) -> dx: full correlation of δ with the rotated filters",
    inputs=("dy", "w"), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: conv2d_grad_input(
        args[0], args[1], node.attrs.window, shape, node.attrs.groups),
    lower=_lower_grad_input, schedule=correlation.conv_grad_input))
registry.register(OpDef(
    "conv2d_grad_weight", "(x, dy) -> dw: x correlated with δ",
    inputs=("x", "dy"), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: conv2d_grad_weight(
        args[0], args[1], node.attrs.window, node.attrs.groups),
    lower=_lower_grad_weight, schedule=filter_gradient.conv_grad_weight))
