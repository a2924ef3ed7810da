"""Rewrites of the folded node list before translation, each matching what exporters write
for one thing cnnc has as one layer or activation:

- Identity: no node, a second name for its input;
- Sigmoid(x) · x → silu; HardSigmoid(x; 1/6, 1/2) · x → hardswish;
- x · ½ · (1 + erf(x / √2)) in its two usual orders → gelu;
- MatMul by a constant, with the Add of a constant after it → one dense (a Gemm);
- ReduceMean / ReduceMax over the two spatial axes → a global pool;
- a zero Pad in front of a Conv or an AveragePool that counts padding, or a −∞ Pad in front of
  a MaxPool → the padding of that layer;
- Mul and Add of a per-channel constant after a Conv → its weight and bias.

A rewritten op is named after the node the rewrite keeps, with the others listed in
`Op.attrs["fused"]` so errors can name them all.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np

from cnnc.onnx.fold import Constants, Op

SQRT2 = math.sqrt(2.0)


class Graph:
    """The ops left after folding, with who reads each tensor; rewrites edit it in place
    (a builder used for one import only)."""

    def __init__(self, ops: list[Op], constants: Constants, output: str) -> None:
        self.ops = list(ops)
        self.constants = constants
        self.output = output
        self.aliases: dict[str, str] = {}

    def readers(self) -> Counter:
        count: Counter = Counter(name for op in self.ops for name in op.inputs if name)
        count[self.output] += 1  # the graph's output is read by the caller
        return count

    def producer(self) -> dict[str, Op]:
        return {name: op for op in self.ops for name in op.outputs if name}

    def resolve(self, name: str) -> str:
        while name in self.aliases:
            name = self.aliases[name]
        return name

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.constant(name) if name else None


def rewrite(graph: Graph) -> Graph:
    for step in REWRITES:
        step(graph)
    return graph


def _replace(graph: Graph, remove: list[Op], new: Op) -> None:
    """`new` in the place of the last op of `remove`, the others dropped."""
    at = max(graph.ops.index(op) for op in remove)
    graph.ops[at] = new
    for op in remove:
        if op in graph.ops and op is not new:
            graph.ops.remove(op)


def _fused(*ops: Op) -> tuple[str, ...]:
    return tuple(op.name for op in ops)


# -- aliases ------------------------------------------------------------------------------

def aliases(graph: Graph) -> None:
    """Nodes that change nothing at inference become second names of their input."""
    kept = []
    for op in graph.ops:
        if _is_alias(op, graph):
            graph.aliases[op.outputs[0]] = op.inputs[0]
        else:
            kept.append(op)
    renamed = []
    for op in kept:
        inputs = tuple(graph.resolve(name) if name else "" for name in op.inputs)
        renamed.append(Op(op.op_type, op.name, inputs, op.outputs, op.attrs))
    graph.ops = renamed
    graph.output = graph.resolve(graph.output)


def _is_alias(op: Op, graph: Graph) -> bool:
    return op.op_type == "Identity"


# -- activations written as several nodes -------------------------------------------------

def gated_activations(graph: Graph) -> None:
    """x · sigmoid(x) → silu and x · hardsigmoid(x) → hardswish, when nothing else reads
    the gate."""
    readers, producer = graph.readers(), graph.producer()
    for op in list(graph.ops):
        if op.op_type != "Mul" or len(op.inputs) != 2:
            continue
        for x, gate in (op.inputs, op.inputs[::-1]):
            source = producer.get(gate)
            if source is None or readers[gate] != 1 or source.inputs[:1] != (x,):
                continue
            kind = _gate_kind(source)
            if kind is not None:
                new = Op(kind, op.name, (x,), op.outputs, {"fused": _fused(source, op)})
                _replace(graph, [source, op], new)
                break


def _gate_kind(source: Op) -> str | None:
    if source.op_type == "Sigmoid":
        return "cnnc.silu"
    if source.op_type == "HardSigmoid" and _close(source.attr("alpha", 0.2), 1 / 6) \
            and _close(source.attr("beta", 0.5), 0.5):
        return "HardSwish"
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def erf_gelu(graph: Graph) -> None:
    """Div(x, √2) (or Mul(x, 1/√2)) → Erf → Add 1 → the two Muls by x and ½, in either
    order: exporters before opset 20 write GELU so."""
    for erf in [op for op in graph.ops if op.op_type == "Erf"]:
        match = _gelu_from(graph, erf)
        if match is not None:
            x, nodes, last = match
            new = Op("Gelu", last.name, (x,), last.outputs, {"fused": _fused(*nodes)})
            _replace(graph, nodes, new)


def _gelu_from(graph: Graph, erf: Op) -> tuple[str, list[Op], Op] | None:
    readers, producer = graph.readers(), graph.producer()
    scale = producer.get(erf.inputs[0])
    if scale is None or readers[erf.inputs[0]] != 1:
        return None
    x = _scaled_by(graph, scale, {"Div": SQRT2, "Mul": 1 / SQRT2})
    plus = _only_reader(graph, erf.outputs[0])
    if x is None or plus is None or plus.op_type != "Add" \
            or not _other_is(graph, plus, erf.outputs[0], 1.0):
        return None
    first = _only_reader(graph, plus.outputs[0])
    if first is None or first.op_type != "Mul":
        return None
    other = _other_input(first, plus.outputs[0])
    if other == x:  # x · (1 + erf) · ½
        half = _only_reader(graph, first.outputs[0])
        if half is None or half.op_type != "Mul" or not _other_is(graph, half,
                                                                  first.outputs[0], 0.5):
            return None
        return x, [scale, erf, plus, first, half], half
    source = producer.get(other)  # (x · ½) · (1 + erf)
    if source is None or source.op_type != "Mul" or readers[other] != 1 \
            or x not in source.inputs or not _other_is(graph, source, x, 0.5):
        return None
    return x, [scale, erf, plus, source, first], first


def _scaled_by(graph: Graph, op: Op, by: dict[str, float]) -> str | None:
    if op.op_type not in by or len(op.inputs) != 2:
        return None
    value = graph.constant(op.inputs[1])
    if value is None or value.size != 1 or not _close(float(value.reshape(())), by[op.op_type]):
        return None
    return op.inputs[0]


def _only_reader(graph: Graph, name: str) -> Op | None:
    if graph.readers()[name] != 1:
        return None
    return next((op for op in graph.ops if name in op.inputs), None)


def _other_input(op: Op, name: str) -> str:
    return op.inputs[1] if op.inputs[0] == name else op.inputs[0]


def _other_is(graph: Graph, op: Op, name: str, number: float) -> bool:
    if len(op.inputs) != 2 or name not in op.inputs:
        return False
    value = graph.constant(_other_input(op, name))
    return value is not None and value.size == 1 and _close(float(value.reshape(())), number)


# -- layers written as several nodes ------------------------------------------------------

def matmul_add(graph: Graph) -> None:
    """MatMul(x, W) [+ b] with W and b constant → Gemm(x, W, b), the form of a dense layer."""
    for op in [op for op in graph.ops if op.op_type == "MatMul"]:
        if graph.constant(op.inputs[1]) is None or graph.constant(op.inputs[0]) is not None:
            continue
        plus = _only_reader(graph, op.outputs[0])
        if plus is not None and plus.op_type == "Add" and len(plus.inputs) == 2 \
                and graph.constant(_other_input(plus, op.outputs[0])) is not None:
            bias = _other_input(plus, op.outputs[0])
            new = Op("Gemm", plus.name, (op.inputs[0], op.inputs[1], bias), plus.outputs,
                     {"fused": _fused(op, plus), "from_matmul": 1})
            _replace(graph, [op, plus], new)
        else:
            new = Op("Gemm", op.name, op.inputs, op.outputs,
                     {"fused": _fused(op), "from_matmul": 1})
            _replace(graph, [op], new)


def spatial_reductions(graph: Graph) -> None:
    """ReduceMean / ReduceMax over axes 2 and 3 of an image → a global pool (keepdims=0
    flattens after it)."""
    kinds = {"ReduceMean": "GlobalAveragePool", "ReduceMax": "GlobalMaxPool"}
    for op in [op for op in graph.ops if op.op_type in kinds]:
        axes = op.attr("axes")
        if axes is None and len(op.inputs) > 1 and op.inputs[1]:
            value = graph.constant(op.inputs[1])
            axes = None if value is None else [int(a) for a in value.reshape(-1)]
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        attrs = {"fused": _fused(op), "keepdims": op.attr("keepdims", 1), "rank_check": 4}
        _replace(graph, [op], Op(kinds[op.op_type], op.name, op.inputs[:1], op.outputs, attrs))


def merge_pads(graph: Graph) -> None:
    """A constant Pad of the spatial axes only, read only by a layer that pads with the same
    value, becomes that layer's padding."""
    producer, readers = graph.producer(), graph.readers()  # a merge changes neither's
    # entries for the tensors still to look at
    for op in [op for op in graph.ops if op.op_type in ("Conv", "AveragePool", "MaxPool")]:
        pad = producer.get(op.inputs[0])
        if pad is None or pad.op_type != "Pad" or readers[op.inputs[0]] != 1:
            continue
        amounts = spatial_pads(graph, pad)
        if amounts is None or not _same_fill(graph, pad, op):
            continue
        attrs = dict(op.attrs, pads=_add_pads(op.attr("pads"), amounts),
                     fused=(*op.attr("fused", ()), pad.name))
        if op.op_type == "AveragePool" and not op.attr("count_include_pad", 0):
            if any(op.attr("pads") or ()):
                continue  # its own padding is not counted, the Pad's would be
            attrs["count_include_pad"] = 1
        new = Op(op.op_type, op.name, (pad.inputs[0], *op.inputs[1:]), op.outputs, attrs)
        _replace(graph, [pad, op], new)


