"""Layers that read several others: `concat` joins them along the channels (or features),
`mul` multiplies two elementwise, the second may be a C x 1 x 1 gate that scales each
channel of the first (squeeze-and-excitation). `add` (add.py) is the third merge; the
statements share their checks here.

concat's gradient hands each input its slice of δ; mul's are δ·B for A and δ·A for B,
summed over each channel's positions where B is a gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnc.graph.ir import BATCH, Node, Shape
from cnnc.loops.build import add, const, loop_nest, mul
from cnnc.loops.ir import Assign, Const, For, Load, Local, LoopFunction, Store, Var
from cnnc.ops import registry
from cnnc.ops.lowering import flat, view
from cnnc.ops.registry import (
    Fusion,
    LayerDef,
    OpDef,
    ShapeContext,
    ShapeProblem,
    Step,
    StepsRule,
)
from cnnc.ops.window import sample


def merge_steps(op: str, verb: str, suffix: str, most: int | None = None) -> StepsRule:
    """The steps rule of a merge statement of op `op`: no options of its own (irgen reads
    the names), at least two names and at most `most`. A wrong count is reported and the
    layer becomes no op, since no op of it could take that many inputs."""

    def steps(stmt, ctx) -> list[Step]:
        ctx.options(stmt.options, {})
        names = stmt.inputs
        count = "two layers" if most == 2 else "two layers or more"
        if len(names) < 2:
            ctx.error(f"{ctx.owner} {verb} {count}, like '{stmt.kind.text} {ctx.name}: a, b', "
                      f"but names only {names[0].text}", names[0].span)
            return []
        if most is not None and len(names) > most:
            ctx.error(f"{ctx.owner} {verb} {count}, but names {len(names)}", names[most].span)
            return []
        return [Step(op, suffix=suffix)]

    return steps


def _distinct(buffers: list) -> list:
    """A tensor read twice (`concat c: a, a`) is one buffer argument."""
    return list({buffer.name: buffer for buffer in buffers}.values())


def _planes(program, name: str, channels: int | None = None, is_output: bool = False):
    """N x C x (positions of a channel): a vector of F features is F channels of 1."""
    shape = program.graph.tensor(name).shape
    return view(program, name, (shape[0], channels or shape[1], math.prod(shape[2:])),
                is_output)


# -- concat: a, b, ... -> their channels (or features) one after the other ------------------

@dataclass(frozen=True, slots=True)
class ConcatSlice:
    """The channels (features) of one concat input in the concat's result: [start, stop)."""

    start: int
    stop: int

    def text(self) -> str:
        return f" channels={self.start}:{self.stop}"


def _concat_shape(ctx: ShapeContext) -> dict:
    first, source = ctx.inputs[0], ctx.sources[0]
    for shape, other in zip(ctx.inputs[1:], ctx.sources[1:], strict=True):
        both = f"{source} gives {sample(first)} and {other} gives {sample(shape)}"
        if len(shape) != len(first):
            raise ShapeProblem(f"{ctx.subject} joins CxHxW tensors or feature vectors, not "
                               f"one of each, but {both}; flatten the CxHxW one to join "
                               "them as vectors")
        if shape[2:] != first[2:]:
            raise ShapeProblem(f"{ctx.subject} joins the channels of tensors of one height "
                               f"and width, but {both}")
    channels = sum(shape[1] for shape in ctx.inputs)
    return {ctx.node.output: (BATCH, channels, *first[2:])}


def _concat_gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    contributions, start = [], 0
    for x in node.inputs:
        stop = start + b.graph.tensor(x).shape[1]
        contributions.append((x, b.op("concat_grad", (dy,), x, node, ConcatSlice(start, stop))))
        start = stop
    return contributions


def _lower_concat(kernel, program) -> LoopFunction:
    """One copy a input, into its channels of the result: out[n, start + c, i] = x[n, c, i]."""
    out = _planes(program, kernel.outputs[0], is_output=True)
    inputs, nests, start = [], [], 0
    for name in kernel.node.inputs:  # graph names: a flatten's output viewed as a vector
        x = _planes(program, name)
        where = (Var("n"), Var("c"), Var("i"))
        target = (Var("n"), add(Var("c"), const(start)), Var("i"))
        nests.append(loop_nest(["n", "c", "i"], [Var(BATCH), x.shape[1], x.shape[2]],
                               (Store(out.name, target, Load(x.name, where)),)))
        inputs.append(x)
        start += x.shape[1]
    return LoopFunction(kernel.name, (*_distinct(inputs), out), (), tuple(nests))


def _lower_concat_grad(kernel, program) -> LoopFunction:
    """dx[n, c, i] = dy[n, start + c, i]: the input's slice of δ."""
    dy = _planes(program, kernel.inputs[0])
    dx = _planes(program, kernel.outputs[0], is_output=True)
    source = (Var("n"), add(Var("c"), const(kernel.node.attrs.start)), Var("i"))
    nest = loop_nest(["n", "c", "i"], [Var(BATCH), dx.shape[1], dx.shape[2]],
                     (Store(dx.name, (Var("n"), Var("c"), Var("i")), Load(dy.name, source)),))
    return LoopFunction(kernel.name, (dy, dx), (), (nest,))


def _concat_grad_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    return args[0][:, node.attrs.start:node.attrs.stop].copy()


# -- mul: a, b -> a · b, b of a's shape or a C x 1 x 1 gate --------------------------------

