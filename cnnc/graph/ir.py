"""The graph IR: named tensors, ops as an Enum with named groups, frozen nodes and layers.

A network is decomposed into primitive ops (conv2d, bias_add, relu, ...) on named tensors, so
that gradient rules can be written per op and the fusion pass can group them again into
kernels. Backward ops will be further members of `Op`, appended to the same node list.
Shapes are `None` until `shapes.infer` fills them; the batch dimension is the symbol `N`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from functools import cached_property

from cnnc.diagnostics import Span

BATCH = "N"
Dim = int | str
Shape = tuple[Dim, ...]


class DType(enum.Enum):
    F32 = "f32"
    F64 = "f64"
    I32 = "i32"
    I64 = "i64"

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F64)


class Op(enum.Enum):
    CONV2D = "conv2d"
    MAXPOOL2D = "maxpool2d"
    AVGPOOL2D = "avgpool2d"
    DENSE = "dense"  # x · Wᵀ on the input flattened to N x features
    BIAS_ADD = "bias_add"  # adds a per-channel (axis 1) bias
    FLATTEN = "flatten"
    RELU = "relu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    SOFTMAX = "softmax"  # over axis 1 of an N x classes tensor
    CROSS_ENTROPY = "cross_entropy"  # mean over the batch of -log p[label]
    MSE = "mse"  # mean over all elements of the squared difference
    # backward ops, made by autodiff; each names what it differentiates
    CONV2D_GRAD_INPUT = "conv2d_grad_input"  # (dy, w) -> dx: full correlation, rotated w
    CONV2D_GRAD_WEIGHT = "conv2d_grad_weight"  # (x, dy) -> dw: x correlated with dy
    BIAS_GRAD = "bias_grad"  # (dy,) -> db: dy summed over all but axis 1
    DENSE_GRAD_INPUT = "dense_grad_input"  # (dy, w) -> dx = dy · W, shaped like x
    DENSE_GRAD_WEIGHT = "dense_grad_weight"  # (x, dy) -> dw = dyᵀ · x
    MAXPOOL2D_GRAD = "maxpool2d_grad"  # (dy, argmax) -> dx: dy to where each max was
    AVGPOOL2D_GRAD = "avgpool2d_grad"  # (dy,) -> dx: dy / (kh·kw) over each window
    RELU_GRAD = "relu_grad"  # (dy, y) -> dy where y > 0
    SIGMOID_GRAD = "sigmoid_grad"  # (dy, y) -> dy · y · (1 − y)
    TANH_GRAD = "tanh_grad"  # (dy, y) -> dy · (1 − y²)
    SOFTMAX_GRAD = "softmax_grad"  # (dy, y) -> y · (dy − Σ dy·y)
    SOFTMAX_CROSS_ENTROPY_GRAD = "softmax_cross_entropy_grad"  # (p, labels) -> (p − onehot) / N
    MSE_GRAD = "mse_grad"  # (y, t) -> 2 (y − t) / size
    RESHAPE = "reshape"  # (dy,) -> dy shaped like the flatten's input
    ADD = "add"  # (a, b) -> a + b: gradients of a tensor read by several ops


class OpGroup:
    """Named sets of ops, so passes say what they mean ("every activation") not list ops."""

    ACTIVATION = frozenset({Op.RELU, Op.SIGMOID, Op.TANH, Op.SOFTMAX})
    ELEMENTWISE = frozenset({Op.RELU, Op.SIGMOID, Op.TANH, Op.BIAS_ADD})
    POOL = frozenset({Op.MAXPOOL2D, Op.AVGPOOL2D})
    WINDOWED = frozenset({Op.CONV2D, Op.MAXPOOL2D, Op.AVGPOOL2D})
    WEIGHTED = frozenset({Op.CONV2D, Op.DENSE})
    LOSS = frozenset({Op.CROSS_ENTROPY, Op.MSE})
    RESHAPE = frozenset({Op.FLATTEN, Op.RESHAPE})
    BACKWARD = frozenset({
        Op.CONV2D_GRAD_INPUT, Op.CONV2D_GRAD_WEIGHT, Op.BIAS_GRAD, Op.DENSE_GRAD_INPUT,
        Op.DENSE_GRAD_WEIGHT, Op.MAXPOOL2D_GRAD, Op.AVGPOOL2D_GRAD, Op.RELU_GRAD,
        Op.SIGMOID_GRAD, Op.TANH_GRAD, Op.SOFTMAX_GRAD, Op.SOFTMAX_CROSS_ENTROPY_GRAD,
        Op.MSE_GRAD, Op.RESHAPE, Op.ADD})
    ACTIVATION_GRAD = frozenset({Op.RELU_GRAD, Op.SIGMOID_GRAD, Op.TANH_GRAD})


def argmax_name(layer: str) -> str:
    """The int32 tensor in which max pooling records the flat position h·W + w of each max."""
    return f"{layer}.argmax"


ACTIVATION_OPS = {"relu": Op.RELU, "sigmoid": Op.SIGMOID, "tanh": Op.TANH, "softmax": Op.SOFTMAX}


class Role(enum.Enum):
    INPUT = "input"  # the network's input batch
    TARGET = "target"  # class labels or regression targets the loss compares against
    PARAM = "param"  # a trainable parameter, PyTorch layout
    VALUE = "value"  # an intermediate or output activation
    LOSS = "loss"  # the scalar loss
    STATE = "state"  # optimizer state kept between steps (momentum, Adam's moments)
    HYPER = "hyper"  # the optimizer's scalars for one step
    SCRATCH = "scratch"  # a kernel's working memory: repacked weights, padded inputs


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    role: Role
    dtype: DType
    shape: Shape | None = None

    @property
    def size(self) -> int:
        """Elements per sample (the batch dimension counts as 1)."""
        assert self.shape is not None, f"{self.name} has no shape yet"
        return math.prod(d for d in self.shape if isinstance(d, int))


@dataclass(frozen=True, slots=True)
class Window:
    """Kernel, stride and zero padding of a conv or pooling op, each as (height, width)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]


