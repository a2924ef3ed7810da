"""Graph → typed graph: every tensor's shape, inferred op by op with each op's shape rule
(`OpDef.shape`), with errors that show the arithmetic.

A shape error names the layer, its line and column, both shapes, and notes how the input
shape came about (the chain of layers and the last layer's `floor((H + 2P - K) / S) + 1`
arithmetic). All shape errors of a graph are reported together; what follows a failed layer
is not checked, since its input shape is unknown.
"""

from __future__ import annotations

import dataclasses

from cnnc.diagnostics import CnncSemanticError, Diagnostic, Note
from cnnc.graph.ir import Graph, Node, Role, Shape
from cnnc.ops import registry
from cnnc.ops.registry import ShapeContext, ShapeProblem
from cnnc.ops.window import arithmetic, sample

# Tensors whose shape flows from the input; parameters and targets get theirs from the op.
_DATA_ROLES = (Role.INPUT, Role.VALUE)


def infer(graph: Graph) -> Graph:
    """The graph with every tensor's shape filled in, or a CnncSemanticError with all errors."""
    typed, diagnostics = infer_collect(graph)
    if diagnostics:
        raise CnncSemanticError(diagnostics)
    return typed


def infer_collect(graph: Graph, broken: frozenset[str] = frozenset()
                  ) -> tuple[Graph, list[Diagnostic]]:
    """Infer what can be inferred; layers in `broken` (and all after them) stay unknown."""
    shapes: dict[str, Shape | None] = {t.name: t.shape for t in graph.tensors}
    diagnostics: list[Diagnostic] = []
    for node in graph.nodes:
        data_inputs = [n for n in node.inputs if graph.tensor(n).role in _DATA_ROLES]
        if node.layer in broken or any(shapes[n] is None for n in data_inputs):
            continue
        try:
            shapes.update(_infer_node(node, [shapes[n] for n in node.inputs], graph))
        except ShapeProblem as problem:
            diagnostics.append(Diagnostic(str(problem), node.span,
                                          _chain_note(graph, shapes, node)))
    tensors = tuple(dataclasses.replace(t, shape=shapes[t.name]) for t in graph.tensors)
    return dataclasses.replace(graph, tensors=tensors), diagnostics


def _infer_node(node: Node, shapes: list[Shape | None], graph: Graph) -> dict[str, Shape]:
    """The shapes of the node's outputs and of the parameters it reads, by its op's rule."""
    subject = graph.layer(node.layer).display if graph.has_layer(node.layer) else node.layer
    context = ShapeContext(node, shapes, subject,
                           [_producer_display(graph, name) for name in node.inputs])
    return registry.get(node.op).shape(context)


def _producer_display(graph: Graph, tensor: str) -> str:
    producer = graph.producer(tensor)
    layer = graph.input if producer is None else producer.layer
    return graph.layer(layer).display


def _chain_note(graph: Graph, shapes: dict[str, Shape | None], failed: Node) -> tuple[Note, ...]:
    """`input 1x12x12 -> conv c1 6x8x8 -> maxpool1 6x4x4 (floor((8 + 0 - 2) / 2) + 1 = 4)`."""
    steps, previous = [], None
    for layer in graph.layers:
        if layer.name == failed.layer:
            break
        shape = shapes.get(layer.output)
        if shape is None:
            return ()
        steps.append(f"{layer.display} {sample(shape)}")
        previous = layer
    if previous is None:
        return ()
    text = " -> ".join(steps)
    window_node = _window_node_of(graph, previous.name)
    if window_node is not None:
        source_shape = shapes[window_node.inputs[0]]
        text += f" ({arithmetic(source_shape[2], source_shape[3], window_node.attrs.window)})"
    return (Note(text),)


def _window_node_of(graph: Graph, layer: str) -> Node | None:
    """The layer's op with a sliding window (conv, pool), whose arithmetic the note shows."""
    return next((n for n in graph.nodes_of(layer) if hasattr(n.attrs, "window")), None)
