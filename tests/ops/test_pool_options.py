"""maxpool and avgpool padding (P, PHxPW, TxLxBxR, same, valid), `ceil=true` (PyTorch's
ceil_mode, with its rule for the last window) and avgpool's `count_pad=false` against
torch.nn.functional in float64: output, argmax and the input gradient of the compiled
module (f32 and f64; a max pool alone and inside a scheduled convolution's kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnc
from conftest import check_text, errors_of, program

FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = {"f32": 2e-5, "f64": 1e-12}


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME (ONNX SAME_UPPER): output ceil(size / stride), the odd pad after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def torch_pool(kind: str, x: torch.Tensor, kernel, stride, pad, ceil: bool,
               count_pad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, argmax or None) by torch: its own padding where the pad is symmetric (so
    ceil mode follows torch's rules), else padded by hand in floor mode (−∞ for max, and
    for count_pad=false a mean over the ones of the unpadded input)."""
    if pad == "same":
        (top, bottom), (left, right) = (same_pads(x.shape[axis + 2], kernel[axis],
                                                  stride[axis]) for axis in (0, 1))
        pad = (top, left, bottom, right)
    elif pad == "valid":
        pad = (0, 0, 0, 0)
    top, left, bottom, right = pad
    if (top, left) == (bottom, right):
        if kind == "maxpool":
            return F.max_pool2d(x, kernel, stride, (top, left), ceil_mode=ceil,
                                return_indices=True)
        return F.avg_pool2d(x, kernel, stride, (top, left), ceil_mode=ceil,
                            count_include_pad=count_pad), None
    assert not ceil, "torch has no asymmetric padding of its own to check ceil mode with"
    sides = (left, right, top, bottom)
    if kind == "maxpool":
        out, index = F.max_pool2d(F.pad(x, sides, value=-np.inf), kernel, stride,
                                  return_indices=True)
        padded_width = x.shape[3] + left + right
        rows, cols = index // padded_width - top, index % padded_width - left
        return out, rows * x.shape[3] + cols
    total = F.avg_pool2d(F.pad(x, sides), kernel, stride)
    if count_pad:
        return total, None
    counted = F.avg_pool2d(F.pad(torch.ones_like(x), sides), kernel, stride)
    return total / counted, None


def close(got, want, dtype: str, name: str) -> None:
    rtol = TOLERANCE[dtype]
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


def check_pool(kind: str, shape, kernel, stride=None, pad=(0, 0, 0, 0), ceil=False,
               count_pad=True, dtype="f64", after_conv=False, schedule=False, batch=2,
               seed=0, opt_level=0) -> None:
    """Compile the pool (alone, or after an identity, a depthwise 1x1 convolution of ones,
    whose kernel a max pool joins; at -O0 unless told), and compare its output, argmax and
    input gradient with torch's."""
    stride = stride or kernel
    pad_text = pad if isinstance(pad, str) else "x".join(map(str, pad))
    options = f"stride={stride[0]}x{stride[1]} pad={pad_text} ceil={str(ceil).lower()}"
    if kind == "avgpool":
        options += f" count_pad={str(count_pad).lower()}"
    conv = [f"conv c: {shape[0]} 1x1 groups={shape[0]} bias=false"] if after_conv else []
    text = program("x".join(map(str, shape)), *conv,
                   f"{kind} p: {kernel[0]}x{kernel[1]} {options}", "loss mse")
    module = cnnc.compile(text, dtype=dtype, schedule=schedule, opt_level=opt_level)
    numpy_dtype = np.float32 if dtype == "f32" else np.float64
    if after_conv:
        module.set_params({"c.weight": np.ones((shape[0], 1, 1, 1), numpy_dtype)})
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *shape)).astype(numpy_dtype)
    y = rng.standard_normal((batch, *module.output_shape)).astype(numpy_dtype)
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    want, index = torch_pool(kind, tx, kernel, stride, pad, ceil, count_pad)
    ((want - torch.tensor(y, dtype=torch.float64)) ** 2).mean().backward()
    close(module.forward(x), want.detach().numpy(), dtype, f"output\n{text}")
    if index is not None:
        np.testing.assert_array_equal(module.activations(x)["p.argmax"], index.numpy(),
                                      err_msg=text)
    close(module.input_gradient(x, y), tx.grad.numpy(), dtype, f"input gradient\n{text}")


