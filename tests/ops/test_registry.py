"""Every registered op, automatically: it has every rule the stages ask for, its gradient
rule agrees with central finite differences (through the numpy reference), and its compiled
kernels, forward and backward, agree with the reference. A new op is checked as soon as its
file registers it, on the program in its `example` field."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_graph_gradients
from numerics import assert_close, random_params, training_noise

import cnnc
from cnnc.diagnostics import Source, Span
from cnnc.driver.modules import compile_module
from cnnc.graph.ir import BATCH, DType, Graph, Layer, Node, Phase, Role, Tensor
from cnnc.ops import registry
from cnnc.passes import reference
from cnnc.passes.autodiff import differentiate
from cnnc.runtime.module import Module

OPS = registry.all_ops()
FORWARD = [op for op in OPS if op.differentiable]
EXAMPLES = [op for op in FORWARD if op.example]


def _variadic_graph(op: registry.OpDef) -> Graph:
    """y = op(x, x), then mse: for an op no statement of the language makes yet. x is read
    twice, so this also checks that the backward pass sums a tensor's gradients."""
    span = Span.point("<test>", 1, 1)
    shape = (BATCH, 3, 2)
    tensors = (Tensor("x", Role.INPUT, DType.F64, shape), Tensor("y", Role.VALUE, DType.F64, shape),
               Tensor("loss.targets", Role.TARGET, DType.F64, shape),
               Tensor("loss", Role.LOSS, DType.F64, ()))
    nodes = (Node(op.name, ("x", "x"), ("y",), "y", span),
             Node("mse", ("y", "loss.targets"), ("loss",), "loss", span,
                  registry.losses()["mse"].attrs({"targets": None}), Phase.LOSS))
    layers = (Layer("x", "input", False, "x", span), Layer("y", op.name, False, "y", span))
    return Graph("g", DType.F64, tensors, nodes, layers, "x", "y", "loss", "loss.targets")


HAND_BUILT = {"add": _variadic_graph}


def _graph(op: registry.OpDef) -> Graph:
    if op.example:
        return cnnc.check(f"network example\n{op.example}\n", dtype="f64")
    return HAND_BUILT[op.name](op)


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_every_op_has_every_rule_a_stage_needs(op):
    assert registry.check_complete(op) == []


@pytest.mark.parametrize("op", FORWARD, ids=[op.name for op in FORWARD])
def test_every_differentiable_op_has_a_program_to_check_it_on(op):
    assert op.example or op.name in HAND_BUILT, \
        f"give {op.name} an example program (OpDef.example)"
    assert op.name in {node.op for node in _graph(op).nodes}


@pytest.mark.parametrize("op", FORWARD, ids=[op.name for op in FORWARD])
def test_gradient_rule_against_finite_differences(op):
    check_graph_gradients(differentiate(_graph(op)), batch=3, seed=3)


@pytest.mark.parametrize("schedule", [True, False], ids=["scheduled", "plain"])
@pytest.mark.parametrize("op", EXAMPLES, ids=[op.name for op in EXAMPLES])
def test_compiled_kernels_match_the_reference(op, schedule):
    """Forward activations, loss and every gradient of the example, compiled, against the
    reference interpreter run on the same parameters."""
    text = f"network example\n{op.example}\n"
    module = cnnc.compile(text, dtype="f64", schedule=schedule)
    graph = differentiate(cnnc.check(text, dtype="f64"))
    params = random_params(module, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, *module.input_shape))
    out_shape = graph.tensor(graph.output).shape[1:]
    if graph.tensor(graph.target).dtype is DType.I64:
        y = rng.integers(0, out_shape[0], 4)
    else:
        y = rng.standard_normal((4, *out_shape))
    inference = reference.run(graph, x, params, y)
    assert_close(module.forward(x), inference[graph.output], np.float64, "output")
    assert_close(np.asarray(module.loss(x, y)), inference[graph.loss], np.float64, "loss")
    expected = reference.run(graph, x, {**params, **training_noise(module, 4)}, y,
                             mode=reference.TRAINING)
    assert_close(module.forward(x, training=True), expected[graph.output], np.float64,
                 "training output")
    gradients, loss = module.gradients_and_loss(x, y)
    assert_close(np.asarray(loss), expected[graph.loss], np.float64, "loss")
    for name, gradient in graph.gradients:
        if name != graph.input:
            assert_close(gradients[name], expected[gradient], np.float64, name)
    assert_close(module.input_gradient(x, y), expected[dict(graph.gradients)[graph.input]],
                 np.float64, "input gradient")


