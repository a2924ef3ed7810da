"""Compiled loss, gradients and optimizer steps against the reference and plain numpy."""

from __future__ import annotations

import numpy as np
import pytest

import cnnc
from cnnc.passes import reference
from cnnc.passes.autodiff import differentiate
from conftest import EXAMPLES


def setup(text: str, batch: int = 3, seed: int = 0):
    module = cnnc.compile(text, dtype="f64")
    graph = differentiate(cnnc.check(text, dtype="f64"))
    rng = np.random.default_rng(seed)
    params = {name: value + 0.1 * rng.standard_normal(value.shape)
              for name, value in module.params.items()}
    module.set_params(params)
    x = rng.standard_normal((batch, *module.input_shape))
    if module.manifest["loss"]["kind"] == "cross_entropy":
        y = rng.integers(0, module.output_shape[0], batch)
    else:
        y = rng.standard_normal((batch, *module.output_shape))
    return module, graph, params, x, y


def assert_gradients_match(text: str, batch: int = 3) -> None:
    module, graph, params, x, y = setup(text, batch)
    expected = reference.run(graph, x, params, y)
    assert module.loss(x, y) == pytest.approx(float(expected[graph.loss]), rel=1e-12)
    gradients = module.gradients(x, y)
    where = dict(graph.gradients)
    for name in params:
        np.testing.assert_allclose(gradients[name], expected[where[name]], rtol=1e-10,
                                   atol=1e-12, err_msg=name)
    np.testing.assert_allclose(module.input_gradient(x, y), expected[where[graph.input]],
                               rtol=1e-10, atol=1e-12)


def net(shape: str, *lines: str, loss: str = "mse") -> str:
    return f"network t\ninput: {shape}\n" + "\n".join(lines) + f"\nloss {loss}\n"


@pytest.mark.parametrize("kernel, stride, pad", [
    ("1x1", "1", "0"), ("3x3", "2", "1"), ("5x5", "1", "2"), ("7x7", "3", "2"),
    ("3x1", "2x1", "1x0"), ("3x3", "1", "same"), ("2x2", "3", "2"),
])
def test_compiled_conv_gradients(kernel, stride, pad):
    assert_gradients_match(net("3x9x8", f"conv c: 4 {kernel} stride={stride} pad={pad} -> relu"))


@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
@pytest.mark.parametrize("window, options", [("2x2", ""), ("3x3", " stride=2 pad=1"),
                                             ("2x3", " stride=1x2 pad=1")])
def test_compiled_pool_gradients(kind, window, options):
    assert_gradients_match(net("2x7x7", "conv c: 3 1x1", f"{kind} p: {window}{options}",
                               "sigmoid"))


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "softmax", "none"])
def test_compiled_dense_gradients(activation):
    assert_gradients_match(net("2x3x3", f"dense d: 5 bias=false -> {activation}", "flatten",
                               "dense e: 3"))


@pytest.mark.parametrize("name", ["lenet", "mlp", "vgg_small"])
def test_compiled_example_gradients(name):
    assert_gradients_match((EXAMPLES / f"{name}.cnn").read_text(), batch=2)


def numpy_steps(optimizer: str, params, grads_of, steps: int, settings: dict):
    """The same updates in plain numpy (PyTorch's formulas)."""
    state = {name: [np.zeros_like(v), np.zeros_like(v)] for name, v in params.items()}
    params = {name: value.copy() for name, value in params.items()}
    for step in range(1, steps + 1):
        grads = grads_of(params)
        for name, g in grads.items():
            first, second = state[name]
            if optimizer == "sgd":
                first[:] = settings["momentum"] * first + g
                params[name] -= settings["lr"] * first
            else:
                first[:] = settings["beta1"] * first + (1 - settings["beta1"]) * g
                second[:] = settings["beta2"] * second + (1 - settings["beta2"]) * g * g
                m_hat = first / (1 - settings["beta1"] ** step)
                v_hat = second / (1 - settings["beta2"] ** step)
                params[name] -= settings["lr"] * m_hat / (np.sqrt(v_hat) + settings["eps"])
    return params


@pytest.mark.parametrize("train_line", [
    "train sgd lr=0.1", "train sgd lr=0.05 momentum=0.9",
    "train adam lr=0.01 beta1=0.8 beta2=0.99 eps=1e-6",
])
def test_optimizer_steps_match_numpy(train_line):
    text = net("2x6x6", "conv c: 3 3x3 -> relu", "maxpool 2x2", "dense d: 4 -> softmax",
               loss="cross_entropy") + train_line + "\n"
    module, graph, params, x, y = setup(text, batch=4)
    settings = dict(cnnc.check(text).train.settings)

    def grads_of(current):
        values = reference.run(graph, x, current, y)
        return {name: values[g] for name, g in graph.gradients if name in current}

    expected = numpy_steps(module.optimizer["kind"], params, grads_of, 3, settings)
    losses = [module.train_step(x, y) for _ in range(3)]
    for name, value in expected.items():
        np.testing.assert_allclose(module.params[name], value, rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    assert losses[0] == pytest.approx(float(reference.run(graph, x, params, y)["loss"]))
    assert losses[2] < losses[0]


def test_target_checks(tmp_path):
    module = cnnc.compile(net("4", "dense d: 3 -> softmax", loss="cross_entropy"))
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(cnnc.CnncRuntimeError, match=r"y holds the label 3, outside the classes"):
        module.loss(x, np.array([0, 3]))
    with pytest.raises(cnnc.CnncRuntimeError, match=r"y must hold one class label a sample"):
        module.loss(x, np.array([0, 1, 2]))
    with pytest.raises(cnnc.CnncRuntimeError, match="y must hold integer class labels"):
        module.loss(x, np.array([0.0, 1.0]))
    regression = cnnc.compile(net("4", "dense d: 3"))
    with pytest.raises(cnnc.CnncRuntimeError, match=r"y must have shape \(2, 3\)"):
        regression.loss(x, np.zeros((2, 4)))
    inference = cnnc.compile("network n\ninput: 4\ndense d: 3\n")
    with pytest.raises(cnnc.CnncRuntimeError, match="has no loss line"):
        inference.train_step(x, np.zeros((2, 3)))


def test_training_arguments_are_checked_before_native_code():
    module = cnnc.compile(net("5", "dense d: 3 -> softmax", loss="cross_entropy"))
    x = np.ones((4, 5), np.float32)
    for method in (module.loss, module.gradients, module.input_gradient, module.train_step):
        with pytest.raises(cnnc.CnncRuntimeError, match="y is required"):
            method(x, None)
    for bad in ("abc", [1], float("nan"), -1.0, 0):
        with pytest.raises(cnnc.CnncRuntimeError, match="lr must be"):
            module.train_step(x, np.zeros(4, int), lr=bad)
    assert module.optimizer_state()["optimizer.step"] == 0  # refused steps are not counted
    for bad in ({"optimizer.step": "abc"}, {"optimizer.step": np.array([1, 2])},
                {"d.weight.velocity": np.array(["a"] * 15).reshape(3, 5)}, [1], None):
        with pytest.raises(cnnc.CnncRuntimeError,
                           match=r"set_optimizer_state|must be a numeric array"):
            module.set_optimizer_state(bad)
    with pytest.raises(cnnc.CnncRuntimeError, match="load_weights takes a path"):
        module.load_weights(None)
