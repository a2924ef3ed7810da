"""The generated backward graph: the algorithm's backward worked examples exactly, and every
gradient rule (through the numpy reference) against central finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_graph_gradients
from hypothesis import given, settings
from hypothesis import strategies as st

import cnnc
from cnnc.graph.ir import Window, format_graph
from cnnc.ops import conv, pool
from cnnc.passes.autodiff import differentiate
from conftest import EXAMPLES


def test_max_upsample_worked_example():
    # δ = [[2, 8], [4, 6]]; maxima at top-left, bottom-right, top-right, bottom-left.
    dy = np.array([[[[2.0, 8.0], [4.0, 6.0]]]])
    argmax = np.array([[[[0 * 4 + 0, 1 * 4 + 3], [2 * 4 + 1, 3 * 4 + 2]]]], dtype=np.int32)
    grad = pool.maxpool2d_grad(dy, argmax, Window((2, 2), (2, 2), (0, 0)), (1, 1, 4, 4))
    assert grad[0, 0].tolist() == [[2, 0, 0, 0], [0, 0, 0, 8], [0, 4, 0, 0], [0, 0, 6, 0]]


def test_average_upsample_worked_example():
    dy = np.array([[[[2.0, 8.0], [4.0, 6.0]]]])
    grad = pool.avgpool2d_grad(dy, Window((2, 2), (2, 2), (0, 0)), (1, 1, 4, 4))
    assert grad[0, 0].tolist() == [[0.5, 0.5, 2, 2], [0.5, 0.5, 2, 2],
                                   [1, 1, 1.5, 1.5], [1, 1, 1.5, 1.5]]


def test_filter_gradient_worked_example():
    # a 4x4 input, a 3x3 filter, a 2x2 δ: dJ/dW(p, q) = Σ_{i,j} a(i+p, j+q) δ(i, j)
    rng = np.random.default_rng(5)
    a = rng.integers(-5, 6, (4, 4)).astype(float)
    delta = rng.integers(-3, 4, (2, 2)).astype(float)
    grad = conv.conv2d_grad_weight(a[None, None], delta[None, None],
                                   Window((3, 3), (1, 1), (0, 0)))
    by_hand = [[sum(a[i + p, j + q] * delta[i, j] for i in range(2) for j in range(2))
                for q in range(3)] for p in range(3)]
    assert grad[0, 0].tolist() == by_hand


def check_gradients(text: str, batch: int = 2, seed: int = 0) -> None:
    """Every parameter's and the input's generated gradient against finite differences."""
    check_graph_gradients(differentiate(cnnc.check(text, dtype="f64")), batch, seed)


def net(shape: str, *lines: str, loss: str = "mse") -> str:
    return f"network g\ninput: {shape}\n" + "\n".join(lines) + f"\nloss {loss}\n"


@pytest.mark.parametrize("kernel, stride, pad", [
    ("1x1", "1", "0"), ("3x3", "1", "1"), ("3x3", "2", "1"), ("5x5", "1", "2"),
    ("5x5", "3", "0"), ("7x7", "2", "2"), ("3x1", "2x1", "1x0"), ("3x3", "1", "same"),
    ("2x2", "3", "2"),
])
def test_conv_gradients(kernel, stride, pad):
    check_gradients(net("3x9x8", f"conv c: 4 {kernel} stride={stride} pad={pad} -> tanh"))


@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
@pytest.mark.parametrize("window, options", [
    ("2x2", ""), ("3x3", " stride=2"), ("3x3", " stride=2 pad=1"), ("2x3", " stride=1x2 pad=1"),
])
def test_pool_gradients(kind, window, options):
    check_gradients(net("2x7x7", "conv c: 3 1x1", f"{kind} p: {window}{options}"))


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "softmax", "none"])
@pytest.mark.parametrize("bias", ["true", "false"])
def test_dense_and_activation_gradients(activation, bias):
    check_gradients(net("2x3x3", f"dense d: 5 bias={bias} -> {activation}", "dense e: 3"))


def test_softmax_cross_entropy_gradient():
    check_gradients(net("2x4x4", "conv c: 2 3x3 -> relu", "flatten", "dense d: 4 -> softmax",
                        loss="cross_entropy"), batch=5)


@pytest.mark.parametrize("name", ["lenet", "mlp"])
def test_example_network_gradients(name):
    check_gradients((EXAMPLES / f"{name}.cnn").read_text(), batch=2)


@st.composite
def gradient_cases(draw):
    height, width = draw(st.integers(3, 8)), draw(st.integers(3, 8))
    kh, kw = draw(st.integers(1, min(height, 4))), draw(st.integers(1, min(width, 4)))
    stride = f"{draw(st.integers(1, 3))}x{draw(st.integers(1, 3))}"
    pad = f"{draw(st.integers(0, 1))}x{draw(st.integers(0, 1))}"
    activation = draw(st.sampled_from(["relu", "tanh", "sigmoid", "none"]))
    pool = draw(st.sampled_from(["", "maxpool 1x1", "avgpool 1x1"]))
    lines = [f"conv c: {draw(st.integers(1, 3))} {kh}x{kw} stride={stride} pad={pad} -> "
             f"{activation}", *([pool] if pool else []), "dense d: 3"]
    return net(f"{draw(st.integers(1, 3))}x{height}x{width}", *lines), draw(st.integers(0, 99))


@settings(max_examples=15, deadline=None)
@given(gradient_cases())
def test_random_networks_gradients(case):
    text, seed = case
    check_gradients(text, seed=seed)


def test_grad_stage_prints_the_backward_graph():
    graph = differentiate(cnnc.check(EXAMPLES / "lenet.cnn"))
    text = format_graph(graph)
    assert "c1.weight.grad = conv2d_grad_weight(image, c1.pre.grad)" in text
    assert "out.pre.grad = softmax_cross_entropy_grad(out, loss.labels)" in text
    assert "  gradient c1.weight = c1.weight.grad" in text


def test_no_loss_no_gradients():
    with pytest.raises(cnnc.CnncSemanticError, match="has no loss line"):
        differentiate(cnnc.check("network n\ninput: 4\ndense d: 2\n"))
