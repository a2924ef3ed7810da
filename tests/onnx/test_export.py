"""ONNX export: every op and option, the examples, trained weights, the opset range and
`cnnc export`, each model checked by onnx (checker, strict shape inference) and run in ONNX
Runtime against the compiled module's `forward`."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="the exported models run in onnxruntime")

import cnnc  # noqa: E402
from cnnc.diagnostics import CnncError  # noqa: E402
from cnnc.onnx.export import export, to_onnx  # noqa: E402
from cnnc.ops import registry  # noqa: E402
from conftest import EXAMPLES, run_cli  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5


def compiled(program, fast: bool = True) -> cnnc.Module:
    """Quick to compile (plain loops at -O0), or quick to run (scheduled, for the large)."""
    return cnnc.compile(program, opt_level=0, schedule=not fast)


def randomised(module: cnnc.Module, seed: int = 1) -> dict[str, np.ndarray]:
    """The module's parameters with biases, batch norm's scale and shift and its running
    statistics drawn away from their initial 0 and 1 (so that each path is exercised), set
    in the module too."""
    rng = np.random.default_rng(seed)
    values = dict(module.params)
    norms = {name.removesuffix(".running_mean") for name in module.buffers
             if name.endswith(".running_mean")}
    for name, value in {**module.params, **module.buffers}.items():
        layer, _, kind = name.rpartition(".")
        if kind == "num_batches_tracked":
            continue
        if kind == "running_var" or (kind == "weight" and layer in norms):
            value = rng.uniform(0.5, 1.5, value.shape)
        elif kind in ("running_mean", "bias"):
            value = rng.normal(0.0, 0.2, value.shape)
        values[name] = np.asarray(value, dtype=module.dtype)
    module.set_params(values)
    return values


def checked(model: onnx.ModelProto, graph: cnnc.Graph) -> None:
    """The full checker, and strict shape inference of the model without the shapes it
    declares: every value's shape inferred in full, a cnnc tensor's as cnnc's (batch N)."""
    onnx.checker.check_model(model, full_check=True)
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=True)
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_param if d.HasField("dim_param") else d.dim_value
                             for d in dims]
        assert all(d.HasField("dim_param") or d.HasField("dim_value") for d in dims), info.name
    for node in model.graph.node:
        for name in node.output:
            assert name in shapes, f"{name} ({node.op_type}) has no inferred shape"
    # ONNX's rule for Resize scales every dimension, so the batch dimension after one gets
    # a symbol of its own (unk__0) rather than the input's N
    batch = None if "Resize" in op_types(model) else "N"
    names = {t.name for t in graph.tensors}
    output = model.graph.output[0].name
    for name, dims in shapes.items():
        cnnc_name = graph.output if name == output else name
        if cnnc_name in names:
            assert dims[1:] == list(graph.tensor(cnnc_name).shape[1:]), name
            assert dims[0] == batch if batch else isinstance(dims[0], str), name
    assert output in shapes


def run_model(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {model.graph.input[0].name: x})
    return y


def exported_matches(program: str, opset: int = 17, batch: int = 3,
                     fast: bool = True) -> onnx.ModelProto:
    """Export `program` with random weights; ONNX Runtime gives the module's outputs."""
    graph, module = cnnc.check(program), compiled(program, fast)
    values = {**randomised(module), **module.buffers}
    model = to_onnx(graph, values, opset)
    checked(model, graph)
    x = np.random.default_rng(2).normal(0.0, 2.0, (batch, *module.input_shape))
    x = x.astype(module.dtype)
    np.testing.assert_allclose(run_model(model, x), module.forward(x), rtol=RTOL, atol=ATOL)
    return model


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def attributes(model: onnx.ModelProto, op_type: str) -> dict:
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def registered(op: str) -> bool:
    return op in {d.name for d in registry.all_ops()}


IMAGE = "network t\ninput x: 3x10x12\n"

