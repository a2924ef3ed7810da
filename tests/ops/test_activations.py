"""The elementwise activations against torch (float64 and float32): the numpy reference and
the gradient rules on a grid with tails, kinks, ±0, ±inf and NaN; compiled kernels, fused
into a convolution and a dense layer and standing alone after a pool, scheduled and plain;
the backward pass of a trained network; leaky_relu's slope; He's initialisation; and one
network on the CUDA simulator. tests/ops/test_registry.py checks each one's gradient by
finite differences and its example's kernels besides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close

import cnnc
from cnnc.diagnostics import Span
from cnnc.graph.ir import Node
from cnnc.ops import registry
from cnnc.ops.registry import Mode
from cnnc.passes.autodiff import differentiate
from cnnc.passes.fuse import fuse
from cnnc.passes.initialise import initial_parameters
from conftest import errors_of, run_cli

SPAN = Span.point("<test>", 1, 1)

# what follows `->`, and torch's function of it
TORCH = {
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,  # torch's default slope is 0.01 too
    "leaky_relu(0.1)": lambda t: F.leaky_relu(t, 0.1),
    "leaky_relu(-0.5)": lambda t: F.leaky_relu(t, -0.5),
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
    "tanh": torch.tanh,
    "silu": F.silu,
    "gelu": F.gelu,
    "hardswish": F.hardswish,
}
ACTS = list(TORCH)
# gradients written with the input, whose backward op reads the pre-activation
READS_INPUT = {"silu", "gelu", "hardswish", "leaky_relu(-0.5)"}


def _torch_for_gradients(act: str):
    """torch's function, except hardsigmoid: torch's float64 backward of it multiplies by
    float32's 1/6 (0.16666667163...), 3e-8 off; relu6(x + 3) / 6 has the same forward and
    the exact gradient, zero at ±3 as torch's."""
    if act == "hardsigmoid":
        return lambda t: F.relu6(t + 3) / 6
    return TORCH[act]


def _grid() -> np.ndarray:
    """Dense in [−10, 10], the kinks (−3, 0, 3, 6) and their neighbours, tails, ±0, ±inf,
    NaN."""
    kinks = np.array([-3.0, 0.0, 3.0, 6.0])
    near = np.concatenate([kinks + d for d in (-1e-9, -1e-300, 0.0, 1e-300, 1e-9)])
    tails = np.array([-1e300, -1000, -745, -40, -38, -20, 20, 38, 40, 745, 1000, 1e300])
    special = np.array([-0.0, 0.0, 5e-324, -5e-324, np.inf, -np.inf, np.nan])
    return np.concatenate([np.linspace(-10, 10, 2001), near, tails, special])


def _split(act: str) -> tuple[str, float | None]:
    """leaky_relu(0.1) -> ("leaky_relu", 0.1)."""
    if "(" not in act:
        return act, None
    name, arg = act.rstrip(")").split("(")
    return name, float(arg)


def _node(act: str) -> Node:
    name, arg = _split(act)
    make = registry.get(name).activation_attrs
    return Node(name, ("x",), ("y",), "a", SPAN, make(arg) if make else None)


class _Recorder:
    """autodiff's builder as far as a gradient rule sees it: records the backward node."""

    def op(self, op: str, inputs: tuple[str, ...], like: str, forward: Node,
           attrs: object = None) -> str:
        self.node = Node(op, inputs, ("dx",), forward.layer, SPAN, attrs)
        return "dx"


def _reference(act: str, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, Node]:
    """y and dx by the op's reference and its gradient rule's backward op."""
    node = _node(act)
    with np.errstate(all="ignore"):
        y = registry.get(node.op).reference(node, [x], x.shape, Mode())
        builder = _Recorder()
        [(of, _)] = registry.get(node.op).gradient(node, "dy", builder)
        assert of == "x"
        grad = builder.node
        values = {"x": x, "y": y, "dy": dy}
        dx = registry.get(grad.op).reference(grad, [values[n] for n in grad.inputs], x.shape,
                                             Mode())
    return y, dx, grad


def _torch(act: str, x: np.ndarray, dy: np.ndarray, function=None):
    t = torch.tensor(x, requires_grad=True)
    y = (function or TORCH[act])(t)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), t.grad.numpy()