def spatial_pads(graph: Graph, pad: Op) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of a constant-mode Pad of a 4-D tensor that pads only its
    height and width, by non-negative amounts; None otherwise."""
    if pad.attr("mode", "constant") != "constant":
        return None
    pads = pad.attr("pads")
    if pads is None and len(pad.inputs) > 1:
        value = graph.constant(pad.inputs[1])
        pads = None if value is None else [int(p) for p in value.reshape(-1)]
    axes = graph.constant(pad.inputs[3]) if len(pad.inputs) > 3 and pad.inputs[3] else None
    if pads is None:
        return None
    if axes is not None:
        full = [0] * 8
        for i, axis in enumerate(int(a) % 4 for a in axes.reshape(-1)):
            full[axis], full[axis + 4] = pads[i], pads[i + len(axes.reshape(-1))]
        pads = full
    if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
        return None
    return pads[2], pads[3], pads[6], pads[7]


def pad_value(graph: Graph, pad: Op) -> float | None:
    if len(pad.inputs) > 2 and pad.inputs[2]:
        value = graph.constant(pad.inputs[2])
        return None if value is None or value.size != 1 else float(value.reshape(()))
    return float(pad.attr("value", 0.0))


def _same_fill(graph: Graph, pad: Op, op: Op) -> bool:
    value = pad_value(graph, pad)
    if value is None:
        return False
    return value == -math.inf if op.op_type == "MaxPool" else value == 0.0


def _add_pads(pads: list[int] | None, extra: tuple[int, int, int, int]) -> list[int]:
    top, left, bottom, right = pads if pads else (0, 0, 0, 0)
    return [top + extra[0], left + extra[1], bottom + extra[2], right + extra[3]]


def channel_affine(graph: Graph) -> None:
    """Mul and Add of a per-channel constant after a Conv that nothing else reads, as
    converters write a batch norm (x·scale + shift) or a separate bias: folded into the
    Conv's weight and bias. Repeated, so Conv → Mul → Add folds whole."""
    changed = True
    while changed:
        changed = False
        producer, readers = graph.producer(), graph.readers()
        for op in [op for op in graph.ops if op.op_type in ("Mul", "Add")]:
            folded = _fold_into_conv(graph, op, producer, readers)
            if folded is not None:
                _replace(graph, [producer[_other_input(op, folded[1])], op], folded[0])
                changed = True
                break