@dataclass(frozen=True, slots=True)
class ConvAttrs:
    filters: int
    window: Window


@dataclass(frozen=True, slots=True)
class PoolAttrs:
    window: Window


@dataclass(frozen=True, slots=True)
class DenseAttrs:
    units: int


@dataclass(frozen=True, slots=True)
class ReshapeAttrs:
    """The per-sample shape a reshape produces (the backward of flatten)."""

    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LossAttrs:
    """A target shape the program declared (`loss mse targets=10`), checked against the output."""

    declared: tuple[int, ...] | None = None


Attrs = ConvAttrs | PoolAttrs | DenseAttrs | LossAttrs | ReshapeAttrs | None


@dataclass(frozen=True, slots=True)
class Node:
    """One op: reads `inputs`, writes `outputs` (tensor names); `layer` is its source layer."""

    op: Op
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layer: str
    span: Span
    attrs: Attrs = None

    @property
    def output(self) -> str:
        return self.outputs[0]


@dataclass(frozen=True, slots=True)
class Layer:
    """A line of the program as the user sees it: what summaries and error notes talk about."""

    name: str
    kind: str  # input, conv, maxpool, avgpool, dense, flatten, loss
    auto_named: bool
    output: str
    span: Span
    activation: str | None = None

    @property
    def display(self) -> str:
        """`conv c3` for a named layer, `maxpool1` for an automatically named one."""
        if self.auto_named or self.name == self.kind:
            return self.name
        return f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    optimizer: str
    settings: tuple[tuple[str, int | float | None], ...]
    span: Span

    def get(self, key: str) -> int | float | None:
        return dict(self.settings)[key]


@dataclass(frozen=True)
class Graph:
    """A whole network. Lookups by name go through indexes built once per graph (the
    `cached_property`s below, which a frozen dataclass without slots can hold)."""

    name: str
    dtype: DType
    tensors: tuple[Tensor, ...]
    nodes: tuple[Node, ...]
    layers: tuple[Layer, ...]
    input: str
    output: str
    loss: str | None = None
    target: str | None = None
    train: TrainConfig | None = None
    gradients: tuple[tuple[str, str], ...] = ()  # (tensor, its gradient) after autodiff

    def tensor(self, name: str) -> Tensor:
        return self._tensor_index[name]

    @property
    def params(self) -> tuple[Tensor, ...]:
        return tuple(t for t in self.tensors if t.role is Role.PARAM)

    def layer(self, name: str) -> Layer:
        return self._layer_index[name]

    def producer(self, tensor: str) -> Node | None:
        return self._producer_index.get(tensor)

    def nodes_of(self, layer: str) -> tuple[Node, ...]:
        return self._nodes_by_layer.get(layer, ())

    @cached_property
    def _tensor_index(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.tensors}

    @cached_property
    def _layer_index(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}

    @cached_property
    def _producer_index(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs}

    @cached_property
    def _nodes_by_layer(self) -> dict[str, tuple[Node, ...]]:
        grouped: dict[str, list[Node]] = {}
        for node in self.nodes:
            grouped.setdefault(node.layer, []).append(node)
        return {layer: tuple(nodes) for layer, nodes in grouped.items()}