def _assert_near(got: np.ndarray, want: np.ndarray, x: np.ndarray, rtol: float,
                 atol: float, what: str) -> None:
    """|got − want| <= rtol·|want| + atol·(1 + |x|), NaN where want is NaN: the absolute
    term is the rounding of 1 ± erf, 1 − y² and the like, which cancel in the tails."""
    assert np.array_equal(np.isnan(got), np.isnan(want)), what
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=what)
    bound = rtol * np.abs(want[finite]) + atol * (1 + np.abs(x[finite]))
    excess = np.abs(got[finite] - want[finite]) - bound
    assert excess.max(initial=-1) <= 0, f"{what}: worst at x = {x[finite][excess.argmax()]}"


@pytest.mark.parametrize("dtype, rtol, atol", [(np.float64, 1e-14, 1e-15),
                                               (np.float32, 5e-7, 2e-7)], ids=["f64", "f32"])
@pytest.mark.parametrize("act", ACTS)
def test_reference_and_gradient_rule_match_torch(act, dtype, rtol, atol):
    """y and dx on the grid (dx where x is not NaN: torch's own answer there depends on
    whether its vectorized loop or its scalar tail ran; see the next test)."""
    with np.errstate(over="ignore"):
        x = _grid().astype(dtype)
    dy = np.random.default_rng(0).uniform(0.5, 2.0, x.shape).astype(dtype)
    y, dx, grad = _reference(act, x, dy)
    assert y.dtype == dx.dtype == dtype
    want_y = TORCH[act](torch.tensor(x)).numpy()
    if act == "gelu" and dtype == np.float32:  # torch's vectorized float32 erf: NaN at inf
        want_y = np.where(x == np.inf, np.inf, want_y)
    _assert_near(y, want_y, x, rtol, atol, "y")
    _, want_dx = _torch(act, x, dy, _torch_for_gradients(act))
    number = ~np.isnan(x)
    _assert_near(dx[number], want_dx[number], x[number], rtol, atol, "dx")
    # the backward op reads x where the gradient needs it, y otherwise
    assert grad.inputs[1] == ("x" if act in READS_INPUT else "y")


@pytest.mark.parametrize("act, at_nan", [
    ("relu", 0.0), ("relu6", 0.0), ("leaky_relu", 0.01), ("leaky_relu(-0.5)", -0.5),
    ("sigmoid", np.nan), ("hardsigmoid", 0.0), ("tanh", np.nan), ("silu", np.nan),
    ("gelu", np.nan), ("hardswish", np.nan),
])
def test_the_gradient_at_nan(act, at_nan):
    """0 where the gradient is a mask (relu, relu6, hardsigmoid: as torch's vectorized
    loops), NaN where it is a formula of x or y; torch's scalar loops give dy instead for
    relu, relu6 and hardswish."""
    _, dx, _ = _reference(act, np.array([np.nan]), np.array([1.0]))
    np.testing.assert_array_equal(dx, [at_nan])


def test_torch_hardsigmoid_gradient_is_a_sixth_in_float32_only():
    """Why hardsigmoid is checked against relu6(x + 3) / 6: ours is the exact 1/6."""
    x = np.array([-1.0, 0.5, 2.0])
    _, dx, _ = _reference("hardsigmoid", x, np.ones(3))
    np.testing.assert_array_equal(dx, np.full(3, 1 / 6))
    _, torch_dx = _torch("hardsigmoid", x, np.ones(3))
    np.testing.assert_allclose(torch_dx, 1 / 6, rtol=1e-7)


@pytest.mark.parametrize("act", ACTS)
def test_gradient_rule_against_central_differences(act):
    rng = np.random.default_rng(2)
    x = rng.uniform(-8, 8, 400)
    x = x[np.min(np.abs(x[:, None] - np.array([-3.0, 0.0, 3.0, 6.0])), axis=1) > 1e-3]
    dy = rng.standard_normal(x.shape)
    _, dx, _ = _reference(act, x, dy)
    h = 1e-6
    plus, _, _ = _reference(act, x + h, dy)
    minus, _, _ = _reference(act, x - h, dy)
    np.testing.assert_allclose(dx, dy * (plus - minus) / (2 * h), rtol=1e-7, atol=1e-9)


# -- compiled kernels ---------------------------------------------------------------------

CHANNELS, SIZE, UNITS = 3, 4, 5


def _network(loss: bool = False) -> str:
    """Every activation fused in a convolution, after a pool on a line of its own (another
    one), and fused in a dense layer."""
    lines = ["network acts", f"input: {CHANNELS}x{SIZE}x{SIZE}"]
    for i, act in enumerate(ACTS):
        lines += [f"conv c{i}: {CHANNELS} 3x3 pad=1 -> {act}", f"maxpool p{i}: 1x1",
                  ACTS[(i + 5) % len(ACTS)]]
    lines += [f"dense d{i}: {UNITS} -> {act}" for i, act in enumerate(ACTS)]
    return "\n".join(lines + (["loss mse"] if loss else [])) + "\n"


