"""The Python training API: fit and evaluate on the loop of `cnnc train`, summary from the
manifest, read-only params."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cnnc
from cnnc.training.data import Dataset, hold_out
from cnnc.training.loop import TrainOptions, train
from conftest import EXAMPLES

SMALL = ("network small\ninput: 1x6x6\nconv c: 3 3x3 -> relu\nmaxpool 2x2\n"
         "dense out: 3 -> softmax\nloss cross_entropy\n"
         "train sgd lr=0.1 momentum=0.9 seed=4 batch=8 epochs=3\n")


def synthetic(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, count)
    x = rng.standard_normal((count, 1, 6, 6)).astype(np.float32) * 0.3
    x[np.arange(count), 0, y, y] += 2.0  # a learnable signal
    return x, y


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "small.cnnm"
    cnnc.compile(SMALL, opt_level=1).save(path)
    return path


def fresh(path) -> cnnc.Module:
    return cnnc.load(path)


def test_fit_is_the_training_loop_of_cnnc_train(small_file):
    """fit with validation= gives what train() gives with the same data and options."""
    x, y = synthetic(64, 0)
    xv, yv = synthetic(16, 1)
    fitted = fresh(small_file)
    history = fitted.fit(x, y, validation=(xv, yv))
    looped = fresh(small_file)
    expected = train(looped, Dataset(x, y), Dataset(xv, yv),
                     TrainOptions(epochs=3, batch=8, seed=4, progress=False),
                     report=lambda _: None)
    assert [e.epoch for e in history.history] == [1, 2, 3] and history.steps == 24
    for got, want in zip(history.history, expected.history, strict=True):
        assert (got.loss, got.held_out_loss, got.accuracy) == \
            (want.loss, want.held_out_loss, want.accuracy)
    for name, value in looped.params.items():
        np.testing.assert_array_equal(fitted.params[name], value, err_msg=name)
    assert history.metrics["accuracy"] == [e.accuracy for e in expected.history]
    assert history.history[-1].accuracy > 0.6  # it learned


def test_fit_val_split_holds_out_like_the_cli(small_file):
    x, y = synthetic(80, 2)
    module = fresh(small_file)
    history = module.fit(x, y, epochs=1, val_split=0.25, seed=7)
    trained, held = hold_out(Dataset(x, y), 0.25, 7)
    loss, accuracy = module.evaluate(held.x, held.y).values()
    assert history.history[0].held_out_loss == pytest.approx(loss, rel=1e-6)
    assert history.history[0].accuracy == accuracy
    assert history.steps == -(-len(trained) // 8)


def test_fit_without_validation_callbacks_checkpoint_and_log(small_file, tmp_path):
    x, y = synthetic(40, 3)
    seen = []

    def stop_after_two(entry):
        seen.append(entry.epoch)
        return entry.epoch == 2

    module = fresh(small_file)
    history = module.fit(x, y, epochs=5, callbacks=[stop_after_two],
                         checkpoint=tmp_path / "c.npz", log=tmp_path / "m.jsonl")
    assert seen == [1, 2] and history.stopped == "callback"
    assert history.history[0].held_out_loss is None and history.history[0].accuracy is None
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[1]["loss"] == history.history[1].loss and lines[1]["steps"] == 10
    resumed = fresh(small_file)
    more = resumed.fit(x, y, epochs=3, resume=tmp_path / "c.npz")
    assert [e.epoch for e in more.history] == [1, 2, 3]


def test_keras_style_callback_objects_get_epoch_and_logs(small_file):
    class Recorder:
        def __init__(self):
            self.calls = []

        def on_epoch_end(self, epoch, logs):
            self.calls.append((epoch, sorted(logs)))

    recorder = Recorder()
    x, y = synthetic(16, 4)
    fresh(small_file).fit(x, y, epochs=2, callbacks=[recorder])
    assert [c[0] for c in recorder.calls] == [1, 2]
    assert "loss" in recorder.calls[0][1] and "held_out_loss" in recorder.calls[0][1]


@pytest.mark.parametrize("arguments, message", [
    ({"epochs": 0}, "epochs must be from 1"),
    ({"batch": 2.5}, "batch must be a whole number"),
    ({"val_split": 1.0}, "val_split must be a number between 0 and 1"),
    ({"validation": ([1], [2], [3])}, "validation must be a pair"),
    ({"val_split": 0.2, "validation": (np.zeros((1, 1, 6, 6)), [0])}, "not both"),
    ({"seed": -1}, "seed must be a whole number"),
    ({"callbacks": [3]}, "a callback must be callable"),
    ({"checkpoint": 5}, "a file must be given as a path"),
])
def test_fit_arguments_are_checked(small_file, arguments, message):
    x, y = synthetic(16, 5)
    with pytest.raises(cnnc.CnncError, match=message):
        fresh(small_file).fit(x, y, **arguments)


def test_fit_checks_every_label_before_the_first_step(small_file):
    x, y = synthetic(16, 6)
    y[-1] = 7  # out of range, and last
    module = fresh(small_file)
    before = module.params
    with pytest.raises(cnnc.CnncError, match=r"y holds the label 7, outside the classes 0\.\.2"):
        module.fit(x, y)
    for name, value in before.items():
        np.testing.assert_array_equal(module.params[name], value)


def test_evaluate_against_numpy(small_file):
    x, y = synthetic(30, 7)
    module = fresh(small_file)
    result = module.evaluate(x, y, batch=7)
    probabilities = module(x)
    assert result["accuracy"] == float(np.mean(probabilities.argmax(axis=1) == y))
    expected = -np.mean(np.log(probabilities[np.arange(30), y].astype(np.float64)))
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    mse = cnnc.compile("network r\ninput: 3\ndense out: 2\nloss mse\n", opt_level=1)
    xs, ts = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)
    assert set(mse.evaluate(xs, ts)) == {"loss"}


def test_summary_of_a_module_is_the_programs(tmp_path):
    from cnnc.artifact.summary import format_table
    from cnnc.passes.summary import summarize

    module = cnnc.compile(EXAMPLES / "lenet.cnn", opt_level=1)
    summary = module.summary()
    assert str(summary) == format_table(summarize(cnnc.check(EXAMPLES / "lenet.cnn")))
    assert repr(summary) == str(summary)
    assert summary.total_params == sum(v.size for v in module.params.values()) == 61_706
    assert summary.trainable_params == 61_706
    assert sum(r.param_bytes for r in summary.rows) == 61_706 * 4
    c1 = next(r for r in summary.rows if r.name == "c1")
    assert c1.activation_bytes == 6 * 28 * 28 * 4


def test_cnnc_summary_of_a_module_file_equals_the_programs(tmp_path, capsys):
    from cnnc.cli.main import main

    path = tmp_path / "mlp.cnnm"
    cnnc.compile(EXAMPLES / "mlp.cnn", opt_level=1).save(path)
    assert main(["summary", str(EXAMPLES / "mlp.cnn")]) == 0
    from_program = capsys.readouterr().out
    assert main(["summary", str(path)]) == 0
    assert capsys.readouterr().out == from_program
    assert main(["summary", "--json", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_params"] == data["trainable_params"] == \
        sum(r["params"] for r in data["layers"])
    assert data["param_bytes"] == 4 * data["total_params"]


def test_params_are_read_only_copies():
    module = cnnc.compile(SMALL, opt_level=1)
    params = module.params
    with pytest.raises(ValueError, match="read-only"):
        params["c.weight"][:] = 0
    changed = {name: value + 1 for name, value in params.items()}  # arithmetic still works
    module.set_params(changed)
    np.testing.assert_array_equal(module.params["c.bias"], params["c.bias"] + 1)
