"""The graph-network examples: each builds; ResNet-20's weights round-trip with PyTorch; the
small residual network learns MNIST (slow: minutes of training)."""

from __future__ import annotations

import importlib.util
import re

import pytest

import cnnc
from conftest import EXAMPLES, REPO, run_cli

GRAPH_EXAMPLES = ["resnet20", "resnet_mnist", "mobilenet_v2", "squeezenet"]
# parameters of the torchvision or paper versions (10 classes)
PARAMETERS = {"resnet20": 272_474, "squeezenet": 727_626, "mobilenet_v2": 2_236_682}


@pytest.mark.parametrize("name", GRAPH_EXAMPLES)
def test_the_example_checks(name):
    graph = cnnc.check(EXAMPLES / f"{name}.cnn")
    assert graph.inference is not None  # batch norm or dropout: an inference pass of its own
    if name in PARAMETERS:  # the trainable ones; running statistics are buffers
        assert sum(t.size for t in graph.params) == PARAMETERS[name]


def _torch_resnet20():
    spec = importlib.util.spec_from_file_location("torch_resnet20",
                                                  EXAMPLES / "torch_resnet20.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resnet20_weights_round_trip_with_pytorch():
    """The README's snippet: torch's state_dict into cnnc and back, the same outputs."""
    pytest.importorskip("torch")
    module = cnnc.compile(EXAMPLES / "resnet20.cnn", opt_level=0, schedule=False)
    assert _torch_resnet20().round_trip(module) < 1e-5


MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="the MNIST files are not in ../shared/data/mnist")
def test_resnet_mnist_reaches_98_5_percent(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", str(EXAMPLES / "resnet_mnist.cnn"),
                             "--data", str(MNIST))
    assert code == 0, err
    accuracy = float(re.findall(r"accuracy ([0-9.]+)%", out + err)[-1])
    assert accuracy >= 98.5