def verify(graph: Graph) -> None:
    """The invariants later passes rely on; raises AssertionError naming the broken one.

    Tensor names are unique; every node reads tensors that exist and are defined before it
    (inputs, parameters and targets count as defined); every value is written exactly once.
    """
    names = [t.name for t in graph.tensors]
    assert len(names) == len(set(names)), f"duplicate tensor names in {names}"
    defined = {t.name for t in graph.tensors if t.role not in (Role.VALUE, Role.LOSS)}
    for node in graph.nodes:
        for name in node.inputs:
            assert name in defined, f"{node.op.value} reads {name} before it is written"
        for name in node.outputs:
            assert name in names, f"{node.op.value} writes the undeclared tensor {name}"
            assert name not in defined, f"{name} is written twice"
            defined.add(name)
    for name in (graph.input, graph.output, graph.loss, graph.target):
        assert name is None or name in defined, f"{name} is never defined"


def format_shape(shape: Shape | None, sep: str = " x ") -> str:
    if shape is None:
        return "?"
    if shape == ():
        return "scalar"
    return sep.join(str(d) for d in shape)


def format_graph(graph: Graph) -> str:
    """The graph as text: declarations, then one line a node with its output's shape and dtype.

    Columns are aligned so two dumps diff line by line; `@line:col` ties a node to its source.
    """
    lines = [f"graph {graph.name} dtype={graph.dtype.value}"]
    declared = [t for t in graph.tensors if t.role is not Role.VALUE and t.role is not Role.LOSS]
    name_width = max(len(t.name) for t in declared)
    for tensor in declared:
        lines.append(f"  {tensor.role.value:<6} {tensor.name:<{name_width}}  "
                     f"{format_shape(tensor.shape)} {tensor.dtype.value}")
    calls = [_format_call(node) for node in graph.nodes]
    call_width = max((len(c) for c in calls), default=0)
    for node, call in zip(graph.nodes, calls, strict=True):
        types = ", ".join(f"{format_shape(t.shape)} {t.dtype.value}"
                          for t in map(graph.tensor, node.outputs))
        lines.append(f"  {call:<{call_width}}  : {types}  @{node.span.line}:{node.span.col}")
    lines.append(f"  output {graph.output}")
    for tensor, gradient in graph.gradients:
        lines.append(f"  gradient {tensor} = {gradient}")
    if graph.train is not None:
        settings = " ".join(f"{k}={_format_setting(v)}" for k, v in graph.train.settings)
        lines.append(f"  train {graph.train.optimizer} {settings}")
    return "\n".join(lines) + "\n"


def _format_call(node: Node) -> str:
    text = f"{', '.join(node.outputs)} = {node.op.value}({', '.join(node.inputs)})"
    attrs = node.attrs
    if isinstance(attrs, ConvAttrs):
        text += f" filters={attrs.filters} {_format_window(attrs.window)}"
    elif isinstance(attrs, PoolAttrs):
        text += f" {_format_window(attrs.window)}"
    elif isinstance(attrs, DenseAttrs):
        text += f" units={attrs.units}"
    elif isinstance(attrs, LossAttrs) and attrs.declared is not None:
        text += f" declared={format_shape(attrs.declared, 'x')}"
    return text


def _format_window(window: Window) -> str:
    def pair(p: tuple[int, int]) -> str:
        return f"{p[0]}x{p[1]}"

    return f"kernel={pair(window.kernel)} stride={pair(window.stride)} pad={pair(window.pad)}"


def _format_setting(value: int | float | None) -> str:
    return "none" if value is None else repr(value)
