"""Batch normalization, as torch.nn.BatchNorm2d (C x H x W, per channel) and BatchNorm1d (a
vector, per feature).

Training (`batchnorm`) normalizes with the batch's mean and biased variance, which it keeps
for the backward pass and for the running statistics, updated by the training step only:
running = (1 − momentum)·running + momentum·batch, with the unbiased variance, as torch does.
At inference the running statistics are used: folded into the weights and bias of the
convolution or dense layer in front (`batchnorm_fold`, a small kernel at the start of each
forward call), or, where no such layer is in front, normalized by a kernel of its own
(`batchnorm_infer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnc.frontend import options as opts
from cnnc.graph.ir import BATCH, Node, Phase, Shape
from cnnc.loops.build import add, const, loop_nest, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Const,
    Expr,
    For,
    Load,
    Local,
    LoopFunction,
    Store,
    Unary,
    UnaryOp,
    Var,
)
from cnnc.ops import registry
from cnnc.ops.lowering import batch_float, view
from cnnc.ops.registry import (
    Fusion,
    LayerDef,
    OpDef,
    OutputDef,
    ParamDef,
    ShapeContext,
    ShapeProblem,
    Step,
)
from cnnc.ops.window import sample
from cnnc.schedule.channels import per_channel
from cnnc.schedule.cost import Machine

ONE = Const(1.0, True)
OPTIONS = {"eps": opts.OptionSpec(opts.positive_number, 1e-5),
           "momentum": opts.OptionSpec(opts.fraction, 0.1)}


@dataclass(frozen=True, slots=True)
class BatchNormAttrs:
    eps: float
    momentum: float

    def text(self) -> str:
        return f" eps={self.eps!r} momentum={self.momentum!r}"


def _steps(stmt, ctx) -> list[Step]:
    values = ctx.options(stmt.options, OPTIONS)
    attrs = BatchNormAttrs(values["eps"], values["momentum"])
    return [Step("batchnorm", attrs, "bn")]


# -- shapes and the numpy reference ----------------------------------------------------------

def _shape(ctx: ShapeContext) -> dict:
    x = ctx.x
    if len(x) not in (2, 4):
        raise ShapeProblem(f"{ctx.subject} normalizes C x H x W images or feature vectors, "
                           f"but {ctx.sources[0]} gives {sample(x)}")
    node, channels = ctx.node, (x[1],)
    shapes = {name: channels for name in node.inputs[1:]}
    shapes.update({node.output: x, node.outputs[1]: channels, node.outputs[2]: channels})
    return shapes


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) if x.ndim == 2 else (0, 2, 3)


def _per_channel(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _reference(node: Node, args: list[np.ndarray], shape, mode):
    """Training: the batch's statistics; returns y, the mean and the biased variance."""
    x, weight, bias = args[:3]
    mean = x.mean(axis=_axes(x))
    var = ((x - _per_channel(mean, x)) ** 2).mean(axis=_axes(x))
    inv = 1 / np.sqrt(var + node.attrs.eps)
    y = (x - _per_channel(mean, x)) * _per_channel(inv * weight, x) + _per_channel(bias, x)
    return y, mean, var


