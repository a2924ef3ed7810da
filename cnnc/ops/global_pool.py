"""Global pooling: `globalavgpool` and `globalmaxpool` reduce each channel of a sample to one
number, C x H x W -> C x 1 x 1 (the mean, or the maximum), as kernels of their own.

The maximum follows max pooling's rule (pool.py): positions are visited row by row, the
first is always taken and a later one only where it is larger or NaN, so δ goes to the
first maximum (as in PyTorch) and a plane with a NaN gives NaN. `LAYER.argmax` (int32)
records the flat position h·W + w its gradient scatters δ to.
"""

from __future__ import annotations

import math

import numpy as np

from cnnc.graph.ir import BATCH, DType, Node
from cnnc.loops.build import add, const, loop_nest
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Const,
    For,
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
from cnnc.ops.lowering import view, zero_fill
from cnnc.ops.registry import Fusion, LayerDef, OpDef, OutputDef, ShapeContext, ShapeProblem, Step
from cnnc.ops.window import sample


def _steps_of(op: str):
    def steps(stmt, ctx) -> list[Step]:
        ctx.options(stmt.options, {})
        return [Step(op, suffix="pool")]

    return steps


def _shape(ctx: ShapeContext) -> dict:
    x = ctx.x
    if len(x) != 4:
        raise ShapeProblem(f"{ctx.subject} needs a CxHxW input, but {ctx.sources[0]} gives "
                           f"{sample(x)}")
    return dict.fromkeys(ctx.node.outputs, (BATCH, x[1], 1, 1))  # the argmax is shaped alike


def _planes(program, name: str, is_output: bool = False):
    """N x C x H·W: one row a channel."""
    shape = program.graph.tensor(name).shape
    return view(program, name, (shape[0], shape[1], math.prod(shape[2:])), is_output)


def _per_channel(program, name: str, is_output: bool = False):
    """An N x C x 1 x 1 tensor as N x C."""
    return view(program, name, program.graph.tensor(name).shape[:2], is_output)


def _flops(graph, node: Node) -> int:
    """One addition or comparison an element of the input."""
    return math.prod(graph.tensor(node.inputs[0]).shape[1:])


# -- global_avgpool2d -----------------------------------------------------------------------

def _lower_avg(kernel, program) -> LoopFunction:
    x = _planes(program, kernel.inputs[0])
    out = _per_channel(program, kernel.outputs[0], is_output=True)
    size = x.shape[2]
    reduce = For("i", const(size), (Assign("acc", add(Var("acc"), Load(
        x.name, (Var("n"), Var("c"), Var("i"))))),))
    body = (Assign("acc", Const(0.0, True)), reduce,
            Store(out.name, (Var("n"), Var("c")),
                  Binary(BinOp.DIV, Var("acc"), Const(float(size), True))))
    nest = loop_nest(["n", "c"], [Var(BATCH), x.shape[1]], body)
    return LoopFunction(kernel.name, (x, out), (Local("acc", out.dtype),), (nest,))


def _avg_gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x = node.inputs[0]
    return [(x, b.op("global_avgpool2d_grad", (dy,), x, node))]


def _avg_grad_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    dy = args[0]
    return np.broadcast_to(dy / (shape[2] * shape[3]), shape).copy()


def _lower_avg_grad(kernel, program) -> LoopFunction:
    """dx[n, c, i] = dy[n, c] / (H·W) at every position i."""
    dy = _per_channel(program, kernel.inputs[0])
    dx = _planes(program, kernel.outputs[0], is_output=True)
    share = Binary(BinOp.DIV, Load(dy.name, (Var("n"), Var("c"))),
                   Const(float(dx.shape[2]), True))
    nest = loop_nest(["n", "c", "i"], [Var(BATCH), dx.shape[1], dx.shape[2]],
                     (Store(dx.name, (Var("n"), Var("c"), Var("i")), share),))
    return LoopFunction(kernel.name, (dy, dx), (), (nest,))


# -- global_maxpool2d: x -> (y, argmax) -----------------------------------------------------

