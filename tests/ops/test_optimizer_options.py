"""The train line's optimizer options against torch.optim: SGD with momentum, Nesterov and
weight decay, Adam with weight decay and AdamW, each run three steps on the same parameters
and gradients in a float64 module; and the words for options that do not go together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cnnc
from conftest import errors_of, run_cli

NET = ("network t\ninput x: 5 dtype=f64\ndense h: 4 -> relu\ndense out: 3 -> softmax\n"
       "loss cross_entropy\ntrain {train}\n")

# (train line, torch optimizer, its keyword arguments)
CASES = [
    ("sgd lr=0.1 weight_decay=0.05", torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.05}),
    ("sgd lr=0.1 momentum=0.9 weight_decay=0.01", torch.optim.SGD,
     {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    ("sgd lr=0.1 momentum=0.8 nesterov=true", torch.optim.SGD,
     {"lr": 0.1, "momentum": 0.8, "nesterov": True}),
    ("sgd lr=0.05 momentum=0.9 nesterov=true weight_decay=0.1", torch.optim.SGD,
     {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("adam lr=0.01 weight_decay=0.1", torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    ("adam lr=0.02 beta1=0.8 beta2=0.99 eps=1e-6 weight_decay=0.03", torch.optim.Adam,
     {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.03}),
    ("adamw lr=0.01", torch.optim.AdamW, {"lr": 0.01}),  # torch's default decay, 0.01
    ("adamw lr=0.05 beta1=0.5 weight_decay=0.2", torch.optim.AdamW,
     {"lr": 0.05, "betas": (0.5, 0.999), "weight_decay": 0.2}),
]


def _torch_copy(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64, requires_grad=True)
            for name, value in params.items()}


def _assert_same(module: cnnc.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, value in expected.items():
        np.testing.assert_allclose(module.params[name], value.detach().numpy(), rtol=1e-12,
                                   atol=1e-14, err_msg=name)


def _torch_step(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                gradients: dict[str, np.ndarray]) -> None:
    for name, tensor in params.items():
        tensor.grad = torch.tensor(gradients[name], dtype=torch.float64)
    optimizer.step()


@pytest.mark.parametrize(("line", "kind", "arguments"), CASES, ids=[c[0] for c in CASES])
def test_three_train_steps_match_torch_optim(line, kind, arguments):
    """The compiled step's own gradients, handed to torch too: the same parameters after."""
    module = cnnc.compile(NET.format(train=line), threads=1)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 5)), rng.integers(0, 3, 6)
    initial = module.params
    expected = _torch_copy(initial)
    optimizer = kind(expected.values(), **arguments)
    for _ in range(3):
        gradients = module.gradients(x, y)
        module.train_step(x, y)
        _torch_step(optimizer, expected, gradients)
    _assert_same(module, expected)
    assert not np.allclose(module.params["h.weight"], initial["h.weight"], atol=1e-3)


@pytest.mark.parametrize(("line", "kind", "arguments"), [CASES[3], CASES[5], CASES[7]],
                         ids=["sgd-nesterov", "adam", "adamw"])
def test_a_rate_given_each_step_is_the_one_the_update_uses(line, kind, arguments):
    """apply_gradients with a new lr each step (what a schedule does) against torch with its
    group's lr set before each step: AdamW's decay reads that step's rate too."""
    module = cnnc.compile(NET.format(train=line), threads=1)
    rng = np.random.default_rng(1)
    expected = _torch_copy(module.params)
    optimizer = kind(expected.values(), **arguments)
    for rate in (0.2, 0.03, 0.007):
        gradients = {name: rng.standard_normal(value.shape)
                     for name, value in module.params.items()}
        module.apply_gradients(gradients, lr=rate)
        optimizer.param_groups[0]["lr"] = rate
        _torch_step(optimizer, expected, gradients)
    _assert_same(module, expected)


def test_adamw_decays_a_parameter_whose_gradient_is_zero():
    """Decoupled: p ← p·(1 − α·λ) whatever the moments, where adam's L2 term would move it
    by the normalised step instead."""
    module = cnnc.compile(NET.format(train="adamw lr=0.1 weight_decay=0.5"), threads=1)
    before = module.params
    module.apply_gradients({name: np.zeros_like(v) for name, v in before.items()})
    for name, value in before.items():
        np.testing.assert_allclose(module.params[name], value * (1 - 0.1 * 0.5), rtol=1e-15)


