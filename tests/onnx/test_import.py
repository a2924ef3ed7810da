"""ONNX import, on models written node by node with onnx.helper: each checked against ONNX
Runtime (the oracle), and the program cnnc writes for it read back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="ONNX import needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is the oracle of these tests")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import cnnc  # noqa: E402
from cnnc.cli.main import main  # noqa: E402
from cnnc.onnx.importer import import_model  # noqa: E402

RNG = np.random.default_rng(7)


def _tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, output, initializers=(), opset=17, functions=(), batch="N"):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *shape])
         for name, shape in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        list(initializers))
    opsets = [helper.make_opsetid("", opset)] + (
        [helper.make_opsetid("local", 1)] if functions else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 8
    return model


def _save(model, tmp_path: Path, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _same_as_ort(path: Path, shape, batch: int = 3) -> cnnc.Module:
    x = RNG.standard_normal((batch, *shape)).astype(np.float32)
    module = cnnc.compile(path)
    np.testing.assert_allclose(module.forward(x), _ort(path, x), rtol=1e-4, atol=1e-5)
    return module


def _conv(name, x, out, cin, k=3, pads=(1, 1, 1, 1), **attrs):
    w = _tensor(f"{name}.weight", RNG.standard_normal((out, cin, k, k)).astype(np.float32) / 3)
    b = _tensor(f"{name}.bias", RNG.standard_normal(out).astype(np.float32))
    node = helper.make_node("Conv", [x, w.name, b.name], [f"{name}_out"], name=f"/{name}/Conv",
                            kernel_shape=[k, k], pads=list(pads), **attrs)
    return node, [w, b]


def test_a_chain_of_patterns_matches_onnx_runtime(tmp_path):
    """conv → silu (Sigmoid, Mul) → erf GELU (Div, Erf, Add, Mul, Mul) → hardswish
    (HardSigmoid, Mul) → global average pool → flatten (Shape/Gather/Unsqueeze/Concat
    chain) → dense (MatMul + Add)."""
    conv, weights = _conv("c1", "x", 4, 2)
    c = lambda name, v: _tensor(name, np.array(v, dtype=np.float32))  # noqa: E731
    nodes = [conv,
             helper.make_node("Sigmoid", ["c1_out"], ["s"], name="/act/Sigmoid"),
             helper.make_node("Mul", ["c1_out", "s"], ["silu"], name="/act/Mul"),
             helper.make_node("Div", ["silu", "sqrt2"], ["d"], name="/g/Div"),
             helper.make_node("Erf", ["d"], ["e"], name="/g/Erf"),
             helper.make_node("Add", ["e", "one"], ["a"], name="/g/Add"),
             helper.make_node("Mul", ["silu", "a"], ["m"], name="/g/Mul"),
             helper.make_node("Mul", ["m", "half"], ["gelu"], name="/g/Mul_1"),
             helper.make_node("HardSigmoid", ["gelu"], ["hs"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["hs", "gelu"], ["hswish"]),
             helper.make_node("GlobalAveragePool", ["hswish"], ["gap"]),
             helper.make_node("Shape", ["gap"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["gap", "target"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["y"], name="/fc/Add")]
    init = [*weights, c("sqrt2", math.sqrt(2)), c("one", 1.0), c("half", 0.5),
            _tensor("zero", np.array(0, np.int64)), _tensor("axes", np.array([0], np.int64)),
            _tensor("minus1", np.array([-1], np.int64)),
            _tensor("w", RNG.standard_normal((4, 5)).astype(np.float32)),
            _tensor("b", RNG.standard_normal(5).astype(np.float32))]
    path = _save(_model(nodes, [("x", [2, 6, 6])], "y", init), tmp_path)
    _same_as_ort(path, (2, 6, 6))
    text = import_model(path).text
    assert "conv c1: 4 3x3 pad=1 -> silu" in text
    assert "activation g: gelu" in text  # after silu, a line of its own
    assert "activation hswish: hardswish" in text and "dense fc: 5" in text
    assert "hardswish" in text and "flatten" in text and "dense" in text
    assert "from=" not in text  # a chain: no layer reads anything but the line above


def test_branches_get_from_and_names_are_valid(tmp_path):
    conv1, w1 = _conv("stem", "input", 4, 3)
    conv2, w2 = _conv("branch", "stem_out", 4, 4)
    conv3, w3 = _conv("side", "stem_out", 4, 4, k=1, pads=(0, 0, 0, 0))
    nodes = [conv1, conv2, conv3,
             helper.make_node("Concat", ["branch_out", "side_out"], ["cat"], axis=1,
                              name="/layer.1/Concat"),
             helper.make_node("Relu", ["cat"], ["y"], name="/layer.1/Relu")]
    path = _save(_model(nodes, [("input", [3, 5, 5])], "y", [*w1, *w2, *w3]), tmp_path)
    _same_as_ort(path, (3, 5, 5))
    text = import_model(path).text
    assert "input data: 3x5x5" in text or "input input_1: 3x5x5" in text
    assert "conv side: 4 1x1 from=stem" in text
    assert "concat layer.1: branch, side -> relu" in text


def test_model_local_functions_are_inlined(tmp_path):
    function = helper.make_function(
        "local", "ConvRelu", ["X", "W"], ["Y"],
        [helper.make_node("Conv", ["X", "W"], ["C"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["C"], ["Y"])],
        [helper.make_opsetid("", 17)])
    w = _tensor("w", RNG.standard_normal((3, 2, 3, 3)).astype(np.float32))
    node = helper.make_node("ConvRelu", ["x", "w"], ["y"], domain="local", name="block")
    path = _save(_model([node], [("x", [2, 4, 4])], "y", [w], functions=[function]), tmp_path)
    _same_as_ort(path, (2, 4, 4))


def test_a_fixed_batch_is_any_batch(tmp_path):
    conv, weights = _conv("c", "x", 2, 1)
    flat = helper.make_node("Reshape", ["c_out", "shape"], ["y"])
    init = [*weights, _tensor("shape", np.array([1, -1], np.int64))]
    path = _save(_model([conv, flat], [("x", [1, 4, 4])], "y", init, batch=1), tmp_path)
    module = cnnc.compile(path)
    x = RNG.standard_normal((5, 1, 4, 4)).astype(np.float32)
    expected = np.concatenate([_ort(path, x[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(module.forward(x), expected, rtol=1e-4, atol=1e-5)


def test_every_unsupported_node_is_listed_and_nothing_written(tmp_path, capsys):
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="linear",
                              name="/up/Resize"),
             helper.make_node("LRN", ["r"], ["l"], size=3, name="/norm/LRN"),
             helper.make_node("Erf", ["l"], ["y"], name="/lonely/Erf")]
    init = [_tensor("scales", np.array([1, 1, 2, 2], np.float32))]
    path = _save(_model(nodes, [("x", [1, 4, 4])], "y", init), tmp_path)
    with pytest.raises(cnnc.CnncInputError) as caught:
        import_model(path)
    message = str(caught.value)
    assert "3 nodes cannot be imported" in message
    assert "Resize '/up/Resize': Resize with mode linear is not supported" in message
    assert "LRN '/norm/LRN': LRN is not supported" in message
    assert "Erf '/lonely/Erf'" in message
    out = tmp_path / "net.cnn"
    assert main(["import", str(path), "-o", str(out)]) == 1
    assert not out.exists() and not (tmp_path / "net.weights.npz").exists()
    assert "/norm/LRN" in capsys.readouterr().err


def test_a_shape_error_names_the_onnx_node(tmp_path, capsys):
    pool = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3],
                            pads=[2, 2, 2, 2], name="/features/pool7")
    path = _save(_model([pool], [("x", [1, 4, 4])], "y"), tmp_path)
    assert main(["import", str(path), "-o", str(tmp_path / "p.cnn")]) == 1
    err = capsys.readouterr().err
    assert "/features/pool7" in err and "more than half the window" in err
    assert not (tmp_path / "p.cnn").exists()


@pytest.mark.parametrize(("data", "expected"), [
    (b"", "the file is empty"),
    (b"\x08\x07garbage that is no protobuf" * 3, "is not an ONNX model"),
])
def test_files_that_are_no_models(tmp_path, data, expected):
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(cnnc.CnncInputError, match=expected):
        import_model(path)


def test_what_cnnc_networks_cannot_be(tmp_path):
    relu = helper.make_node("Add", ["x", "z"], ["y"])
    two = _model([relu], [("x", [4]), ("z", [4])], "y")
    with pytest.raises(cnnc.CnncInputError, match="take one input; this model takes 2"):
        import_model(_save(two, tmp_path, "two.onnx"))
    old = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", [4])], "y", opset=9)
    with pytest.raises(cnnc.CnncInputError, match="opset 9; cnnc imports opsets 11"):
        import_model(_save(old, tmp_path, "old.onnx"))
    with pytest.raises(cnnc.CnncInputError, match="no such file"):
        import_model(tmp_path / "missing.onnx")


def test_cli_import_writes_a_program_and_weights_that_load(tmp_path, capsys):
    conv, weights = _conv("c1", "x", 3, 1)
    bn_init = [_tensor(f"bn.{k}", v) for k, v in {
        "weight": RNG.uniform(0.5, 1.5, 3), "bias": RNG.standard_normal(3),
        "running_mean": RNG.standard_normal(3), "running_var": RNG.uniform(0.5, 2, 3)}.items()]
    bn_init = [_tensor(t.name, numpy_helper.to_array(t).astype(np.float32)) for t in bn_init]
    nodes = [conv, helper.make_node("BatchNormalization",
                                    ["c1_out", *[t.name for t in bn_init]], ["b"],
                                    epsilon=1e-3, momentum=0.8, name="/bn/BatchNormalization"),
             helper.make_node("Clip", ["b", "lo", "hi"], ["y"], name="/act/Clip")]
    init = [*weights, *bn_init, _tensor("lo", np.array(-1, np.float32)),
            _tensor("hi", np.array(2.5, np.float32))]
    path = _save(_model(nodes, [("x", [1, 5, 5])], "y", init), tmp_path)
    program = tmp_path / "net.cnn"
    assert main(["import", str(path), "-o", str(program)]) == 0
    assert "wrote" in capsys.readouterr().out
    text = program.read_text()
    assert "batchnorm bn: eps=0.001 momentum=0.2 -> clip(-1, 2.5)" in text
    module = cnnc.compile(program)
    module.load_weights(tmp_path / "net.weights.npz")
    x = RNG.standard_normal((4, 1, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(module.forward(x), _ort(path, x), rtol=1e-4, atol=1e-5)
    compiled = tmp_path / "net.cnnm"
    assert main(["compile", str(path), "-o", str(compiled)]) == 0
    np.testing.assert_allclose(cnnc.load(compiled).forward(x), _ort(path, x),
                               rtol=1e-4, atol=1e-5)


def test_imported_model_trains_with_a_loss_added(tmp_path):
    w = _tensor("fc.weight", RNG.standard_normal((3, 8)).astype(np.float32))
    b = _tensor("fc.bias", np.zeros(3, np.float32))
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1)]
    path = _save(_model(nodes, [("x", [2, 2, 2])], "y", [w, b]), tmp_path)
    data = tmp_path / "d.npz"
    np.savez(data, x=RNG.standard_normal((32, 2, 2, 2)).astype(np.float32),
             y=RNG.integers(0, 3, 32))
    out = tmp_path / "w.npz"
    assert main(["train", str(path), "--data", str(data), "--loss", "cross_entropy",
                 "--max-iter", "3", "--batch", "8", "--out", str(out), "--checkpoint",
                 str(tmp_path / "c.npz"), "--no-progress"]) == 0
    trained = np.load(out)
    assert trained["fc.weight"].shape == (3, 8)
    assert not np.allclose(trained["fc.weight"], numpy_helper.to_array(w))


def test_compile_with_weights_and_export_of_an_onnx_model(tmp_path):
    conv, weights = _conv("c1", "x", 2, 1)
    nodes = [conv, helper.make_node("Relu", ["c1_out"], ["y"])]
    path = _save(_model(nodes, [("x", [1, 4, 4])], "y", weights), tmp_path)
    program = tmp_path / "net.cnn"
    assert main(["import", str(path), "-o", str(program)]) == 0
    x = RNG.standard_normal((2, 1, 4, 4)).astype(np.float32)
    module = tmp_path / "net.cnnm"  # the imported weights stored in the module file
    assert main(["compile", str(program), "--weights", str(tmp_path / "net.weights.npz"),
                 "-o", str(module)]) == 0
    np.testing.assert_allclose(cnnc.load(module).forward(x), _ort(path, x),
                               rtol=1e-4, atol=1e-5)
    again = tmp_path / "again.onnx"  # import, then export: the same function
    assert main(["export", str(path), "-o", str(again)]) == 0
    np.testing.assert_allclose(_ort(again, x), _ort(path, x), rtol=1e-5, atol=1e-6)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{"c1.weight": np.zeros((3, 1, 3, 3), np.float32)})
    assert main(["compile", str(program), "--weights", str(wrong), "-o",
                 str(tmp_path / "w.cnnm")]) == 1
    assert not (tmp_path / "w.cnnm").exists()


def test_a_training_mode_dropout_is_a_dropout_layer(tmp_path):
    """A training-mode export's Dropout keeps its rate as a layer: a copy at inference (the
    same function as the model without it), masks in training calls."""
    conv, weights = _conv("c1", "x", 2, 1)
    plain = _save(_model([conv, helper.make_node("Relu", ["c1_out"], ["y"])],
                         [("x", [1, 4, 4])], "y", weights), tmp_path, "plain.onnx")
    nodes = [conv, helper.make_node("Dropout", ["c1_out", "ratio", "training"], ["d"],
                                    name="/drop/Dropout"),
             helper.make_node("Relu", ["d"], ["y"])]
    init = [*weights, _tensor("ratio", np.array(0.25, np.float32)),
            _tensor("training", np.array(True))]
    path = _save(_model(nodes, [("x", [1, 4, 4])], "y", init), tmp_path)
    assert "dropout drop: 0.25" in import_model(path).text
    module = cnnc.compile(path)
    x = RNG.standard_normal((64, 1, 4, 4)).astype(np.float32)
    kept = module.forward(x)
    np.testing.assert_allclose(kept, _ort(plain, x), rtol=1e-4, atol=1e-5)
    dropped = module.forward(x, training=True)[kept > 0]
    assert 0.18 < np.mean(dropped == 0) < 0.32  # a quarter of what relu keeps is dropped
    np.testing.assert_allclose(dropped[dropped != 0], kept[kept > 0][dropped != 0] / 0.75,
                               rtol=1e-5)


def test_a_per_channel_mul_and_add_fold_into_the_conv(tmp_path):
    """Conv → Mul(scale) → Add(shift), as converters write a batch norm: one conv line, with
    the scale in its weight and the shift as its bias."""
    w = _tensor("c.weight", RNG.standard_normal((3, 2, 3, 3)).astype(np.float32))
    scale = _tensor("scale", RNG.uniform(0.5, 2, (1, 3, 1, 1)).astype(np.float32))
    shift = _tensor("shift", RNG.standard_normal((3, 1, 1)).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "c.weight"], ["c"], kernel_shape=[3, 3],
                              name="/c/Conv"),
             helper.make_node("Mul", ["c", "scale"], ["m"], name="/bn/Mul"),
             helper.make_node("Add", ["shift", "m"], ["a"], name="/bn/Add"),
             helper.make_node("Relu", ["a"], ["y"])]
    path = _save(_model(nodes, [("x", [2, 6, 6])], "y", [w, scale, shift]), tmp_path)
    _same_as_ort(path, (2, 6, 6))
    text = import_model(path).text
    assert "conv c: 3 3x3 -> relu" in text and "/bn/Mul" in text and "/bn/Add" in text
    plane = _tensor("plane", RNG.standard_normal((1, 1, 4, 4)).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "c.weight"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Add", ["c", "plane"], ["y"], name="/plane/Add")]
    other = _save(_model(nodes, [("x", [2, 6, 6])], "y", [w, plane]), tmp_path, "o.onnx")
    with pytest.raises(cnnc.CnncInputError, match="Add '/plane/Add': Add of a layer and a "
                                                  "constant"):
        import_model(other)  # it varies over the plane, not by channel: no bias
