"""conv's groups, dilation and padding options (P, PHxPW, TxLxBxR, same, valid) against
PyTorch in float64: the compiled module (scheduled and plain, f32 and f64) forward, its
weight, bias and input gradients against torch autograd, and the wording of bad options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnc
from cnnc.ops.conv import conv2d
from cnnc.passes.autodiff import differentiate
from cnnc.passes.fuse import fuse
from cnnc.schedule.apply import lower_blocked
from cnnc.schedule.cost import Machine
from conftest import check_text, errors_of, program

FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = {"f32": 2e-4, "f64": 1e-10}


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's SAME (ONNX SAME_UPPER): output ceil(size / stride), the odd pad after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def torch_pads(pad, shape, kernel, stride, dilation) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a pad option, as four numbers."""
    if pad == "valid":
        return 0, 0, 0, 0
    if pad == "same":
        (top, bottom), (left, right) = (same_pads(shape[axis + 1], kernel[axis], stride[axis],
                                                  dilation[axis]) for axis in (0, 1))
        return top, left, bottom, right
    return pad


def close(got, want, dtype: str, name: str) -> None:
    rtol = TOLERANCE[dtype]
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


def check_conv(shape, filters, kernel, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1),
               groups=1, bias=True, dtype="f64", schedule=True, batch=2, seed=0, opt_level=0):
    """Compile `conv c` with these options (at -O0 unless told: LLVM's passes are most of a
    compile), and compare its output and every gradient of the mse loss with torch's conv2d
    of the same parameters."""
    pad_text = pad if isinstance(pad, str) else "x".join(map(str, pad))
    text = program("x".join(map(str, shape)),
                   f"conv c: {filters} {kernel[0]}x{kernel[1]} stride={stride[0]}x{stride[1]} "
                   f"pad={pad_text} dilation={dilation[0]}x{dilation[1]} groups={groups} "
                   f"bias={'true' if bias else 'false'}", "loss mse")
    module = cnnc.compile(text, dtype=dtype, schedule=schedule, opt_level=opt_level)
    numpy_dtype = np.float32 if dtype == "f32" else np.float64
    rng = np.random.default_rng(seed)
    params = {name: (rng.standard_normal(p.shape) * 0.5).astype(numpy_dtype)
              for name, p in module.params.items()}
    module.set_params(params)
    assert params["c.weight"].shape == (filters, shape[0] // groups, *kernel)
    x = rng.standard_normal((batch, *shape)).astype(numpy_dtype)
    y = rng.standard_normal((batch, *module.output_shape)).astype(numpy_dtype)

    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(params["c.weight"], dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(params["c.bias"], dtype=torch.float64, requires_grad=True) \
        if bias else None
    top, left, bottom, right = torch_pads(pad, shape, kernel, stride, dilation)
    want = F.conv2d(F.pad(tx, (left, right, top, bottom)), tw, tb, stride=stride,
                    dilation=dilation, groups=groups)
    ((want - torch.tensor(y, dtype=torch.float64)) ** 2).mean().backward()

    close(module.forward(x), want.detach().numpy(), dtype, f"output\n{text}")
    gradients = module.gradients(x, y)
    close(gradients["c.weight"], tw.grad.numpy(), dtype, f"weight gradient\n{text}")
    if bias:
        close(gradients["c.bias"], tb.grad.numpy(), dtype, f"bias gradient\n{text}")
    close(module.input_gradient(x, y), tx.grad.numpy(), dtype, f"input gradient\n{text}")
    return module


CASES = {
    "depthwise": dict(shape=(4, 7, 9), filters=4, kernel=(3, 3), pad=(1, 1, 1, 1), groups=4),
    "depthwise multiplier 2, stride 2": dict(shape=(3, 9, 8), filters=6, kernel=(3, 3),
                                             stride=(2, 2), pad="same", groups=3),
    "grouped, dilated": dict(shape=(6, 10, 9), filters=4, kernel=(3, 2), dilation=(2, 3),
                             pad=(2, 1, 0, 2), groups=2),
    "dilated, strided": dict(shape=(2, 11, 10), filters=3, kernel=(3, 3), stride=(2, 3),
                             dilation=(2, 2), pad=(1, 0, 1, 2)),
    "pad 0x0x1x1, stride 2": dict(shape=(3, 8, 8), filters=5, kernel=(2, 2), stride=(2, 2),
                                  pad=(0, 0, 1, 1), bias=False),
    "same, even kernel, dilated": dict(shape=(2, 7, 6), filters=17, kernel=(4, 2),
                                       dilation=(2, 1), pad="same"),
    "many groups of whole vectors": dict(shape=(32, 5, 6), filters=32, kernel=(3, 3),
                                         pad=(1, 1, 1, 1), groups=2),
}


@pytest.mark.parametrize("schedule", [True, False], ids=["scheduled", "plain"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_conv_options_against_torch_in_float64(case, schedule):
    check_conv(**CASES[case], schedule=schedule)


@pytest.mark.parametrize("case", ["depthwise multiplier 2, stride 2", "grouped, dilated"])
def test_conv_options_against_torch_in_float32(case):
    check_conv(**CASES[case], dtype="f32", batch=3, opt_level=3)


def test_depthwise_schedule_with_row_and_column_tails_and_a_fused_pool():
    """The depthwise pattern over several column vectors (and, with 16 lanes, a tail block
    of rows), with relu and a max pool in its kernel, against torch."""
    text = program("3x9x40", "conv c: 6 3x3 pad=1x2 dilation=1x2 groups=3 -> relu",
                   "maxpool p: 2x2", "loss mse")
    module = cnnc.compile(text)
    rng = np.random.default_rng(7)
    w, b = rng.standard_normal((6, 1, 3, 3)), rng.standard_normal(6)
    module.set_params({"c.weight": w.astype(np.float32), "c.bias": b.astype(np.float32)})
    x = rng.standard_normal((2, 3, 9, 40)).astype(np.float32)
    conv = F.relu(F.conv2d(torch.tensor(x, dtype=torch.float64), torch.tensor(w),
                           torch.tensor(b), padding=(1, 2), dilation=(1, 2), groups=3))
    values = module.activations(x)
    close(values["c"], conv.numpy(), "f32", "conv")
    close(values["p"], F.max_pool2d(conv, 2).numpy(), "f32", "pool")


def _patterns(text: str, machine: Machine) -> dict[str, str | None]:
    """The schedule pattern of each convolution kernel, or None where it keeps its loops."""
    program_ = fuse(differentiate(cnnc.check(text)))
    patterns = {}
    for kernel in program_.kernels:
        if "conv" in kernel.name:
            lowered = lower_blocked(kernel, program_, machine)
            patterns[kernel.name] = None if lowered is None else lowered.schedule.pattern
    return patterns


AVX2 = Machine(256, 16, 32 * 1024, 512 * 1024)
AVX512 = Machine(512, 32, 48 * 1024, 2048 * 1024)


@pytest.mark.parametrize("machine", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_grouped_and_dilated_layers_get_register_blocked_schedules(machine):
    text = program("8x12x20", "conv dw: 8 3x3 pad=1 groups=8",
                   "conv g: 16 3x3 dilation=2 groups=2", "conv s: 4 3x3 stride=2 dilation=2",
                   "loss mse")
    patterns = _patterns(text, machine)
    # by output channels or by output columns, as the machine's lanes make it best
    assert patterns.pop("g_conv_fwd") in ("correlation, 2 groups",
                                          "correlation over output width, 2 groups")
    assert patterns == {
        "dw_conv_fwd": "depthwise correlation over output width",
        "dw_conv2d_grad_input_bwd": "correlation of δ, 1 stride phase(s), 8 groups",
        "dw_conv2d_grad_weight_bwd": "filter gradient, 8 groups",
        "g_conv2d_grad_input_bwd": "correlation of δ, 1 stride phase(s), 2 groups",
        "g_conv2d_grad_weight_bwd": "filter gradient, 2 groups",
        "s_conv_fwd": "correlation",
        # strided and dilated: the taps make no dense stride phases; the plain loops
        "s_conv2d_grad_input_bwd": None,
        "s_conv2d_grad_weight_bwd": "filter gradient"}


@st.composite
def conv_layers(draw) -> dict:
    groups = draw(st.integers(1, 3))
    shape = (groups * draw(st.integers(1, 3)), draw(st.integers(3, 10)), draw(st.integers(3, 10)))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = draw(st.one_of(st.sampled_from(["same", "valid"]),
                         st.tuples(*[st.integers(0, 2)] * 4)))
    top, left, bottom, right = torch_pads(pad, shape, kernel, stride, dilation)
    for size, before, after, axis in ((shape[1], top, bottom, 0), (shape[2], left, right, 1)):
        if size + before + after < (kernel[axis] - 1) * dilation[axis] + 1:
            pad = "same"  # the window does not fit: any size fits with same padding
    return dict(shape=shape, filters=groups * draw(st.integers(1, 3)), kernel=kernel,
                stride=stride, pad=pad, dilation=dilation, groups=groups,
                bias=draw(st.booleans()), schedule=draw(st.booleans()),
                batch=draw(st.integers(1, 3)))


@FEW
@given(conv_layers())
def test_drawn_conv_layers_agree_with_torch(layer):
    check_conv(**layer)


def test_the_reference_is_torch_for_a_depthwise_dilated_window():
    """The numpy reference on its own, against torch (the kernels are checked against it
    by the registry tests)."""
    from cnnc.graph.ir import Window

    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 6, 9, 8)), rng.standard_normal((6, 1, 3, 2))
    window = Window((3, 2), (2, 1), (1, 0, 2, 1), (2, 3))
    want = F.conv2d(F.pad(torch.tensor(x), (0, 1, 1, 2)), torch.tensor(w), stride=(2, 1),
                    dilation=(2, 3), groups=6)
    np.testing.assert_allclose(conv2d(x, w, window, groups=6), want.numpy(), rtol=1e-12)


@pytest.mark.parametrize("shape, options, out", [
    ("3x9x8", "stride=2 pad=same", (4, 5, 4)),
    ("3x9x8", "stride=3 pad=same dilation=2", (4, 3, 3)),
    ("3x9x8", "pad=same dilation=3", (4, 9, 8)),
    ("3x9x8", "pad=valid", (4, 7, 6)),
    ("3x9x8", "pad=0x0x1x1 stride=2", (4, 4, 4)),
    ("3x9x8", "pad=1x2", (4, 9, 10)),
    ("3x9x8", "dilation=2x3", (4, 5, 2)),
])
def test_output_sizes(shape, options, out):
    graph = check_text(program(shape, f"conv c: 4 3x3 {options}"))
    assert graph.tensor("c").shape[1:] == out


def test_flops_of_a_grouped_layer_count_its_groups_channels_only():
    from cnnc.ops import registry

    graph = check_text(program("8x9x9", "conv c: 12 3x3 groups=4 bias=false"))
    node = graph.producer("c")
    # 2 per multiply-add: 12 filters of 8/4 channels x 3x3 taps, at 7x7 outputs
    assert registry.get("conv2d").flops(graph, node) == 2 * 12 * 2 * 9 * 7 * 7


def test_the_ir_prints_groups_dilation_and_asymmetric_pads():
    graph = check_text(program("4x9x9", "conv a: 4 3x3 pad=0x0x1x1 dilation=2 groups=2",
                               "conv b: 4 3x3 stride=2 pad=same groups=4", "conv c: 4 3x3 pad=2"))
    texts = [graph.producer(f"{name}.conv").attrs.text() for name in "abc"]
    assert texts == [" filters=4 kernel=3x3 stride=1x1 pad=0x0x1x1 dilation=2x2 groups=2",
                     " filters=4 kernel=3x3 stride=2x2 pad=same groups=4",
                     " filters=4 kernel=3x3 stride=1x1 pad=2x2"]
    # stride 1: same is known before the input's size, the odd pad at the bottom and right
    even = check_text(program("1x5x5", "conv c: 1 4x4 pad=same"))
    assert even.producer("c.conv").attrs.window.pad == (1, 1, 2, 2)


@pytest.mark.parametrize("lines, expected", [
    (["conv c: 4 3x3 groups=3"],
     [(3, 15, "conv c: groups=3 does not divide the 4 filters (4 = 3 x 1 + 1)")]),
    (["conv c: 6 3x3 groups=0"],
     [(3, 22, "conv c: groups expects an integer of at least 1, got 0")]),
    (["conv c: 2 3x3 pad=1x2x3"],
     [(3, 19, "conv c: pad expects a padding like 1, 1x0, 0x0x1x1 (top, left, bottom, "
              "right), same or valid, got 1x2x3")]),
    (["conv c: 2 3x3 pad=0x0x-1x1"],
     [(3, 19, "conv c: pad expects a padding of at least 0, got 0x0x-1x1")]),
    (["conv c: 2 3x3 pad=full"],
     [(3, 19, "conv c: pad expects a padding like 1, 1x0, 0x0x1x1 (top, left, bottom, "
              "right), same or valid, got 'full'")]),
    (["conv c: 2 3x3 dilation=0"],
     [(3, 24, "conv c: dilation expects dilations of at least 1, got 0")]),
])
def test_bad_options_are_named_at_their_value(lines, expected):
    assert errors_of(program("3x8x8", *lines)) == expected


def test_groups_that_do_not_divide_the_input_channels_show_the_arithmetic():
    (error,) = errors_of(program("1x8x8", "conv a: 16 3x3", "conv b: 6 3x3 groups=3"))
    assert error == (4, 1, "conv b: groups=3 does not divide the 16 input channels "
                           "(16 = 3 x 5 + 1) that conv a gives (16x6x6)")


def test_a_dilated_window_that_does_not_fit_says_its_extent():
    (error,) = errors_of(program("1x6x6", "conv c: 1 3x3 dilation=3 pad=0x0x1x0"))
    assert error == (3, 1, "conv c needs an input of at least 6x7 (a 3x3 window dilated 3x3, "
                           "7x7 in all, with pad 0x0x1x0), but input gives 1x6x6")


def test_grouped_dilated_conv_on_the_cuda_simulator():
    """The plain loops of a grouped, dilated, asymmetrically padded conv and a ceil-mode
    average pool (a window over the edge) as CUDA kernels, against the reference."""
    pytest.importorskip("numba.cuda")
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA GPU and no simulator")
    from cnnc.passes import reference
    from cnnc.passes.autodiff import differentiate

    text = program("2x5x5", "conv c: 2 2x2 pad=1x0x0x1 dilation=2 groups=2",
                   "avgpool p: 2x2 ceil=true count_pad=false", "loss mse")
    module = cnnc.compile(text, target="cuda", dtype="f64")
    rng = np.random.default_rng(1)
    params = {name: rng.standard_normal(p.shape) for name, p in module.params.items()}
    module.set_params(params)
    x = rng.standard_normal((1, 2, 5, 5))
    y = rng.standard_normal((1, *module.output_shape))
    graph = differentiate(cnnc.check(text, dtype="f64"))
    want = reference.run(graph, x, params, y)
    gradients = dict(graph.gradients)
    close(module(x), want[graph.output], "f64", "output")
    close(module.input_gradient(x, y), want[gradients[graph.input]], "f64", "input gradient")
    for name, value in module.gradients(x, y).items():
        close(value, want[gradients[name]], "f64", name)
