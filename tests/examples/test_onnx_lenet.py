"""examples/onnx_lenet.py, the README's PyTorch → ONNX → cnnc → train → ONNX → ONNX Runtime
path, on a few digits-shaped samples: every step runs, and ONNX Runtime's accuracy on the
exported file is what cnnc's own evaluation of the trained weights says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the example exports from PyTorch")
pytest.importorskip("onnxruntime", reason="the example checks in ONNX Runtime")

from cnnc.cli.main import main

EXAMPLE = Path(__file__).parents[2] / "examples" / "onnx_lenet.py"


def _example():
    spec = importlib.util.spec_from_file_location("onnx_lenet", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_round_trip_of_the_readme(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    images = rng.normal(0, 0.3, (200, 1, 28, 28)).astype(np.float32)
    images[np.arange(200), 0, labels * 2 + 3, 5:20] += 2.0  # a learnable row per class
    np.savez("digits.npz", x=images, y=labels)
    example = _example()
    assert example.main(["export", "lenet5.onnx"]) == 0
    assert main(["import", "lenet5.onnx", "-o", "lenet5.cnn", "--loss", "cross_entropy"]) == 0
    assert main(["train", "lenet5.cnn", "--weights", "lenet5.weights.npz", "--data",
                 "digits.npz", "--epochs", "3", "--lr", "0.1", "--batch", "16", "--out",
                 "trained.weights.npz", "--no-progress"]) == 0
    assert main(["export", "lenet5.cnn", "--weights", "trained.weights.npz", "-o",
                 "trained.onnx"]) == 0
    capsys.readouterr()
    assert main(["eval", "lenet5.cnn", "--weights", "trained.weights.npz", "--data",
                 "digits.npz"]) == 0
    cnnc_accuracy = re.search(r"accuracy ([\d.]+)%", capsys.readouterr().out).group(1)
    assert example.main(["check", "trained.onnx", "--data", "digits.npz"]) == 0
    shown = capsys.readouterr().out
    assert f"{cnnc_accuracy}% of the 40 held-out digits" in shown
    assert float(re.search(r"outputs ([\d.e+-]+)", shown).group(1)) < 1e-4