PROGRAMS = {
    "conv_options": IMAGE + "conv a: 6 3x3 stride=2x1 pad=0x1x2x1 dilation=2 groups=3\n"
                            "conv b: 4 2x3 stride=2 pad=same bias=false -> relu\n"
                            "conv c: 4 1x1 -> leaky_relu\n"
                            "conv d: 4 3x3 pad=1 -> leaky_relu(-0.3)\n",
    "conv_is_the_output_without_bias": IMAGE + "conv a: 4 3x3 bias=false\n",
    "dense_flattens_an_image": IMAGE + "maxpool 2x2\ndense d: 7 -> sigmoid\n"
                                       "dense e: 3 bias=false -> tanh\n",
    "flatten_then_dense": IMAGE + "conv a: 2 1x1\nflatten\ndense d: 5 -> relu6\n",
    "activations": IMAGE + "conv a: 4 1x1 -> hardsigmoid\nconv b: 4 1x1 -> hardswish\n"
                           "conv c: 4 1x1 -> silu\nconv d: 4 1x1 -> gelu\nmaxpool 1x1\ngelu\n"
                           "dense e: 5 -> softmax\n",
    "maxpool_options": IMAGE + "maxpool 3x3 stride=2 pad=1 ceil=true\n"
                               "maxpool 2x3 stride=1x2 pad=0x1x1x1\nmaxpool 2x2 pad=same\n",
    "avgpool_counting_padding_and_ceil": IMAGE + "avgpool 3x3 stride=2 pad=1 ceil=true\n",
    "avgpool_ceil_without_padding": IMAGE + "avgpool 3x3 stride=2 ceil=true\n",
    "avgpool_not_counting_padding": IMAGE + "avgpool 3x3 stride=2 pad=1 ceil=true "
                                            "count_pad=false\n",
    "avgpool_asymmetric_and_same": IMAGE + "avgpool 3x2 stride=2x1 pad=1x0x0x1\n"
                                           "avgpool 3x3 stride=2 pad=same\n",
    "global_pools": IMAGE + "conv a: 4 3x3\nglobalmaxpool g\nconv b: 4 1x1 from=a\n"
                            "globalavgpool h\nadd s: g, h\n",
    "merges": IMAGE + "conv a: 4 3x3 pad=1 -> relu\nconv b: 4 1x1 from=x\nconv c: 4 1x1 from=x\n"
                      "add s: a, b, c\nadd t: s, a -> relu\nconcat k: t, b, x\n"
                      "globalavgpool g\nconv gate: 11 1x1 -> sigmoid\nmul m: k, gate\n"
                      "mul n: m, k\n",
    "vectors_merge": "network t\ninput x: 9\ndense a: 6 -> relu\ndense b: 6 from=x\n"
                     "concat c: a, b\ndense d: 6 from=x\nadd s: a, d\nmul m: s, b\n"
                     "concat k: c, m\n",
    "upsample": IMAGE + "conv a: 2 3x3\nupsample 2x3\nconv b: 2 1x1\nupsample 1x5\n",
    "batchnorm": IMAGE + "conv a: 4 3x3 -> relu\nbatchnorm bn eps=1e-3 momentum=0.3\n"
                         "maxpool 2x2\nbatchnorm bn2 -> relu\ndense d: 6\nbatchnorm bn3\n"
                         "dense e: 4 bias=false\nbatchnorm bn4 -> tanh\n",
    "dropout_inside_and_last": IMAGE + "conv a: 4 3x3 -> relu\ndropout 0.5\n"
                                       "dense d: 6\ndropout 0.25\n",
    "cross_entropy_of_logits": IMAGE + "dense d: 4\nloss cross_entropy\n",
}
# activations with arguments, the activation statement, log_softmax and pad, each with the op
# whose coming it waits for (hardsigmoid's arguments and the statement came with clip)
NEW_OPS = {
    "clip": ("clip", IMAGE + "conv a: 4 1x1 -> clip(-0.5, 0.7)\nconv b: 4 1x1 -> clip(-inf, 0.2)\n"
                             "conv c: 4 1x1 -> clip(0.1, inf)\n"),
    "hardsigmoid_alpha_beta": ("clip", IMAGE + "conv a: 4 1x1 -> hardsigmoid(0.3, 0.4)\n"),
    "log_softmax": ("log_softmax", IMAGE + "dense d: 6 -> log_softmax\n"),
    "softmax_of_a_2d_sample": ("log_softmax", "network t\ninput x: 4x5\n"
                                              "activation a: softmax\n"),
    "pad": ("pad2d", IMAGE + "pad p: 1x0x2x1 value=0.5\nconv c: 2 2x2\npad q: 1\n"
                            "pad r: 2x1 value=-3\n"),
    "log_softmax_of_a_2d_sample": ("log_softmax", "network t\ninput x: 4x5\n"
                                                  "activation a: log_softmax\n"),
}


