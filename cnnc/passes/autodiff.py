"""Typed graph → forward + backward graph, by per-op gradient rules.

`RULES` maps each forward op to a function that, given the gradient of the op's output,
returns the gradients of its inputs as new IR nodes (backward ops are ordinary IR ops, so
they are fused, lowered and compiled like forward ones). One reverse-order loop applies
them; where a tensor feeds several ops its gradients are summed with `add`.

Softmax followed by cross-entropy is differentiated as one: δ = (p − onehot) / N, which is
exact and never divides by a probability.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from cnnc.diagnostics import CnncSemanticError
from cnnc.graph.ir import Graph, Node, Op, OpGroup, ReshapeAttrs, Role, Tensor, argmax_name

Contribution = tuple[str, str]  # (tensor, one gradient of the loss with respect to it)


class _Builder:
    """Appends backward nodes; each gradient tensor is shaped like what it differentiates."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.tensors = list(graph.tensors)
        self.nodes = list(graph.nodes)
        self.names = {t.name for t in self.tensors}

    def op(self, op: Op, inputs: tuple[str, ...], like: str, forward: Node,
           attrs: object = None) -> str:
        template = self.graph.tensor(like)
        name, count = f"{like}.grad", 1
        while name in self.names:
            count += 1
            name = f"{like}.grad{count}"
        self.names.add(name)
        self.tensors.append(Tensor(name, Role.VALUE, template.dtype, template.shape))
        self.nodes.append(Node(op, inputs, (name,), forward.layer, forward.span, attrs))
        return name


Rule = Callable[[Node, str, _Builder], list[Contribution]]


def _conv(node: Node, dy: str, b: _Builder) -> list[Contribution]:
    x, w = node.inputs
    return [(x, b.op(Op.CONV2D_GRAD_INPUT, (dy, w), x, node, node.attrs)),
            (w, b.op(Op.CONV2D_GRAD_WEIGHT, (x, dy), w, node, node.attrs))]


def _dense(node: Node, dy: str, b: _Builder) -> list[Contribution]:
    x, w = node.inputs
    return [(x, b.op(Op.DENSE_GRAD_INPUT, (dy, w), x, node)),
            (w, b.op(Op.DENSE_GRAD_WEIGHT, (x, dy), w, node))]


def _bias_add(node: Node, dy: str, b: _Builder) -> list[Contribution]:
    x, bias = node.inputs
    return [(x, dy), (bias, b.op(Op.BIAS_GRAD, (dy,), bias, node))]


def _maxpool(node: Node, dy: str, b: _Builder) -> list[Contribution]:
    x = node.inputs[0]
    argmax = argmax_name(node.layer)
    return [(x, b.op(Op.MAXPOOL2D_GRAD, (dy, argmax), x, node, node.attrs))]


def _avgpool(node: Node, dy: str, b: _Builder) -> list[Contribution]:
    x = node.inputs[0]
    return [(x, b.op(Op.AVGPOOL2D_GRAD, (dy,), x, node, node.attrs))]


def _flatten(node: Node, dy: str, b: _Builder) -> list[Contribution]:
    x = node.inputs[0]
    shape = tuple(b.graph.tensor(x).shape[1:])
    return [(x, b.op(Op.RESHAPE, (dy,), x, node, ReshapeAttrs(shape)))]


def _activation(grad_op: Op) -> Rule:
    def rule(node: Node, dy: str, b: _Builder) -> list[Contribution]:
        x = node.inputs[0]
        return [(x, b.op(grad_op, (dy, node.output), x, node))]

    return rule


def _cross_entropy(node: Node, dy: str | None, b: _Builder) -> list[Contribution]:
    probabilities, labels = node.inputs
    softmax = b.graph.producer(probabilities)
    assert softmax is not None and softmax.op is Op.SOFTMAX, "irgen guarantees a softmax"
    logits = softmax.inputs[0]
    return [(logits, b.op(Op.SOFTMAX_CROSS_ENTROPY_GRAD, (probabilities, labels), logits,
                          node))]


def _mse(node: Node, dy: str | None, b: _Builder) -> list[Contribution]:
    y, targets = node.inputs
    return [(y, b.op(Op.MSE_GRAD, (y, targets), y, node))]


RULES: dict[Op, Rule] = {
    Op.CONV2D: _conv, Op.DENSE: _dense, Op.BIAS_ADD: _bias_add, Op.MAXPOOL2D: _maxpool,
    Op.AVGPOOL2D: _avgpool, Op.FLATTEN: _flatten, Op.RELU: _activation(Op.RELU_GRAD),
    Op.SIGMOID: _activation(Op.SIGMOID_GRAD), Op.TANH: _activation(Op.TANH_GRAD),
    Op.SOFTMAX: _activation(Op.SOFTMAX_GRAD), Op.CROSS_ENTROPY: _cross_entropy, Op.MSE: _mse,
}


def differentiate(graph: Graph) -> Graph:
    """The graph with backward nodes appended and `gradients` naming, for the input and
    every parameter, the tensor holding d(mean loss)/d(it)."""
    if graph.loss is None:
        raise CnncSemanticError.single(f"network {graph.name} has no loss line, so there is "
                                       "nothing to differentiate; add e.g. 'loss cross_entropy'")
    builder = _Builder(graph)
    pending: dict[str, list[str]] = {}
    for node in reversed(graph.nodes):
        if node.op in OpGroup.LOSS:
            contributions = RULES[node.op](node, None, builder)
        elif node.output in pending:
            dy = _total(builder, pending.pop(node.output), node)
            contributions = RULES[node.op](node, dy, builder)
        else:
            continue  # nothing downstream depends on it (softmax before cross-entropy)
        for tensor, gradient in contributions:
            pending.setdefault(tensor, []).append(gradient)
    wanted = [graph.input] + [p.name for p in graph.params]
    gradients = tuple((name, _total(builder, pending[name], None)) for name in wanted
                      if name in pending)
    return dataclasses.replace(graph, tensors=tuple(builder.tensors),
                               nodes=tuple(builder.nodes), gradients=gradients)


def _total(builder: _Builder, parts: list[str], node: Node | None) -> str:
    """One gradient from several: a chain of `add` nodes."""
    total = parts[0]
    for part in parts[1:]:
        forward = node or builder.graph.producer(total) or builder.graph.nodes[-1]
        total = builder.op(Op.ADD, (total, part), total, forward)
    return total
