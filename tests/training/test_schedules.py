"""The learning-rate schedules (training.schedule): against values worked out by hand and
torch.optim.lr_scheduler stepped as its documentation says, and the training loop's use of
them: each step gets its iteration's rate, one process or several."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import cnnc
from cnnc.frontend.options import TRAINING_OPTIONS
from cnnc.training import schedule
from cnnc.training.data import Dataset
from cnnc.training.loop import Solo, TrainOptions, train
from cnnc.training.schedule import describe, learning_rate
from conftest import run_cli


def rates(settings: dict, per_epoch: int, epochs: int, **given) -> list[float]:
    return [learning_rate(settings, t, per_epoch, epochs, **given)
            for t in range(per_epoch * epochs)]


def torch_rates(make, iterations: int, base: float) -> list[float]:
    """The rate torch's scheduler gives each iteration, stepped once after each."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = make(optimizer)
    found = []
    with warnings.catch_warnings():  # step() before optimizer.step(): no real training here
        warnings.simplefilter("ignore")
        for _ in range(iterations):
            found.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
    return found


def test_constant_is_the_base_rate_or_the_one_given():
    assert rates({"lr": 0.05}, 3, 2) == [0.05] * 6
    assert rates({"lr": 0.05, "schedule": "constant"}, 2, 2, lr=0.2) == [0.2] * 4


def test_step_by_hand_and_as_torch_steplr_each_epoch():
    settings = {"lr": 0.1, "schedule": "step", "step_size": 2, "gamma": 0.5}
    got = rates(settings, 3, 6)  # 3 iterations an epoch: the rate holds for an epoch
    by_hand = [0.1] * 6 + [0.05] * 6 + [0.025] * 6
    np.testing.assert_allclose(got, by_hand, rtol=1e-15)
    per_epoch = torch_rates(lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5), 6, 0.1)
    np.testing.assert_allclose(got[::3], per_epoch, rtol=1e-15)


def test_cosine_by_hand_and_as_torch_cosine_annealing_each_iteration():
    got = rates({"lr": 1.0, "schedule": "cosine"}, 2, 2)  # T = 4 iterations
    by_hand = [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(math.pi / 4)) / 2]
    np.testing.assert_allclose(got, by_hand, rtol=1e-15)
    got = rates({"lr": 0.3, "schedule": "cosine"}, 7, 5)
    expected = torch_rates(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=35, eta_min=0), 35, 0.3)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert 0 < got[-1] < 0.3 * 0.01  # towards 0 over the whole run, not past it


def test_cosine_anneals_over_max_iter_where_the_run_ends_sooner():
    got = [learning_rate({"lr": 1.0, "schedule": "cosine"}, t, 10, 100, max_iter=4)
           for t in range(4)]
    np.testing.assert_allclose(got, rates({"lr": 1.0, "schedule": "cosine"}, 2, 2),
                               rtol=1e-15)


def test_warmup_by_hand_then_the_schedule_from_its_own_start():
    """1 epoch of 4 iterations: α/4, α/2, 3α/4, α; then cosine over the other 8."""
    settings = {"lr": 0.4, "schedule": "cosine", "warmup": 1}
    got = rates(settings, 4, 3)
    np.testing.assert_allclose(got[:4], [0.1, 0.2, 0.3, 0.4], rtol=1e-15)
    np.testing.assert_allclose(got[4:], rates({"lr": 0.4, "schedule": "cosine"}, 4, 2),
                               rtol=1e-15)
    assert rates({"lr": 1.0, "warmup": 2}, 1, 4) == [0.5, 1.0, 1.0, 1.0]


def test_warmup_then_cosine_as_torch_linear_then_cosine_in_sequence():
    per_epoch, epochs, warmup, base = 5, 6, 2, 0.2
    warm = warmup * per_epoch

    def make(optimizer):
        lr = torch.optim.lr_scheduler
        return lr.SequentialLR(optimizer, [
            lr.LinearLR(optimizer, start_factor=1 / warm, end_factor=1.0, total_iters=warm - 1),
            lr.CosineAnnealingLR(optimizer, T_max=per_epoch * epochs - warm)],
            milestones=[warm])

    got = rates({"lr": base, "schedule": "cosine", "warmup": warmup}, per_epoch, epochs)
    np.testing.assert_allclose(got, torch_rates(make, per_epoch * epochs, base), rtol=1e-12)


def test_warmup_then_step_as_torch_linear_then_steplr_in_sequence():
    """StepLR stepped each iteration with step_size·B iterations is the per-epoch one."""
    per_epoch, epochs, warmup, base = 3, 7, 1, 0.5

    def make(optimizer):
        lr = torch.optim.lr_scheduler
        return lr.SequentialLR(optimizer, [
            lr.LinearLR(optimizer, start_factor=1 / 3, end_factor=1.0, total_iters=2),
            lr.StepLR(optimizer, step_size=2 * per_epoch, gamma=0.1)], milestones=[3])

    settings = {"lr": base, "schedule": "step", "step_size": 2, "gamma": 0.1, "warmup": warmup}
    np.testing.assert_allclose(rates(settings, per_epoch, epochs),
                               torch_rates(make, per_epoch * epochs, base), rtol=1e-12)