@pytest.mark.parametrize("name", PROGRAMS)
def test_each_op_and_option_runs_in_onnxruntime_as_in_cnnc(name):
    exported_matches(PROGRAMS[name])


@pytest.mark.parametrize("name", NEW_OPS)
def test_the_newer_activations_run_in_onnxruntime_as_in_cnnc(name):
    op, program = NEW_OPS[name]
    if not registered(op):
        pytest.skip(f"cnnc has no {op} op")
    for opset in (11, 17):
        exported_matches(program, opset)


def test_the_model_keeps_cnnc_names_and_a_symbolic_batch():
    program = PROGRAMS["batchnorm"]
    model = exported_matches(program, batch=1)
    graph = cnnc.check(program)
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == [graph.output] == ["bn4"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 10, 12]
    names = {t.name for t in model.graph.initializer}
    assert {t.name for t in graph.params + graph.buffers} <= names
    assert "a.bias" in model.graph.node[0].input  # a conv's bias is Conv's third input
    # other batch sizes run too
    module = compiled(program)
    randomised(module)
    values = {**module.params, **module.buffers}
    model = to_onnx(graph, values)
    x = np.random.default_rng(3).normal(size=(5, 3, 10, 12)).astype(np.float32)
    np.testing.assert_allclose(run_model(model, x), module.forward(x), rtol=RTOL, atol=ATOL)


def test_batchnorm_is_batch_normalization_with_onnx_momentum_and_eps():
    model = exported_matches(PROGRAMS["batchnorm"])
    norms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(norms) == 4
    first = {a.name: onnx.helper.get_attribute_value(a) for a in norms[0].attribute}
    assert first["epsilon"] == pytest.approx(1e-3) and first["momentum"] == pytest.approx(0.7)
    assert list(norms[0].input[1:]) == ["bn.weight", "bn.bias", "bn.running_mean",
                                        "bn.running_var"]


def test_dropout_is_left_out():
    model = exported_matches(PROGRAMS["dropout_inside_and_last"])
    assert "Dropout" not in op_types(model)
    assert op_types(model)[-1] == "Identity"  # the last layer's name for the output
    assert model.graph.output[0].name == cnnc.check(PROGRAMS["dropout_inside_and_last"]).output


def test_windows_are_written_with_onnx_attributes():
    conv = attributes(exported_matches(PROGRAMS["conv_options"]), "Conv")
    assert conv["pads"] == [0, 1, 2, 1] and conv["strides"] == [2, 1]
    assert conv["dilations"] == [2, 2] and conv["group"] == 3
    pooled = exported_matches(PROGRAMS["avgpool_counting_padding_and_ceil"])
    # 10 x 12, 3x3 stride 2 pad 1, ceil: a last window over padded rows 10..12 (columns
    # 12..14), of which row 12 (column 14) is past the padding: zeros counted for the
    # padding (Pad), none for the overhang
    assert op_types(pooled) == ["Pad", "AveragePool"]
    assert attributes(pooled, "AveragePool")["count_include_pad"] == 0
    uncounted = attributes(exported_matches(PROGRAMS["avgpool_not_counting_padding"]),
                           "AveragePool")
    assert uncounted["count_include_pad"] == 0 and uncounted["pads"] == [1, 1, 2, 2]
    resize = attributes(exported_matches(PROGRAMS["upsample"]), "Resize")
    assert resize["mode"] == b"nearest" and resize["nearest_mode"] == b"floor"


