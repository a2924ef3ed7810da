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
            notes = _chain_note(graph, shapes, node) + _use_notes(graph, node)
            diagnostics.append(Diagnostic(str(problem), node.span, notes))
    tensors = tuple(dataclasses.replace(t, shape=shapes[t.name]) for t in graph.tensors)
    return dataclasses.replace(graph, tensors=tensors), diagnostics


def _use_notes(graph: Graph, node: Node) -> tuple[Note, ...]:
    """A line of a used block: where each enclosing block was used, innermost first."""
    if not graph.has_layer(node.layer):
        return ()
    return tuple(Note("in the block used here", span) for span in graph.layer(node.layer).uses)


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
    """`input 1x12x12 -> conv c1 6x8x8 -> maxpool1 6x4x4 (floor((8 + 0 - 2) / 2) + 1 = 4)`:
    for each layer the failing node reads, the layers its value comes from, in program
    order, and that layer's window arithmetic. A linear network's chain is every layer above
    the failing one; a merge gets one chain an input."""
    notes: list[Note] = []
    for source in _source_layers(graph, failed):
        text = _chain_text(graph, shapes, source)
        if text is None:
            return ()
        if all(note.message != text for note in notes):
            notes.append(Note(text))
    return tuple(notes)


def _chain_text(graph: Graph, shapes: dict[str, Shape | None], source: str) -> str | None:
    """The chain of layers that ends in layer `source`; None where a shape is unknown."""
    ancestors = _ancestors(graph, source)
    steps = []
    for layer in graph.layers:
        if layer.name not in ancestors:
            continue
        shape = shapes.get(layer.output)
        if shape is None:
            return None
        steps.append(f"{layer.display} {sample(shape)}")
    text = " -> ".join(steps)
    window_node = _window_node_of(graph, source)
    if window_node is not None:
        source_shape = shapes[window_node.inputs[0]]
        text += f" ({arithmetic(source_shape[2], source_shape[3], window_node.attrs.window)})"
    return text


def _layer_of(graph: Graph, tensor: str) -> str:
    producer = graph.producer(tensor)
    return graph.input if producer is None else producer.layer


def _data_inputs(graph: Graph, node: Node) -> list[str]:
    return [name for name in node.inputs if graph.tensor(name).role in _DATA_ROLES]


def _source_layers(graph: Graph, failed: Node) -> list[str]:
    """The other layers whose values the failing node reads, directly or through the ops of
    its own layer before it, in the order it reads them."""
    sources: list[str] = []
    pending = [failed]
    while pending:
        node = pending.pop(0)
        for name in _data_inputs(graph, node):
            producer = graph.producer(name)
            if producer is not None and producer.layer == failed.layer:
                pending.append(producer)
            elif _layer_of(graph, name) not in sources:
                sources.append(_layer_of(graph, name))
    return sources


def _ancestors(graph: Graph, layer: str) -> set[str]:
    """`layer` and every layer its value is computed from."""
    found, pending = {layer}, [layer]
    while pending:
        for node in graph.nodes_of(pending.pop()):
            for name in _data_inputs(graph, node):
                above = _layer_of(graph, name)
                if above not in found:
                    found.add(above)
                    pending.append(above)
    return found


def _window_node_of(graph: Graph, layer: str) -> Node | None:
    """The layer's op with a sliding window (conv, pool), whose arithmetic the note shows."""
    return next((n for n in graph.nodes_of(layer) if hasattr(n.attrs, "window")), None)
