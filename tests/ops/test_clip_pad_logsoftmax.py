"""clip, hardsigmoid(ALPHA, BETA), log_softmax and the pad layer against PyTorch: the numpy
rules and their gradient rules in float64 and float32 (bounds, ±inf and NaN included), the
compiled modules in both dtypes, a network ending in log_softmax trained with
cross_entropy (torch's nll_loss of log_softmax), central finite differences of the loss,
and the errors of each. tests/ops/test_registry.py checks each op's example besides."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradcheck import check_graph_gradients
from numerics import random_params

import cnnc
from cnnc.diagnostics import Span
from cnnc.graph.ir import Node
from cnnc.ops import registry
from cnnc.ops.pad import PadAttrs
from cnnc.passes import reference
from cnnc.passes.autodiff import differentiate
from conftest import errors_of

SPAN = Span.point("<test>", 1, 1)
NAN, INF = float("nan"), float("inf")


def _evaluate(op: str, args: list[np.ndarray], attrs=None, shape=None):
    node = Node(op, tuple(f"in{i}" for i in range(len(args))), ("y",), "y", SPAN, attrs)
    return reference.evaluate(node, args, shape)


def _activation(name: str, *args: float):
    """A node of activation `name`, with the attributes its op makes of `args`."""
    op = registry.get(name)
    return Node(name, ("x",), ("y",), "a", SPAN, op.activation_attrs(*args)
                if op.activation_attrs else None)


class _Recorder:
    def op(self, op, inputs, like, forward, attrs=None) -> str:
        self.node = Node(op, inputs, ("dx",), forward.layer, SPAN, attrs)
        return "dx"


def _rules(node: Node, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, Node]:
    """y and dx by the forward op's reference and its gradient rule's backward op."""
    with np.errstate(all="ignore"):
        y = registry.get(node.op).reference(node, [x], x.shape, None)
        builder = _Recorder()
        [(of, _)] = registry.get(node.op).gradient(node, "dy", builder)
        assert of == "x"
        values = {"x": x, "y": y, "dy": dy}
        grad = builder.node
        dx = registry.get(grad.op).reference(grad, [values[n] for n in grad.inputs], x.shape,
                                             None)
    return y, dx, grad


def _torch(function, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = torch.tensor(x, requires_grad=True)
    y = function(t)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), t.grad.numpy()


def _grid(*points: float) -> np.ndarray:
    """[−10, 10], the given points and their neighbours, ±0, ±inf and NaN."""
    near = np.concatenate([np.array(points) + d for d in (-1e-9, 0.0, 1e-9)])
    special = np.array([-0.0, 0.0, 1e300, -1e300, INF, -INF, NAN])
    return np.concatenate([np.linspace(-10, 10, 801), near, special])


# -- clip ---------------------------------------------------------------------------------

CLIPS = [(0.0, 6.0), (-1.0, INF), (-INF, 0.5), (-INF, INF), (2.0, 2.0), (-3.5, -3.0)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("low, high", CLIPS, ids=[f"{a}_{b}" for a, b in CLIPS])
def test_clip_and_its_gradient_are_torch_clamps(low, high, dtype):
    """Exactly torch.clamp(x, MIN, MAX), and its gradient: dy strictly inside the bounds, 0
    at either bound, outside and for NaN (x = inf is at the bound MAX = inf)."""
    finite = [b for b in (low, high) if np.isfinite(b)]
    with np.errstate(over="ignore"):
        x = _grid(*finite).astype(dtype)
    dy = np.random.default_rng(0).uniform(0.5, 2.0, x.shape).astype(dtype)
    y, dx, grad = _rules(_activation("clip", low, high), x, dy)
    want_y, want_dx = _torch(lambda t: torch.clamp(t, low, high), x, dy)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(dx, want_dx)
    assert grad.op == "clip_grad" and grad.inputs == ("dy", "y")  # y tells inside from out


def test_clip_gradient_at_the_bounds_themselves():
    x = np.array([-1.0, -0.5, 0.0, 6.0, 7.0, NAN])
    _, dx, _ = _rules(_activation("clip", -1.0, 6.0), x, np.ones(6))
    np.testing.assert_array_equal(dx, [0, 1, 1, 0, 0, 0])


# -- hardsigmoid(ALPHA, BETA) ----------------------------------------------------------------

HARDSIGMOIDS = [(0.2, 0.5), (1 / 6, 0.5), (-0.3, 0.25), (2.0, -1.0), (0.0, 0.75)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("alpha, beta", HARDSIGMOIDS, ids=[f"{a:.3g}_{b}" for a, b in
                                                           HARDSIGMOIDS])
def test_hardsigmoid_of_alpha_and_beta_is_clamp_of_the_line(alpha, beta, dtype):
    """clamp(ALPHA·x + BETA, 0, 1), ONNX's HardSigmoid, written in torch; its gradient
    ALPHA·dy strictly between 0 and 1."""
    edges = [(-beta) / alpha, (1 - beta) / alpha] if alpha else []
    with np.errstate(over="ignore"):
        x = _grid(*edges).astype(dtype)
    dy = np.random.default_rng(1).uniform(0.5, 2.0, x.shape).astype(dtype)
    y, dx, grad = _rules(_activation("hardsigmoid", alpha, beta), x, dy)
    a, b = dtype(alpha), dtype(beta)
    want_y, want_dx = _torch(lambda t: torch.clamp(t * a.item() + b.item(), 0, 1), x, dy)
    np.testing.assert_array_equal(y, want_y.astype(dtype))
    np.testing.assert_allclose(dx, want_dx, rtol=1e-15 if dtype == np.float64 else 1e-7)
    assert grad.inputs == ("dy", "y")


def test_plain_hardsigmoid_is_still_torchs_and_prints_no_attributes(tmp_path):
    x = np.linspace(-5, 5, 101)
    y, dx, _ = _rules(_activation("hardsigmoid"), x, np.ones_like(x))
    np.testing.assert_allclose(y, F.hardsigmoid(torch.tensor(x)).numpy(), rtol=1e-15)
    np.testing.assert_allclose(dx, np.where(np.abs(x) < 3, 1 / 6, 0.0), rtol=1e-15)
    text = ("network h\ninput: 4\ndense d: 3 -> hardsigmoid\ndense e: 2 -> hardsigmoid(0.2, 0.5)"
            "\nloss mse\n")
    graph = differentiate(cnnc.check(text))
    plain, given = (n for n in graph.nodes if n.op == "hardsigmoid")
    assert plain.attrs is None and given.attrs.text() == " alpha=0.2 beta=0.5"
    backward = [n.attrs for n in graph.nodes if n.op == "hardsigmoid_grad"]
    assert backward == [given.attrs, None]


# -- log_softmax --------------------------------------------------------------------------

def _rows(seed: int = 2) -> np.ndarray:
    """Ordinary rows, large logits (±1e4: a plain exp overflows), a constant row, a NaN row
    and one with −inf."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.standard_normal((4, 6)) * 3,
                           np.array([[1e4, -1e4, 0.0, 5e3, 1e4, -2.0],
                                     [7.0] * 6,
                                     [1.0, NAN, 0.0, 2.0, 3.0, 4.0],
                                     [-INF, 1.0, 2.0, -INF, 0.0, 0.5]])])


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-14), (np.float32, 1e-6)],
                         ids=["f64", "f32"])