def _params(module: cnnc.Module, seed: int) -> dict[str, np.ndarray]:
    """Weights that take pre-activations past every kink (±3, 6) and into the tails."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, p in module.params.items():
        fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else 1
        values[name] = (rng.standard_normal(p.shape) * 3 / math.sqrt(fan_in)).astype(p.dtype)
    module.set_params(values)
    return values


def _layers(params: dict[str, np.ndarray]):
    """(output, input, torch's function of the input) for every layer, in order."""
    p = {name: torch.tensor(value) for name, value in params.items()}
    previous = "input"
    for i, act in enumerate(ACTS):
        yield (f"c{i}", previous, lambda t, i=i, act=act: TORCH[act](
            F.conv2d(t, p[f"c{i}.weight"], p[f"c{i}.bias"], padding=1)))
        yield (f"p{i}", f"c{i}", TORCH[ACTS[(i + 5) % len(ACTS)]])  # a 1x1 pool is no change
        previous = f"p{i}"
    for i, act in enumerate(ACTS):
        yield (f"d{i}", previous, lambda t, i=i, act=act: TORCH[act](
            F.linear(t.flatten(1), p[f"d{i}.weight"], p[f"d{i}.bias"])))
        previous = f"d{i}"


def _kernel_names(text: str, train: bool) -> list[str]:
    graph = cnnc.check(text)
    return [k.name for k in fuse(differentiate(graph) if train else graph).kernels
            if k.phase == "forward"]


def test_every_activation_fuses_into_conv_and_dense_and_stands_alone_after_a_pool():
    names = _kernel_names(_network(), train=False)
    for i, act in enumerate(ACTS):
        tag = _split(act)[0]
        assert f"c{i}_conv_{tag}_maxpool_fwd" in names
        assert f"p{i}_{_split(ACTS[(i + 5) % len(ACTS)])[0]}_fwd" in names
        assert f"d{i}_dense_{tag}_fwd" in names


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("schedule", [True, False], ids=["scheduled", "plain"])
def test_compiled_activations_match_torch_layer_by_layer(dtype, schedule):
    """Each layer's compiled output against torch applied to the compiled input of that
    layer, so that each comparison sees the rounding of one layer only."""
    module = cnnc.compile(_network(), dtype=dtype, schedule=schedule, opt_level=0)
    params = _params(module, seed=3)
    numpy_dtype = np.float64 if dtype == "f64" else np.float32
    x = (np.random.default_rng(4).standard_normal((3, CHANNELS, SIZE, SIZE)) * 3)
    values = {"input": x.astype(numpy_dtype), **module.activations(x.astype(numpy_dtype))}
    for name, source, function in _layers(params):
        want = function(torch.tensor(values[source])).numpy()
        assert_close(values[name].reshape(want.shape), want, numpy_dtype, name)


def test_x_reading_activations_are_their_own_kernel_when_training():
    """Their backward op reads the pre-activation, so it is stored: the activation runs as a
    kernel of its own; those whose gradient reads y stay fused."""
    names = _kernel_names(_network(loss=True), train=True)
    for i, act in enumerate(ACTS):
        tag = _split(act)[0]
        if act in READS_INPUT:
            assert f"c{i}_conv_fwd" in names and f"c{i}_{tag}_fwd" in names
            assert f"d{i}_dense_fwd" in names and f"d{i}_{tag}_fwd" in names
        else:
            assert f"c{i}_conv_{tag}_maxpool_fwd" in names and f"d{i}_dense_{tag}_fwd" in names


def _torch_loss(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """The network's mse in torch (hardsigmoid as relu6(x + 3) / 6, see above), and the
    leaves to take gradients of."""
    leaves = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    leaves["input"] = torch.tensor(x, requires_grad=True)
    t = leaves["input"]
    for i, act in enumerate(ACTS):
        t = _torch_for_gradients(act)(
            F.conv2d(t, leaves[f"c{i}.weight"], leaves[f"c{i}.bias"], padding=1))
        t = _torch_for_gradients(ACTS[(i + 5) % len(ACTS)])(t)
    t = t.flatten(1)
    for i, act in enumerate(ACTS):
        t = _torch_for_gradients(act)(F.linear(t, leaves[f"d{i}.weight"], leaves[f"d{i}.bias"]))
    return F.mse_loss(t, torch.tensor(y)), leaves


def test_trained_network_gradients_and_sgd_step_match_torch_autograd():
    """Every backward op, compiled (plain: the scheduled fused kernels are checked above,
    and the schedules of the backward convolutions are not the activations' business)."""
    module = cnnc.compile(_network(loss=True) + "train sgd lr=0.1\n", dtype="f64",
                          schedule=False, opt_level=0)
    params = _params(module, seed=5)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, CHANNELS, SIZE, SIZE)) * 3
    y = rng.standard_normal((3, UNITS))
    loss, leaves = _torch_loss(params, x, y)
    loss.backward()
    gradients = module.gradients(x, y)
    for name, value in gradients.items():
        np.testing.assert_allclose(value, leaves[name].grad.numpy(), rtol=1e-10, atol=1e-13,
                                   err_msg=name)
    np.testing.assert_allclose(module.input_gradient(x, y), leaves["input"].grad.numpy(),
                               rtol=1e-10, atol=1e-13)
    module.train_step(x, y)
    for name, value in module.params.items():
        np.testing.assert_allclose(value, params[name] - 0.1 * leaves[name].grad.numpy(),
                                   rtol=1e-10, atol=1e-13, err_msg=name)