CASES = {
    # 7 = 2 + 2 + 3: the third window of 2 hangs over the edge in ceil mode, and average
    # pooling divides it by 2, not 4, though padding counts
    "ceil, window over the edge": dict(shape=(2, 7, 7), kernel=(2, 2), ceil=True),
    "ceil, padded, overlapping": dict(shape=(2, 6, 8), kernel=(3, 3), stride=(2, 2),
                                      pad=(1, 1, 1, 1), ceil=True, count_pad=False),
    # torch drops a last window that would start in the bottom padding: 5 + 2 rows, stride 2
    "ceil, last window dropped": dict(shape=(1, 5, 6), kernel=(2, 2), stride=(2, 2),
                                      pad=(1, 1, 1, 1), ceil=True),
    "ceil, rectangular": dict(shape=(3, 8, 9), kernel=(3, 2), stride=(2, 3), pad=(1, 0, 1, 0),
                              ceil=True, count_pad=False),
    "pad 0x0x1x1": dict(shape=(2, 6, 7), kernel=(2, 2), pad=(0, 0, 1, 1), count_pad=False),
    "pad 1x0x0x1, overlapping": dict(shape=(2, 7, 6), kernel=(3, 3), stride=(2, 1),
                                     pad=(1, 0, 0, 1)),
    "same, stride 2": dict(shape=(2, 7, 8), kernel=(3, 3), stride=(2, 2), pad="same",
                           count_pad=False),
    "same, stride 1, even window": dict(shape=(1, 5, 6), kernel=(2, 2), stride=(1, 1),
                                        pad="same"),
    "valid": dict(shape=(2, 7, 7), kernel=(3, 3), stride=(2, 2), pad="valid"),
}


@pytest.mark.parametrize("kind", ["avgpool", "maxpool"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_pool_options_against_torch(case, kind):
    """count_pad=false where a case says so (the drawn pools below take both)."""
    check_pool(kind, **CASES[case])


@pytest.mark.parametrize("schedule", [True, False], ids=["scheduled", "plain"])
@pytest.mark.parametrize("case", ["ceil, window over the edge", "pad 0x0x1x1"])
def test_maxpool_inside_a_convolution_kernel_against_torch(case, schedule):
    check_pool("maxpool", **CASES[case], after_conv=True, schedule=schedule)


@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
def test_float32_ceil_mode_without_counted_padding(kind):
    check_pool(kind, **CASES["ceil, padded, overlapping"], dtype="f32", opt_level=3)


@st.composite
def pools(draw) -> dict:
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    shape = (draw(st.integers(1, 3)), draw(st.integers(kernel[0], 9)),
             draw(st.integers(kernel[1], 9)))
    pad = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    kind = draw(st.sampled_from(["maxpool", "avgpool"]))
    return dict(kind=kind, shape=shape, kernel=kernel,
                stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))), pad=(*pad, *pad),
                ceil=draw(st.booleans()), count_pad=draw(st.booleans()),
                batch=draw(st.integers(1, 3)))


@FEW
@given(pools())
def test_drawn_pools_agree_with_torch(pool):
    check_pool(**pool)


@pytest.mark.parametrize("size, kernel, stride, pad", [
    (5, 2, 2, 1), (6, 3, 2, 1), (7, 3, 3, 1), (4, 3, 2, 0), (10, 4, 3, 2), (1, 1, 2, 0),
])
def test_ceil_mode_output_sizes_are_torchs(size, kernel, stride, pad):
    graph = check_text(program(f"1x{size}x{size}",
                               f"maxpool p: {kernel}x{kernel} stride={stride} pad={pad} "
                               "ceil=true"))
    want = F.max_pool2d(torch.zeros(1, 1, size, size), kernel, stride, pad, ceil_mode=True)
    assert graph.tensor("p").shape[2:] == tuple(want.shape[2:])


def test_the_ir_prints_ceil_count_pad_and_same():
    graph = check_text(program("1x9x9", "avgpool a: 3x3 stride=2 pad=0x0x1x1 ceil=true "
                               "count_pad=false", "maxpool b: 2x2 pad=same", "avgpool c: 2x2"))
    texts = [graph.producer(name).attrs.text() for name in "abc"]
    assert texts == [" kernel=3x3 stride=2x2 pad=0x0x1x1 ceil=true count_pad=false",
                     " kernel=2x2 stride=2x2 pad=same",
                     " kernel=2x2 stride=2x2 pad=0x0"]


def test_a_ceil_mode_size_note_shows_the_rounding():
    (error,) = errors_of(program("1x5x5", "maxpool p: 2x2 ceil=true", "conv c: 1 4x4"))
    assert error[2] == "conv c needs an input of at least 4x4, but maxpool p gives 1x3x3"
    graph_errors = _notes(program("1x5x5", "maxpool p: 2x2 ceil=true", "conv c: 1 4x4"))
    assert graph_errors == ["input 1x5x5 -> maxpool p 1x3x3 (ceil((5 + 0 - 2) / 2) + 1 = 3)"]


def _notes(text: str) -> list[str]:
    from cnnc.diagnostics import CnncError

    with pytest.raises(CnncError) as caught:
        check_text(text)
    return [note.message for d in caught.value.diagnostics for note in d.notes]


@pytest.mark.parametrize("lines, expected", [
    (["maxpool 3x3 pad=0x0x2x1"],
     [(3, 13, "maxpool1: pad=0x0x2x1 is more than half the window 3x3; at most 1x1 on each "
              "side")]),
    (["maxpool 2x2 count_pad=false"],
     [(3, 13, "maxpool1 has no option 'count_pad'")]),
    (["avgpool 2x2 ceil=yes"], [(3, 18, "avgpool1: ceil expects true or false, got 'yes'")]),
])
def test_bad_pool_options(lines, expected):
    got = errors_of(program("1x8x8", *lines))
    assert [(line, col, message.split(";")[0] if "no option" in message else message)
            for line, col, message in got] == expected