def test_log_softmax_and_its_gradient_match_torch(dtype, rtol):
    x = _rows().astype(dtype)
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(dtype)
    node = Node("log_softmax", ("x",), ("y",), "a", SPAN)
    y, dx, grad = _rules(node, x, dy)
    want_y, want_dx = _torch(lambda t: F.log_softmax(t, dim=1), x, dy)
    assert y.dtype == dx.dtype == dtype and grad.inputs == ("dy", "y")
    np.testing.assert_allclose(y, want_y, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(dx, want_dx, rtol=rtol, atol=rtol * 10)
    assert np.isnan(y[6]).all() and np.isfinite(y[4]).all()


def test_log_softmax_of_a_two_dimensional_sample_is_over_the_whole_sample():
    x = np.random.default_rng(4).standard_normal((3, 4, 5))
    dy = np.random.default_rng(5).standard_normal((3, 4, 5))
    for op, function in (("log_softmax", F.log_softmax), ("softmax", F.softmax)):
        node = Node(op, ("x",), ("y",), "a", SPAN)
        y, dx, _ = _rules(node, x, dy)
        want_y, want_dx = _torch(lambda t, f=function: f(t.flatten(1), dim=1).reshape(t.shape),
                                 x, dy)
        np.testing.assert_allclose(y, want_y, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-13, atol=1e-15)


CLASSES, FEATURES, BATCH = 5, 7, 6
LOG_SOFTMAX_NET = f"network ls\ninput: {FEATURES}\ndense d: {CLASSES} -> log_softmax\n"


def _torch_nll(x, labels, params, eps: float = 0.0):
    """(loss, dloss/dx, parameter gradients, log-probabilities): nll_loss(log_softmax(z)),
    or with smoothing, torch's cross_entropy of the log-probabilities."""
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    p = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True)
         for k, v in params.items()}
    logp = F.log_softmax(F.linear(xt, p["d.weight"], p["d.bias"]), dim=1)
    target = torch.tensor(labels)
    loss = F.nll_loss(logp, target) if eps == 0 else \
        F.cross_entropy(logp, target, label_smoothing=eps)
    loss.backward()
    return (loss.item(), xt.grad.numpy(), {k: v.grad.numpy() for k, v in p.items()},
            logp.detach().numpy())


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cross_entropy_of_log_softmax_is_torchs_nll_loss_in_the_reference(eps):
    rng = np.random.default_rng(6)
    x, labels = rng.standard_normal((BATCH, FEATURES)), rng.integers(0, CLASSES, BATCH)
    params = {"d.weight": rng.standard_normal((CLASSES, FEATURES)) * 2,
              "d.bias": rng.standard_normal(CLASSES)}
    smoothing = f" label_smoothing={eps}" if eps else ""
    graph = differentiate(cnnc.check(LOG_SOFTMAX_NET + f"loss cross_entropy{smoothing}\n",
                                     dtype="f64"))
    loss, dx, dp, logp = _torch_nll(x, labels, params, eps)
    values = reference.run(graph, x, params, labels)
    np.testing.assert_allclose(values[graph.output], logp, rtol=1e-13)
    np.testing.assert_allclose(values[graph.loss], loss, rtol=1e-13)
    gradients = dict(graph.gradients)
    np.testing.assert_allclose(values[gradients[graph.input]], dx, rtol=1e-11, atol=1e-15)
    for name, want in dp.items():
        np.testing.assert_allclose(values[gradients[name]], want, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("dtype, rtol", [("f64", 1e-11), ("f32", 2e-5)])
def test_compiled_log_softmax_network_trains_as_torch(dtype, rtol):
    """forward is log-probabilities, loss and gradients torch's nll_loss(log_softmax), and
    one SGD step moves the parameters as torch's would."""
    module = cnnc.compile(LOG_SOFTMAX_NET + "loss cross_entropy\ntrain sgd lr=0.5\n",
                          dtype=dtype)
    cast = np.float32 if dtype == "f32" else np.float64
    params = random_params(module, seed=7)
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((BATCH, FEATURES)) * 3).astype(cast)
    labels = rng.integers(0, CLASSES, BATCH)
    loss, dx, dp, logp = _torch_nll(x, labels, params)
    np.testing.assert_allclose(module.forward(x), logp, rtol=rtol, atol=rtol)
    gradients, got = module.gradients_and_loss(x, labels)
    np.testing.assert_allclose(got, loss, rtol=rtol)
    np.testing.assert_allclose(module.input_gradient(x, labels), dx, rtol=rtol, atol=rtol)
    for name, want in dp.items():
        np.testing.assert_allclose(gradients[name], want, rtol=rtol, atol=rtol, err_msg=name)
    module.train_step(x, labels)
    for name, want in dp.items():
        np.testing.assert_allclose(module.params[name], params[name] - 0.5 * want,
                                   rtol=rtol, atol=rtol, err_msg=name)