def test_dense_flattens_only_what_is_not_flat():
    assert op_types(exported_matches(PROGRAMS["dense_flattens_an_image"]))[:3] == \
        ["MaxPool", "Flatten", "Gemm"]
    assert op_types(exported_matches(PROGRAMS["vectors_merge"])).count("Flatten") == 0


EXAMPLE_BATCH = {"lenet": 4, "mlp": 4, "vgg_small": 2, "resnet20": 2, "mobilenet_v2": 2,
                 "squeezenet": 1}


@pytest.mark.parametrize("name", EXAMPLE_BATCH)
def test_each_example_runs_in_onnxruntime_as_in_cnnc(name):
    large = name in ("mobilenet_v2", "squeezenet")  # scheduled kernels: they run faster
    exported_matches((EXAMPLES / f"{name}.cnn").read_text(), batch=EXAMPLE_BATCH[name],
                     fast=not large)


OPSET_PROGRAM = IMAGE + "conv a: 4 3x3 -> gelu\nconv b: 4 1x1 -> hardswish\n" \
                        "conv c: 4 1x1 -> relu6\nupsample 2x2\ndense d: 5 -> softmax\n"


@pytest.mark.parametrize("opset", [11, 13, 17, 20, 21])
def test_every_opset_gives_the_same_outputs_with_its_own_ops(opset):
    model = exported_matches(OPSET_PROGRAM, opset)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    types = op_types(model)
    assert ("Gelu" in types) == (opset >= 20) and ("Erf" in types) == (opset < 20)
    assert ("HardSwish" in types) == (opset >= 14)
    assert "Clip" in types and "Resize" in types


@pytest.mark.parametrize("opset", [10, 22, "17"])
def test_an_opset_outside_the_range_is_refused(opset):
    graph = cnnc.check(OPSET_PROGRAM)
    with pytest.raises(CnncError, match="cnnc exports opsets 11 to 21"):
        to_onnx(graph, {}, opset)


def test_an_op_without_an_onnx_form_is_named():
    graph = cnnc.check(PROGRAMS["conv_is_the_output_without_bias"])
    odd = dataclasses.replace(graph.nodes[0], op="mystery_op")
    graph = dataclasses.replace(graph, nodes=(odd, *graph.nodes[1:]))
    with pytest.raises(CnncError, match="no ONNX form is known for the op mystery_op"):
        to_onnx(graph, {"a.weight": np.zeros((4, 3, 3, 3), np.float32)})


TRAINED = IMAGE + "conv a: 4 3x3 -> relu\nbatchnorm bn momentum=0.2\ndropout 0.3\n" \
                  "dense d: 5\nbatchnorm bn2 -> relu\ndense out: 3\nloss cross_entropy\n" \
                  "train sgd lr=0.1 momentum=0.9 seed=4\n"


def _trained(tmp_path):
    module = compiled(TRAINED)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 3, 10, 12)).astype(np.float32)
    labels = rng.integers(0, 3, 6).astype(np.int32)
    for _ in range(4):
        module.train_step(x, labels)
    assert not np.allclose(module.buffers["bn.running_var"], 1.0)
    return module, x


