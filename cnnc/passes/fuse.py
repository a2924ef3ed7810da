"""Graph → kernels: the graph's ops grouped into the units code is generated for, by each
op's fusion role (`OpDef.fusion`).

An anchor (conv, dense) takes the epilogues that follow it (a bias, then an activation) into
its kernel, as long as nothing else reads the intermediate result they replace (the
backward op of an activation whose gradient reads its input, silu or gelu, does: in a
training pass such an activation is a kernel of its own, and its input is stored); an anchor
that `takes_pool` also takes a following pool (the pool of a sample runs while the sample's
anchor output is still in cache; that output is kept, since the backward pass reads it).
Every other op is a kernel of its own, except an alias (flatten), which is no kernel at all,
only a second name for the same memory (NCHW is contiguous). For a differentiated graph the
loss and each backward op get a kernel too.
"""

from __future__ import annotations

import dataclasses

from cnnc.graph.ir import Graph, Node, Phase, Role, Tensor
from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.ops import registry
from cnnc.ops.registry import Fusion, OpDef

# the tensors that have memory before any kernel runs
_GIVEN = (Role.INPUT, Role.PARAM, Role.BUFFER, Role.NOISE)


def fuse(graph: Graph) -> KernelProgram:
    """Forward kernels; for a differentiated graph also the loss and one kernel a backward op.
    A graph with an inference pass gets the kernels of that pass too, sharing those it has in
    common with the training pass (`KernelProgram.inference` lists the pass's kernels)."""
    alias: dict[str, str] = {}
    kernels: list[Kernel] = []
    storage: list[Tensor] = [t for t in graph.tensors if t.role in _GIVEN]
    forward = [n for n in graph.nodes if n.phase is Phase.FORWARD]
    made: dict[tuple[Node, ...], str] = {}
    _forward_pass(graph, forward, _readers(graph.nodes), alias, kernels, storage, made, True)
    inference: list[str] = []
    if graph.inference is not None:
        nodes = [*graph.inference, *(n for n in graph.nodes if n.phase is Phase.LOSS)]
        inference = _forward_pass(graph, list(graph.inference), _readers(nodes), alias,
                                  kernels, storage, made, False)
    if graph.gradients:
        _backward_kernels(graph, alias, kernels, storage)
    output = alias.get(graph.output, graph.output)
    return KernelProgram(graph, tuple(kernels), tuple(storage), tuple(alias.items()), output,
                         tuple(inference))


def _forward_pass(graph: Graph, nodes: list[Node], readers: dict[str, list[Node]],
                  alias: dict[str, str], kernels: list[Kernel], storage: list[Tensor],
                  shared: dict[tuple[Node, ...], str], training: bool) -> list[str]:
    """The kernels of one forward pass, in order, by name. The training pass fills `shared`
    with its kernels by the nodes they cover; the inference pass reuses those it can and
    adds its own (named `..._infer`)."""
    names: list[str] = []
    known = {t.name for t in storage}
    position = 0
    while position < len(nodes):
        node = nodes[position]
        if registry.get(node.op).fusion is Fusion.ALIAS:
            alias[node.output] = alias.get(node.inputs[0], node.inputs[0])
            position += 1
            continue
        covered = _covered(nodes, position, readers, graph.output)
        position += len(covered)
        if tuple(covered) in shared and not training:
            names.append(shared[tuple(covered)])
            continue
        kernel = _forward_kernel(covered, alias)
        if not training:
            kernel = dataclasses.replace(kernel, name=kernel.name.removesuffix("_fwd") + "_infer",
                                         phase="inference")
        kernel = _unique_name(kernel, kernels)
        kernels.append(kernel)
        names.append(kernel.name)
        if training:
            shared[tuple(covered)] = kernel.name
        fresh = [name for name in kernel.outputs if name not in known]
        storage += [graph.tensor(name) for name in fresh]
        known.update(fresh)
    return names


def _readers(nodes) -> dict[str, list[Node]]:
    """Every node of `nodes` that reads each tensor."""
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    return readers


