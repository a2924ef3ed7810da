"""Real architectures exported from PyTorch (tests/onnx/torch_models.py), imported by cnnc
and run against ONNX Runtime, the oracle: eval-mode exports (batch norm folded into the
convs by the exporter), training-mode exports (BatchNormalization kept, computed by ONNX
Runtime with the batch's statistics), a fixed batch, older opsets, the dynamo exporter,
and an imported model fine-tuned and exported again through the command line."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="ONNX import needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is the oracle of these tests")
torch = pytest.importorskip("torch", reason="the models are exported from PyTorch")

from torch_models import ResNet20, build, randomized  # noqa: E402

import cnnc  # noqa: E402
from cnnc.cli.main import main  # noqa: E402
from cnnc.onnx.importer import import_model  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
# LLVM's -O1 compiles a few times faster than -O3, from the same scheduled loop nests
OPT = 1
slow = pytest.mark.slow


def _input(shape: tuple[int, ...], batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def _export(model: torch.nn.Module, x: np.ndarray, path: Path, training: bool = False,
            dynamic: bool = True, **options: object) -> Path:
    """`model` written to `path` by torch's TorchScript exporter (batch N unless `dynamic`
    is false); the model is left in eval mode."""
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    if dynamic:
        options["dynamic_axes"] = {"x": {0: "N"}}
    model.train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes about its own future
        torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False,
                          input_names=["x"], training=mode, **options)
    model.eval()
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _torch(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def _close(actual: np.ndarray, expected: np.ndarray, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape
    error = np.abs(actual - expected)
    print(f"max abs difference {error.max():.3g}, largest value {np.abs(expected).max():.3g}, "
          f"{(error / (atol + RTOL * np.abs(expected))).max():.2f} of the tolerance")  # -s
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol)


def _without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with each Dropout an Identity: a training-mode export's Dropout draws a new
    mask in every ONNX Runtime call, which no other runtime can reproduce."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.Dropout):
            setattr(model, name, torch.nn.Identity())
        else:
            _without_dropout(child)
    return model


# -- eval-mode exports: batch norm folded by the exporter --------------------------------------

@pytest.mark.parametrize("name", ["resnet20", "darknet", "squeezenet11",
                                  pytest.param("resnet18", marks=slow),
                                  pytest.param("mobilenetv2", marks=slow)])
def test_an_eval_export_runs_as_onnx_runtime_runs_it(tmp_path, name):
    model, shape = build(name)
    path = _export(model, _input(shape, 2), tmp_path / f"{name}.onnx")
    assert "BatchNormalization" not in _op_types(path)
    module = cnnc.compile(path, opt_level=OPT)
    x = _input(shape, 3, seed=2)  # another batch than the export's: the batch is N
    _close(module.forward(x), _ort(path, x))


# -- training-mode exports: BatchNormalization kept ---------------------------------------------

# MobileNetV2's 52 batch norms on batch statistics (down to 2 x 2 images, 16 values a
# channel) make float32 rounding grow: ONNX Runtime's own logits are 2e-5 to 4e-5 from the
# float64 answer, as cnnc's are (test_mobilenetv2_trains_in_float64_as_torch_does shows
# that cnnc's program is exact), so the two float32 results may differ by twice that.
TRAINING_ATOL = {"mobilenetv2": 1e-4}


@pytest.mark.parametrize("name", ["resnet20", "darknet",
                                  pytest.param("resnet18", marks=slow),
                                  pytest.param("mobilenetv2", marks=slow),
                                  pytest.param("squeezenet11", marks=slow)])
def test_a_training_export_normalizes_by_the_batch_and_infers_with_running_stats(
        tmp_path, name):
    model, shape = build(name)
    _without_dropout(model)
    path = _export(model, _input(shape, 2), tmp_path / f"{name}.onnx", training=True)
    if name != "squeezenet11":  # SqueezeNet has no batch norm
        assert "BatchNormalization" in _op_types(path)
    module = cnnc.compile(path, opt_level=OPT)
    x = _input(shape, 4, seed=3)
    # ONNX Runtime computes training-mode BatchNormalization with the batch's statistics
    _close(module.forward(x, training=True), _ort(path, x), TRAINING_ATOL.get(name, ATOL))
    # and cnnc's inference uses the running statistics the file holds, as torch's eval does
    _close(module.forward(x), _torch(model, x))


@slow
def test_mobilenetv2_trains_in_float64_as_torch_does(tmp_path):
    """The imported program built for float64 gives torch's float64 training-mode output to
    rounding: what the float32 comparison above leaves to its tolerance is rounding too."""
    model, shape = build("mobilenetv2")
    _without_dropout(model)
    path = _export(model, _input(shape, 2), tmp_path / "mobilenetv2.onnx", training=True)
    imported = import_model(path)
    module = cnnc.compile(imported.text, dtype="f64", opt_level=OPT)
    module.set_params({k: v.astype(np.float64) for k, v in imported.weights.items()})
    x = _input(shape, 4, seed=3).astype(np.float64)
    exact = copy.deepcopy(model).double().train()
    with torch.no_grad():
        expected = exact(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(module.forward(x, training=True), expected, rtol=1e-9,
                               atol=1e-11)


# -- export options ---------------------------------------------------------------------------

def test_a_fixed_batch_export_runs_at_any_batch(tmp_path):
    """Exported for a batch of 3 (every shape in it says 3); cnnc runs 2 and 4. ONNX
    Runtime takes only 3: samples 0 to 2, then 1 to 3."""
    model, shape = build("squeezenet11")
    path = _export(model, _input(shape, 3), tmp_path / "fixed.onnx", dynamic=False)
    x = _input(shape, 4, seed=4)
    module = cnnc.compile(path, opt_level=OPT)
    expected = np.concatenate([_ort(path, x[:3]), _ort(path, x[1:])[2:]])
    _close(module.forward(x[:2]), expected[:2])
    _close(module.forward(x), expected)


@pytest.mark.parametrize("name, opset", [("darknet", 11), ("darknet", 13),
                                         pytest.param("mobilenetv2", 11, marks=slow),
                                         pytest.param("resnet20", 13, marks=slow)])
def test_an_older_opset_export_runs_as_onnx_runtime_runs_it(tmp_path, name, opset):
    """Opset 11 writes Pad's amounts and Clip's bounds as inputs, Squeeze's axes as an
    attribute (13 as an input)."""
    model, shape = build(name)
    path = _export(model, _input(shape, 2), tmp_path / f"{name}.onnx", opset_version=opset)
    assert onnx.load(str(path)).opset_import[0].version == opset
    x = _input(shape, 3, seed=5)
    _close(cnnc.compile(path, opt_level=OPT).forward(x), _ort(path, x))


def test_a_training_export_at_opset_13(tmp_path):
    """Before opset 14 BatchNormalization had no training_mode attribute: torch marks a
    training export by the running-statistics outputs."""
    model, shape = build("darknet")
    path = _export(model, _input(shape, 2), tmp_path / "dark13.onnx", training=True,
                   opset_version=13)
    module = cnnc.compile(path, opt_level=OPT)
    x = _input(shape, 3, seed=6)
    _close(module.forward(x), _torch(model, x))
    _close(module.forward(x, training=True), _ort(path, x))


@pytest.mark.parametrize("name", ["darknet", pytest.param("mobilenetv2", marks=slow)])
def test_a_dynamo_export_with_external_data_runs_as_onnx_runtime_runs_it(tmp_path, name):
    pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript")
    model, shape = build(name)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(_input(shape, 2)),), str(path),
                          dynamo=True, input_names=["x"], external_data=True,
                          dynamic_shapes={"x": {0: torch.export.Dim("N")}}, verbose=False)
    stored = onnx.load(str(path), load_external_data=False).graph.initializer
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored)
    module = cnnc.compile(path, opt_level=OPT)
    x = _input(shape, 3, seed=7)
    _close(module.forward(x), _ort(path, x))
    _close(module.forward(x), _torch(model, x))


# -- import, fine-tune, export ------------------------------------------------------------------

def test_an_imported_model_fine_tunes_and_exports_again(tmp_path, capsys):
    """A ResNet-8 (the CIFAR ResNet with one block a stage) exported in training mode:
    `cnnc import`, `cnnc train --weights --loss cross_entropy`, `cnnc export`; ONNX Runtime
    runs the exported file as cnnc runs the trained program."""
    model = randomized(ResNet20(blocks=1)).eval()
    onnx_path = _export(model, _input((3, 32, 32), 2), tmp_path / "resnet8.onnx",
                        training=True)
    rng = np.random.default_rng(8)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((40, 3, 32, 32)).astype(np.float32),
             y=rng.integers(0, 10, 40))
    program, weights = tmp_path / "net.cnn", tmp_path / "net.weights.npz"
    trained, log = tmp_path / "trained.npz", tmp_path / "metrics.jsonl"
    exported = tmp_path / "trained.onnx"

    assert main(["import", str(onnx_path), "-o", str(program)]) == 0
    assert main(["train", str(program), "--weights", str(weights), "--loss", "cross_entropy",
                 "--data", str(data), "--epochs", "1", "--batch", "8", "--max-iter", "3",
                 "--lr", "0.05", "--out", str(trained), "--checkpoint",
                 str(tmp_path / "ckpt.npz"), "--log", str(log), "--no-progress"]) == 0
    assert main(["export", str(program), "--weights", str(trained), "-o", str(exported)]) == 0
    capsys.readouterr()

    before, after = np.load(weights), np.load(trained)
    assert set(before) == set(after)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert "fc.weight" in changed and "conv1.weight" in changed
    assert any(k.endswith("running_mean") for k in changed)  # the batch norms' buffers too
    epoch = json.loads(log.read_text().splitlines()[-1])
    assert np.isfinite(epoch["loss"]) and epoch["steps"] == 3

    onnx.checker.check_model(onnx.load(str(exported)), full_check=True)
    module = cnnc.compile(program, opt_level=OPT)
    module.load_weights(trained)
    x = _input((3, 32, 32), 3, seed=9)
    _close(_ort(exported, x), module.forward(x))
    # the imported weights, before training, still give torch's numbers
    module.load_weights(weights)
    _close(module.forward(x), _torch(copy.deepcopy(model), x))
