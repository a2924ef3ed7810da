"""The kernel program: the graph's ops grouped into the units code is generated for (made by
`passes/fuse.py`), over named storage tensors, and its printer (`--emit kernels`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cnnc.graph.ir import Graph, Node, Shape, Tensor, Window


@dataclass(frozen=True, slots=True)
class Kernel:
    """One generated function. `op` is the op of `node`, the kernel's anchor (or only) node,
    which the lowering looks up; `inputs` and `outputs` are storage tensors for a forward
    kernel, graph tensors (aliases resolved by the lowering) for the others."""

    op: str
    name: str  # the native function's name, e.g. c1_conv_relu_fwd
    layer: str
    inputs: tuple[str, ...]  # data input first, then weight and bias where there are any
    outputs: tuple[str, ...]  # the result, then its other outputs (a fused pool's)
    node: Node
    phase: str = "forward"  # forward, inference, loss or backward: which entry points run it
    activation: str | None = None  # an epilogue op applied as the result is stored
    activation_attrs: object = None  # that op's attributes (leaky_relu's slope), if it has any
    has_bias: bool = False  # the last input is a per-channel bias the sums start from
    pool: Node | None = None  # a pool run in the batch loop; outputs: anchor's, pool's

    @property
    def window(self) -> Window | None:
        return getattr(self.node.attrs, "window", None)

    def unfused(self) -> tuple[Kernel, ...]:
        """The anchor and the pool a fused kernel is made of; or the kernel alone."""
        if self.pool is None:
            return (self,)
        anchor = dataclasses.replace(self, outputs=self.outputs[:1], pool=None)
        pool = Kernel(self.pool.op, self.name, self.layer, self.outputs[:1], self.outputs[1:],
                      self.pool)
        return anchor, pool


@dataclass(frozen=True, slots=True)
class KernelProgram:
    """The network as kernels over named storage tensors."""

    graph: Graph
    kernels: tuple[Kernel, ...]
    storage: tuple[Tensor, ...]  # every tensor that has memory: input, params, kernel outputs
    aliases: tuple[tuple[str, str], ...]  # (tensor, storage it shares), e.g. flatten outputs
    output: str  # storage name of the network's output
    # the kernels of the inference pass in order, where it differs from the training pass's
    # (`Graph.inference`): shared forward kernels and those of phase "inference"
    inference: tuple[str, ...] = ()

    def forward_kernels(self, training: bool) -> list[str]:
        """The kernels `forward` runs (inference), or those of a training call's forward."""
        if not training and self.inference:
            return list(self.inference)
        return [k.name for k in self.kernels if k.phase == "forward"]

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.storage if t.name == name)

    def storage_of(self, name: str) -> str:
        """The storage tensor a graph tensor lives in (itself, or what it aliases)."""
        return dict(self.aliases).get(name, name)


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
    if program.inference:
        lines.append(f"  inference {', '.join(program.inference)}")
    lines.append(f"  output {program.output}")
    return "\n".join(lines) + "\n"


def _shape(shape: Shape | None) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if shape is not None else "?"
