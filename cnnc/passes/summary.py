"""Per-layer summary of a typed graph: output shape, parameters, FLOPs and memory. The rows,
the table and the JSON are the module file's (artifact.summary), so a module needs no front
end for its summary; this half makes the rows from the graph at compile time."""

from __future__ import annotations

import math

from cnnc.artifact.summary import (
    DTYPE_BYTES,
    FLOPS_NOTE,
    MEMORY_NOTE,
    LayerRow,
    Summary,
    format_table,
    from_manifest,
    human_bytes,
    rows_to_json,
    to_json,
)
from cnnc.graph.ir import BATCH, Graph, Layer, Node, Role
from cnnc.ops import registry

# the manifest's half, for the compiler's callers that take both from here
__all__ = ["DTYPE_BYTES", "FLOPS_NOTE", "MEMORY_NOTE", "LayerRow", "Summary", "format_table",
           "from_manifest", "human_bytes", "node_flops", "rows_to_json", "summarize",
           "to_json"]


def summarize(graph: Graph) -> Summary:
    rows = tuple(_row(graph, layer) for layer in graph.layers)
    loss = graph.producer(graph.loss).op if graph.loss else None
    return Summary(graph.name, graph.dtype.value,
                   (graph.input, tuple(graph.tensor(graph.input).shape[1:])),
                   (graph.output, tuple(graph.tensor(graph.output).shape[1:])), rows,
                   tuple((p.name, tuple(p.shape)) for p in graph.params), loss)


def _row(graph: Graph, layer: Layer) -> LayerRow:
    nodes = graph.nodes_of(layer.name)
    params = {p for n in nodes for p in n.inputs if graph.tensor(p).role is Role.PARAM}
    param_elements = sum(graph.tensor(p).size for p in params)
    written = [layer.output] + [t for n in nodes for t in n.outputs[1:]]  # + argmax
    activation = sum(_sample_bytes(graph, name) for name in dict.fromkeys(written))
    flops = sum(node_flops(graph, n) for n in nodes)
    itemsize = DTYPE_BYTES[graph.dtype.value]
    return LayerRow(layer.name, _kind(layer), tuple(graph.tensor(layer.output).shape[1:]),
                    param_elements, flops, param_elements * itemsize, activation)


def _sample_bytes(graph: Graph, name: str) -> int:
    tensor = graph.tensor(name)
    return math.prod(d for d in tensor.shape if d != BATCH) * DTYPE_BYTES[tensor.dtype.value]


def node_flops(graph: Graph, node: Node) -> int:
    """FLOPs of one sample by the node's op (`OpDef.flops`): 2 per multiply-add of conv and
    dense ops, 0 for the others."""
    return registry.get(node.op).flops(graph, node)


def _kind(layer: Layer) -> str:
    return layer.kind + (f"+{layer.activation}" if layer.activation else "")
