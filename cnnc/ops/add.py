"""Elementwise sum of two or more tensors of one shape. The backward pass sums the gradients
of a tensor read by several ops with it; its own gradient passes δ to every input."""

from __future__ import annotations

from functools import reduce

import numpy as np

from cnnc.graph.ir import BATCH, Node
from cnnc.loops.build import add, loop_nest
from cnnc.loops.ir import Load, LoopFunction, Store, Var
from cnnc.ops import registry
from cnnc.ops.lowering import flat, view
from cnnc.ops.merge import merge_steps
from cnnc.ops.registry import Fusion, LayerDef, OpDef, ShapeContext, ShapeProblem
from cnnc.ops.window import sample


def _shape(ctx: ShapeContext) -> dict:
    first = ctx.inputs[0]
    for shape, source in zip(ctx.inputs[1:], ctx.sources[1:], strict=True):
        if shape != first:
            raise ShapeProblem(f"{ctx.subject} adds tensors of one shape, but {ctx.sources[0]} "
                               f"gives {sample(first)} and {source} gives {sample(shape)}")
    return {ctx.node.output: first}


def _reference(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    return reduce(np.add, args[1:], args[0])


def _gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    return [(x, dy) for x in node.inputs]


def _lower(kernel, program) -> LoopFunction:
    """out = a + b + ..., added left to right, over flat views: N x elements for a batch of
    values, all elements for a parameter's gradients."""
    batched = program.graph.tensor(kernel.outputs[0]).shape[:1] == (BATCH,)
    inputs = [_flat(program, name, batched) for name in kernel.inputs]
    out = _flat(program, kernel.outputs[0], batched, is_output=True)
    where = (Var("n"), Var("i")) if batched else (Var("i"),)
    total = reduce(add, [Load(buffer.name, where) for buffer in inputs])
    extents = [Var(BATCH), out.shape[1]] if batched else [out.shape[0]]
    nest = loop_nest([v.name for v in where], extents, (Store(out.name, where, total),))
    return LoopFunction(kernel.name, (*_distinct(inputs), out), (), (nest,))


def _flat(program, name: str, batched: bool, is_output: bool = False):
    if batched:
        return flat(program, name, is_output)
    return view(program, name, (program.graph.tensor(name).size,), is_output)


def _distinct(buffers: list) -> list:
    """A tensor added to itself is one buffer argument."""
    return list({buffer.name: buffer for buffer in buffers}.values())


registry.register(OpDef(
    "add", "a + b (+ ...): elementwise, one shape", inputs=None, shape=_shape,
    reference=_reference, gradient=_gradient, fusion=Fusion.ALONE, kernel_tag="add", sums=True,
    lower=_lower))
registry.register_layer(LayerDef("add", merge_steps("add", "adds", "sum")))