def test_log_softmax_network_learns_a_separable_problem():
    """Trained with fit, the log-probabilities come to name each sample's class."""
    rng = np.random.default_rng(9)
    centres = rng.standard_normal((3, 4)) * 2
    labels = rng.integers(0, 3, 120)
    x = centres[labels] + rng.standard_normal((120, 4)) * 0.3
    module = cnnc.compile("network l\ninput: 4\ndense h: 8 -> tanh\ndense d: 3\n"
                          "activation p: log_softmax\nloss cross_entropy\n"
                          "train sgd lr=0.1 momentum=0.9 batch=20 epochs=40\n", dtype="f64")
    module.fit(x, labels)
    logp = module.forward(x)
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, rtol=1e-12)
    assert (logp.argmax(axis=1) == labels).mean() > 0.95
    loss = module.loss(x, labels)
    np.testing.assert_allclose(loss, F.nll_loss(torch.tensor(logp), torch.tensor(labels)).item(),
                               rtol=1e-10)


# -- pad ------------------------------------------------------------------------------------

PADS = {"1": ((1, 1, 1, 1), 0.0), "2x1": ((2, 1, 2, 1), 0.0),
        "0x2x1x3": ((0, 2, 1, 3), -1.5), "0": ((0, 0, 0, 0), 4.0)}