def _reference_infer(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x, weight, bias, running_mean, running_var = args
    inv = 1 / np.sqrt(running_var + node.attrs.eps)
    return (x - _per_channel(running_mean, x)) * _per_channel(inv * weight, x) + \
        _per_channel(bias, x)


def _reference_fold(node: Node, args: list[np.ndarray], shape, mode):
    """(w, [b,] γ, β, mean, var) -> (w·s, β + (b − mean)·s), s = γ / sqrt(var + eps)."""
    weight, rest = args[0], args[1:]
    bias, (gamma, beta, mean, var) = (rest[0], rest[1:]) if len(rest) == 5 else (0, rest)
    scale = gamma / np.sqrt(var + node.attrs.eps)
    folded = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return folded, beta + (bias - mean) * scale


def _reference_grad_input(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    dy, x, weight, mean, var = args
    count = x.size // x.shape[1]
    inv = _per_channel(1 / np.sqrt(var + node.attrs.eps), x)
    xhat = (x - _per_channel(mean, x)) * inv
    sum_dy = _per_channel(dy.sum(axis=_axes(x)), x)
    sum_dy_xhat = _per_channel((dy * xhat).sum(axis=_axes(x)), x)
    return _per_channel(weight, x) * inv / count * (count * dy - sum_dy - xhat * sum_dy_xhat)


def _reference_grad_weight(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    dy, x, mean, var = args
    xhat = (x - _per_channel(mean, x)) / _per_channel(np.sqrt(var + node.attrs.eps), x)
    return (dy * xhat).sum(axis=_axes(x))


# -- gradients -------------------------------------------------------------------------------

def _gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x, weight, bias = node.inputs[:3]
    _, mean, var = node.outputs
    return [(x, b.op("batchnorm_grad_input", (dy, x, weight, mean, var), x, node, node.attrs)),
            (weight, b.op("batchnorm_grad_weight", (dy, x, mean, var), weight, node,
                          node.attrs)),
            (bias, b.op("bias_grad", (dy,), bias, node))]


# -- inference: fold into the layer in front, or normalize alone ------------------------------

# the anchors whose weights batch norm folds into: their output channel is the weight's axis 0
_FOLDS_INTO = ("conv2d", "dense")


def _inference(node: Node, builder) -> list[Node]:
    """The nodes that compute `node`'s output at inference (see passes/inference.py)."""
    x, weight, bias, running_mean, running_var = node.inputs
    chain = builder.producers_read_only_by(x, node)
    if chain and chain[0].op in _FOLDS_INTO:
        anchor, rest = chain[0], chain[1:]
        if all(n.op == "bias_add" for n in rest) and len(rest) <= 1:
            builder.drop(chain)
            old_bias = rest[0].inputs[1:] if rest else ()
            folded_w = builder.tensor_like(f"{anchor.inputs[1]}.folded", anchor.inputs[1])
            folded_b = builder.tensor_like(f"{node.layer}.folded_bias", bias)
            fold = Node("batchnorm_fold", (anchor.inputs[1], *old_bias, weight, bias,
                                           running_mean, running_var),
                        (folded_w, folded_b), node.layer, node.span, node.attrs,
                        Phase.INFERENCE)
            pre = builder.tensor_like(f"{node.layer}.folded", node.output)
            conv = Node(anchor.op, (anchor.inputs[0], folded_w), (pre,), anchor.layer,
                        anchor.span, anchor.attrs, Phase.INFERENCE)
            shift = Node("bias_add", (pre, folded_b), (node.output,), node.layer, node.span,
                         None, Phase.INFERENCE)
            return [fold, conv, shift]
    return [Node("batchnorm_infer", node.inputs, (node.output,), node.layer, node.span,
                 node.attrs, Phase.INFERENCE)]


# -- loop lowerings ----------------------------------------------------------------------------

def _channels(program, name: str, is_output: bool = False):
    """N x C x S (S: the positions of a channel in one sample, 1 for a vector)."""
    shape = program.graph.tensor(name).shape
    return view(program, name, (shape[0], shape[1], math.prod(shape[2:])), is_output)


def _count(x) -> Expr:
    """How many values each channel's statistics are over: N · S."""
    return mul(batch_float(), const(float(x.shape[2])))


def _sum_over(var: str, value: Expr, x) -> tuple:
    """var = Σ over n and s of `value` (an expression of n, c and s), as a sum over the
    samples of each sample's sum: two short chains of additions round far less than one
    of N·S terms (a channel of a batch of 64 32x32 images is 65,536 values)."""
    inner = For("s", const(x.shape[2]), (Assign("part", add(Var("part"), value)),))
    per_sample = (Assign("part", Const(0.0, True)), inner,
                  Assign(var, add(Var(var), Var("part"))))
    return (Assign(var, Const(0.0, True)), For("n", Var(BATCH), per_sample))


def _inverse_std(var: Expr, eps: float) -> Expr:
    return Binary(BinOp.DIV, ONE, Unary(UnaryOp.SQRT, add(var, const(float(eps)))))


def _at(buffer) -> Load:
    return Load(buffer.name, (Var("n"), Var("c"), Var("s")))


# The lowerings read the node's inputs, not the kernel's: a kernel names the storage an input
# lives in (a flatten's input), whose shape is not the one the node sees.

def _lower(kernel, program) -> LoopFunction:
    """Per channel: the mean, then the biased variance (a second pass, as accurate as the
    reference's), then y = x·scale + shift."""
    x = _channels(program, kernel.node.inputs[0])
    weight, bias = view(program, kernel.node.inputs[1]), view(program, kernel.node.inputs[2])
    y = _channels(program, kernel.outputs[0], is_output=True)
    mean = view(program, kernel.outputs[1], is_output=True)
    var = view(program, kernel.outputs[2], is_output=True)
    c = (Var("c"),)
    centred = Binary(BinOp.SUB, Load(x.name, (Var("n"), Var("c"), Var("s"))), Var("m"))
    body = (
        *_sum_over("acc", _at(x), x),
        Assign("m", Binary(BinOp.DIV, Var("acc"), _count(x))),
        *_sum_over("acc", mul(centred, centred), x),
        Assign("v", Binary(BinOp.DIV, Var("acc"), _count(x))),
        Store(mean.name, c, Var("m")), Store(var.name, c, Var("v")),
        Assign("k", mul(_inverse_std(Var("v"), kernel.node.attrs.eps), Load(weight.name, c))),
        Assign("t", Binary(BinOp.SUB, Load(bias.name, c), mul(Var("m"), Var("k")))),
        loop_nest(["n", "s"], [Var(BATCH), x.shape[2]],
                  (Store(y.name, (Var("n"), Var("c"), Var("s")),
                         add(mul(_at(x), Var("k")), Var("t"))),)))
    locals_ = tuple(Local(n, x.dtype) for n in ("acc", "part", "m", "v", "k", "t"))
    return LoopFunction(kernel.name, (x, weight, bias, y, mean, var), locals_,
                        (For("c", const(x.shape[1]), body),))


def _lower_infer(kernel, program) -> LoopFunction:
    x = _channels(program, kernel.node.inputs[0])
    weight, bias, mean, var = (view(program, name) for name in kernel.node.inputs[1:])
    y = _channels(program, kernel.outputs[0], is_output=True)
    c = (Var("c"),)
    body = (
        Assign("k", mul(_inverse_std(Load(var.name, c), kernel.node.attrs.eps),
                        Load(weight.name, c))),
        Assign("t", Binary(BinOp.SUB, Load(bias.name, c), mul(Load(mean.name, c), Var("k")))),
        loop_nest(["n", "s"], [Var(BATCH), x.shape[2]],
                  (Store(y.name, (Var("n"), Var("c"), Var("s")),
                         add(mul(_at(x), Var("k")), Var("t"))),)))
    return LoopFunction(kernel.name, (x, weight, bias, mean, var, y),
                        (Local("k", x.dtype), Local("t", x.dtype)),
                        (For("c", const(x.shape[1]), body),))


def _lower_fold(kernel, program) -> LoopFunction:
    """w'[f, ...] = w[f, ...]·s[f], b'[f] = β[f] + (b[f] − mean[f])·s[f]."""
    w_shape = program.graph.tensor(kernel.node.inputs[0]).shape
    per_filter = math.prod(w_shape[1:])
    weight = view(program, kernel.node.inputs[0], (w_shape[0], per_filter))
    has_bias = len(kernel.node.inputs) == 6
    rest = [view(program, name) for name in kernel.node.inputs[1:]]
    old_bias, (gamma, beta, mean, var) = (rest[0], rest[1:]) if has_bias else (None, rest)
    folded_w = view(program, kernel.outputs[0], (w_shape[0], per_filter), is_output=True)
    folded_b = view(program, kernel.outputs[1], is_output=True)
    f = (Var("f"),)
    shifted = Binary(BinOp.SUB, Load(old_bias.name, f), Load(mean.name, f)) if has_bias \
        else Unary(UnaryOp.NEG, Load(mean.name, f))
    body = (
        Assign("k", mul(_inverse_std(Load(var.name, f), kernel.node.attrs.eps),
                        Load(gamma.name, f))),
        Store(folded_b.name, f, add(Load(beta.name, f), mul(shifted, Var("k")))),
        For("i", const(per_filter),
            (Store(folded_w.name, (Var("f"), Var("i")),
                   mul(Load(weight.name, (Var("f"), Var("i"))), Var("k"))),)))
    inputs = (weight, *([old_bias] if has_bias else []), gamma, beta, mean, var)
    return LoopFunction(kernel.name, (*inputs, folded_w, folded_b), (Local("k", weight.dtype),),
                        (For("f", const(w_shape[0]), body),))


def _lower_grad_input(kernel, program) -> LoopFunction:
    """dx = γ·inv / M · (M·dy − Σdy − x̂·Σ(dy·x̂)), per channel, M = N·S."""
    dy, x = _channels(program, kernel.node.inputs[0]), _channels(program, kernel.node.inputs[1])
    weight, mean, var = (view(program, name) for name in kernel.node.inputs[2:])
    dx = _channels(program, kernel.outputs[0], is_output=True)
    c = (Var("c"),)
    xhat = mul(Binary(BinOp.SUB, _at(x), Load(mean.name, c)), Var("inv"))
    total = Binary(BinOp.SUB, Binary(BinOp.SUB, mul(_count(x), _at(dy)), Var("sdy")),
                   mul(xhat, Var("sdx")))
    body = (
        Assign("inv", _inverse_std(Load(var.name, c), kernel.node.attrs.eps)),
        *_sum_over("sdy", _at(dy), x),
        *_sum_over("sdx", mul(_at(dy), xhat), x),
        Assign("k", Binary(BinOp.DIV, mul(Load(weight.name, c), Var("inv")), _count(x))),
        loop_nest(["n", "s"], [Var(BATCH), x.shape[2]],
                  (Store(dx.name, (Var("n"), Var("c"), Var("s")), mul(Var("k"), total)),)))
    locals_ = tuple(Local(n, x.dtype) for n in ("inv", "sdy", "sdx", "part", "k"))
    return LoopFunction(kernel.name, (dy, x, weight, mean, var, dx), locals_,
                        (For("c", const(x.shape[1]), body),))


def _lower_grad_weight(kernel, program) -> LoopFunction:
    """dγ[c] = Σ dy · x̂."""
    dy, x = _channels(program, kernel.node.inputs[0]), _channels(program, kernel.node.inputs[1])
    mean, var = view(program, kernel.node.inputs[2]), view(program, kernel.node.inputs[3])
    dw = view(program, kernel.outputs[0], is_output=True)
    c = (Var("c"),)
    xhat = mul(Binary(BinOp.SUB, _at(x), Load(mean.name, c)), Var("inv"))
    body = (Assign("inv", _inverse_std(Load(var.name, c), kernel.node.attrs.eps)),
            *_sum_over("acc", mul(_at(dy), xhat), x),
            Store(dw.name, c, Var("acc")))
    return LoopFunction(kernel.name, (dy, x, mean, var, dw),
                        tuple(Local(n, x.dtype) for n in ("inv", "acc", "part")),
                        (For("c", const(x.shape[1]), body),))


def _update_buffers(node: Node, program, name: str) -> LoopFunction:
    """running = (1 − m)·running + m·batch; the variance unbiased: · M / (M − 1)."""
    x = _channels(program, node.inputs[0])
    running_mean, running_var = (view(program, t, is_output=True) for t in node.inputs[3:])
    mean, var = view(program, node.outputs[1]), view(program, node.outputs[2])
    momentum = const(float(node.attrs.momentum))
    keep = const(1.0 - float(node.attrs.momentum))
    count = _count(x)
    # M = 1 has no unbiased variance; the runtime refuses such a training batch first
    unbiased = Binary(BinOp.DIV, count, Binary(BinOp.SUB, count, ONE))
    c = (Var("c"),)
    body = (Store(running_mean.name, c, add(mul(keep, Load(running_mean.name, c)),
                                            mul(momentum, Load(mean.name, c)))),
            Store(running_var.name, c, add(mul(keep, Load(running_var.name, c)),
                                           mul(momentum, mul(Load(var.name, c), unbiased)))))
    return LoopFunction(name, (x, mean, var, running_mean, running_var), (),
                        (For("c", const(x.shape[1]), body),))


def _scheduled(lower, flops_per_value: int):
    """A schedule rule: `lower`'s loops vectorized over positions and shared over channels
    (schedule.channels); `flops_per_value`: the kernel's passes over one value, roughly,
    which decide from how many samples its channels are worth sharing."""
    def rule(kernel, program, machine: Machine):
        _, channels, positions = _channels(program, kernel.node.inputs[0]).shape
        return per_channel(lower(kernel, program), machine,
                           flops_per_value * channels * positions, positions)
    return rule


def _flops(graph, node: Node) -> int:
    return 2 * graph.tensor(node.output).size


def _no_shapes(ctx: ShapeContext) -> dict[str, Shape]:
    return {}


def _fold_shapes(ctx: ShapeContext) -> dict[str, Shape]:
    node = ctx.node
    return {node.outputs[0]: ctx.inputs[0], node.outputs[1]: ctx.inputs[-1]}


registry.register_layer(LayerDef("batchnorm", _steps))
registry.register(OpDef(
    "batchnorm", "training: (x − batch mean) / sqrt(batch var + eps) · γ + β, per channel",
    inputs=("x",),
    params=(ParamDef("weight", registry.ones), ParamDef("bias", registry.zeros),
            ParamDef("running_mean", registry.zeros, "buffer"),
            ParamDef("running_var", registry.ones, "buffer")),
    outputs=(OutputDef("mean"), OutputDef("var")), shape=_shape, reference=_reference,
    gradient=_gradient, fusion=Fusion.ALONE, kernel_tag="batchnorm", lower=_lower,
    schedule=_scheduled(_lower, 6), flops=_flops, inference=_inference,
    update_buffers=_update_buffers,
    # folded into the conv at inference; over a vector, after flatten, alone
    example="input: 2x4x4\nconv c: 3 3x3 bias=false\nbatchnorm b -> relu\nflatten\n"
            "batchnorm e\ndense d: 4\nloss mse"))
registry.register(OpDef(
    "batchnorm_infer", "inference: (x − running mean) / sqrt(running var + eps) · γ + β",
    inputs=("x",), shape=_no_shapes, reference=_reference_infer, differentiable=False,
    fusion=Fusion.ALONE, kernel_tag="batchnorm", lower=_lower_infer,
    schedule=_scheduled(_lower_infer, 2), flops=_flops))
registry.register(OpDef(
    "batchnorm_fold", "(w, [b,] γ, β, mean, var) -> the weights and bias with batch norm in them",
    inputs=None, outputs=(OutputDef("bias"),), shape=_fold_shapes,
    reference=_reference_fold, differentiable=False, fusion=Fusion.ALONE,
    kernel_tag="batchnorm_fold", lower=_lower_fold))
registry.register(OpDef(
    "batchnorm_grad_input", "(dy, x, γ, mean, var) -> dx", inputs=("dy", "x", "w", "mean", "var"),
    shape=_no_shapes, reference=_reference_grad_input, differentiable=False,
    fusion=Fusion.ALONE, lower=_lower_grad_input, schedule=_scheduled(_lower_grad_input, 10)))
registry.register(OpDef(
    "batchnorm_grad_weight", "(dy, x, mean, var) -> dγ = Σ dy · x̂",
    inputs=("dy", "x", "mean", "var"), shape=_no_shapes, reference=_reference_grad_weight,
    differentiable=False, fusion=Fusion.ALONE, lower=_lower_grad_weight,
    schedule=_scheduled(_lower_grad_weight, 4)))
