"""The worked examples of the algorithm's sections 2 and 3, reproduced exactly by compiled
code. Small integers keep every product and sum exact in float32, so equality is exact."""

import numpy as np

import cnnc
from cnnc.graph.ir import Window
from cnnc.ops.pool import maxpool2d


def conv_module(text: str, weight: np.ndarray, bias: np.ndarray | None = None) -> cnnc.Module:
    module = cnnc.compile(text)
    values = {"c.weight": weight.astype(np.float32)}
    if bias is not None:
        values["c.bias"] = bias.astype(np.float32)
    module.set_params(values)
    return module


def test_example_1_a_3x4_input_and_a_2x2_filter():
    a, b, c, d, e, f, g, h, i, j, k, l = range(1, 13)  # noqa: E741 (the document's names)
    w, x, y, z = 2, -1, 3, 5
    module = conv_module("network e\ninput: 1x3x4\nconv c: 1 2x2 bias=false\n",
                         np.array([[[[w, x], [y, z]]]]))
    out = module(np.array([[[[a, b, c, d], [e, f, g, h], [i, j, k, l]]]], dtype=np.float32))
    assert out.shape == (1, 1, 2, 3)
    assert out[0, 0, 0, 0] == a * w + b * x + e * y + f * z
    assert out[0, 0, 0, 1] == b * w + c * x + f * y + g * z
    assert out[0, 0, 1, 2] == g * w + h * x + k * y + l * z
    expected = [[p * w + q * x + r * y + s * z for p, q, r, s in
                 ((a, b, e, f), (b, c, f, g), (c, d, g, h))],
                [p * w + q * x + r * y + s * z for p, q, r, s in
                 ((e, f, i, j), (f, g, j, k), (g, h, k, l))]]
    assert out[0, 0].tolist() == expected


def test_example_2_a_5x5_input_and_a_3x3_filter_give_3x3():
    rng = np.random.default_rng(2)
    image = rng.integers(-4, 5, (5, 5))
    kernel = rng.integers(-3, 4, (3, 3))
    module = conv_module("network e\ninput: 1x5x5\nconv c: 1 3x3 bias=false\n",
                         kernel[None, None])
    out = module(image[None, None].astype(np.float32))[0, 0]
    by_hand = [[sum(image[i + m, j + n] * kernel[m, n] for m in range(3) for n in range(3))
                for j in range(3)] for i in range(3)]
    assert out.tolist() == by_hand


def test_example_3_three_channels_pad_1_two_filters_stride_2_with_biases():
    rng = np.random.default_rng(3)
    image = rng.integers(-3, 4, (3, 5, 5))
    filters = rng.integers(-2, 3, (2, 3, 3, 3))
    biases = np.array([1, -2])
    module = conv_module("network e\ninput: 3x5x5\nconv c: 2 3x3 stride=2 pad=1\n",
                         filters, biases)
    out = module(image[None].astype(np.float32))[0]
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)))  # 3 channels of 7x7
    assert out.shape == (2, 3, 3)
    for k in range(2):
        for i in range(3):
            for j in range(3):
                window = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
                assert out[k, i, j] == (window * filters[k]).sum() + biases[k]


def test_section_3_max_pooling_takes_the_maximum_of_each_quadrant():
    rng = np.random.default_rng(4)
    image = rng.permutation(16).reshape(4, 4).astype(np.float32)
    module = cnnc.compile("network e\ninput: 1x4x4\nmaxpool p: 2x2 stride=2\n")
    out = module(image[None, None])[0, 0]
    quadrants = [[image[:2, :2].max(), image[:2, 2:].max()],
                 [image[2:, :2].max(), image[2:, 2:].max()]]
    assert out.tolist() == quadrants
    _, argmax = maxpool2d(image[None, None], Window((2, 2), (2, 2), (0, 0)))
    np.testing.assert_array_equal(module.activations(image[None, None])["p.argmax"], argmax)
    for (row, col), position in np.ndenumerate(argmax[0, 0]):
        assert image.flat[position] == out[row, col]


def test_section_3_general_stride_output_size():
    module = cnnc.compile("network e\ninput: 1x7x7\navgpool p: 3x3 stride=2\n")
    assert module(np.ones((1, 1, 7, 7), np.float32)).shape == (1, 1, 3, 3)  # floor((7-3)/2)+1
