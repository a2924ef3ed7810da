"""Shape inference against sizes computed by hand, and every shape error's exact text."""

import math

import pytest

from cnnc.diagnostics import CnncSemanticError
from cnnc.graph.ir import BATCH
from cnnc.passes.shapes import infer
from conftest import check_text, errors_of, program, sample_shape


def by_hand(size: int, kernel: int, stride: int, pad: int) -> int:
    return math.floor((size + 2 * pad - kernel) / stride) + 1


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("pad", [0, 1, 2])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_conv_output_size_for_strides_and_pads(kernel, stride, pad):
    graph = check_text(program("3x17x16", f"conv c: 8 {kernel}x{kernel} stride={stride} pad={pad}"))
    assert sample_shape(graph, "c") == (8, by_hand(17, kernel, stride, pad),
                                        by_hand(16, kernel, stride, pad))
    assert graph.tensor("c.weight").shape == (8, 3, kernel, kernel)
    assert graph.tensor("c.bias").shape == (8,)


def test_worked_examples_of_the_algorithm_document():
    # cnn-algorithm.md section 2: 3x4 input, 2x2 filter -> 2x3; 5x5 with 3x3 -> 3x3;
    # 3 channels of 5x5, pad 1, two 3x3x3 filters, stride 2 -> 2 channels of 3x3.
    assert sample_shape(check_text(program("1x3x4", "conv c: 1 2x2")), "c") == (1, 2, 3)
    assert sample_shape(check_text(program("1x5x5", "conv c: 1 3x3")), "c") == (1, 3, 3)
    graph = check_text(program("3x5x5", "conv c: 2 3x3 stride=2 pad=1"))
    assert sample_shape(graph, "c") == (2, 3, 3)
    assert graph.tensor("c.weight").shape == (2, 3, 3, 3)
    # section 3: 4x4 input, 2x2 max pooling of stride 2 -> 2x2.
    assert sample_shape(check_text(program("1x4x4", "maxpool p: 2x2")), "p") == (1, 2, 2)


def test_same_padding_keeps_height_and_width_for_odd_kernels():
    graph = check_text(program("3x11x8", "conv a: 4 3x3 pad=same", "conv b: 4 5x1 pad=same",
                               "conv c: 4 7x7 pad=same"))
    for name in "abc":
        assert sample_shape(graph, name) == (4, 11, 8)
    assert graph.producer("b.conv").attrs.window.pad == (2, 0, 2, 0)


def test_rectangular_kernels_strides_and_pads():
    graph = check_text(program("2x20x9", "conv c: 5 3x1 stride=2x1 pad=1x0"))
    assert sample_shape(graph, "c") == (5, by_hand(20, 3, 2, 1), by_hand(9, 1, 1, 0))
    assert graph.tensor("c.weight").shape == (5, 2, 3, 1)


@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
def test_overlapping_pools_window_3_stride_2(kind):
    graph = check_text(program("6x13x10", f"{kind} p: 3x3 stride=2",
                               f"{kind} q: 3x3 stride=2 pad=1"))
    assert sample_shape(graph, "p") == (6, by_hand(13, 3, 2, 0), by_hand(10, 3, 2, 0))
    assert sample_shape(graph, "q") == (6, by_hand(6, 3, 2, 1), by_hand(4, 3, 2, 1))


def test_pool_stride_defaults_to_the_window():
    graph = check_text(program("1x9x9", "maxpool p: 3x2"))
    assert sample_shape(graph, "p") == (1, 3, 4)


def test_lenet_shapes_and_pytorch_parameter_layouts():
    graph = check_text(program("1x28x28", "conv c1: 6 5x5 pad=2 -> relu", "maxpool 2x2",
                               "conv c3: 16 5x5 -> relu", "maxpool 2x2 stride=2",
                               "dense f5: 120 -> relu", "dense f6: 84", "relu",
                               "dense out: 10 -> softmax", "loss cross_entropy"))
    expected = {"c1": (6, 28, 28), "maxpool1": (6, 14, 14), "c3": (16, 10, 10),
                "maxpool2": (16, 5, 5), "f5": (120,), "f6": (84,), "out": (10,)}
    assert {layer.name: sample_shape(graph, layer.output)
            for layer in graph.layers[1:]} == expected
    assert graph.tensor("f5.weight").shape == (120, 16 * 5 * 5)
    assert graph.tensor("loss.labels").shape == (BATCH,)
    assert graph.tensor("loss").shape == ()