def _is_gate(x: Shape, gate: Shape) -> bool:
    """Whether `gate` scales each channel of the CxHxW `x` by one number."""
    return len(x) == 4 and tuple(gate) == (BATCH, x[1], 1, 1)


def _mul_shape(ctx: ShapeContext) -> dict:
    a, b = ctx.inputs
    if tuple(a) == tuple(b) or _is_gate(a, b):
        return {ctx.node.output: a}
    problem = (f"{ctx.subject} multiplies tensors of one shape, or a CxHxW tensor by a Cx1x1 "
               f"gate, but {ctx.sources[0]} gives {sample(a)} and {ctx.sources[1]} gives "
               f"{sample(b)}")
    if _is_gate(b, a):
        problem += "; the gate goes second"
    elif len(a) == 4 and len(b) == 2 and b[1] == a[1]:
        problem += ("; a dense layer gives a vector, not a Cx1x1 gate: a 1x1 conv of a "
                    "globalavgpool gives one")
    raise ShapeProblem(problem)


def _mul_gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    """dA = δ·B (B broadcast as in the forward op), dB = δ·A, summed over H, W for a gate."""
    x, y = node.inputs
    gate = b.graph.tensor(y).shape != b.graph.tensor(x).shape
    dy_of_y = b.op("mul_grad_gate" if gate else "mul", (dy, x), y, node)
    return [(x, b.op("mul", (dy, y), x, node)), (y, dy_of_y)]


def _lower_mul(kernel, program) -> LoopFunction:
    """out = a · b over N x elements, or, for a gate, out[n, c, i] = a[n, c, i] · g[n, c]."""
    graph = program.graph
    first, second = kernel.node.inputs
    if graph.tensor(first).shape == graph.tensor(second).shape:
        a, b = flat(program, first), flat(program, second)
        out = flat(program, kernel.outputs[0], is_output=True)
        where = (Var("n"), Var("i"))
        value = mul(Load(a.name, where), Load(b.name, where))
    else:
        a = _planes(program, first)
        b = view(program, second, a.shape[:2])
        out = _planes(program, kernel.outputs[0], is_output=True)
        where = (Var("n"), Var("c"), Var("i"))
        value = mul(Load(a.name, where), Load(b.name, where[:2]))
    names = [v.name for v in where]
    nest = loop_nest(names, [Var(BATCH), *out.shape[1:]], (Store(out.name, where, value),))
    return LoopFunction(kernel.name, (*_distinct([a, b]), out), (), (nest,))


def _gate_grad_reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    dy, x = args
    return (dy * x).sum(axis=(2, 3), keepdims=True)


def _lower_gate_grad(kernel, program) -> LoopFunction:
    """dg[n, c] = Σ over the positions i of the channel of dy[n, c, i] · a[n, c, i]."""
    dy, x = (_planes(program, name) for name in kernel.inputs)
    dg = view(program, kernel.outputs[0], dy.shape[:2], is_output=True)
    plane = (Var("n"), Var("c"), Var("i"))
    term = mul(Load(dy.name, plane), Load(x.name, plane))
    body = (Assign("acc", Const(0.0, True)),
            For("i", const(dy.shape[2]), (Assign("acc", add(Var("acc"), term)),)),
            Store(dg.name, plane[:2], Var("acc")))
    nest = loop_nest(["n", "c"], [Var(BATCH), dy.shape[1]], body)
    return LoopFunction(kernel.name, (*_distinct([dy, x]), dg), (Local("acc", dg.dtype),),
                        (nest,))


def _mul_flops(graph, node: Node) -> int:
    return math.prod(graph.tensor(node.output).shape[1:])


registry.register_layer(LayerDef("concat", merge_steps("concat", "joins", "cat")))
registry.register_layer(LayerDef("mul", merge_steps("mul", "multiplies", "prod", most=2)))
registry.register(OpDef(
    "concat", "a, b, ... joined along the channels (or features)", inputs=None,
    shape=_concat_shape, fusion=Fusion.ALONE, kernel_tag="concat",
    reference=lambda node, args, shape, mode: np.concatenate(args, axis=1),
    gradient=_concat_gradient, lower=_lower_concat,
    example="input x: 2x4x4\nconv a: 3 3x3 pad=1 -> tanh\nconv b: 2 1x1 from=x\n"
            "concat c: a, b, x\nconv d: 2 1x1\nloss mse"))
registry.register(OpDef(
    "concat_grad", "(dy,) -> the slice of dy a concat input's channels made",
    inputs=("dy",), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_concat_grad_reference, lower=_lower_concat_grad))
registry.register(OpDef(
    "mul", "a · b: elementwise, b of a's shape or a Cx1x1 gate of a CxHxW a",
    inputs=("a", "b"), shape=_mul_shape, fusion=Fusion.ALONE, kernel_tag="mul",
    reference=lambda node, args, shape, mode: args[0] * args[1],
    gradient=_mul_gradient, lower=_lower_mul, flops=_mul_flops,
    example="input x: 2x4x3\nconv a: 3 3x3 pad=1\nglobalavgpool g from=a\n"
            "conv s: 3 1x1 -> sigmoid\nmul m: a, s\nmul q: m, a\nloss mse"))
registry.register(OpDef(
    "mul_grad_gate", "(dy, a) -> Σ over H, W of dy · a: the gradient of a Cx1x1 gate",
    inputs=("dy", "a"), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_gate_grad_reference, lower=_lower_gate_grad))
