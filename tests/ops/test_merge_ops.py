"""Graph networks: `concat`, `mul` and `add` of named layers, `from=` on flatten, dense and
conv, against PyTorch written out by hand for each program: the reference and the compiled
modules (f32, f64), forward and every gradient; the errors of merges and their notes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import random_params

import cnnc
from cnnc.diagnostics import CnncSemanticError, Span
from cnnc.graph.ir import Node
from cnnc.passes import reference
from cnnc.passes.autodiff import differentiate
from conftest import errors_of

SPAN = Span.point("<test>", 1, 1)


def _conv(p, name, x, pad=0, stride=1):
    return F.conv2d(x, p[f"{name}.weight"], p.get(f"{name}.bias"), stride=stride, padding=pad)


def _dense(p, name, x):
    return F.linear(x.flatten(1), p[f"{name}.weight"], p.get(f"{name}.bias"))


def _residual(p, x):
    a = F.relu(_conv(p, "a", x, pad=1))
    return _dense(p, "d", F.relu(_conv(p, "b", a, pad=1) + _conv(p, "s", x)))


def _fire(p, x):
    squeeze = F.relu(_conv(p, "sq", x))
    joined = torch.cat([F.relu(_conv(p, "e1", squeeze)), F.relu(_conv(p, "e3", squeeze, 1))], 1)
    return _dense(p, "d", F.max_pool2d(joined, 2))


def _squeeze_excite(p, x):
    c = F.relu(_conv(p, "c", x, pad=1))
    gate = torch.sigmoid(_conv(p, "e", F.relu(_conv(p, "z", F.adaptive_avg_pool2d(c, 1)))))
    return _dense(p, "d", F.adaptive_max_pool2d(c * gate, 1))


def _unet(p, x):
    a = F.relu(_conv(p, "a", x, pad=1))
    b = _conv(p, "b", F.max_pool2d(a, 2), pad=1)
    u = torch.cat([torch.nn.Upsample(scale_factor=2, mode="nearest")(b), a], 1)
    return _conv(p, "o", u * u)


def _vectors(p, x):
    f = x.flatten(1)
    joined = torch.cat([f, torch.tanh(_dense(p, "a", f))], 1)
    return torch.tanh(_dense(p, "d", joined)) + _dense(p, "e", f)


def _from_names(p, x):
    c = F.relu(_conv(p, "c", x, pad=1))
    return _dense(p, "d", c) + _dense(p, "e", _conv(p, "k", c))


# each program, without its network and loss lines, and the same network in torch
PROGRAMS = {
    "residual": ("input x: 2x6x6\nconv a: 4 3x3 pad=1 -> relu\nconv b: 4 3x3 pad=1\n"
                 "conv s: 4 1x1 from=x\nadd r: b, s -> relu\nflatten\ndense d: 3", _residual),
    "fire": ("input x: 3x5x5\nconv sq: 2 1x1 -> relu\nconv e1: 3 1x1 -> relu\n"
             "conv e3: 4 3x3 pad=1 from=sq -> relu\nconcat f: e1, e3\nmaxpool 2x2\n"
             "dense d: 3", _fire),
    "squeeze_excite": ("input x: 4x4x4\nconv c: 4 3x3 pad=1 -> relu\nglobalavgpool g\n"
                       "conv z: 2 1x1 -> relu\nconv e: 4 1x1 -> sigmoid\nmul m: c, e\n"
                       "globalmaxpool\ndense d: 3", _squeeze_excite),
    "unet": ("input x: 2x4x4\nconv a: 3 3x3 pad=1 -> relu\nmaxpool 2x2\n"
             "conv b: 3 3x3 pad=1\nupsample 2x2\nconcat u: upsample1, a\nmul q: u, u\n"
             "conv o: 2 1x1", _unet),
    "vectors": ("input x: 2x3x3\nflatten f\ndense a: 4 -> tanh\nconcat v: f, a\n"
                "dense d: 2 -> tanh\ndense e: 2 from=f\nadd s: d, e", _vectors),
    "from_names": ("input x: 2x4x4\nconv c: 3 3x3 pad=1 -> relu\nconv k: 2 1x1\n"
                   "flatten g from=c\ndense d: 2\ndense e: 2 from=k\nadd s: d, e", _from_names),
}


def _text(name: str) -> str:
    return f"network {name}\n{PROGRAMS[name][0]}\nloss mse\n"


def _torch_values(name, params, x, y):
    """(output, loss, gradient of the input, gradient of each parameter) in float64."""
    p = {key: torch.tensor(np.asarray(v, np.float64), requires_grad=True)
         for key, v in params.items()}
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    out = PROGRAMS[name][1](p, xt)
    loss = ((out - torch.tensor(np.asarray(y, np.float64))) ** 2).mean()
    loss.backward()
    return (out.detach().numpy(), loss.item(), xt.grad.numpy(),
            {key: v.grad.numpy() for key, v in p.items()})


def _close(got, want, rtol, what):
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def _data(graph, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, *graph.tensor(graph.input).shape[1:]))
    y = rng.standard_normal((3, *graph.tensor(graph.output).shape[1:]))
    return x, y


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_reference_forward_and_gradients_against_torch(name):
    graph = differentiate(cnnc.check(_text(name), dtype="f64"))
    rng = np.random.default_rng(1)
    params = {p.name: rng.standard_normal(p.shape) * 0.5 for p in graph.params}
    x, y = _data(graph, seed=3)
    values = reference.run(graph, x, params, y)
    out, loss, dx, grads = _torch_values(name, params, x, y)
    _close(values[graph.output], out, 1e-12, "output")
    _close(values[graph.loss], loss, 1e-12, "loss")
    gradients = dict(graph.gradients)
    _close(values[gradients[graph.input]], dx, 1e-12, "input gradient")
    for param, grad in grads.items():
        _close(values[gradients[param]], grad, 1e-12, param)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_compiled_graph_networks_against_torch(name, dtype):
    """f64 at the default -O3, f32 at -O0, which compiles several times faster (every op's
    -O3 kernels in both dtypes' code paths are checked by tests/ops/test_registry.py)."""
    module = cnnc.compile(_text(name), dtype=dtype, opt_level=3 if dtype == "f64" else 0)
    params = random_params(module, seed=2)
    x, y = _data(cnnc.check(_text(name)), seed=4)
    cast = np.float32 if dtype == "f32" else np.float64
    x, y = x.astype(cast), y.astype(cast)
    out, loss, dx, grads = _torch_values(name, params, x, y)
    rtol = 2e-4 if dtype == "f32" else 1e-10
    _close(module.forward(x), out, rtol, "output")
    gradients, got_loss = module.gradients_and_loss(x, y)
    _close(np.asarray(got_loss), loss, rtol, "loss")
    _close(module.input_gradient(x, y), dx, rtol, "input gradient")
    for param, grad in grads.items():
        _close(gradients[param], grad, rtol, param)


# -- the ops' numpy rules against torch ------------------------------------------------------

def _evaluate(op, args, outputs=("y",), attrs=None, shape=None):
    node = Node(op, tuple(f"in{i}" for i in range(len(args))), outputs, "y", SPAN, attrs)
    return reference.evaluate(node, args, shape)


def test_concat_reference_is_torch_cat_for_planes_and_vectors():
    rng = np.random.default_rng(0)
    planes = [rng.standard_normal((2, c, 3, 4)) for c in (1, 3, 2)]
    np.testing.assert_array_equal(
        _evaluate("concat", planes), torch.cat([torch.tensor(p) for p in planes], 1).numpy())
    vectors = [rng.standard_normal((2, f)) for f in (5, 1)]
    np.testing.assert_array_equal(
        _evaluate("concat", vectors), torch.cat([torch.tensor(v) for v in vectors], 1).numpy())


def test_mul_reference_and_its_gate_gradient_against_torch():
    rng = np.random.default_rng(1)
    a, gate, dy = (rng.standard_normal(s) for s in ((2, 3, 4, 5), (2, 3, 1, 1), (2, 3, 4, 5)))
    at, gt = (torch.tensor(v, requires_grad=True) for v in (a, gate))
    product = at * gt
    product.backward(torch.tensor(dy))
    np.testing.assert_allclose(_evaluate("mul", [a, gate]), product.detach().numpy(),
                               rtol=1e-15)
    np.testing.assert_allclose(_evaluate("mul_grad_gate", [dy, a]), gt.grad.numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(_evaluate("mul", [dy, gate]), at.grad.numpy(), rtol=1e-15)


# -- errors -----------------------------------------------------------------------------------

def _program(*lines: str) -> str:
    return "network e\ninput x: 2x8x8\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("lines, expected", [
    (["conv a: 4 3x3 pad=1", "conv b: 2 3x3 stride=2 from=x", "concat c: a, b"],
     (5, 1, "concat c joins the channels of tensors of one height and width, but conv a "
            "gives 4x8x8 and conv b gives 2x3x3")),
    (["conv a: 4 3x3 pad=1", "dense b: 3 from=x", "concat c: a, b"],
     (5, 1, "concat c joins CxHxW tensors or feature vectors, not one of each, but conv a "
            "gives 4x8x8 and dense b gives 3; flatten the CxHxW one to join them as vectors")),
    (["conv a: 4 3x3 pad=1", "conv b: 3 1x1 from=x", "mul m: a, b"],
     (5, 1, "mul m multiplies tensors of one shape, or a CxHxW tensor by a Cx1x1 gate, but "
            "conv a gives 4x8x8 and conv b gives 3x8x8")),
    (["conv a: 4 3x3 pad=1", "globalavgpool g", "mul m: g, a"],
     (5, 1, "mul m multiplies tensors of one shape, or a CxHxW tensor by a Cx1x1 gate, but "
            "globalavgpool g gives 4x1x1 and conv a gives 4x8x8; the gate goes second")),
    (["conv a: 4 3x3 pad=1", "globalavgpool g", "dense s: 4 -> sigmoid", "mul m: a, s"],
     (6, 1, "mul m multiplies tensors of one shape, or a CxHxW tensor by a Cx1x1 gate, but "
            "conv a gives 4x8x8 and dense s gives 4; a dense layer gives a vector, not a "
            "Cx1x1 gate: a 1x1 conv of a globalavgpool gives one")),
    (["conv a: 4 3x3 pad=1", "mul m: a, a, x"],
     (4, 14, "mul m multiplies two layers, but names 3")),
    (["conv a: 4 3x3 pad=1", "concat c: a"],
     (4, 11, "concat c joins two layers or more, like 'concat c: a, b', but names only a")),
    (["conv a: 4 3x3 pad=1", "add s: a -> relu"],
     (4, 8, "add s adds two layers or more, like 'add s: a, b', but names only a")),
    (["conv a: 2 3x3 pad=1", "concat c: a, x axis=1"],
     (4, 16, "concat c has no option 'axis'; expected one of (none)")),
])
def test_merge_errors_name_both_shapes_and_where_they_came_from(lines, expected):
    assert errors_of(_program(*lines)) == [expected]


