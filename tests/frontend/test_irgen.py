"""Names, line order, options and the decomposition of layers into ops."""

import dataclasses

import pytest

import cnnc
from cnnc.graph.ir import DType, Role, format_graph, verify
from conftest import EXAMPLES, check_text, errors_of, program


def test_automatic_names_count_every_layer_of_a_kind():
    graph = check_text(program("1x16x16", "conv c1: 2 3x3", "maxpool 2x2", "conv 2 3x3",
                               "maxpool 2x2", "flatten", "dense 4", "dense out: 2"))
    assert [layer.name for layer in graph.layers] == [
        "input", "c1", "maxpool1", "conv2", "maxpool2", "flatten1", "dense1", "out"]
    assert [layer.display for layer in graph.layers[:4]] == [
        "input", "conv c1", "maxpool1", "conv2"]


def test_a_layer_becomes_primitive_ops_named_after_it():
    graph = check_text(program("1x8x8", "conv c: 2 3x3 -> relu", "dense d: 3 bias=false",
                               "sigmoid"))
    assert [(n.op, n.inputs, n.output) for n in graph.nodes] == [
        ("conv2d", ("input", "c.weight"), "c.conv"),
        ("bias_add", ("c.conv", "c.bias"), "c.pre"),
        ("relu", ("c.pre",), "c"),
        ("dense", ("c", "d.weight"), "d.matmul"),
        ("sigmoid", ("d.matmul",), "d"),
    ]
    assert graph.layer("d").activation == "sigmoid"
    assert {p.name for p in graph.params} == {"c.weight", "c.bias", "d.weight"}


