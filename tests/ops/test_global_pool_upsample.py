"""`globalavgpool`, `globalmaxpool` and `upsample` against PyTorch: the numpy rules and their
gradients, compiled modules in f32 and f64, the maximum's ties and NaN, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import random_params

import cnnc
from cnnc.diagnostics import Span
from cnnc.graph.ir import Node
from cnnc.ops.upsample import UpsampleAttrs
from cnnc.passes import reference
from conftest import errors_of

SPAN = Span.point("<test>", 1, 1)
NAN, INF = float("nan"), float("inf")


def _evaluate(op, args, outputs=("y",), attrs=None, shape=None):
    node = Node(op, tuple(f"in{i}" for i in range(len(args))), outputs, "y", SPAN, attrs)
    return reference.evaluate(node, args, shape)


def _torch(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, requires_grad=True)


def test_global_average_and_its_gradient_against_torch():
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 1, 1))
    xt = _torch(x)
    pooled = F.adaptive_avg_pool2d(xt, 1)
    pooled.backward(torch.tensor(dy))
    np.testing.assert_allclose(_evaluate("global_avgpool2d", [x]), pooled.detach().numpy(),
                               rtol=1e-14)
    np.testing.assert_allclose(_evaluate("global_avgpool2d_grad", [dy], shape=x.shape),
                               xt.grad.numpy(), rtol=1e-15)


# planes of 2x3: plain, a tie (the first maximum takes δ), NaNs (the last NaN, as torch),
# all −∞ (the first position)
PLANES = np.array([[[[0.5, -1.0, 2.0], [1.5, 0.0, -3.0]],
                    [[4.0, 1.0, 4.0], [0.0, 4.0, 2.0]],
                    [[1.0, NAN, 3.0], [NAN, 9.0, 0.0]],
                    [[-INF, -INF, -INF], [-INF, -INF, -INF]]]])


def test_global_maximum_its_position_and_gradient_against_torch():
    dy = np.arange(1.0, 5.0).reshape(1, 4, 1, 1)
    xt = _torch(PLANES)
    pooled, index = F.adaptive_max_pool2d(xt, 1, return_indices=True)
    pooled.backward(torch.tensor(dy))
    best, argmax = _evaluate("global_maxpool2d", [PLANES], ("y", "y.argmax"))
    np.testing.assert_array_equal(best, pooled.detach().numpy())  # NaN where torch has NaN
    np.testing.assert_array_equal(best, torch.amax(torch.tensor(PLANES), (2, 3), True).numpy())
    np.testing.assert_array_equal(argmax, index.numpy())
    assert argmax.reshape(-1).tolist() == [2, 0, 3, 0]
    grad = _evaluate("global_maxpool2d_grad", [dy, argmax], shape=PLANES.shape)
    np.testing.assert_array_equal(grad, xt.grad.numpy())


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_compiled_global_maximum_takes_the_first_maximum_and_lets_nan_through(dtype):
    module = cnnc.compile("network g\ninput x: 4x2x3\nglobalmaxpool g\nloss mse\n", dtype=dtype)
    cast = np.float32 if dtype == "f32" else np.float64
    x = np.concatenate([PLANES, PLANES[:, :, ::-1, ::-1]]).astype(cast)
    values = module.activations(x)
    xt = _torch(x.astype(np.float64))
    pooled, index = F.adaptive_max_pool2d(xt, 1, return_indices=True)
    np.testing.assert_array_equal(values["g"], pooled.detach().numpy().astype(cast))
    np.testing.assert_array_equal(values["g.argmax"], index.numpy())
    # δ is NaN at a NaN maximum and goes to its position alone, as in torch
    y = np.zeros((2, 4, 1, 1), cast)
    ((pooled - torch.tensor(y, dtype=torch.float64)) ** 2).mean().backward()
    np.testing.assert_array_equal(module.input_gradient(x, y), xt.grad.numpy().astype(cast))


def test_upsample_and_its_gradient_against_torch():
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((2, 3, 2, 4)), rng.standard_normal((2, 3, 6, 8))
    xt = _torch(x)
    up = torch.nn.Upsample(scale_factor=(3, 2), mode="nearest")(xt)
    up.backward(torch.tensor(dy))
    attrs = UpsampleAttrs((3, 2))
    np.testing.assert_array_equal(_evaluate("upsample_nearest", [x], attrs=attrs),
                                  up.detach().numpy())
    np.testing.assert_allclose(_evaluate("upsample_nearest_grad", [dy], attrs=attrs,
                                         shape=x.shape), xt.grad.numpy(), rtol=1e-14)


def _network(p, x):
    up = torch.nn.Upsample(scale_factor=(3, 2), mode="nearest")(x)
    c = torch.relu(F.conv2d(up, p["c.weight"], p["c.bias"]))
    a = torch.tanh(F.adaptive_avg_pool2d(c, 1))
    m = F.adaptive_max_pool2d(F.conv2d(c, p["k.weight"], p["k.bias"]), 1)
    return torch.cat([a, m], 1)


PROGRAM = ("network u\ninput x: 2x3x2\nupsample u: 3x2\nconv c: 3 3x3\nrelu\n"
           "globalavgpool a -> tanh\nconv k: 2 2x2 from=c\nglobalmaxpool m\nconcat o: a, m\n"
           "loss mse\n")


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_compiled_upsample_and_global_pools_against_torch(dtype):
    module = cnnc.compile(PROGRAM, dtype=dtype, opt_level=3 if dtype == "f64" else 0)
    params = random_params(module, seed=3)
    cast = np.float32 if dtype == "f32" else np.float64
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 3, 2)).astype(cast)
    y = rng.standard_normal((3, 5, 1, 1)).astype(cast)
    p = {name: _torch(np.asarray(v, np.float64)) for name, v in params.items()}
    xt = _torch(x.astype(np.float64))
    out = _network(p, xt)
    loss = ((out - torch.tensor(y, dtype=torch.float64)) ** 2).mean()
    loss.backward()
    rtol = 1e-4 if dtype == "f32" else 1e-11
    np.testing.assert_allclose(module.forward(x), out.detach().numpy(), rtol=rtol, atol=rtol)
    gradients, got = module.gradients_and_loss(x, y)
    np.testing.assert_allclose(got, loss.item(), rtol=rtol)
    np.testing.assert_allclose(module.input_gradient(x, y), xt.grad.numpy(), rtol=rtol,
                               atol=rtol)
    for name, tensor in p.items():
        np.testing.assert_allclose(gradients[name], tensor.grad.numpy(), rtol=rtol, atol=rtol,
                                   err_msg=name)


def _program(*lines: str) -> str:
    return "network e\ninput x: 2x4x4\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("lines, expected", [
    (["upsample u: 0x2"], (3, 13, "upsample u: each factor must be at least 1, got 0x2")),
    (["upsample -2x2"], (3, 10, "upsample1: each factor must be at least 1, got -2x2")),
    (["upsample u: 2x2x2"],
     (3, 13, "upsample u: the factor must be two numbers FHxFW like 2x2, got 2x2x2")),
    (["upsample u: 2x2 mode=bilinear"],
     (3, 17, "upsample u has no option 'mode'; expected one of (none)")),
    (["dense d: 3", "upsample u: 2x2"],
     (4, 1, "upsample u needs a CxHxW input, but dense d gives 3")),
    (["dense d: 3", "globalavgpool g"],
     (4, 1, "globalavgpool g needs a CxHxW input, but dense d gives 3")),
    (["flatten f", "globalmaxpool"],
     (4, 1, "globalmaxpool1 needs a CxHxW input, but flatten f gives 32")),
])
def test_errors(lines, expected):
    assert errors_of(_program(*lines)) == [expected]