def test_conv_silu_trains_with_its_pre_activation_stored():
    """conv c: 3 3x3 -> silu, trained: the convolution's kernel stores c.pre (bias added),
    which silu's kernel and its gradient read; the gradients match torch's."""
    text = ("network s\ninput: 2x5x5\nconv c: 3 3x3 -> silu\ndense d: 2\nloss mse\n"
            "train sgd lr=0.1\n")
    program = fuse(differentiate(cnnc.check(text, dtype="f64")))
    kernels = {k.name: k for k in program.kernels}
    assert kernels["c_conv_fwd"].outputs == ("c.pre",)
    assert kernels["c_silu_fwd"].inputs == ("c.pre",)
    assert kernels["c_silu_grad_bwd"].inputs[1] == "c.pre"
    module = cnnc.compile(text, dtype="f64", opt_level=0)
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((4, 2, 5, 5)) * 2, rng.standard_normal((4, 2))
    p = {name: torch.tensor(value, requires_grad=True) for name, value in module.params.items()}
    out = F.linear(F.silu(F.conv2d(torch.tensor(x), p["c.weight"], p["c.bias"])).flatten(1),
                   p["d.weight"], p["d.bias"])
    F.mse_loss(out, torch.tensor(y)).backward()
    for name, value in module.gradients(x, y).items():
        np.testing.assert_allclose(value, p[name].grad.numpy(), rtol=1e-11, err_msg=name)


# -- gelu's erf on a dense grid, compiled -------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_compiled_gelu_on_a_dense_grid_with_tails_nan_and_inf(dtype):
    """gelu alone after a pool: the C library's erf (erff for f32) against Python's
    math.erf in float64 and torch in both."""
    with np.errstate(over="ignore"):
        x = _grid().astype(dtype)
    x = np.concatenate([x, np.zeros(-x.size % 64, dtype)]).reshape(-1, 1, 8, 8)
    module = cnnc.compile("network g\ninput: 1x8x8\nmaxpool 1x1\ngelu\n",
                          dtype="f64" if dtype == np.float64 else "f32", opt_level=1)
    got = module(x)
    want = F.gelu(torch.tensor(x)).numpy()
    if dtype == np.float64:
        _assert_near(got, want, x, 1e-14, 1e-15, "torch")
        erf = np.array([math.erf(v * math.sqrt(0.5)) for v in x.ravel()])
        with np.errstate(invalid="ignore"):  # −inf · 0
            oracle = x.ravel() * 0.5 * (1 + erf)
        _assert_near(got.ravel(), oracle, x.ravel(), 1e-14, 1e-15, "math.erf")
    else:
        want = np.where(x == np.inf, np.inf, want)  # torch's vectorized erff: NaN at inf
        _assert_near(got, want, x, 5e-7, 2e-7, "torch")


