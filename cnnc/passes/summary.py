"""Per-layer summary: output shape, parameters, FLOPs and memory, from a typed graph or from
the `layers` a module file's manifest records (so a module needs no front end for it)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from cnnc.graph.ir import BATCH, ConvAttrs, Graph, Layer, Node, Op, Role, format_shape

FLOPS_NOTE = "FLOPs: 2 per multiply-add of conv and dense layers, for one sample"
MEMORY_NOTE = ("memory: the parameters' bytes, and the bytes of the tensors a layer writes "
               "for one sample (its output; max pooling also its argmax)")
DTYPE_BYTES = {"f32": 4, "f64": 8, "i32": 4, "i64": 8}


@dataclass(frozen=True, slots=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    flops: int
    param_bytes: int = 0
    activation_bytes: int = 0  # a sample's


@dataclass(frozen=True)
class Summary:
    """What `cnnc summary` shows; `str()` and `repr()` are the table."""

    network: str
    dtype: str
    input: tuple[str, tuple[int, ...]]
    output: tuple[str, tuple[int, ...]]
    rows: tuple[LayerRow, ...]
    parameters: tuple[tuple[str, tuple[int, ...]], ...]
    loss: str | None

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable_params(self) -> int:
        return self.total_params  # every parameter of a cnnc network is trained

    def __str__(self) -> str:
        return format_table(self)

    __repr__ = __str__


def summarize(graph: Graph) -> Summary:
    rows = tuple(_row(graph, layer) for layer in graph.layers)
    loss = graph.producer(graph.loss).op.value if graph.loss else None
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


def rows_to_json(summary: Summary) -> list[dict[str, Any]]:
    """The rows as a module file's manifest records them."""
    return [dict(asdict(r), output_shape=list(r.output_shape)) for r in summary.rows]


def from_manifest(manifest: dict[str, Any]) -> Summary:
    """The summary a module file's manifest holds (checked against its program on load)."""
    rows = tuple(LayerRow(**dict(r, output_shape=tuple(r["output_shape"])))
                 for r in manifest["layers"])
    params = tuple((e["name"], tuple(e["shape"])) for e in manifest["storage"]
                   if e["role"] == "param")
    io = {key: (manifest[key]["name"], tuple(manifest[key]["shape"]))
          for key in ("input", "output")}
    loss = manifest["loss"]["kind"] if "loss" in manifest else None
    return Summary(manifest["network"], manifest["dtype"], io["input"], io["output"], rows,
                   params, loss)


def format_table(summary: Summary) -> str:
    rows = summary.rows
    header = ("layer", "kind", "output shape", "params", "FLOPs", "param bytes",
              "act. bytes")
    cells = [(r.name, r.kind, format_shape(r.output_shape, "x"), f"{r.params:,}",
              f"{r.flops:,}", f"{r.param_bytes:,}", f"{r.activation_bytes:,}") for r in rows]
    total = ("total", "", "", f"{summary.total_params:,}", f"{sum(r.flops for r in rows):,}",
             f"{sum(r.param_bytes for r in rows):,}",
             f"{sum(r.activation_bytes for r in rows):,}")
    widths = [max(len(row[i]) for row in [header, *cells, total]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        left = [row[i].ljust(widths[i]) for i in range(3)]
        right = [row[i].rjust(widths[i]) for i in range(3, len(row))]
        return "  ".join(left + right).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [f"network {summary.network} ({summary.dtype}; shapes are per sample, "
           f"the batch size is chosen at run time)", line(header), rule]
    out += [line(c) for c in cells]
    out += [rule, line(total),
            f"parameters: {summary.total_params:,} in all, {summary.trainable_params:,} "
            f"trainable ({human_bytes(sum(r.param_bytes for r in rows))}); activations of "
            f"one sample: {human_bytes(sum(r.activation_bytes for r in rows))}",
            FLOPS_NOTE, MEMORY_NOTE]
    return "\n".join(out) + "\n"


def human_bytes(count: int) -> str:
    """1,536 -> '1.5 KiB': sizes a reader takes in at a glance."""
    if count < 1024:
        return f"{count:,} bytes"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GiB"


def to_json(summary: Summary) -> str:
    data = {
        "network": summary.network,
        "dtype": summary.dtype,
        "input": {"name": summary.input[0], "shape": list(summary.input[1])},
        "output": {"name": summary.output[0], "shape": list(summary.output[1])},
        "layers": rows_to_json(summary),
        "parameters": [{"name": n, "shape": list(s)} for n, s in summary.parameters],
        "total_params": summary.total_params,
        "trainable_params": summary.trainable_params,
        "total_flops": sum(r.flops for r in summary.rows),
        "param_bytes": sum(r.param_bytes for r in summary.rows),
        "activation_bytes_per_sample": sum(r.activation_bytes for r in summary.rows),
        "loss": summary.loss,
    }
    return json.dumps(data, indent=2) + "\n"
