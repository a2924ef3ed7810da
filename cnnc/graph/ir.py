"""The graph IR: named tensors, frozen nodes (each names its op) and layers.

A network is decomposed into primitive ops (conv2d, bias_add, relu, ...) on named tensors, so
that gradient rules can be written per op and the fusion pass can group them again into
kernels. What each op means lives in the op registry (`cnnc/ops/`); a node names its op.
autodiff appends the backward nodes to the same node list.
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


class Phase(enum.Enum):
    """Which pass made a node, and so which entry points run it."""

    FORWARD = "forward"
    LOSS = "loss"  # the loss of the forward pass's output against the targets
    BACKWARD = "backward"  # made by autodiff
    INFERENCE = "inference"  # computes a forward value otherwise at inference (folded batch norm)


class Role(enum.Enum):
    INPUT = "input"  # the network's input batch
    TARGET = "target"  # class labels or regression targets the loss compares against
    PARAM = "param"  # a trainable parameter, PyTorch layout
    VALUE = "value"  # an intermediate or output activation
    LOSS = "loss"  # the scalar loss
    STATE = "state"  # optimizer state kept between steps (momentum, Adam's moments)
    HYPER = "hyper"  # the optimizer's scalars for one step
    SCRATCH = "scratch"  # a kernel's working memory: repacked weights, padded inputs
    BUFFER = "buffer"  # state a training step updates, no gradient (running statistics)
    NOISE = "noise"  # uniform random numbers in [0, 1) the runtime draws for a training call
    # weights repacked for a kernel's register blocks (schedule.prepack): the module keeps
    # them between calls and repacks them when the parameters change
    PACKED = "packed"


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
    """Kernel, stride and dilation of a conv or pooling op, each as (height, width), and its
    zero padding as (top, left, bottom, right); a pair (PH, PW) is read as (PH, PW, PH, PW).

    Two sizes are only known once the input's are (`cnnc.ops.window.resolve` works them out):
    `same` pads so that the output is ceil(input / stride), the odd one at the bottom and
    right (the `pad` given is then (0, 0, 0, 0)), and `ceil` rounds the output size up, as
    PyTorch's ceil_mode, adding a last window that hangs over the bottom and right edge."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]
    dilation: tuple[int, int] = (1, 1)
    ceil: bool = False
    same: bool = False

    def __post_init__(self) -> None:
        if len(self.pad) == 2:
            object.__setattr__(self, "pad", (*self.pad, *self.pad))
        assert len(self.pad) == 4, f"a window's pad has 2 or 4 sizes, not {self.pad}"

    @property
    def symmetric(self) -> bool:
        """Top equals bottom and left equals right: the pad is a pair (PH, PW)."""
        return self.pad[:2] == self.pad[2:]


@dataclass(frozen=True, slots=True)
class Node:
    """One op: reads `inputs`, writes `outputs` (tensor names); `layer` is its source layer.
    `op` names its definition in the op registry (`cnnc.ops.registry`); `attrs` is that
    op's attribute dataclass, whose `text()` is how `--emit ir` prints it."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layer: str
    span: Span
    attrs: object = None
    phase: Phase = Phase.FORWARD

    @property
    def output(self) -> str:
        return self.outputs[0]


@dataclass(frozen=True, slots=True)
class Layer:
    """A line of the program as the user sees it: what summaries and error notes talk about."""

    name: str
    kind: str  # the statement's keyword (conv, maxpool, ...), or input or loss
    auto_named: bool
    output: str
    span: Span
    activation: str | None = None
    uses: tuple[Span, ...] = ()  # inside used blocks: each use, innermost first

    @property
    def display(self) -> str:
        """`conv c3` for a named layer, `maxpool1` for an automatically named one."""
        if self.auto_named or self.name == self.kind:
            return self.name
        return f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    optimizer: str
    settings: tuple[tuple[str, int | float | bool | str | None], ...]
    span: Span

    def get(self, key: str) -> int | float | bool | str | None:
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
    # the forward pass at inference, where it differs from `nodes`' forward nodes (batch norm
    # with running statistics, no dropout): forward nodes and INFERENCE ones, in order
    inference: tuple[Node, ...] | None = None

    def tensor(self, name: str) -> Tensor:
        return self._tensor_index[name]

    @property
    def params(self) -> tuple[Tensor, ...]:
        """The trainable parameters (what the optimizer updates)."""
        return tuple(t for t in self.tensors if t.role is Role.PARAM)

    @property
    def buffers(self) -> tuple[Tensor, ...]:
        """State saved with the parameters that no gradient reaches (running statistics)."""
        return tuple(t for t in self.tensors if t.role is Role.BUFFER)

    def forward_nodes(self, training: bool) -> tuple[Node, ...]:
        """The forward pass of training (batch statistics, dropout) or of inference."""
        if not training and self.inference is not None:
            return self.inference
        return tuple(n for n in self.nodes if n.phase is Phase.FORWARD)

    def layer(self, name: str) -> Layer:
        return self._layer_index[name]

    def has_layer(self, name: str) -> bool:
        """Whether `name` is a line of the program (the loss node's `loss` is not)."""
        return name in self._layer_index

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
    given = {t.name for t in graph.tensors if t.role not in (Role.VALUE, Role.LOSS)}
    _verify_nodes(graph, graph.nodes, set(given), names)
    if graph.inference is not None:
        assert all(n.phase in (Phase.FORWARD, Phase.INFERENCE) for n in graph.inference), \
            "the inference pass holds a loss or backward node"
        defined = _verify_nodes(graph, graph.inference, set(given), names)
        assert graph.output in defined, "the inference pass never computes the output"


def _verify_nodes(graph: Graph, nodes: tuple[Node, ...], defined: set[str],
                  names: list[str]) -> set[str]:
    for node in nodes:
        for name in node.inputs:
            assert name in defined, f"{node.op} reads {name} before it is written"
        for name in node.outputs:
            assert name in names, f"{node.op} writes the undeclared tensor {name}"
            assert name not in defined, f"{name} is written twice"
            defined.add(name)
    if nodes is graph.nodes:
        for name in (graph.input, graph.output, graph.loss, graph.target):
            assert name is None or name in defined, f"{name} is never defined"
    return defined


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
    if graph.inference is not None:
        lines.append("  at inference, in place of the forward nodes they replace:")
        for node in graph.inference:
            if node.phase is Phase.INFERENCE:
                lines.append(f"    {_format_call(node)}  @{node.span.line}:{node.span.col}")
    lines.append(f"  output {graph.output}")
    for tensor, gradient in graph.gradients:
        lines.append(f"  gradient {tensor} = {gradient}")
    if graph.train is not None:
        settings = " ".join(f"{k}={_format_setting(v)}" for k, v in graph.train.settings)
        lines.append(f"  train {graph.train.optimizer} {settings}")
    return "\n".join(lines) + "\n"


def _format_call(node: Node) -> str:
    text = f"{', '.join(node.outputs)} = {node.op}({', '.join(node.inputs)})"
    return text if node.attrs is None else text + node.attrs.text()


def _format_setting(value: int | float | bool | str | None) -> str:
    """As the train line writes it: none, true, cosine, 0.05."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else repr(value)
