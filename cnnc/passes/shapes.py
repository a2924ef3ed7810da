"""Graph → typed graph: every tensor's shape, inferred op by op, with errors that show the
arithmetic.

`infer` holds one case per op. A shape error names the layer, its line and column, both
shapes, and notes how the input shape came about (the chain of layers and the last layer's
`floor((H + 2P - K) / S) + 1` arithmetic). All shape errors of a graph are reported together;
what follows a failed layer is not checked, since its input shape is unknown.
"""

from __future__ import annotations

import dataclasses
import math

from cnnc.diagnostics import CnncSemanticError, Diagnostic, Note
from cnnc.graph.ir import (
    BATCH,
    ConvAttrs,
    DenseAttrs,
    Graph,
    LossAttrs,
    Node,
    Op,
    OpGroup,
    PoolAttrs,
    Role,
    Shape,
    Window,
    format_shape,
)

# Tensors whose shape flows from the input; parameters and targets get theirs from the op.
_DATA_ROLES = (Role.INPUT, Role.VALUE)


class ShapeProblem(Exception):
    """Raised by one op's case; becomes a diagnostic with the layer's span and the notes."""


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
    """One case per op: the shapes of the node's outputs and of the parameters it reads."""
    x = shapes[0]
    match node.op:
        case Op.CONV2D:
            attrs = node.attrs
            assert isinstance(attrs, ConvAttrs)
            out = _windowed(node, x, attrs.window, graph, channels=attrs.filters)
            return {node.output: out,
                    node.inputs[1]: (attrs.filters, x[1], *attrs.window.kernel)}
        case Op.MAXPOOL2D | Op.AVGPOOL2D:
            attrs = node.attrs
            assert isinstance(attrs, PoolAttrs)
            out = _windowed(node, x, attrs.window, graph, channels=x[1])
            return dict.fromkeys(node.outputs, out)  # max pooling's argmax is shaped alike
        case Op.DENSE:
            attrs = node.attrs
            assert isinstance(attrs, DenseAttrs)
            features = math.prod(x[1:])
            return {node.output: (BATCH, attrs.units), node.inputs[1]: (attrs.units, features)}
        case Op.BIAS_ADD:
            return {node.output: x, node.inputs[1]: (x[1],)}
        case Op.FLATTEN:
            return {node.output: (BATCH, math.prod(x[1:]))}
        case Op.RELU | Op.SIGMOID | Op.TANH:
            return {node.output: x}
        case Op.SOFTMAX:
            if len(x) != 2:
                raise ShapeProblem(f"softmax needs a vector of class scores, but "
                                   f"{graph.layer(node.layer).display} gives {_sample(x)}; "
                                   "add a dense layer before it")
            return {node.output: x}
        case Op.CROSS_ENTROPY:
            _check_declared(node, x, graph)
            return {node.output: (), node.inputs[1]: (BATCH,)}
        case Op.MSE:
            _check_declared(node, x, graph)
            return {node.output: (), node.inputs[1]: x}
    raise AssertionError(f"no shape rule for {node.op}")


def _windowed(node: Node, x: Shape, window: Window, graph: Graph, channels: int) -> Shape:
    """Output N x channels x H' x W' of a conv or pool, H' = floor((H + 2P - K) / S) + 1."""
    subject = graph.layer(node.layer).display
    source = _producer_display(graph, node.inputs[0])
    if len(x) != 4:
        raise ShapeProblem(f"{subject} needs a CxHxW input, but {source} gives {_sample(x)}")
    (kh, kw), (ph, pw) = window.kernel, window.pad
    if x[2] + 2 * ph < kh or x[3] + 2 * pw < kw:
        need = f"{max(kh - 2 * ph, 1)}x{max(kw - 2 * pw, 1)}"
        padded = f" (a {kh}x{kw} window with pad {ph}x{pw})" if ph or pw else ""
        raise ShapeProblem(f"{subject} needs an input of at least {need}{padded}, "
                           f"but {source} gives {_sample(x)}")
    height, width = output_size(x[2], x[3], window)
    return (BATCH, channels, height, width)


def output_size(height: int, width: int, window: Window) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = window.kernel, window.stride, window.pad
    return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1


def arithmetic(height: int, width: int, window: Window) -> str:
    """`floor((8 + 0 - 2) / 2) + 1 = 4`, once when height and width are computed alike."""
    out_h, out_w = output_size(height, width, window)

    def one(size: int, pad: int, kernel: int, stride: int, out: int) -> str:
        return f"floor(({size} + {2 * pad} - {kernel}) / {stride}) + 1 = {out}"

    rows = one(height, window.pad[0], window.kernel[0], window.stride[0], out_h)
    cols = one(width, window.pad[1], window.kernel[1], window.stride[1], out_w)
    return rows if rows == cols else f"H: {rows}, W: {cols}"


def _check_declared(node: Node, output: Shape, graph: Graph) -> None:
    attrs = node.attrs
    assert isinstance(attrs, LossAttrs)
    source = _producer_display(graph, node.inputs[0])
    if node.op is Op.CROSS_ENTROPY and len(output) != 2:
        raise ShapeProblem(f"loss cross_entropy needs class probabilities, but {source} "
                           f"gives {_sample(output)}")
    if attrs.declared is not None and tuple(output[1:]) != attrs.declared:
        key = "classes" if node.op is Op.CROSS_ENTROPY else "targets"
        declared = format_shape(attrs.declared, "x")
        raise ShapeProblem(f"loss {node.op.value} declares {key}={declared}, but the network "
                           f"output {source} gives {_sample(output)}")


def _producer_display(graph: Graph, tensor: str) -> str:
    producer = graph.producer(tensor)
    layer = graph.input if producer is None else producer.layer
    return graph.layer(layer).display


def _sample(shape: Shape) -> str:
    """One sample's shape, `6x4x4`: the batch dimension left out, as the program writes it."""
    return format_shape(tuple(shape[1:]), "x")


def _chain_note(graph: Graph, shapes: dict[str, Shape | None], failed: Node) -> tuple[Note, ...]:
    """`input 1x12x12 -> conv c1 6x8x8 -> maxpool1 6x4x4 (floor((8 + 0 - 2) / 2) + 1 = 4)`."""
    steps, previous = [], None
    for layer in graph.layers:
        if layer.name == failed.layer:
            break
        shape = shapes.get(layer.output)
        if shape is None:
            return ()
        steps.append(f"{layer.display} {_sample(shape)}")
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
    return next((n for n in graph.nodes_of(layer) if n.op in OpGroup.WINDOWED), None)