def test_a_trained_network_exports_its_trained_state(tmp_path):
    module, x = _trained(tmp_path)
    graph = cnnc.check(TRAINED)
    model = to_onnx(graph, {**module.params, **module.buffers})
    checked(model, graph)
    np.testing.assert_allclose(run_model(model, x), module.forward(x), rtol=RTOL, atol=ATOL)
    # through files: the module file's stored state, and a weights file
    module.save(tmp_path / "t.cnnm")
    module.save_weights(tmp_path / "t.npz")
    (tmp_path / "t.cnn").write_text(TRAINED)
    for network, weights in ((tmp_path / "t.cnnm", None), (tmp_path / "t.cnn", tmp_path / "t.npz")):
        model = export(network, tmp_path / "t.onnx", weights)
        stored = onnx.load(str(tmp_path / "t.onnx"))
        assert stored == model
        np.testing.assert_allclose(run_model(stored, x), module.forward(x), rtol=RTOL,
                                   atol=ATOL)


def test_without_weights_a_program_exports_its_initial_parameters(tmp_path):
    (tmp_path / "t.cnn").write_text(TRAINED)
    model = export(tmp_path / "t.cnn", tmp_path / "t.onnx")
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, value in {**compiled(TRAINED).params}.items():
        np.testing.assert_array_equal(stored[name], value)


@pytest.mark.parametrize("change, words", [
    (lambda w: w.pop("a.weight"), "no array for the parameter a.weight"),
    (lambda w: w.update({"a.weight": np.zeros((4, 3, 2, 2))}), "a.weight must have shape"),
    (lambda w: w.update({"stray": np.zeros(2)}), "the array stray of no parameter"),
])
def test_wrong_weights_are_refused_and_nothing_is_written(tmp_path, capsys, change, words):
    module = compiled(TRAINED)
    weights = {**module.params, **module.buffers}
    change(weights)
    np.savez(tmp_path / "w.npz", **weights)
    (tmp_path / "t.cnn").write_text(TRAINED)
    target = tmp_path / "t.onnx"
    with pytest.raises(CnncError, match=words):
        export(tmp_path / "t.cnn", target, tmp_path / "w.npz")
    code, out, err = run_cli(capsys, "export", str(tmp_path / "t.cnn"), "--weights",
                             str(tmp_path / "w.npz"), "-o", str(target))
    assert code == 1 and out == "" and words in err
    assert not target.exists()


def test_cnnc_export_writes_the_model_and_says_what(tmp_path, capsys):
    target = tmp_path / "lenet.onnx"
    code, out, err = run_cli(capsys, "export", str(EXAMPLES / "lenet.cnn"), "-o", str(target),
                             "--opset", "13")
    assert code == 0 and err == ""
    model = onnx.load(str(target))
    assert model.opset_import[0].version == 13
    assert out == (f"wrote {target}: network lenet5, opset 13, {len(model.graph.node)} nodes, "
                   "61,706 parameters\n")
    graph = cnnc.check(EXAMPLES / "lenet.cnn")
    checked(model, graph)


@pytest.mark.parametrize("argv, words", [
    (["--opset", "9"], "opset 9 is not supported"),
    (["--weights", "missing.npz"], "cannot read weights missing.npz: no such file"),
])
def test_cnnc_export_refuses_bad_input(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "export", str(EXAMPLES / "lenet.cnn"), "-o", "m.onnx",
                             *argv)
    assert code == 1 and out == "" and words in err
    assert not (tmp_path / "m.onnx").exists()


def test_cnnc_export_of_a_missing_file(tmp_path, capsys):
    for name in ("none.cnn", "none.cnnm"):
        code, _, err = run_cli(capsys, "export", str(tmp_path / name), "-o",
                               str(tmp_path / "m.onnx"))
        assert code == 1 and "no such file" in err
    assert not (tmp_path / "m.onnx").exists()


def test_cnnc_export_without_onnx_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails
    code, out, err = run_cli(capsys, "export", str(EXAMPLES / "lenet.cnn"), "-o",
                             str(tmp_path / "m.onnx"))
    assert code == 1 and out == ""
    assert err == "error: cnnc export needs the onnx package: pip install 'cnnc[onnx]'\n"
    assert not (tmp_path / "m.onnx").exists()