def test_a_step_schedule_never_reaches_a_rate_of_zero():
    rate = learning_rate({"lr": 1.0, "schedule": "step", "step_size": 1, "gamma": 1e-10},
                         400, 1, 500)
    assert 0 < rate <= schedule.SMALLEST_RATE


def test_the_defaults_are_the_languages_and_are_described():
    for key, default in schedule.DEFAULTS.items():
        assert TRAINING_OPTIONS[key].default == default, key
    assert describe({"lr": 0.1}) == ""
    assert describe({"schedule": "cosine", "warmup": 2}) == \
        "cosine schedule after 2 warm-up epochs"
    assert describe({"schedule": "step", "step_size": 5, "gamma": 0.5}) == \
        "step schedule (x0.5 every 5 epochs)"
    assert describe({"warmup": 1}) == "constant rate after 1 warm-up epoch"


NET = ("network t\ninput x: 3 dtype=f64\ndense out: 2 -> softmax\nloss cross_entropy\n"
       "train sgd lr=0.4 schedule=cosine warmup=1 epochs=3 batch=4\n")


class Recording(Solo):
    """One process, keeping the rate each step was given."""

    def __init__(self) -> None:
        self.given: list[float] = []

    def step(self, module, x, y, lr):
        self.given.append(lr)
        return super().step(module, x, y, lr)


@pytest.fixture(scope="module")
def data() -> Dataset:
    rng = np.random.default_rng(3)
    return Dataset(rng.standard_normal((10, 3)), rng.integers(0, 2, 10))


def test_the_loop_gives_each_step_its_iterations_rate(data):
    """10 samples in batches of 4: 3 iterations an epoch, 9 in all; the epoch's record and
    line carry its last step's rate."""
    module, team, lines = cnnc.compile(NET, threads=1), Recording(), []
    result = train(module, data, data, TrainOptions(epochs=3, batch=4, progress=False),
                   report=lines.append, team=team)
    expected = [0.4 / 3, 0.8 / 3, 0.4] + [0.4 * (1 + math.cos(math.pi * t / 6)) / 2
                                          for t in range(6)]
    np.testing.assert_allclose(team.given, expected, rtol=1e-15)
    assert [entry.lr for entry in result.history] == [team.given[i] for i in (2, 5, 8)]
    assert ", lr 0.4 (" in lines[0] and ", lr 0.02679 (" in lines[2]


def test_the_rate_given_to_the_run_is_the_schedules_base(data):
    module, team = cnnc.compile(NET, threads=1), Recording()
    train(module, data, None, TrainOptions(epochs=3, batch=4, lr=0.04, progress=False,
                                           max_iter=3), report=lambda _: None, team=team)
    np.testing.assert_allclose(team.given, [0.04 / 3, 0.08 / 3, 0.04], rtol=1e-15)


def test_parameters_follow_the_schedule_as_steps_with_those_rates(data):
    """The whole run equals steps taken by hand with the schedule's rates: the rate reaches
    the update, not just the record."""
    trained, by_hand = cnnc.compile(NET, threads=1), cnnc.compile(NET, threads=1)
    train(trained, data, None, TrainOptions(epochs=3, batch=4, progress=False),
          report=lambda _: None)
    rng = np.random.default_rng(0)  # the loop's data order: TrainOptions.seed
    for epoch in range(3):
        order = rng.permutation(10)
        for position, start in enumerate(range(0, 10, 4)):
            mine = order[start:start + 4]
            by_hand.train_step(data.x[mine], data.y[mine],
                               lr=learning_rate(by_hand.optimizer, epoch * 3 + position, 3, 3))
    for name, value in by_hand.params.items():
        np.testing.assert_array_equal(trained.params[name], value, err_msg=name)


MPIRUN = shutil.which("mpirun") or shutil.which("mpirun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or MPIRUN is None,
                    reason="needs mpi4py and mpirun: pip install 'cnnc[mpi]'")
def test_two_mpi_ranks_follow_the_schedule_of_one_process(tmp_path, capsys):
    """2 ranks of batch 2 see each step the samples one process of batch 4 sees, and must
    take them with the same rates to end with the same parameters."""
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((30, 3)), y=rng.integers(0, 2, 30))
    (tmp_path / "t.cnn").write_text(NET.replace("sgd lr=0.4", "sgd lr=0.4 momentum=0.9"))
    command = [sys.executable, "-m", "cnnc", "train", "t.cnn", "--data", "d.npz",
               "--no-progress"]
    run = subprocess.run([MPIRUN, "-n", "2", *command, "--batch", "2", "--out", "two.npz"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "CNNC_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "cosine schedule after 1 warm-up epoch" in run.stdout
    code, out, err = run_cli(capsys, "train", str(tmp_path / "t.cnn"), "--data",
                             str(tmp_path / "d.npz"), "--no-progress", "--batch", "4",
                             "--out", str(tmp_path / "one.npz"),
                             "--checkpoint", str(tmp_path / "one.ckpt.npz"))
    assert code == 0, err
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    for name in one.files:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-12, atol=1e-14, err_msg=name)
    def rates_shown(text: str) -> list[str]:  # each epoch line's rate
        return re.findall(r"^epoch \d/3: .*, lr ([0-9.e-]+) \(", text, re.MULTILINE)

    assert len(rates_shown(out)) == 3 and rates_shown(run.stdout) == rates_shown(out)