def _covered(nodes: list[Node], start: int, readers: dict[str, list[Node]],
             graph_output: str) -> list[Node]:
    """The node at `start`, and, for an anchor, the epilogues (in slot order) and the pool
    that follow it and read its result."""
    covered = [nodes[start]]
    anchor = registry.get(nodes[start].op)
    if anchor.fusion is not Fusion.ANCHOR:
        return covered
    last_slot = 0
    for node in nodes[start + 1:]:
        op = registry.get(node.op)
        result = covered[-1].output
        if node.inputs[0] != result:
            break
        if op.fusion is Fusion.EPILOGUE and op.slot > last_slot and \
                _private(result, node, readers, graph_output):
            covered.append(node)
            last_slot = op.slot
        elif op.fusion is Fusion.POOL and anchor.takes_pool:
            covered.append(node)  # the anchor's result stays an output of the kernel
            break
        else:
            break
    return covered


def _private(tensor: str, reader: Node, readers: dict[str, list[Node]], graph_output: str
             ) -> bool:
    """Whether `reader` is the only use of `tensor`: then it need never be stored."""
    return tensor != graph_output and readers.get(tensor, []) == [reader]


def _forward_kernel(covered: list[Node], alias: dict[str, str]) -> Kernel:
    head, op = covered[0], registry.get(covered[0].op)
    inputs = tuple(alias.get(name, name) for name in head.inputs)
    epilogues = [n for n in covered[1:] if registry.get(n.op).fusion is Fusion.EPILOGUE]
    bias = next((n.inputs[1] for n in epilogues if _slot(n) is registry.Slot.BIAS), None)
    activated = next((n for n in epilogues if _slot(n) is registry.Slot.ACTIVATION), None)
    activation = activated.op if activated else None
    pool = covered[-1] if registry.get(covered[-1].op).fusion is Fusion.POOL and \
        len(covered) > 1 else None
    name = _forward_name(head, op, activation, pool)
    outputs = covered[-1].outputs if pool is None else (covered[-2].output, *pool.outputs)
    return Kernel(head.op, name, head.layer, inputs + ((bias,) if bias else ()), outputs, head,
                  activation=activation, activation_attrs=activated.attrs if activated else None,
                  has_bias=bias is not None, pool=pool)


def _slot(node: Node) -> registry.Slot | None:
    return registry.get(node.op).slot


def _forward_name(head: Node, op: OpDef, activation: str | None, pool: Node | None) -> str:
    """c1_conv_relu_maxpool_fwd: the layer, the anchor's tag, the activation, the pool."""
    parts = [head.layer, op.kernel_tag, activation or "",
             registry.get(pool.op).pool_tag if pool else ""]
    return "_".join(part for part in parts if part) + "_fwd"


def _backward_kernels(graph: Graph, alias: dict[str, str], kernels: list[Kernel],
                      storage: list[Tensor]) -> None:
    """The loss kernel, then one kernel a backward op; a reshape is an alias like flatten."""
    storage += [graph.tensor(graph.target), graph.tensor(graph.loss)]
    for node in graph.nodes:
        if node.phase is Phase.FORWARD:
            continue
        if registry.get(node.op).fusion is Fusion.ALIAS:
            alias[node.output] = alias.get(node.inputs[0], node.inputs[0])
            continue
        name = f"loss_{node.op}" if node.phase is Phase.LOSS else f"{node.layer}_{node.op}_bwd"
        kernels.append(_unique_name(Kernel(node.op, name, node.layer, node.inputs, node.outputs,
                                           node, phase=node.phase.value), kernels))
        if node.phase is not Phase.LOSS:
            storage.append(graph.tensor(node.output))


def _unique_name(kernel: Kernel, earlier: list[Kernel]) -> Kernel:
    """Layer names are unique, but `a` + `_conv_fwd` could still meet a layer `a_conv`."""
    taken = {k.name for k in earlier}
    name, count = kernel.name, 1
    while name in taken:
        count += 1
        name = f"{kernel.name}_{count}"
    return dataclasses.replace(kernel, name=name)

