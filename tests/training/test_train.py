"""The training loop: resume equality, checkpoints that survive a kill, the NaN stop, the
train/eval/check --grad commands, and LeNet-5 on real MNIST digits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from synthetic import SMALL, synthetic

import cnnc
from cnnc.cli.main import main
from cnnc.training.data import Dataset, load_mnist_split
from cnnc.training.loop import CnncTrainingError, TrainOptions, train
from conftest import EXAMPLES, REPO

MNIST = REPO.parent / "shared" / "data" / "mnist"


def quiet(**kwargs) -> TrainOptions:
    return TrainOptions(batch=8, progress=False, **kwargs)


def test_resume_continues_bit_for_bit(tmp_path):
    data, held = synthetic(64, 0), synthetic(16, 1)
    straight = cnnc.compile(SMALL)
    train(straight, data, held, quiet(epochs=3), report=lambda _: None)
    first = cnnc.compile(SMALL)
    train(first, data, held, quiet(epochs=1, checkpoint=tmp_path / "c.npz"), report=lambda _: None)
    resumed = cnnc.compile(SMALL)
    result = train(resumed, data, held, quiet(epochs=3, resume=tmp_path / "c.npz"),
                   report=lambda _: None)
    assert [e.epoch for e in result.history] == [1, 2, 3]
    for name, value in straight.params.items():
        np.testing.assert_array_equal(resumed.params[name], value, err_msg=name)


def test_training_learns_and_stops_at_max_iter():
    data, held = synthetic(96, 2), synthetic(48, 3)
    module = cnnc.compile(SMALL)
    result = train(module, data, held, quiet(epochs=8), report=lambda _: None)
    assert result.history[-1].accuracy > 0.9
    assert result.history[-1].loss < result.history[0].loss
    capped = train(cnnc.compile(SMALL), data, held, quiet(epochs=8, max_iter=5),
                   report=lambda _: None)
    assert capped.steps == 5 and capped.stopped == "max_iter"


def test_tol_stops_when_no_parameter_moves():
    data, held = synthetic(32, 2), synthetic(8, 3)
    result = train(cnnc.compile(SMALL.replace("lr=0.1", "lr=0.0000001")), data, held,
                   quiet(epochs=5, tol=1e-3), report=lambda _: None)
    assert result.stopped == "tol" and result.steps == 1


def test_overflow_stops_with_the_layer_named_and_checkpoint_intact(tmp_path):
    text = ("network blowup\ninput: 4\ndense h: 16 -> relu\ndense out: 2\nloss mse\n"
            "train sgd lr=1e30\n")
    rng = np.random.default_rng(0)
    data = Dataset(rng.standard_normal((32, 4)).astype(np.float32) * 100,
                   rng.standard_normal((32, 2)).astype(np.float32))
    checkpoint = tmp_path / "ckpt.npz"
    checkpoint.write_bytes(b"previous checkpoint")
    with pytest.raises(CnncTrainingError, match=r"not finite appear in the (forward|backward) "
                                                r"pass, in layer (h|out)"):
        train(cnnc.compile(text), data, data, quiet(epochs=3, checkpoint=checkpoint),
              report=lambda _: None)
    assert checkpoint.read_bytes() == b"previous checkpoint"


WRITER = """
import sys, numpy as np, cnnc
from cnnc.training.loop import TrainResult, save_checkpoint
module = cnnc.compile(sys.argv[2])
rng = np.random.default_rng(0)
while True:  # until killed
    save_checkpoint(module, rng, 1, TrainResult(), sys.argv[1])
