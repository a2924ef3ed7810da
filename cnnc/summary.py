"""Per-layer summary of a typed graph: output shape, parameter count and forward FLOPs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .ir import ConvAttrs, Graph, Layer, Node, Op, Role, format_shape

FLOPS_NOTE = "FLOPs: 2 per multiply-add of conv and dense layers, for one sample"


@dataclass(frozen=True, slots=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    flops: int


def layer_rows(graph: Graph) -> list[LayerRow]:
    rows = []
    for layer in graph.layers:
        nodes = graph.nodes_of(layer.name)
        params = {p for n in nodes for p in n.inputs if graph.tensor(p).role is Role.PARAM}
        count = sum(graph.tensor(p).size for p in params)
        flops = sum(node_flops(graph, n) for n in nodes)
        shape = graph.tensor(layer.output).shape
        rows.append(LayerRow(layer.name, _kind(layer), tuple(shape[1:]), count, flops))
    return rows


def node_flops(graph: Graph, node: Node) -> int:
    """2 × multiply-adds for one sample of a conv or dense op, 0 for every other op."""
    if node.op is Op.CONV2D:
        assert isinstance(node.attrs, ConvAttrs)
        weight = graph.tensor(node.inputs[1]).shape
        out = graph.tensor(node.output).shape
        return 2 * math.prod(weight) * out[2] * out[3]
    if node.op is Op.DENSE:
        return 2 * math.prod(graph.tensor(node.inputs[1]).shape)
    return 0


def _kind(layer: Layer) -> str:
    return layer.kind + (f"+{layer.activation}" if layer.activation else "")


def format_table(graph: Graph) -> str:
    rows = layer_rows(graph)
    header = ("layer", "kind", "output shape", "params", "FLOPs")
    cells = [(r.name, r.kind, format_shape(r.output_shape, "x"), f"{r.params:,}",
              f"{r.flops:,}") for r in rows]
    total = ("total", "", "", f"{sum(r.params for r in rows):,}",
             f"{sum(r.flops for r in rows):,}")
    widths = [max(len(row[i]) for row in [header, *cells, total]) for i in range(5)]

    def line(row: tuple[str, ...]) -> str:
        left = [row[i].ljust(widths[i]) for i in range(3)]
        right = [row[i].rjust(widths[i]) for i in range(3, 5)]
        return "  ".join(left + right).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [f"network {graph.name} ({graph.dtype.value}; shapes are per sample, "
           f"the batch size is chosen at run time)", line(header), rule]
    out += [line(c) for c in cells]
    out += [rule, line(total), FLOPS_NOTE]
    return "\n".join(out) + "\n"


def to_json(graph: Graph) -> str:
    rows = layer_rows(graph)
    data = {
        "network": graph.name,
        "dtype": graph.dtype.value,
        "input": {"name": graph.input, "shape": list(graph.tensor(graph.input).shape[1:])},
        "output": {"name": graph.output, "shape": list(graph.tensor(graph.output).shape[1:])},
        "layers": [{"name": r.name, "kind": r.kind, "output_shape": list(r.output_shape),
                    "params": r.params, "flops": r.flops} for r in rows],
        "parameters": [{"name": p.name, "shape": list(p.shape)} for p in graph.params],
        "total_params": sum(r.params for r in rows),
        "total_flops": sum(r.flops for r in rows),
        "loss": _loss_kind(graph),
    }
    return json.dumps(data, indent=2) + "\n"


def _loss_kind(graph: Graph) -> str | None:
    node = graph.producer(graph.loss) if graph.loss else None
    return None if node is None else node.op.value
