"""Every kernel kind, compiled through the loop IR and LLVM, against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import compare_with_reference

import cnnc

DTYPES = [np.float32, np.float64]


def net(shape: str, *lines: str) -> str:
    return f"network k\ninput: {shape}\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kernel, stride, pad", [
    ("1x1", "1", "0"), ("3x3", "1", "1"), ("3x3", "2", "same" if False else "1"),
    ("5x5", "1", "2"), ("5x5", "3", "0"), ("7x7", "2", "2"), ("3x1", "2x1", "1x0"),
    ("1x3", "1", "0x1"), ("3x3", "1", "same"), ("5x5", "1", "same"), ("2x2", "3", "2"),
    ("3x5", "2", "1x2"),
])
def test_conv_shapes_strides_and_pads(dtype, kernel, stride, pad):
    compare_with_reference(net("3x11x9", f"conv c: 5 {kernel} stride={stride} pad={pad}"),
                           batch=2, dtype=dtype)


@pytest.mark.parametrize("channels_in, channels_out", [(1, 1), (3, 16), (16, 33), (33, 3)])
def test_conv_channel_counts(channels_in, channels_out):
    compare_with_reference(net(f"{channels_in}x7x5", f"conv c: {channels_out} 3x3 pad=1"),
                           batch=3)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batches(batch):
    compare_with_reference(net("2x9x9", "conv c: 4 3x3 -> relu", "maxpool 2x2",
                               "dense d: 5 -> softmax"), batch=batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
@pytest.mark.parametrize("window, stride, pad", [
    ("2x2", None, "0"), ("3x3", "2", "0"), ("3x3", "2", "1"), ("3x3", "1", "1"),
    ("2x3", "1x2", "1"), ("5x5", "3", "2"),
])
def test_pooling_overlapping_and_padded(dtype, kind, window, stride, pad):
    options = (f" stride={stride}" if stride else "") + f" pad={pad}"
    compare_with_reference(net("3x13x11", f"{kind} p: {window}{options}"), batch=2, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bias", ["true", "false"])
@pytest.mark.parametrize("activation", ["none", "relu", "sigmoid", "tanh", "softmax"])
def test_dense_every_activation_with_and_without_bias(dtype, bias, activation):
    compare_with_reference(net("2x3x5", f"dense d: 7 bias={bias} -> {activation}"),
                           batch=4, dtype=dtype)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_conv_activations_and_activation_lines_after_pools(activation):
    compare_with_reference(net("2x8x8", f"conv c: 3 3x3 -> {activation}", "maxpool 2x2",
                               activation, "flatten", activation), batch=3)


def _kernel_names(text: str) -> list[str]:
    from cnnc.driver.pipeline import front_end
    from cnnc.frontend.source import to_source
    from cnnc.passes.fuse import fuse

    return [k.name for k in fuse(front_end(to_source(text))).kernels]


@pytest.mark.parametrize("lines, kernels", [
    (["conv c: 3 3x3 -> relu", "maxpool p: 2x2"], ["c_conv_relu_maxpool_fwd"]),
    (["conv c: 3 3x3 bias=false", "maxpool p: 2x2"], ["c_conv_maxpool_fwd"]),
    (["conv c: 3 3x3", "tanh", "maxpool p: 2x2"], ["c_conv_tanh_maxpool_fwd"]),
    # only the first pool reads the convolution; an average pool is not fused
    (["conv c: 3 3x3", "maxpool p: 2x2", "maxpool q: 2x2"], ["c_conv_maxpool_fwd", "q_fwd"]),
    (["conv c: 3 3x3", "avgpool p: 2x2"], ["c_conv_fwd", "p_fwd"]),
    (["conv c: 3 3x3 bias=false", "relu", "maxpool p: 2x2"],
     ["c_conv_relu_maxpool_fwd"]),
])
def test_a_max_pool_after_a_convolution_joins_its_kernel(lines, kernels):
    text = net("2x10x10", *lines)
    assert _kernel_names(text) == kernels
    compare_with_reference(text, batch=3)


@pytest.mark.parametrize("schedule", [True, False], ids=["scheduled", "plain"])
def test_fused_pool_keeps_the_convolution_output_argmax_and_nan(schedule):
    module = cnnc.compile(net("1x4x4", "conv c: 2 1x1 bias=false", "maxpool p: 2x2 stride=2"),
                          schedule=schedule)
    module.set_params({"c.weight": np.array([1.0, -1.0], np.float32).reshape(2, 1, 1, 1)})
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 3, 2] = np.nan
    values = module.activations(x)
    np.testing.assert_array_equal(values["c"][0, 0], x[0, 0])  # the conv result is kept
    assert values["p.argmax"][0].tolist() == [[[5, 7], [13, 14]], [[0, 2], [8, 14]]]
    assert np.isnan(values["p"][0, :, 1, 1]).all()
    assert values["p"][0, 0, 0].tolist() == [5.0, 7.0]


@pytest.mark.parametrize("schedule", [True, False], ids=["scheduled", "plain"])
def test_fused_pool_ties_go_to_the_first_position_of_each_window(schedule):
    module = cnnc.compile(net("1x6x20", "conv c: 1 1x1 bias=false", "maxpool p: 2x2"),
                          schedule=schedule)
    module.set_params({"c.weight": np.ones((1, 1, 1, 1), np.float32)})
    argmax = module.activations(np.ones((2, 1, 6, 20), np.float32))["p.argmax"]
    rows, columns = np.meshgrid(np.arange(3), np.arange(10), indexing="ij")
    np.testing.assert_array_equal(argmax[1, 0], rows * 2 * 20 + columns * 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_softmax_of_huge_logits_does_not_overflow(dtype):
    module = cnnc.compile(net("4", "dense d: 4 bias=false -> softmax"),
                          dtype="f32" if dtype == np.float32 else "f64")
    module.set_params({"d.weight": np.eye(4, dtype=dtype)})
    x = np.array([[1e4, -1e4, 0.0, 1e4 - 1], [-1e4, -1e4, -1e4, -1e4]], dtype=dtype)
    probabilities = module(x)
    assert np.all(np.isfinite(probabilities))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    e = np.exp(-1.0)
    np.testing.assert_allclose(probabilities[0], [1 / (1 + e), 0, 0, e / (1 + e)], rtol=1e-5)
    np.testing.assert_allclose(probabilities[1], 0.25)


def test_nan_input_is_allowed_and_propagates_through_max_and_relu():
    module = cnnc.compile(net("1x2x2", "maxpool p: 2x2", "relu"))
    x = np.array([[[[1.0, np.nan], [3.0, 2.0]]]], dtype=np.float32)
    assert np.isnan(module(x)).all()
    assert module.activations(x)["p.argmax"].item() == 1


def test_argmax_is_a_named_int32_tensor_with_flat_positions():
    module = cnnc.compile(net("1x4x4", "maxpool p: 2x2"))
    x = np.arange(16, dtype=np.float32)[::-1].reshape(1, 1, 4, 4).copy()
    argmax = module.activations(x)["p.argmax"]
    assert argmax.dtype == np.int32
    assert argmax.reshape(2, 2).tolist() == [[0, 2], [8, 10]]


@st.composite
def conv_cases(draw):
    channels, height, width = draw(st.integers(1, 4)), draw(st.integers(1, 12)), \
        draw(st.integers(1, 12))
    kh, kw = draw(st.integers(1, min(height, 5))), draw(st.integers(1, min(width, 5)))
    stride = f"{draw(st.integers(1, 3))}x{draw(st.integers(1, 3))}"
    pad = f"{draw(st.integers(0, 2))}x{draw(st.integers(0, 2))}"
    filters = draw(st.integers(1, 6))
    pool = draw(st.sampled_from(["", "maxpool 1x1", "avgpool 1x1"]))
    lines = [f"conv c: {filters} {kh}x{kw} stride={stride} pad={pad} -> "
             f"{draw(st.sampled_from(['relu', 'tanh', 'none']))}"]
    if pool:
        lines.append(pool)
    return net(f"{channels}x{height}x{width}", *lines), draw(st.integers(1, 5))


@settings(max_examples=25, deadline=None)
@given(conv_cases())
def test_random_convolutions_match_the_reference(case):
    text, batch = case
    compare_with_reference(text, batch=batch)


@pytest.mark.parametrize("name", ["lenet", "mlp", "vgg_small"])
def test_example_networks_match_the_reference(name):
    from conftest import EXAMPLES
    compare_with_reference((EXAMPLES / f"{name}.cnn").read_text(), batch=3)


@pytest.mark.parametrize("lines", [
    ["conv 4 1x1", "flatten", "softmax"],
    ["flatten", "softmax"],
    ["conv c: 2 3x3", "flatten"],
])
def test_flatten_views_feed_softmax_and_the_output(lines):
    compare_with_reference(net("3x4x4", *lines), batch=3)
    module = cnnc.compile(net("3x4x4", *lines))
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    assert module(x).shape == (2, *module.output_shape)


def test_a_network_that_only_flattens_returns_a_new_array():
    module = cnnc.compile(net("2x3x3", "flatten"))
    x = np.arange(36, dtype=np.float32).reshape(2, 2, 3, 3)
    y = module(x)
    assert y.shape == (2, 18) and not np.shares_memory(x, y)
    np.testing.assert_array_equal(y, x.reshape(2, 18))