"""


def test_a_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    big = SMALL.replace("dense out: 3", "dense wide: 4000\ndense out: 3")
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), big])
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    module = cnnc.compile(big)
    train(module, synthetic(8, 0), synthetic(8, 1), quiet(epochs=2, resume=path),
          report=lambda _: None)  # loads the checkpoint, then trains epoch 2


def test_train_and_eval_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = synthetic(80, 5)
    np.savez(tmp_path / "d.npz", x=data.x, y=data.y)
    (tmp_path / "small.cnn").write_text(SMALL)
    assert main(["train", "small.cnn", "--data", "d.npz", "--epochs", "2", "--batch", "16",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "training small on cpu: sgd lr=0.1 momentum=0.9, batch 16, 2 epochs, 64 samples" in out
    assert "epoch 2/2: training loss" in out and (tmp_path / "small.weights.npz").exists()
    assert main(["eval", "small.cnn", "--weights", "small.weights.npz", "--data", "d.npz"]) == 0
    assert "small on 16 held-out samples (--val-split 0.2 with seed 4 of the 80 in d.npz" in \
        capsys.readouterr().out  # the 16 train held out (the train line's seed 4)
    assert main(["eval", "small.cnn", "--weights", "small.weights.npz", "--data", "d.npz",
                 "--split", "all"]) == 0
    assert "small on 80 samples (all of d.npz): loss" in capsys.readouterr().out
    assert main(["compile", "small.cnn", "-O1"]) == 0  # a module file trains the same way
    assert main(["train", "small.cnnm", "--data", "d.npz", "--epochs", "1", "--out", "m.npz",
                 "--no-progress"]) == 0
    assert (tmp_path / "m.npz").exists() and "epoch 1/1" in capsys.readouterr().out
    assert main(["eval", "small.cnnm", "--weights", "m.npz", "--data", "d.npz"]) == 0
    assert main(["train", "small.cnn", "--data", "d.npz", "--batch", "8", "--max-iter", "3",
                 "--no-progress"]) == 0
    assert "stopped early: max_iter reached after 3 steps" in capsys.readouterr().out
    assert main(["train", "small.cnn", "--data", "d.npz", "--batch", "0"]) == 1
    assert "--batch expects an integer from 1 to 2,147,483,647, got 0" in capsys.readouterr().err
    assert main(["train", "small.cnn", "--data", "absent.npz"]) == 1
    assert "no data at absent.npz" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3, 6, 6)), y=np.zeros(4, int))
    assert main(["train", "small.cnn", "--data", "wrong.npz", "--no-progress"]) == 1
    assert "samples have shape (3, 6, 6), but network small takes (1, 6, 6)" in \
        capsys.readouterr().err


def test_check_grad_command(capsys, tmp_path):
    small = tmp_path / "small.cnn"
    small.write_text("network s\ninput: 1x6x6\nconv c1: 2 3x3 -> relu\nmaxpool 2x2\n"
                     "dense d: 3 -> softmax\nloss cross_entropy\n")
    assert main(["check", "--grad", str(small)]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 parameters within 1e-06" in out and "c1.weight" in out
    assert main(["check", "--grad", "--tolerance", "1e-30", str(EXAMPLES / "mlp.cnn")]) == 1


@pytest.mark.slow  # 20 s: every one of LeNet-5's parameters
def test_check_grad_command_on_lenet(capsys):
    assert main(["check", "--grad", str(EXAMPLES / "lenet.cnn")]) == 0
    out = capsys.readouterr().out
    assert "10 of 10 parameters within 1e-06" in out and "c1.weight" in out


@pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist is not here")
def test_lenet_reaches_97_percent_on_mnist_within_5_epochs():
    digits = load_mnist_split(MNIST, "test")
    training = Dataset(digits.x[:8000], digits.y[:8000])
    held_out = Dataset(digits.x[8000:], digits.y[8000:])
    module = cnnc.compile(EXAMPLES / "lenet.cnn")
    accuracies = []
    for epoch in range(1, 6):
        result = train(module, training, held_out,
                       TrainOptions(epochs=1, batch=64, seed=epoch, progress=False),
                       report=lambda _: None)
        accuracies.append(result.history[-1].accuracy)
        if accuracies[-1] >= 0.97:
            break
    assert max(accuracies) >= 0.97, accuracies


def test_bad_data_checkpoints_and_options_are_user_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.cnn").write_text(SMALL)
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 1, 6, 6)), y=np.zeros(0, int))
    np.savez(tmp_path / "scalar.npz", x=np.array(1.0), y=np.array(2))
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 1, 6, 6)), y=np.zeros(1, int))
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04" + b"junk" * 10)
    (tmp_path / "ckpt.npz").write_bytes(b"PK\x03\x04 not a checkpoint")
    data = synthetic(16, 0)
    np.savez(tmp_path / "d.npz", x=data.x, y=data.y)
    cases = [
        (["--data", "empty.npz"], "too few to hold some out"),
        (["--data", "scalar.npz"], "x must hold samples along its first axis"),
        (["--data", "one.npz"], "1 samples are too few"),
        (["--data", "zip.npz"], "cannot read zip.npz"),
        (["--data", "d.npz", "--resume", "ckpt.npz"], "cannot resume from ckpt.npz"),
        (["--data", "d.npz", "--seed", "-1"], "--seed expects an integer from 0 to 2**63 - 1"),
        (["--data", "d.npz", "--lr", "nan"], "--lr expects a finite number above 0, got nan"),
        (["--data", "d.npz", "--max-iter", "0"], "--max-iter expects an integer from 1"),
        (["--data", "d.npz", "--epochs", "0"], "--epochs expects an integer from 1"),
        (["--data", "d.npz", "--tol", "-1"], "--tol expects a finite number of at least 0"),
        (["--data", "d.npz", "--val-split", "1"], "--val-split expects a number between 0 and"),
    ]
    for extra, message in cases:
        assert main(["train", "small.cnn", "--no-progress", *extra]) == 1, extra
        assert message in capsys.readouterr().err, extra
    (tmp_path / "file").write_text("x")
    assert main(["download", str(tmp_path / "file" / "sub")]) == 1
    assert "cannot make the folder" in capsys.readouterr().err