@pytest.mark.parametrize("written", sorted(PADS))
def test_pad_and_its_gradient_against_torch(written):
    (top, left, bottom, right), value = PADS[written]
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 4, 5))
    attrs = PadAttrs((top, left, bottom, right), value)
    xt = torch.tensor(x, requires_grad=True)
    padded = F.pad(xt, (left, right, top, bottom), value=value)
    dy = rng.standard_normal(padded.shape)
    padded.backward(torch.tensor(dy))
    np.testing.assert_array_equal(_evaluate("pad2d", [x], attrs), padded.detach().numpy())
    np.testing.assert_array_equal(_evaluate("pad2d_grad", [dy], attrs, x.shape),
                                  xt.grad.numpy())
    graph = cnnc.check(f"network p\ninput x: 3x4x5\npad p: {written} value={value}\n")
    assert graph.nodes[0].attrs == attrs
    assert graph.tensor("p").shape[1:] == (3, 4 + top + bottom, 5 + left + right)


def _pad_network(p, x):
    padded = F.pad(x, (2, 0, 1, 1), value=0.25)
    c = torch.relu(F.conv2d(padded, p["c.weight"], p["c.bias"]))
    return F.pad(c, (1, 1, 1, 1))


PAD_PROGRAM = ("network p\ninput x: 2x3x4\npad a: 1x2x1x0 value=0.25\nconv c: 3 2x2 -> relu\n"
               "pad b: 1\nloss mse\n")


@pytest.mark.parametrize("schedule", [True, False], ids=["scheduled", "plain"])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_compiled_pad_network_against_torch(dtype, schedule):
    module = cnnc.compile(PAD_PROGRAM, dtype=dtype, schedule=schedule)
    params = random_params(module, seed=11)
    cast = np.float32 if dtype == "f32" else np.float64
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 2, 3, 4)).astype(cast)
    y = rng.standard_normal((3, *module.output_shape)).astype(cast)
    p = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True)
         for k, v in params.items()}
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    out = _pad_network(p, xt)
    loss = F.mse_loss(out, torch.tensor(y.astype(np.float64)))
    loss.backward()
    rtol = 1e-5 if dtype == "f32" else 1e-12
    assert module.output_shape == (3, 6, 7)
    np.testing.assert_allclose(module.forward(x), out.detach().numpy(), rtol=rtol, atol=rtol)
    gradients, got = module.gradients_and_loss(x, y)
    np.testing.assert_allclose(got, loss.item(), rtol=rtol)
    np.testing.assert_allclose(module.input_gradient(x, y), xt.grad.numpy(), rtol=rtol,
                               atol=rtol)
    for name, tensor in p.items():
        np.testing.assert_allclose(gradients[name], tensor.grad.numpy(), rtol=rtol, atol=rtol,
                                   err_msg=name)


# -- finite differences of whole networks ---------------------------------------------------

FD_PROGRAMS = {
    "clip": "input: 2x4x4\nconv c: 3 3x3 -> clip(-0.3, 0.4)\nactivation k: clip(0, inf)\n"
            "dense d: 3 -> clip(-inf, 0.2)\nloss mse",
    "hardsigmoid": "input: 5\ndense d: 4 -> hardsigmoid(0.7, 0.4)\n"
                   "activation h: hardsigmoid(-2, 0.5)\ndense e: 2\nloss mse",
    "log_softmax": "input: 5\ndense d: 4 -> log_softmax\ndense e: 3\nactivation l: log_softmax"
                   "\nloss cross_entropy label_smoothing=0.1",
    "pad": "input: 2x3x3\npad p: 0x1x2x1 value=-0.5\nconv c: 2 2x2\npad q: 1\n"
           "maxpool 2x2\nloss mse",
    "2-D sample": "input x: 3x4\nactivation s: softmax\nactivation l: log_softmax from=x\n"
                  "add a: s, l\nactivation g: gelu\ndropout 0.3\nflatten\ndense d: 2\nloss mse",
}


@pytest.mark.parametrize("name", sorted(FD_PROGRAMS))
def test_network_gradients_against_central_differences(name):
    graph = differentiate(cnnc.check(f"network fd\n{FD_PROGRAMS[name]}\n", dtype="f64"))
    check_graph_gradients(graph, batch=3, seed=13)


# -- errors -------------------------------------------------------------------------------