def _notes(text: str) -> tuple[str, list[str]]:
    with pytest.raises(CnncSemanticError) as caught:
        cnnc.check(text)
    (diagnostic,) = caught.value.diagnostics
    return diagnostic.message, [note.message for note in diagnostic.notes]


def test_an_add_of_two_shapes_notes_the_chain_of_each_input_and_not_a_side_branch():
    message, notes = _notes(_program(
        "conv x1: 16 3x3 pad=1", "conv side: 2 1x1 from=x", "conv y: 32 3x3 stride=2 from=x",
        "add b1: x1, y"))
    assert message == ("add b1 adds tensors of one shape, but conv x1 gives 16x8x8 and "
                       "conv y gives 32x3x3")
    assert notes == ["input x 2x8x8 -> conv x1 16x8x8 (floor((8 + 2 - 3) / 1) + 1 = 8)",
                     "input x 2x8x8 -> conv y 32x3x3 (floor((8 + 0 - 3) / 2) + 1 = 3)"]


def test_a_layer_after_a_merge_notes_every_layer_the_merge_reads_in_program_order():
    _, notes = _notes(_program("conv a: 2 3x3", "conv side: 2 1x1 from=x", "conv b: 2 3x3 from=x",
                               "concat c: a, b", "conv d: 2 9x9", "add s: d, side"))
    assert notes == ["input x 2x8x8 -> conv a 2x6x6 -> conv b 2x6x6 -> concat c 4x6x6"]


