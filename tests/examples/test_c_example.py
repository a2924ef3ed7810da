"""examples/c: its Makefile compiles LeNet-5 with trained weights into a C library and the
classify program, which classifies the MNIST test images; its outputs are the Python
module's, bit for bit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnnc
from cnnc.training.data import load_mnist_split
from conftest import EXAMPLES, REPO, run_cli

MNIST = REPO.parent / "shared" / "data" / "mnist"


def test_classify_gives_module_forward_bit_for_bit(tmp_path, capsys, monkeypatch):
    missing = [p for p in ("make", "cc", "gunzip") if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no MNIST test split at {MNIST}")
    monkeypatch.chdir(tmp_path)  # where train writes its checkpoint
    weights = tmp_path / "lenet5.weights.npz"
    code, _, err = run_cli(capsys, "train", str(EXAMPLES / "lenet.cnn"), "--data", str(MNIST),
                           "--epochs", "1", "--out", str(weights), "--no-progress")
    assert code == 0, err
    build = tmp_path / "build"
    done = subprocess.run(["make", "-C", str(EXAMPLES / "c"), f"BUILD={build}",
                           f"CNNC={sys.executable} -m cnnc", f"MNIST={MNIST}",
                           f"WEIGHTS={weights}", "run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "image 0: class " in done.stdout and "on 10000 images" in done.stdout
    outputs = tmp_path / "y.bin"
    subprocess.run([str(build / "classify"), "--weights", str(build / "lenet5.weights.bin"),
                    "--batch", "100", "--out", str(outputs),
                    str(build / "t10k-images-idx3-ubyte")], check=True, capture_output=True)
    images = load_mnist_split(Path(MNIST), "test").x
    module = cnnc.compile(EXAMPLES / "lenet.cnn")
    module.load_weights(weights)
    expected = module.forward(images)
    got = np.fromfile(outputs, dtype=np.float32).reshape(expected.shape)
    assert np.array_equal(got, expected)
    accuracy = np.mean(got.argmax(axis=1) == load_mnist_split(Path(MNIST), "test").y)
    assert f"accuracy {accuracy:.4f} on 10000 images" in done.stdout
    assert accuracy > 0.85  # one epoch on 8,000 of these digits