# -- leaky_relu's slope -------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [True, False], ids=["scheduled", "plain"])
def test_leaky_relu_slope_reaches_the_fused_kernel(schedule):
    text = ("network l\ninput: 4\ndense d: 4 bias=false -> leaky_relu(0.1)\n"
            "dense e: 4 bias=false -> leaky_relu\n")
    assert _kernel_names(text, train=False) == ["d_dense_leaky_relu_fwd",
                                                "e_dense_leaky_relu_fwd"]
    module = cnnc.compile(text, schedule=schedule, dtype="f64", opt_level=1)
    module.set_params({"d.weight": np.eye(4), "e.weight": np.eye(4)})
    x = np.array([[-1.0, 2.0, -30.0, 0.5]])
    values = module.activations(x)
    np.testing.assert_array_equal(values["d"], [[-0.1, 2.0, -3.0, 0.5]])
    np.testing.assert_allclose(values["e"], [[-0.001, 2.0, -0.03, 0.5]], rtol=1e-15)


def test_leaky_relu_slope_prints_in_the_graph(capsys, tmp_path):
    path = tmp_path / "l.cnn"
    path.write_text("network l\ninput: 4\ndense d: 3 -> leaky_relu(0.1)\ndense e: 2\n"
                    "leaky_relu\nloss mse\n")
    code, out, _ = run_cli(capsys, "compile", str(path), "--emit", "grad")
    assert code == 0
    assert "d = leaky_relu(d.pre) slope=0.1 " in out
    assert "e = leaky_relu(e.pre) slope=0.01 " in out
    assert "= leaky_relu_grad(" in out and out.count("slope=0.1 ") == 2


@pytest.mark.parametrize("line, message", [
    ("dense d: 2 -> relu(0.1)", "relu takes no argument; write relu"),
    ("dense d: 2 -> gelu(1)", "gelu takes no argument; write gelu"),
    ("dense d: 2 -> leaky_relu(1e999)", "leaky_relu: the slope must be a finite number, not inf"),
])
def test_an_activation_argument_it_does_not_take_is_an_error(line, message):
    assert [m for _, _, m in errors_of(f"network n\ninput: 3\n{line}\n")] == [message]


def test_any_finite_slope_is_accepted():
    graph = cnnc.check("network n\ninput: 3\ndense d: 2 -> leaky_relu(-2)\ndense e: 2\n"
                       "leaky_relu(0)\n")
    assert [n.attrs.slope for n in graph.nodes if n.op == "leaky_relu"] == [-2.0, 0.0]


# -- initialisation -----------------------------------------------------------------------

@pytest.mark.parametrize("act, variance", [
    ("relu", 2.0), ("relu6", 2.0), ("leaky_relu(0.5)", 2 / 1.25), ("leaky_relu", 2 / 1.0001),
])
def test_relu_like_layers_start_with_he_scale(act, variance):
    params = initial_parameters(cnnc.check(f"network n\ninput: 400\ndense d: 400 -> {act}\n"))
    weight = params["d.weight"]
    assert abs(weight.std() / math.sqrt(variance / 400) - 1) < 0.02


@pytest.mark.parametrize("act", ["silu", "gelu", "hardswish", "sigmoid"])
def test_other_activations_start_with_glorot_scale(act):
    params = initial_parameters(cnnc.check(f"network n\ninput: 400\ndense d: 400 -> {act}\n"))
    limit = math.sqrt(6 / 800)
    assert np.abs(params["d.weight"]).max() <= limit
    assert abs(params["d.weight"].std() / (limit / math.sqrt(3)) - 1) < 0.02


# -- CUDA ---------------------------------------------------------------------------------

def test_several_activations_on_the_cuda_simulator():
    """gelu fused in a convolution, silu alone after a pool, four more fused in dense
    layers: the CUDA module's output and parameter gradients against the reference."""
    pytest.importorskip("numba.cuda")
    from cnnc.passes import reference

    text = ("network g\ninput: 1x3x3\nconv c: 2 2x2 -> gelu\nmaxpool 1x1\nsilu\n"
            "dense d: 3 -> leaky_relu(-0.5)\ndense e: 3 -> hardswish\ndense f: 3 -> relu6\n"
            "dense h: 2 -> hardsigmoid\nloss mse\n")
    module = cnnc.compile(text, target="cuda", dtype="f64")
    params = _params(module, seed=8)
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((2, 1, 3, 3)) * 3, rng.standard_normal((2, 2))
    graph = differentiate(cnnc.check(text, dtype="f64"))
    want = reference.run(graph, x, params, y)
    assert_close(module(x), want[graph.output], np.float64, "output")
    gradients, loss = module.gradients_and_loss(x, y)
    assert_close(np.asarray(loss), want[graph.loss], np.float64, "loss")
    for name, gradient in graph.gradients:
        if name != graph.input:
            assert_close(gradients[name], want[gradient], np.float64, name)