def test_flatten_dense_without_bias_and_flat_input():
    graph = check_text(program("3x4x5", "flatten", "dense d: 7 bias=false"))
    assert sample_shape(graph, "flatten1") == (60,)
    assert graph.tensor("d.weight").shape == (7, 60)
    assert [p.name for p in graph.params] == ["d.weight"]
    flat = check_text(program("784", "dense d: 10"))
    assert flat.tensor("d.weight").shape == (10, 784)


def test_mse_targets_take_the_output_shape():
    graph = check_text(program("1x8x8", "conv c: 2 3x3", "loss mse targets=2x6x6"))
    assert graph.tensor("loss.targets").shape == (BATCH, 2, 6, 6)


def test_the_error_example_of_the_language_document():
    text = ("network small\ninput: 1x12x12\n\n# three layers\nconv c1: 6 5x5 -> relu\n"
            "maxpool 2x2\nconv c3: 16 5x5 -> relu\n")
    with pytest.raises(CnncSemanticError) as caught:
        check_text(text, "small.cnn")
    assert str(caught.value).splitlines() == [
        "small.cnn:7:1: error: conv c3 needs an input of at least 5x5, but maxpool1 gives 6x4x4",
        "    conv c3: 16 5x5 -> relu",
        "    ^~~~~~~~~~~~~~~~~~~~~~~",
        "note: input 1x12x12 -> conv c1 6x8x8 -> maxpool1 6x4x4 "
        "(floor((8 + 0 - 2) / 2) + 1 = 4)",
    ]


@pytest.mark.parametrize("lines, expected", [
    (["conv c: 1 7x7 pad=1"],
     (3, 1, "conv c needs an input of at least 5x5 (a 7x7 window with pad 1x1), "
            "but input gives 1x4x4")),
    (["maxpool 2x2", "maxpool 2x2", "maxpool 2x2"],
     (5, 1, "maxpool3 needs an input of at least 2x2, but maxpool2 gives 1x1x1")),
    (["dense d: 4", "conv c: 2 1x1"],
     (4, 1, "conv c needs a CxHxW input, but dense d gives 4")),
    (["conv c: 2 3x3 -> softmax"],
     (3, 1, "softmax needs a vector of class scores, but conv c gives 2x2x2; "
            "add a dense layer before it")),
    (["flatten", "dense d: 3", "loss mse targets=4"],
     (5, 1, "loss mse declares targets=4, but the network output dense d gives 3")),
    (["dense d: 3 -> softmax", "loss cross_entropy classes=10"],
     (4, 1, "loss cross_entropy declares classes=10, but the network output dense d gives 3")),
])
def test_shape_error_text_line_and_column(lines, expected):
    assert errors_of(program("1x4x4", *lines)) == [expected]


def test_every_independent_shape_error_is_reported_but_nothing_downstream():
    # the conv fails; what follows it is unknown and not checked, but the train line is.
    errors = errors_of(program("1x4x4", "conv c: 1 9x9", "conv d: 1 9x9", "loss mse",
                               "train sgd lr=-1"))
    assert [(line, col) for line, col, _ in errors] == [(3, 1), (6, 14)]


def test_infer_alone_raises_with_all_errors():
    from cnnc.diagnostics import Source
    from cnnc.frontend import irgen
    from cnnc.frontend.parse import parse

    graph = irgen.generate(parse(Source(program("1x2x2", "conv c: 1 3x3"), "x.cnn"))).graph
    with pytest.raises(CnncSemanticError) as caught:
        infer(graph)
    assert len(caught.value.diagnostics) == 1
