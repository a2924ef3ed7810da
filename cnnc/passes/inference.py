"""Typed graph → the same graph with its inference pass (`Graph.inference`): the forward
nodes, where each op that computes otherwise at inference (`OpDef.inference`: batch norm
with its running statistics, folded into the convolution in front; dropout as a copy) is
replaced by the nodes its rule gives. A graph without such ops keeps `inference=None`: its
one forward pass serves both modes.
"""

from __future__ import annotations

import dataclasses

from cnnc.graph.ir import Graph, Node, Phase, Role, Tensor
from cnnc.ops import registry
from cnnc.ops.registry import Slot


class _Builder:
    """What an op's inference rule may do: look at the nodes so far, drop some it replaces,
    and declare new tensors."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.nodes: list[Node] = []
        self.tensors = list(graph.tensors)
        self._names = {t.name for t in graph.tensors}
        forward = [n for n in graph.nodes if n.phase is Phase.FORWARD]
        self._readers: dict[str, list[Node]] = {}
        for node in forward:
            for name in node.inputs:
                self._readers.setdefault(name, []).append(node)

    def producers_read_only_by(self, tensor: str, reader: Node) -> list[Node]:
        """The chain of nodes so far, first to last, that makes `tensor` through values no
        other forward node reads: the anchor and its epilogues a rule may replace."""
        chain: list[Node] = []
        while True:
            producer = next((n for n in reversed(self.nodes) if tensor in n.outputs), None)
            if producer is None or len(producer.outputs) != 1 or \
                    self._readers.get(tensor) != [reader] or tensor == self.graph.output:
                return chain
            chain.insert(0, producer)
            if registry.get(producer.op).slot is not Slot.BIAS:  # an anchor, or no epilogue
                return chain
            tensor, reader = producer.inputs[0], producer

    def drop(self, nodes: list[Node]) -> None:
        for node in nodes:
            self.nodes.remove(node)

    def tensor_like(self, name: str, like: str) -> str:
        """A new value shaped like tensor `like`, named `name` (made unique)."""
        unique, count = name, 1
        while unique in self._names:
            count += 1
            unique = f"{name}{count}"
        self._names.add(unique)
        template = self.graph.tensor(like)
        self.tensors.append(Tensor(unique, Role.VALUE, template.dtype, template.shape))
        return unique


def derive(graph: Graph) -> Graph:
    """`graph` with its inference pass, where an op of it computes otherwise at inference."""
    forward = [n for n in graph.nodes if n.phase is Phase.FORWARD]
    if not any(registry.get(n.op).inference for n in forward):
        return graph
    builder = _Builder(graph)
    for node in forward:
        rule = registry.get(node.op).inference
        builder.nodes += rule(node, builder) if rule else [node]
    return dataclasses.replace(graph, tensors=tuple(builder.tensors),
                               inference=tuple(builder.nodes))