def _program(*lines: str) -> str:
    return "network e\ninput x: 2x4x4\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("lines, expected", [
    (["dense d: 2 -> clip"], (3, 15, "clip takes 2 arguments, min and max: clip(0, 6)")),
    (["dense d: 2 -> clip(1)"], (3, 15, "clip takes 2 arguments, min and max: clip(0, 6)")),
    (["dense d: 2 -> clip(1, 2, 3)"], (3, 15, "clip takes 2 arguments, min and max: "
                                              "clip(0, 6)")),
    (["dense d: 2 -> clip(6, 0)"],
     (3, 15, "clip: the minimum 6 is above the maximum 0; write clip(MIN, MAX)")),
    (["dense d: 2 -> clip(inf, -inf)"],
     (3, 15, "clip: the minimum inf is above the maximum -inf; write clip(MIN, MAX)")),
    (["dense d: 2 -> clip(0, six)"],
     (3, 15, "clip: an argument is a number like 0.1, inf or -inf, got 'six'")),
    (["dense d: 2 -> hardsigmoid(0.2)"],
     (3, 15, "hardsigmoid takes 2 arguments or none, alpha and beta: hardsigmoid(0.2, 0.5)")),
    (["dense d: 2 -> hardsigmoid(0.2, inf)"],
     (3, 15, "hardsigmoid: alpha and beta must be finite numbers, not 0.2 and inf")),
    (["dense d: 2 -> leaky_relu(0.1, 0.2)"],
     (3, 15, "leaky_relu takes 1 argument or none, the slope: leaky_relu(0.1)")),
    (["dense d: 2 -> log_softmax(1)"], (3, 15, "log_softmax takes no argument; write "
                                                "log_softmax")),
    (["activation l: log_softmax"],
     (3, 1, "log_softmax needs a vector of class scores, but input x gives 2x4x4; add a dense "
            "layer before it")),
    (["conv c: 2 3x3 -> log_softmax"],
     (3, 1, "log_softmax needs a vector of class scores, but conv c gives 2x2x2; add a dense "
            "layer before it")),
    (["pad p: -1x0"], (3, 8, "pad p: each pad must be at least 0, got -1x0")),
    (["pad p: 1x1x1"], (3, 8, "pad p: the padding must be P, PHxPW or TxLxBxR (top, left, "
                              "bottom, right) like 1, 1x2 or 0x0x1x1, got 1x1x1")),
    (["pad p: 1 value=1e999"], (3, 16, "pad p: value expects a finite number, got 1e999")),
    (["pad p: 1 value=zero"], (3, 16, "pad p: value expects a number like 0 or -1.5, got zero")),
    (["pad p: 1 mode=reflect"], (3, 10, "pad p has no option 'mode'; expected one of value")),
    (["dense d: 3", "pad p: 1"], (4, 1, "pad p needs a CxHxW input, but dense d gives 3")),
    (["pad 1 -> relu"], (3, 7, "expected an option like stride=2 or the end of the line, "
                               "got \"->\"")),
])
def test_errors(lines, expected):
    assert errors_of(_program(*lines)) == [expected]


def test_a_pad_without_a_colon_and_without_a_name():
    graph = cnnc.check(_program("pad p 1x0", "pad 2", "conv c: 2 3x3 pad=1"))
    assert [layer.name for layer in graph.layers] == ["x", "p", "pad2", "c"]
    assert graph.tensor("p").shape[1:] == (2, 6, 4)  # 1x0: rows only
    assert graph.tensor("pad2").shape[1:] == (2, 10, 8)


# -- CUDA ---------------------------------------------------------------------------------

def test_on_the_cuda_simulator():
    """pad, clip fused in a convolution, hardsigmoid(ALPHA, BETA) fused in a dense layer,
    log_softmax: the CUDA module's output, loss and gradients against the reference."""
    pytest.importorskip("numba.cuda")
    text = ("network g\ninput: 1x3x3\npad p: 1x0x0x1 value=0.5\nconv c: 2 2x2 -> clip(-0.2, 0.3)"
            "\ndense d: 3 -> hardsigmoid(0.4, 0.3)\ndense e: 3 -> log_softmax\n"
            "loss cross_entropy\n")
    module = cnnc.compile(text, target="cuda", dtype="f64")
    params = random_params(module, seed=14)
    rng = np.random.default_rng(15)
    x, labels = rng.standard_normal((2, 1, 3, 3)), rng.integers(0, 3, 2)
    graph = differentiate(cnnc.check(text, dtype="f64"))
    want = reference.run(graph, x, params, labels)
    np.testing.assert_allclose(module(x), want[graph.output], rtol=1e-12, atol=1e-12)
    gradients, loss = module.gradients_and_loss(x, labels)
    np.testing.assert_allclose(loss, want[graph.loss], rtol=1e-12)
    for name, gradient in graph.gradients:
        if name != graph.input:
            np.testing.assert_allclose(gradients[name], want[gradient], rtol=1e-11, atol=1e-12,
                                       err_msg=name)
