"""The `activation NAME: ACT [from=X]` statement, activations with several arguments, and
two-dimensional samples (`input x: 4x5`): how they parse, the graph they make, every
activation as a layer of its own compiled against torch, and their errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradcheck import check_graph_gradients

import cnnc
from cnnc.diagnostics import CnncSyntaxError, Source
from cnnc.frontend.parse import parse
from cnnc.frontend.syntax import ActivationLayerStmt, format_program
from cnnc.ops import registry
from cnnc.passes import reference
from cnnc.passes.autodiff import differentiate
from conftest import errors_of


def _program(shape: str, *lines: str) -> str:
    return f"network a\ninput x: {shape}\n" + "\n".join(lines) + "\n"


# -- parsing ------------------------------------------------------------------------------

def test_the_statement_parses_with_name_activation_arguments_and_from():
    program = parse(Source(_program("3x4x4", "conv c1: 2 3x3", "activation r1: relu",
                                    "activation s: leaky_relu(0.1) from=c1",
                                    "activation p: clip(-inf, inf)", "activation hardswish"),
                           "t.cnn"))
    layers = [s for s in program.statements if isinstance(s, ActivationLayerStmt)]
    assert [(s.name and s.name.text, s.activation.text) for s in layers] == [
        ("r1", "relu"), ("s", "leaky_relu"), ("p", "clip"), (None, "hardswish")]
    assert [a.value for a in layers[1].activation.args] == [0.1]
    assert [a.value for a in layers[2].activation.args] == [-math.inf, math.inf]
    assert [o.key.text for o in layers[1].options] == ["from"]
    text = format_program(program)
    assert "activationlayer @5:1-38 kind=activation name=s activation=leaky_relu(0.1) " \
           "options=(from=c1)" in text
    assert "activation=clip(-inf, inf)" in text


def test_several_arguments_print_as_written_and_one_as_before():
    text = format_program(parse(Source(_program("4", "dense d: 3 -> leaky_relu(0.1)",
                                                "clip(0, 6)"), "t.cnn")))
    assert "activation=leaky_relu(0.1)" in text and "activation @4:1-11 activation=clip(0, 6)" \
        in text


@pytest.mark.parametrize("line, col, message", [
    ("dense d: 2 -> clip(0 6)", 22, "expected ',' and another argument or ')', got \"6\""),
    ("dense d: 2 -> clip(", 20, "expected a number like 0.1, inf or -inf, got the end of the "
                                "line"),
    ("activation r:", 14, "expected an activation like relu, got the end of the line"),
    ("activation", 11, "expected a layer name or an activation like relu, got the end of the "
                       "line"),
    ("conv pad: 3 3x3", 6, "expected a layer name or a filter count like 6, got \"pad\"; pad "
                           "is a keyword and cannot be a name"),
])
def test_syntax_errors_in_words(line, col, message):
    with pytest.raises(CnncSyntaxError) as caught:
        parse(Source(f"network n\n{line}\n", "t.cnn"))
    assert [(d.span.line, d.span.col, d.message) for d in caught.value.diagnostics] == [
        (2, col, message)]


def test_pad_is_still_an_option_of_conv_and_pooling():
    graph = cnnc.check(_program("1x4x4", "conv c: 2 3x3 pad=1", "maxpool 2x2 pad=1"))
    assert graph.tensor("c").shape[1:] == (2, 4, 4) and graph.tensor("maxpool1").shape[1:] \
        == (2, 3, 3)


# -- the graph ----------------------------------------------------------------------------

def test_an_activation_layer_right_after_the_input_reads_the_input():
    graph = cnnc.check(_program("3x2x2", "activation r: relu", "activation s: tanh",
                                "activation t: sigmoid from=x", "add o: s, t"))
    assert [(n.op, n.inputs, n.output) for n in graph.nodes] == [
        ("relu", ("x",), "r"), ("tanh", ("r",), "s"), ("sigmoid", ("x",), "t"),
        ("add", ("s", "t"), "o")]
    assert [(layer.name, layer.kind, layer.activation) for layer in graph.layers[1:4]] == [
        ("r", "activation", "relu"), ("s", "activation", "tanh"), ("t", "activation", "sigmoid")]
    assert graph.layer("s").display == "activation s"


def test_a_pre_activation_output_read_elsewhere():
    """conv c's own output (no `-> act`) is read by an activation layer and by add."""
    graph = cnnc.check(_program("2x5x5", "conv c: 2 3x3", "activation r: relu", "add a: c, r"))
    add = next(n for n in graph.nodes if n.op == "add")
    assert add.inputs == ("c", "r")