def global_maxpool2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maxima, argmax), N x C x 1 x 1 each: the first maximum of each plane, or its last
    NaN where it has one (a later NaN always takes the place, as in max pooling)."""
    n, c = x.shape[:2]
    planes = x.reshape(n, c, -1)
    nan = np.isnan(planes)
    last_nan = planes.shape[2] - 1 - np.argmax(nan[..., ::-1], axis=2)
    first_max = np.argmax(np.where(nan, -np.inf, planes), axis=2)
    index = np.where(nan.any(axis=2), last_nan, first_max)
    best = np.take_along_axis(planes, index[..., None], axis=2)
    return best.reshape(n, c, 1, 1), index.astype(np.int32).reshape(n, c, 1, 1)


def _lower_max(kernel, program) -> LoopFunction:
    """As max pooling's loops over a window of the whole plane: selects, not branches."""
    x = _planes(program, kernel.inputs[0])
    out, argmax = (_per_channel(program, name, is_output=True) for name in kernel.outputs)
    value = Var("value")
    take = Binary(BinOp.OR, Binary(BinOp.OR, Binary(BinOp.LT, Var("index"), const(0)),
                                   Binary(BinOp.GT, value, Var("best"))),
                  Unary(UnaryOp.ISNAN, value))
    visit = (Assign("value", Load(x.name, (Var("n"), Var("c"), Var("i")))),
             Assign("index", Select(take, Var("i"), Var("index"))),
             Assign("best", Binary(BinOp.MAX, Var("best"), value)))
    where = (Var("n"), Var("c"))
    body = (Assign("best", Const(-math.inf, True)), Assign("index", const(-1)),
            For("i", const(x.shape[2]), visit),
            Store(out.name, where, Var("best")), Store(argmax.name, where, Var("index")))
    nest = loop_nest(["n", "c"], [Var(BATCH), x.shape[1]], body)
    locals_ = (Local("best", out.dtype), Local("value", out.dtype), Local("index", DType.I64))
    return LoopFunction(kernel.name, (x, out, argmax), locals_, (nest,))


def _max_gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    x = node.inputs[0]
    return [(x, b.op("global_maxpool2d_grad", (dy, node.outputs[1]), x, node))]


def _max_grad_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    dy, argmax = args
    n, c = dy.shape[:2]
    grad = np.zeros((n, c, shape[2] * shape[3]), dtype=dy.dtype)
    np.put_along_axis(grad, argmax.reshape(n, c, 1).astype(np.int64), dy.reshape(n, c, 1),
                      axis=2)
    return grad.reshape(shape)


def _lower_max_grad(kernel, program) -> LoopFunction:
    """dx = 0, then each channel's δ at its maximum."""
    dy, argmax = (_per_channel(program, name) for name in kernel.inputs)
    dx = _planes(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("c"))
    scatter = Store(dx.name, (*where, Load(argmax.name, where)), Load(dy.name, where))
    nest = loop_nest(["n", "c"], [Var(BATCH), dx.shape[1]], (scatter,))
    return LoopFunction(kernel.name, (dy, argmax, dx), (), (zero_fill(dx), nest))


registry.register_layer(LayerDef("globalavgpool", _steps_of("global_avgpool2d")))
registry.register_layer(LayerDef("globalmaxpool", _steps_of("global_maxpool2d")))
registry.register(OpDef(
    "global_avgpool2d", "the mean of each channel's plane: C x H x W -> C x 1 x 1",
    inputs=("x",), shape=_shape, fusion=Fusion.ALONE, kernel_tag="gap",
    reference=lambda node, args, shape, mode: args[0].mean(axis=(2, 3), keepdims=True),
    gradient=_avg_gradient, lower=_lower_avg, flops=_flops,
    example="input x: 2x5x4\nconv c: 3 1x1\nglobalavgpool -> tanh\ndense d: 2\nloss mse"))
registry.register(OpDef(
    "global_avgpool2d_grad", "(dy,) -> dx: δ / (H·W) at every position of its plane",
    inputs=("dy",), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_avg_grad_reference, lower=_lower_avg_grad))
registry.register(OpDef(
    "global_maxpool2d", "the maximum of each channel's plane, and where it was",
    inputs=("x",), outputs=(OutputDef("argmax", DType.I32),), shape=_shape,
    fusion=Fusion.ALONE, kernel_tag="gmp",
    reference=lambda node, args, shape, mode: global_maxpool2d(args[0]),
    gradient=_max_gradient, lower=_lower_max, flops=_flops,
    example="input x: 2x5x4\nconv c: 3 1x1\nglobalmaxpool g\ndense d: 2\nloss mse"))
registry.register(OpDef(
    "global_maxpool2d_grad", "(dy, argmax) -> dx: each channel's δ to its maximum",
    inputs=("dy", "argmax"), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_max_grad_reference, lower=_lower_max_grad))