@pytest.mark.parametrize("schedule", [True, False], ids=["scheduled", "plain"])
@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_hand_built_ops_compile_to_the_reference(name, schedule):
    """An op no statement makes yet, compiled from its hand-built graph: its forward kernel,
    and (x read twice) the backward pass's sum of the two gradients of x."""
    graph = HAND_BUILT[name](registry.get(name))
    differentiated = differentiate(graph)
    module = Module(compile_module(graph, Source("", "<hand-built>"), 0, schedule))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, *module.input_shape))
    y = rng.standard_normal((3, *module.output_shape))
    expected = reference.run(differentiated, x, {}, y)
    assert_close(module.forward(x), expected[graph.output], np.float64, "output")
    gradient = dict(differentiated.gradients)[graph.input]
    assert_close(module.input_gradient(x, y), expected[gradient], np.float64, "input gradient")


def test_a_parameter_read_by_two_ops_gets_the_sum_of_its_gradients():
    """x and W read by two dense ops: autodiff sums the two gradients of each with `add`, a
    batched sum for x and one over the parameter's own shape for W, compiled and in the
    reference alike."""
    from cnnc.ops.dense import DenseAttrs
    from cnnc.passes.shapes import infer

    span = Span.point("<test>", 1, 1)
    tensors = (Tensor("x", Role.INPUT, DType.F64, (BATCH, 3)),
               Tensor("w", Role.PARAM, DType.F64),
               *(Tensor(name, Role.VALUE, DType.F64) for name in ("a", "b", "y")),
               Tensor("loss.targets", Role.TARGET, DType.F64),
               Tensor("loss", Role.LOSS, DType.F64, ()))
    nodes = (Node("dense", ("x", "w"), ("a",), "a", span, DenseAttrs(4)),
             Node("dense", ("x", "w"), ("b",), "b", span, DenseAttrs(4)),
             Node("add", ("a", "b"), ("y",), "y", span),
             Node("mse", ("y", "loss.targets"), ("loss",), "loss", span,
                  registry.losses()["mse"].attrs({"targets": None}), Phase.LOSS))
    layers = tuple(Layer(name, kind, False, name, span)
                   for name, kind in (("x", "input"), ("a", "dense"), ("b", "dense"), ("y", "add")))
    graph = infer(Graph("shared", DType.F64, tensors, nodes, layers, "x", "y", "loss",
                        "loss.targets"))
    differentiated = differentiate(graph)
    sums = [n for n in differentiated.nodes if n.op == "add" and n.phase is Phase.BACKWARD]
    assert [n.outputs for n in sums] == [("x.grad3",), ("w.grad3",)]  # .grad + .grad2
    module = Module(compile_module(graph, Source("", "<hand-built>"), 0, True))
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 3))
    module.set_params({"w": w})
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 4))
    expected = reference.run(differentiated, x, {"w": w}, y)
    gradients = module.gradients(x, y)
    assert_close(gradients["w"], expected[dict(differentiated.gradients)["w"]], np.float64, "w")
    # y = 2·x·Wᵀ, loss = mean((y − t)²): dW = 2 · 2 (y − t)ᵀ x / size
    np.testing.assert_allclose(gradients["w"], 2 * 2 * ((2 * x @ w.T - y).T @ x) / y.size,
                               rtol=1e-12)
    assert_close(module.input_gradient(x, y), expected[dict(differentiated.gradients)["x"]],
                 np.float64, "x")