def test_unnamed_activation_layers_are_counted_by_kind():
    graph = cnnc.check(_program("4", "activation relu", "dense d: 3", "activation gelu"))
    assert [layer.name for layer in graph.layers] == ["x", "activation1", "d", "activation2"]


def test_after_flatten_and_dropout():
    graph = cnnc.check(_program("2x3x3", "flatten f", "activation r: relu6", "dropout 0.5",
                                "activation s: softmax", "loss cross_entropy"))
    assert graph.producer(graph.loss).op == "cross_entropy"  # it reads the probabilities


def test_inside_a_block_the_name_is_prefixed():
    graph = cnnc.check(_program("2x4x4", "block act(slope=0.1)", "    conv c: 2 1x1",
                                "    activation r: leaky_relu(0.2)", "    add o: c, r", "end",
                                "use u: act()"))
    assert [layer.name for layer in graph.layers[1:]] == ["u.c", "u.r", "u.o"]
    assert next(n for n in graph.nodes if n.op == "leaky_relu").attrs.slope == 0.2


# -- every activation as a layer of its own, against torch --------------------------------

TORCH = {
    "relu": F.relu, "relu6": F.relu6, "leaky_relu": F.leaky_relu,
    "leaky_relu(-0.3)": lambda t: F.leaky_relu(t, -0.3), "sigmoid": torch.sigmoid,
    "hardsigmoid": lambda t: F.relu6(t + 3) / 6, "tanh": torch.tanh, "silu": F.silu,
    "gelu": F.gelu, "hardswish": F.hardswish,
    "hardsigmoid(0.2, 0.5)": lambda t: torch.clamp(0.2 * t + 0.5, 0, 1),
    "clip(-0.5, 1)": lambda t: torch.clamp(t, -0.5, 1), "clip(0, inf)": lambda t: torch.clamp(
        t, 0, math.inf),
    "softmax": lambda t: F.softmax(t, dim=1), "log_softmax": lambda t: F.log_softmax(t, dim=1),
}
FEATURES = 6


def test_every_activation_name_has_a_case_here():
    names = {written.split("(")[0] for written in TORCH}
    assert names == set(registry.activations())


def _network() -> str:
    """Every activation as a layer reading the input, the results joined."""
    lines = [f"activation a{i}: {act} from=x" for i, act in enumerate(TORCH)]
    joined = ", ".join(f"a{i}" for i in range(len(TORCH)))
    return _program(str(FEATURES), *lines, f"concat o: {joined}", "loss mse")


