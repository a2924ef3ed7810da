"""Graph → kernels: the forward ops grouped into the units code is generated for.

conv + bias + activation and dense + bias + activation become one kernel each, and a max pool
that reads a convolution's result joins its kernel too (the pool of a sample runs while the
sample's convolution output is still in cache); max pooling also writes the position of each
maximum to a named int32 tensor `LAYER.argmax`, which the backward pass will read; softmax
and any activation left alone are kernels of their own; flatten is no kernel at all, only a
second name for the same memory (NCHW is contiguous).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from cnnc.graph.ir import BATCH, Graph, Node, Op, OpGroup, Role, Shape, Tensor, Window, argmax_name


class KernelKind(enum.Enum):
    CONV = "conv"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    DENSE = "dense"
    SOFTMAX = "softmax"
    ACTIVATION = "activation"
    LOSS = "loss"  # the mean loss of the batch, from the output and the targets
    GRAD = "grad"  # one backward op of the graph (its `node`)
    UPDATE = "update"  # one parameter's optimizer step


@dataclass(frozen=True, slots=True)
class Kernel:
    """One generated function. `inputs` and `outputs` are storage tensors (aliases resolved)."""

    kind: KernelKind
    name: str  # the native function's name, e.g. c1_conv_relu_maxpool_fwd
    layer: str
    inputs: tuple[str, ...]  # data input first, then weight and bias where there are any
    outputs: tuple[str, ...]  # the result, then (max pooling) its argmax
    window: Window | None = None
    activation: Op | None = None
    has_bias: bool = False
    node: Node | None = None  # the op of a LOSS or GRAD kernel
    pool: Window | None = None  # a max pool fused after a CONV; outputs: conv, pool, argmax

    def unfused(self) -> tuple[Kernel, ...]:
        """The convolution and the max pool a fused kernel is made of; or the kernel alone."""
        if self.pool is None:
            return (self,)
        conv = dataclasses.replace(self, outputs=self.outputs[:1], pool=None)
        pool = Kernel(KernelKind.MAXPOOL, self.name, self.layer, self.outputs[:1],
                      self.outputs[1:], self.pool)
        return conv, pool

    @property
    def phase(self) -> str:
        """forward, loss, backward or update: which entry points run this kernel."""
        return {KernelKind.LOSS: "loss", KernelKind.GRAD: "backward",
                KernelKind.UPDATE: "update"}.get(self.kind, "forward")


@dataclass(frozen=True, slots=True)
class KernelProgram:
    """The forward pass as kernels over named storage tensors."""

    graph: Graph
    kernels: tuple[Kernel, ...]
    storage: tuple[Tensor, ...]  # every tensor that has memory: input, params, kernel outputs
    aliases: tuple[tuple[str, str], ...]  # (tensor, storage it shares), e.g. flatten outputs
    output: str  # storage name of the network's output

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.storage if t.name == name)

    def storage_of(self, name: str) -> str:
        """The storage tensor a graph tensor lives in (itself, or what it aliases)."""
        return dict(self.aliases).get(name, name)


def fuse(graph: Graph) -> KernelProgram:
    """Forward kernels; for a differentiated graph also the loss and one kernel a backward op."""
    nodes = [n for n in graph.nodes if n.op not in OpGroup.LOSS | OpGroup.BACKWARD]
    alias: dict[str, str] = {}
    kernels: list[Kernel] = []
    storage: list[Tensor] = [t for t in graph.tensors if t.role in (Role.INPUT, Role.PARAM)]
    position = 0
    while position < len(nodes):
        node = nodes[position]
        if node.op is Op.FLATTEN:
            alias[node.output] = alias.get(node.inputs[0], node.inputs[0])
            position += 1
            continue
        covered = _covered(nodes, position)
        kernel = _unique_name(_kernel(covered, alias), kernels)
        kernels.append(kernel)
        storage += [graph.tensor(name) for name in kernel.outputs]
        position += len(covered)
    if graph.gradients:
        _backward_kernels(graph, alias, kernels, storage)
    output = alias.get(graph.output, graph.output)
    return KernelProgram(graph, tuple(kernels), tuple(storage), tuple(alias.items()), output)


def _backward_kernels(graph: Graph, alias: dict[str, str], kernels: list[Kernel],
                      storage: list[Tensor]) -> None:
    """The loss kernel, then one kernel a backward op; a reshape is an alias like flatten."""
    storage += [graph.tensor(graph.target), graph.tensor(graph.loss)]
    for node in graph.nodes:
        if node.op is Op.RESHAPE:
            alias[node.output] = alias.get(node.inputs[0], node.inputs[0])
            continue
        if node.op in OpGroup.LOSS:
            kind, name = KernelKind.LOSS, f"loss_{node.op.value}"
        elif node.op in OpGroup.BACKWARD:
            kind, name = KernelKind.GRAD, f"{node.layer}_{node.op.value}_bwd"
        else:
            continue
        kernels.append(_unique_name(Kernel(kind, name, node.layer, node.inputs, node.outputs,
                                           node=node), kernels))
        if node.op not in OpGroup.LOSS:
            storage.append(graph.tensor(node.output))


def _unique_name(kernel: Kernel, earlier: list[Kernel]) -> Kernel:
    """Layer names are unique, but `a` + `_conv_fwd` could still meet a layer `a_conv`."""
    taken = {k.name for k in earlier}
    name, count = kernel.name, 1
    while name in taken:
        count += 1
        name = f"{kernel.name}_{count}"
    return dataclasses.replace(kernel, name=name)


def _covered(nodes: list[Node], start: int) -> list[Node]:
    """The node at `start` and the bias, activation and (after a convolution) max pool that
    follow it and read its result."""
    covered = [nodes[start]]
    if nodes[start].op not in OpGroup.WEIGHTED:
        return covered
    following_ops = [frozenset({Op.BIAS_ADD}), OpGroup.ACTIVATION - {Op.SOFTMAX}]
    if nodes[start].op is Op.CONV2D:
        following_ops.append(frozenset({Op.MAXPOOL2D}))
    for wanted in following_ops:
        following = start + len(covered)
        if (following < len(nodes) and nodes[following].op in wanted
                and nodes[following].inputs[0] == covered[-1].output):
            covered.append(nodes[following])
    return covered


def _kernel(covered: list[Node], alias: dict[str, str]) -> Kernel:
    head = covered[0]
    source = alias.get(head.inputs[0], head.inputs[0])
    bias = next((n.inputs[1] for n in covered if n.op is Op.BIAS_ADD), None)
    activation = next((n.op for n in covered if n.op in OpGroup.ACTIVATION), None)
    output = covered[-1].output
    layer = head.layer
    match head.op:
        case Op.CONV2D | Op.DENSE:
            return _weighted_kernel(covered, source, bias, activation)

        case Op.MAXPOOL2D:
            return Kernel(KernelKind.MAXPOOL, f"{layer}_fwd", layer, (source,),
                          (output, argmax_name(layer)), head.attrs.window)
        case Op.AVGPOOL2D:
            return Kernel(KernelKind.AVGPOOL, f"{layer}_fwd", layer, (source,), (output,),
                          head.attrs.window)
        case Op.SOFTMAX:
            return Kernel(KernelKind.SOFTMAX, f"{layer}_softmax_fwd", layer, (source,),
                          (output,), activation=Op.SOFTMAX)
        case Op.RELU | Op.SIGMOID | Op.TANH:
            return Kernel(KernelKind.ACTIVATION, f"{layer}_{head.op.value}_fwd", layer,
                          (source,), (output,), activation=head.op)
    raise AssertionError(f"no kernel for {head.op}")


def _weighted_kernel(covered: list[Node], source: str, bias: str | None,
                     activation: Op | None) -> Kernel:
    """conv or dense + bias + activation, and a conv's max pool, as one kernel."""
    head, layer = covered[0], covered[0].layer
    kind = KernelKind.CONV if head.op is Op.CONV2D else KernelKind.DENSE
    inputs = (source, head.inputs[1]) + ((bias,) if bias else ())
    name = f"{layer}_{kind.value}" + (f"_{activation.value}" if activation else "")
    window = head.attrs.window if head.op is Op.CONV2D else None
    pool = covered[-1] if covered[-1].op is Op.MAXPOOL2D else None
    if pool is None:
        return Kernel(kind, f"{name}_fwd", layer, inputs, (covered[-1].output,), window,
                      activation, bias is not None)
    outputs = (covered[-2].output, pool.output, argmax_name(pool.layer))
    return Kernel(kind, f"{name}_maxpool_fwd", layer, inputs, outputs, window,
                  activation, bias is not None, pool=pool.attrs.window)


def format_kernels(program: KernelProgram) -> str:
    """`--emit kernels`: storage tensors, aliases, then one line a kernel."""
    lines = [f"kernels {program.graph.name} dtype={program.graph.dtype.value}"]
    for tensor in program.storage:
        lines.append(f"  {tensor.role.value:<6} {tensor.name}: {_shape(tensor.shape)} "
                     f"{tensor.dtype.value}")
    for name, target in program.aliases:
        lines.append(f"  alias  {name} = {target}")
    for kernel in program.kernels:
        lines.append(f"  {kernel.name}({', '.join(kernel.inputs)}) -> {', '.join(kernel.outputs)}")
    lines.append(f"  output {program.output}")
    return "\n".join(lines) + "\n"


def _shape(shape: Shape | None) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if shape is not None else "?"


__all__ = ["BATCH", "Kernel", "KernelKind", "KernelProgram", "argmax_name", "format_kernels",
           "fuse"]