def test_without_the_new_options_the_update_is_the_code_it_was(tmp_path, capsys):
    """weight_decay=0 and nesterov=false emit nothing: the loop IR of sgd is v = μ·v + g;
    p = p − α·v, reading nothing but the hyper buffer's lr and momentum."""
    def loops(train: str) -> str:
        path = tmp_path / "t.cnn"
        path.write_text(NET.format(train=train))
        code, out, err = run_cli(capsys, "compile", str(path), "--emit", "loops",
                                 "--no-schedule")
        assert code == 0, err
        return out

    text = loops("sgd lr=0.1 momentum=0.9")
    assert text == loops("sgd lr=0.1 momentum=0.9 weight_decay=0 nesterov=false")
    assert ("    h.weight.velocity[i] = (optimizer.hyper[1] * h.weight.velocity[i]) + "
            "h.weight.grad[i]\n    h.weight[i] = h.weight[i] - (optimizer.hyper[0] * "
            "h.weight.velocity[i])\n") in text
    decayed = loops("sgd lr=0.1 momentum=0.9 weight_decay=0.5")
    assert "h.weight.grad[i] + (0.5 * h.weight[i])" in decayed


def test_nesterov_without_momentum_is_refused_at_the_train_line():
    text = NET.format(train="sgd lr=0.1 nesterov=true")
    [(line, col, message)] = errors_of(text)
    assert (line, col) == (6, 1)
    assert message.startswith("train sgd: nesterov=true needs a momentum above 0")
    assert "momentum=0.9" in message


def test_bad_option_values_say_what_was_expected():
    errors = errors_of(NET.format(
        train="sgd weight_decay=-0.1 nesterov=yes schedule=cosin warmup=-1 gamma=0"))
    messages = [message for _, _, message in errors]
    assert messages == [
        "train sgd: weight_decay expects a number of at least 0, got -0.1",
        "train sgd: nesterov expects true or false, got 'yes'",
        "train sgd: schedule expects constant, step or cosine, got 'cosin'; "
        "did you mean 'cosine'?",
        "train sgd: warmup expects an integer of at least 0, got -1",
        "train sgd: gamma expects a number above 0, got 0",
    ]
    [(_, _, message)] = errors_of(NET.format(train="adamw momentum=0.9"))
    assert message.startswith("train adamw has no option 'momentum'")
    [(_, _, message)] = errors_of(NET.format(train="sgd schedule=linear"))
    assert message.endswith("got 'linear'")  # no near miss, no guess


def test_the_settings_reach_the_module_file(tmp_path):
    line = "adamw lr=0.01 schedule=step step_size=2 gamma=0.5 warmup=1"
    module = cnnc.compile(NET.format(train=line), threads=1)
    settings = module.optimizer
    assert settings["kind"] == "adamw" and settings["weight_decay"] == 0.01
    assert (settings["schedule"], settings["step_size"], settings["gamma"],
            settings["warmup"]) == ("step", 2, 0.5, 1)
    module.save(tmp_path / "t.cnnm")
    assert cnnc.load(tmp_path / "t.cnnm").optimizer == settings


@pytest.mark.parametrize("line", ["sgd lr=0.1 momentum=0.9 nesterov=true weight_decay=0.1",
                                  "adamw lr=0.05 weight_decay=0.2"])
def test_the_cuda_update_is_the_cpus(line):
    """The same loop IR through Numba CUDA (the simulator without a GPU): update kernels
    only, on given gradients."""
    cuda = pytest.importorskip("numba.cuda", reason="numba is not installed")
    if not cuda.is_available():
        pytest.skip("no CUDA GPU and no simulator (NUMBA_ENABLE_CUDASIM=1)")
    text = NET.format(train=line)
    gpu, cpu = cnnc.compile(text, target="cuda"), cnnc.compile(text, threads=1)
    cpu.set_params(gpu.params)
    rng = np.random.default_rng(2)
    for rate in (0.1, 0.02):
        gradients = {name: rng.standard_normal(value.shape) for name, value in cpu.params.items()}
        gpu.apply_gradients(gradients, lr=rate)
        cpu.apply_gradients(gradients, lr=rate)
    for name, value in cpu.params.items():
        np.testing.assert_allclose(gpu.params[name], value, rtol=1e-12, atol=1e-14, err_msg=name)