@pytest.mark.parametrize("dtype, rtol", [("f64", 1e-13), ("f32", 2e-6)])
def test_every_activation_layer_compiled_against_torch(dtype, rtol):
    module = cnnc.compile(_network(), dtype=dtype)
    cast = np.float32 if dtype == "f32" else np.float64
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, FEATURES)) * 3).astype(cast)
    y = rng.standard_normal((5, FEATURES * len(TORCH))).astype(cast)
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    out = torch.cat([f(xt) for f in TORCH.values()], dim=1)
    loss = F.mse_loss(out, torch.tensor(y, dtype=torch.float64))
    loss.backward()
    np.testing.assert_allclose(module.forward(x), out.detach().numpy(), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(module.loss(x, y), loss.item(), rtol=rtol)
    np.testing.assert_allclose(module.input_gradient(x, y), xt.grad.numpy(), rtol=rtol * 10,
                               atol=rtol)


def test_every_activation_layer_gradient_against_central_differences():
    check_graph_gradients(differentiate(cnnc.check(_network(), dtype="f64")), batch=3, seed=1)


# -- two-dimensional samples ----------------------------------------------------------------

TWO_D = _program("4x5", "activation r: relu", "activation s: softmax from=x",
                 "activation l: log_softmax from=x", "add a: r, s, l", "dropout 0.25",
                 "activation t: tanh", "flatten f", "dense d: 3 -> sigmoid", "loss mse")


def _two_d_torch(p, x):
    r, s = F.relu(x), F.softmax(x.flatten(1), dim=1).reshape(x.shape)
    lsm = F.log_softmax(x.flatten(1), dim=1).reshape(x.shape)
    t = torch.tanh(r + s + lsm)  # dropout is the identity at inference
    return torch.sigmoid(F.linear(t.flatten(1), p["d.weight"], p["d.bias"]))


@pytest.mark.parametrize("dtype, rtol", [("f64", 1e-12), ("f32", 2e-5)])
def test_a_two_dimensional_sample_compiled_against_torch(dtype, rtol):
    module = cnnc.compile(TWO_D, dtype=dtype)
    assert module.input_shape == (4, 5)
    cast = np.float32 if dtype == "f32" else np.float64
    rng = np.random.default_rng(2)
    params = {"d.weight": rng.standard_normal((3, 20)) * 0.5, "d.bias": rng.standard_normal(3)}
    module.set_params({k: v.astype(cast) for k, v in params.items()})
    x = rng.standard_normal((6, 4, 5)).astype(cast)
    p = {k: torch.tensor(v) for k, v in params.items()}
    want = _two_d_torch(p, torch.tensor(x.astype(np.float64))).numpy()
    np.testing.assert_allclose(module.forward(x), want, rtol=rtol, atol=rtol)
    values = module.activations(x)
    np.testing.assert_allclose(values["s"].reshape(6, -1).sum(axis=1), 1.0, rtol=rtol)


def test_a_two_dimensional_sample_trains_by_the_reference_gradients():
    graph = differentiate(cnnc.check(TWO_D, dtype="f64"))
    assert graph.tensor("x").shape[1:] == (4, 5) and graph.tensor("t").shape[1:] == (4, 5)
    check_graph_gradients(graph, batch=3, seed=3)
    # the dense layer flattens it: 20 features
    assert reference.run(graph, np.zeros((2, 4, 5)), {"d.weight": np.zeros((3, 20)),
                                                      "d.bias": np.zeros(3)})["d"].shape == (2, 3)


@pytest.mark.parametrize("line, message", [
    ("conv c: 2 3x3", "conv c needs a CxHxW input, but input x gives 4x5"),
    ("maxpool 2x2", "maxpool1 needs a CxHxW input, but input x gives 4x5"),
    ("avgpool 2x2", "avgpool1 needs a CxHxW input, but input x gives 4x5"),
    ("batchnorm b", "batchnorm b normalizes C x H x W images or feature vectors, but input x "
                    "gives 4x5"),
    ("globalavgpool g", "globalavgpool g needs a CxHxW input, but input x gives 4x5"),
    ("globalmaxpool g", "globalmaxpool g needs a CxHxW input, but input x gives 4x5"),
    ("upsample u: 2x2", "upsample u needs a CxHxW input, but input x gives 4x5"),
    ("pad p: 1", "pad p needs a CxHxW input, but input x gives 4x5"),
])
def test_ops_that_need_cxhxw_refuse_a_two_dimensional_sample(line, message):
    assert errors_of(_program("4x5", line)) == [(3, 1, message)]


# -- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("lines, expected", [
    (["activation r: none"],
     [(3, 15, "activation r: an activation layer needs an activation, not none; write e.g. "
              "'activation NAME: relu'")]),
    (["activation r: rleu"], [(3, 15, "unknown activation 'rleu'; did you mean 'relu'?")]),
    (["activation r: relu(1)"], [(3, 15, "relu takes no argument; write relu")]),
    (["activation r: clip(0)"], [(3, 15, "clip takes 2 arguments, min and max: clip(0, 6)")]),
    (["activation r: relu stride=2"],
     [(3, 20, "activation r has no option 'stride'; expected one of (none)")]),
    (["activation r: relu from=q"],
     [(3, 25, "activation r reads 'q', but no layer above has that name")]),
    (["activation r: relu", "tanh"],
     [(4, 1, "tanh on a line of its own applies to the layer above, but that is an activation "
             "layer already; write 'activation NAME: tanh' for another one")]),
    (["activation r: relu", "activation r: tanh"],
     [(4, 12, "duplicate name 'r'; names are unique within a network")]),
    (["dense d: 3", "activation r: softmax", "dense e: 2", "loss cross_entropy"],
     [(4, 15, "softmax must be the last layer before loss cross_entropy, but dense e "
              "follows it")]),
    (["activation r: softmax"],
     [(3, 1, "softmax needs a vector of class scores, but input x gives 2x3x3; add a dense "
             "layer before it")]),
])
def test_errors(lines, expected):
    assert errors_of(_program("2x3x3", *lines)) == expected


def test_a_plain_activation_line_keeps_its_meaning():
    """`relu` alone still modifies the layer above, and is still refused with none above."""
    graph = cnnc.check(_program("4", "dense d: 3", "relu"))
    assert [layer.name for layer in graph.layers] == ["x", "d"]
    assert graph.layer("d").activation == "relu"
    assert errors_of(_program("4", "relu"))[-1] == (
        3, 1, "relu on a line of its own applies to the layer above, but there is no layer "
              "above it")