def test_a_residual_chain_notes_the_shortcut_as_its_own_chain():
    message, notes = _notes(_program("conv a: 4 3x3 pad=1 -> relu", "conv b: 4 3x3",
                                     "add r: b, a -> relu"))
    assert message == ("add r adds tensors of one shape, but conv b gives 4x6x6 and conv a "
                       "gives 4x8x8")
    assert notes == [
        "input x 2x8x8 -> conv a 4x8x8 -> conv b 4x6x6 (floor((8 + 0 - 3) / 1) + 1 = 6)",
        "input x 2x8x8 -> conv a 4x8x8 (floor((8 + 2 - 3) / 1) + 1 = 8)"]


# -- the CUDA backend (Numba's simulator without a GPU, see tests/conftest.py) ---------------

CUDA_PROGRAM = ("network k\ninput x: 2x4x4\nconv a: 2 3x3 pad=1 -> relu\nmaxpool 2x2\n"
                "upsample 2x2\nconcat c: upsample1, a\nglobalavgpool g\n"
                "conv e: 4 1x1 -> sigmoid\nmul m: c, e\nglobalmaxpool\ndense d: 2\nloss mse\n")


def test_cuda_kernels_of_concat_mul_upsample_and_global_pools_match_the_reference():
    cuda = pytest.importorskip("numba.cuda", reason="numba is not installed")
    if not cuda.is_available():
        pytest.skip("no CUDA GPU and no simulator (NUMBA_ENABLE_CUDASIM=1)")
    module = cnnc.compile(CUDA_PROGRAM, target="cuda", dtype="f64")
    params = random_params(module, seed=5)
    graph = differentiate(cnnc.check(CUDA_PROGRAM, dtype="f64"))
    x, y = _data(graph, seed=6)
    values = reference.run(graph, x, params, y)
    gradients = dict(graph.gradients)
    _close(module.forward(x), values[graph.output], 1e-12, "output")
    _close(np.asarray(module.loss(x, y)), values[graph.loss], 1e-12, "loss")
    _close(module.input_gradient(x, y), values[gradients[graph.input]], 1e-12, "input gradient")
    for name, gradient in module.gradients(x, y).items():
        _close(gradient, values[gradients[name]], 1e-12, name)
