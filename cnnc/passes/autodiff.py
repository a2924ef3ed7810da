"""Typed graph → forward + backward graph, by each op's gradient rule (`OpDef.gradient`).

A rule gets the gradient of the op's output and returns the gradients of its inputs as new
IR nodes (backward ops are ordinary IR ops, so they are fused, lowered and compiled like
forward ones). One reverse-order loop applies them; where a tensor feeds several ops its
gradients are summed with `add`.
"""

from __future__ import annotations

import dataclasses

from cnnc.diagnostics import CnncSemanticError
from cnnc.graph.ir import Graph, Node, Phase, Role, Tensor
from cnnc.ops import registry

Contribution = tuple[str, str]  # (tensor, one gradient of the loss with respect to it)


class _Builder:
    """Appends backward nodes; each gradient tensor is shaped like what it differentiates."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.tensors = list(graph.tensors)
        self.nodes = list(graph.nodes)
        self.names = {t.name for t in self.tensors}

    def op(self, op: str, inputs: tuple[str, ...], like: str, forward: Node,
           attrs: object = None) -> str:
        """A backward node of op `op` on behalf of `forward`; its result is shaped like
        tensor `like` and named after it (`LIKE.grad`, `LIKE.grad2`, ...)."""
        template = self.graph.tensor(like)
        name, count = f"{like}.grad", 1
        while name in self.names:
            count += 1
            name = f"{like}.grad{count}"
        self.names.add(name)
        self.tensors.append(Tensor(name, Role.VALUE, template.dtype, template.shape))
        self.nodes.append(Node(op, inputs, (name,), forward.layer, forward.span, attrs,
                               Phase.BACKWARD))
        return name


def differentiate(graph: Graph) -> Graph:
    """The graph with backward nodes appended and `gradients` naming, for the input and
    every parameter, the tensor holding d(mean loss)/d(it)."""
    if graph.loss is None:
        raise CnncSemanticError.single(f"network {graph.name} has no loss line, so there is "
                                       "nothing to differentiate; add e.g. 'loss cross_entropy'")
    builder = _Builder(graph)
    pending: dict[str, list[str]] = {}
    for node in reversed(graph.nodes):
        rule = registry.get(node.op).gradient
        assert rule is not None, f"the op {node.op} has no gradient rule"
        if node.phase is Phase.LOSS:
            contributions = rule(node, None, builder)
        elif node.output in pending:
            dy = _total(builder, node.output, pending.pop(node.output), node)
            contributions = rule(node, dy, builder)
        else:
            continue  # nothing downstream depends on it (softmax before cross-entropy)
        for tensor, gradient in contributions:
            pending.setdefault(tensor, []).append(gradient)
    wanted = [graph.input] + [p.name for p in graph.params]
    gradients = tuple((name, _total(builder, name, pending[name], _first_reader(graph, name)))
                      for name in wanted if name in pending)
    return dataclasses.replace(graph, tensors=tuple(builder.tensors),
                               nodes=tuple(builder.nodes), gradients=gradients)


def _total(builder: _Builder, tensor: str, parts: list[str], node: Node) -> str:
    """The gradient of `tensor` from its contributions, one from each op that reads it: a
    chain of `add` nodes, named like `tensor`'s other gradients, on behalf of `node`."""
    total = parts[0]
    for part in parts[1:]:
        total = builder.op(registry.gradient_sum(), (total, part), tensor, node)
    return total


def _first_reader(graph: Graph, tensor: str) -> Node:
    """The op the sum of an input's or parameter's gradients is reported at."""
    return next(node for node in graph.nodes if tensor in node.inputs)