def test_ir_is_frozen():
    graph = check_text(program("1x8x8", "dense d: 3"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.nodes[0].op = "relu"


def test_dtype_from_input_line_and_override():
    text = "network n\ninput: 1x4x4 dtype=f64\ndense d: 2\nloss mse\n"
    graph = check_text(text)
    assert graph.dtype is DType.F64
    assert {t.dtype for t in graph.tensors if t.role is not Role.TARGET} == {DType.F64}
    from cnnc.diagnostics import Source
    from cnnc.driver.pipeline import front_end
    assert front_end(Source(text), dtype="f32").dtype is DType.F32


def test_train_defaults_are_filled_and_given_values_kept():
    graph = check_text(program("1x4x4", "dense d: 2 -> softmax", "loss cross_entropy",
                               "train adam lr=0.01 batch=8"))
    assert graph.train.optimizer == "adam"
    assert dict(graph.train.settings) == {
        "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
        "batch": 8, "epochs": 1, "max_iter": None, "tol": 0.0, "seed": 0,
        "schedule": "constant", "step_size": 30, "gamma": 0.1, "warmup": 0}


def test_loss_labels_are_integers_and_mse_targets_float():
    ce = check_text(program("4", "dense d: 2 -> softmax", "loss cross_entropy"))
    assert ce.tensor(ce.target).dtype is DType.I64
    mse = check_text(program("4", "dense d: 2", "loss mse"))
    assert mse.tensor(mse.target).dtype is DType.F32


@pytest.mark.parametrize("lines, expected", [
    (["conv c1: 2 3x3", "conv c1: 2 3x3"],
     [(4, 6, "duplicate name 'c1'; names are unique within a network")]),
    (["conv conv2: 2 3x3", "conv 2 3x3"],
     [(4, 1, "duplicate name 'conv2' (the automatic name of this conv); "
             "names are unique within a network")]),
    (["conv c: 2 3x3 strde=2"], [(3, 15, "conv c has no option 'strde'; did you mean 'stride'?")]),
    (["conv c: 2 3x3 stride=1 stride=2"], [(3, 24, "conv c: the option stride is given twice")]),
    (["conv c: 2 3x3 bias=yes"], [(3, 20, "conv c: bias expects true or false, got 'yes'")]),
    (["conv c: 2 3x3 pad=-1"], [(3, 19, "conv c: pad expects a padding of at least 0, got -1")]),
    (["conv c: 2 3x3 stride=1x2x3"],
     [(3, 22, "conv c: stride expects a stride like 2 or 2x1, got 1x2x3")]),
    (["conv c: 2 3x3x3"], [(3, 11, "conv c: the kernel must be HxW like 3x3, got 3x3x3")]),
    (["conv c: 2 0x3"], [(3, 11, "conv c: the kernel sizes must be from 1 to 2147483647, "
                                 "got 0x3")]),
    (["conv c: 99999999999 3x3"],
     [(3, 9, "conv c: the filter count must be at most 2147483647, got 99999999999")]),
    (["maxpool 2x2 pad=same2"],
     [(3, 17, "maxpool1: pad expects a padding like 1, 1x0, 0x0x1x1 (top, left, bottom, "
              "right), same or valid, got 'same2'")]),
    (["maxpool 3x3 pad=2"],
     [(3, 13, "maxpool1: pad=2x2 is more than half the window 3x3; at most 1x1")]),
    (["conv c: 2 3x3 -> relu", "tanh"],
     [(4, 1, "the layer above already has the activation relu; a layer takes one")]),
    (["dense d: 2 -> softmax", "loss crossentropy"],
     [(4, 6, "unknown loss 'crossentropy'; did you mean 'cross_entropy'?")]),
    (["dense d: 2", "loss mse", "train sgdd"],
     [(5, 7, "unknown optimizer 'sgdd'; did you mean 'sgd'?")]),
    (["dense d: 2", "loss mse", "train sgd momentum=1"],
     [(5, 20, "train sgd: momentum expects a number from 0 up to (not including) 1, got 1")]),
    (["dense d: 2", "loss mse", "train sgd epochs=0 seed=-1 tol=x"],
     [(5, 18, "train sgd: epochs expects an integer of at least 1, got 0"),
      (5, 25, "train sgd: seed expects an integer from 0 to 2**63 - 1, got -1"),
      (5, 32, "train sgd: tol expects a number like 0.05, got 'x'")]),
    (["dense d: 2", "loss mse", "train sgd lr=1e999"],
     [(5, 14, "train sgd: lr expects a finite number, got 1e999")]),
    (["dense d: 2", "train sgd"],
     [(4, 1, "the train line needs a loss line, e.g. 'loss cross_entropy', "
             "to know what to minimise")]),
    (["dense d: 2", "loss mse", "loss mse"], [(5, 1, "a second loss line; a program has one")]),
    (["dense d: 2 -> relu", "flaten"],
     [(4, 1, "unknown statement 'flaten'; did you mean 'flatten'?")]),
    (["relu"], [(2, 1, "the network has no layers"),
                (3, 1, "relu on a line of its own applies to the layer above, "
                       "but there is no layer above it")]),
])
def test_irgen_error_text_line_and_column(lines, expected):
    assert errors_of(program("1x8x8", *lines)) == expected


def test_order_of_lines():
    assert errors_of("input: 1x4x4\nnetwork n\ndense d: 2\n") == [
        (2, 1, "the network line must be the first line of the program")]
    assert errors_of("input: 1x4x4\ndense d: 2\n") == [
        (1, 1, "missing the line 'network NAME'; a program starts with it")]
    assert errors_of("network n\ndense d: 2\ninput: 1x4x4\n") == [
        (3, 1, "the input line must come before the first layer")]
    assert errors_of("network n\ninput: 1x4x4\n") == [(2, 1, "the network has no layers")]
    assert errors_of("network n\ninput: 1x4x4\ninput: 1x4x4\ndense d: 1\n") == [
        (3, 1, "a second input line; a program has one")]
    assert errors_of("network n\ninput: 1x4x4\ndense d: 2\nloss mse\nrelu\n") == [
        (5, 1, "relu comes after the loss line; layers go above it")]


def test_the_input_name_is_a_layer_name_too():
    assert errors_of("network n\ninput x: 1x4x4\ndense x: 3\n") == [
        (3, 7, "duplicate name 'x'; names are unique within a network")]


def test_input_shape_forms():
    assert errors_of("network n\ninput: 2x28x28x1\ndense d: 1\n") == [
        (2, 8, "the input shape must be CxHxW like 1x28x28, a feature count like 784, "
               "or a 2-D sample like 4x5, got 2x28x28x1")]


def test_printer_shows_every_tensor_shape_and_dtype():
    text = format_graph(check_text(program("1x6x6", "conv c: 2 3x3 -> relu", "dense d: 2")))
    assert "  param  c.weight  2 x 1 x 3 x 3 f32" in text
    assert "c = relu(c.pre)" in text and ": N x 2 x 4 x 4 f32  @3:1" in text
    assert ": N x 2 f32  @4:1" in text


@pytest.mark.parametrize("name", ["lenet", "mlp", "vgg_small"])
def test_example_graphs_pass_the_verifier(name):
    verify(cnnc.check(EXAMPLES / f"{name}.cnn"))


def test_the_verifier_catches_a_read_before_write():
    graph = check_text(program("1x6x6", "conv c: 2 3x3", "relu"))
    swapped = dataclasses.replace(graph, nodes=graph.nodes[::-1])
    with pytest.raises(AssertionError, match="before it is written"):
        verify(swapped)


def test_check_takes_text_a_path_or_a_path_string(tmp_path):
    text = program("1x6x6", "dense d: 2")
    path = tmp_path / "net.txt"
    path.write_text(text)
    for given in (text, path, str(path)):
        assert cnnc.check(given).tensor("d.weight").shape == (2, 36)
    with pytest.raises(cnnc.CnncInputError, match="no such file"):
        cnnc.check(str(tmp_path / "absent.cnn"))


def test_unknown_dtype_is_a_cnnc_error():
    with pytest.raises(cnnc.CnncError, match="dtype must be f32 or f64, got 'f16'"):
        cnnc.check(program("4", "dense d: 2"), dtype="f16")