def _fold_into_conv(graph: Graph, op: Op, producer: dict[str, Op],
                    readers: Counter) -> tuple[Op, str] | None:
    """The Conv with `op` folded in, and the constant's name; None where it does not fit."""
    if len(op.inputs) != 2:
        return None
    for name in op.inputs:
        value, conv = graph.constant(name), producer.get(_other_input(op, name))
        if value is None or conv is None or conv.op_type != "Conv" \
                or readers[conv.outputs[0]] != 1:
            continue
        weight = graph.constant(conv.inputs[1])
        if weight is None or weight.ndim != 4 or readers[conv.inputs[1]] != 1:
            return None
        per_channel = _per_channel(value, weight.shape[0])
        if per_channel is None:
            return None
        bias = graph.constant(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] \
            else np.zeros(weight.shape[0], weight.dtype)
        if op.op_type == "Mul":
            weight = weight * per_channel.reshape(-1, 1, 1, 1).astype(weight.dtype)
            bias = bias * per_channel.astype(bias.dtype)
        else:
            bias = bias + per_channel.astype(bias.dtype)
        names = (_constant(graph, conv.inputs[1], weight),
                 _constant(graph, f"{conv.inputs[1]}::bias", bias))
        attrs = dict(conv.attrs, fused=(*conv.attr("fused", ()), op.name))
        return Op("Conv", conv.name, (conv.inputs[0], *names), op.outputs, attrs), name
    return None


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
    """A constant that broadcasts over N x C x H x W by channel only, as a C vector."""
    if value.ndim > 4 or any(d != 1 for i, d in enumerate(value.shape[::-1]) if i in (0, 1)):
        return None
    shape = (1,) * (4 - value.ndim) + value.shape
    if shape[0] != 1 or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)


def _constant(graph: Graph, name: str, value: np.ndarray) -> str:
    """`value` under `name` among the folded constants (both probes: it has no batch)."""
    graph.constants.first[name] = graph.constants.second[name] = value
    return name


REWRITES: tuple[Callable[[Graph], None], ...] = (
    aliases, gated_activations, erf_gelu, matmul_add, spatial_reductions, merge_pads,
    channel_affine)
