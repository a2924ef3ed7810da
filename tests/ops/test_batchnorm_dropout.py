"""Batch norm and dropout against torch: inference with running statistics (folded into the
convolution in front, or alone), training with the batch's, the running statistics after
train steps, gradients; dropout's keep rate, scale and reproducibility."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import cnnc

torch = pytest.importorskip("torch")

PROGRAM = """network bnnet
input image: 2x5x5
conv c1: 3 3x3 pad=1 bias=false
batchnorm bn1 -> relu
conv c2: 3 3x3 pad=1
batchnorm bn2 eps=1e-3 momentum=0.2
add s: bn2, bn1 -> relu
maxpool 2x2
batchnorm bn3
flatten
dense out: 4
batchnorm bn4
loss mse
train sgd lr=0.1 momentum=0.9
"""


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(3)
        self.c2 = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.2)
        self.bn3 = torch.nn.BatchNorm2d(3)
        self.out = torch.nn.Linear(12, 4)
        self.bn4 = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        a = torch.relu(self.bn1(self.c1(x)))
        s = torch.relu(self.bn2(self.c2(a)) + a)
        p = self.bn3(torch.nn.functional.max_pool2d(s, 2))
        return self.bn4(self.out(p.flatten(1)))


@functools.cache
def _module_file(dtype: str):
    """Compiled once a dtype: each test gets a fresh module of the same file."""
    return cnnc.compile(PROGRAM, dtype=dtype)._file


def _pair(dtype: str = "f64", seed: int = 0):
    torch.manual_seed(seed)
    net = TorchNet().double() if dtype == "f64" else TorchNet()
    rng = np.random.default_rng(seed)
    with torch.no_grad():  # running statistics and affine parameters away from 0 and 1
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.5, module.num_features)))
                module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, module.num_features)))
                module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, module.num_features)))
                module.bias.copy_(torch.from_numpy(rng.normal(0, 0.3, module.num_features)))
    m = cnnc.Module(_module_file(dtype))
    m.set_params(net.state_dict())
    return net, m


def _data(dtype, batch: int = 6, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 2, 5, 5)).astype(dtype)
    y = rng.standard_normal((batch, 4)).astype(dtype)
    return x, y


def test_parameter_and_buffer_names_are_torchs():
    net, m = _pair()
    assert set(m.params) == {name for name, _ in net.named_parameters()}
    assert set(m.params) | set(m.buffers) == set(net.state_dict())


@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_inference_uses_running_statistics(dtype):
    net, m = _pair(dtype)
    x, _ = _data(np.float64 if dtype == "f64" else np.float32)
    net.eval()
    want = net(torch.from_numpy(x)).detach().numpy()
    tol = 1e-10 if dtype == "f64" else 2e-5
    np.testing.assert_allclose(m.forward(x), want, rtol=tol, atol=tol)


def test_training_forward_and_loss_use_batch_statistics_and_change_nothing():
    net, m = _pair()
    x, y = _data(np.float64)
    before = m.buffers
    net.train()
    want = net(torch.from_numpy(x))
    np.testing.assert_allclose(m.forward(x, training=True), want.detach().numpy(),
                               rtol=1e-10, atol=1e-10)
    loss = torch.nn.functional.mse_loss(want, torch.from_numpy(y))
    assert m.loss(x, y, training=True) == pytest.approx(float(loss.detach()), rel=1e-10)
    for name, value in m.buffers.items():
        np.testing.assert_array_equal(value, before[name])


def test_gradients_are_torchs_in_training_mode():
    net, m = _pair()
    x, y = _data(np.float64)
    net.train()
    loss = torch.nn.functional.mse_loss(net(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    got = m.gradients(x, y)
    for name, parameter in net.named_parameters():
        np.testing.assert_allclose(got[name], parameter.grad.numpy(), rtol=1e-8, atol=1e-10,
                                   err_msg=name)
    # input gradient too
    xt = torch.from_numpy(x).requires_grad_(True)
    torch.nn.functional.mse_loss(net(xt), torch.from_numpy(y)).backward()
    np.testing.assert_allclose(m.input_gradient(x, y), xt.grad.numpy(), rtol=1e-8, atol=1e-10)


def test_running_statistics_after_three_train_steps():
    net, m = _pair()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    for step in range(3):
        x, y = _data(np.float64, seed=10 + step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
        m.train_step(x, y)
    state = net.state_dict()
    for name, value in m.buffers.items():
        np.testing.assert_allclose(value, state[name].numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    for name, value in m.params.items():
        np.testing.assert_allclose(value, state[name].numpy(), rtol=1e-8, atol=1e-10,
                                   err_msg=name)
    assert int(m.buffers["bn1.num_batches_tracked"]) == 3


def test_running_statistics_by_hand():
    """One batch norm over a vector: the update is (1 − m)·r + m·batch, variance unbiased."""
    m = cnnc.compile("network v\ninput x: 3\nbatchnorm b momentum=0.25\nloss mse\n"
                     "train sgd lr=0.01\n", dtype="f64")
    rng = np.random.default_rng(3)
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = rng.standard_normal((5, 3)) * 2 + 1
        m.train_step(x, np.zeros((5, 3)))
        mean = 0.75 * mean + 0.25 * x.mean(axis=0)
        var = 0.75 * var + 0.25 * x.var(axis=0, ddof=1)
    np.testing.assert_allclose(m.buffers["b.running_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(m.buffers["b.running_var"], var, rtol=1e-12)


def test_batch_statistics_are_the_whole_batchs_for_any_thread_count():
    _, m = _pair("f64")
    x, y = _data(np.float64, batch=16)
    m.set_threads(1)
    one = m.gradients(x, y)
    m.set_threads(4)
    four = m.gradients(x, y)
    for name in one:
        np.testing.assert_array_equal(one[name], four[name])


def test_folded_inference_kernels():
    """At inference each batch norm after a conv or dense is folded into its weights."""
    from cnnc.diagnostics import Source
    from cnnc.driver.pipeline import Options, Stage, run

    build = run(Source(PROGRAM), Options(), until=Stage.FUSE)
    inference = build.kernels.inference
    assert [k for k in inference if "batchnorm_fold" in k] == \
        ["bn1_batchnorm_fold_infer", "bn2_batchnorm_fold_infer", "bn4_batchnorm_fold_infer"]
    assert "bn3_batchnorm_infer" in inference  # after a pool: normalized alone


def test_save_and_load_weights_keep_buffers(tmp_path):
    net, m = _pair()
    m.save_weights(tmp_path / "w.npz")
    other = cnnc.Module(_module_file("f64"))
    other.load_weights(tmp_path / "w.npz")
    for name, value in m.buffers.items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(other.buffers[name], value)
    x, _ = _data(np.float64)
    np.testing.assert_array_equal(other.forward(x), m.forward(x))
    net.load_state_dict({name: torch.from_numpy(np.array(v))
                         for name, v in {**m.params, **m.buffers}.items()})


# -- dropout -----------------------------------------------------------------------------

DROPOUT = """network d
input x: 4000
dropout 0.3
loss mse
train sgd lr=0.1 seed=7
"""


def test_dropout_keep_rate_and_scale():
    m = cnnc.compile(DROPOUT, dtype="f64")
    x = np.ones((5, 4000))
    y = m.forward(x, training=True)
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01  # 20,000 draws: 4 standard deviations
    np.testing.assert_allclose(y[kept], 1 / 0.7)
    np.testing.assert_array_equal(m.forward(x), x)  # identity at inference


def test_dropout_mask_is_reproducible_and_advances_only_with_train_step():
    m = cnnc.compile(DROPOUT, dtype="f64")
    x = np.ones((8, 4000))
    first = m.forward(x, training=True)
    np.testing.assert_array_equal(m.forward(x, training=True), first)
    grads = m.input_gradient(x, np.zeros((8, 4000)))
    np.testing.assert_array_equal(grads != 0, first != 0)  # the same mask
    m.set_threads(1)
    one = m.forward(x, training=True)
    m.set_threads(4)
    np.testing.assert_array_equal(m.forward(x, training=True), one)
    m.train_step(x, np.zeros((8, 4000)))
    assert (m.forward(x, training=True) != first).any()
    again = cnnc.compile(DROPOUT, dtype="f64")
    np.testing.assert_array_equal(again.forward(x, training=True), first)


def test_dropout_rate_errors():
    with pytest.raises(cnnc.CnncError, match="dropout rate must be a number from 0 up to"):
        cnnc.compile("network d\ninput x: 4\ndropout 1.5\n")


# -- on the GPU target (Numba's simulator without a GPU) ---------------------------------------

SMALL = """network small
input image: 2x3x3
conv c1: 2 2x2 bias=false
batchnorm bn1 -> relu
dropout 0.4
flatten
batchnorm bn2
dense out: 3
loss mse
train sgd lr=0.1
"""


def test_cuda_batch_norm_and_dropout_match_the_cpu():
    """The same module file semantics on the GPU target: inference, a training forward with
    the same dropout mask, gradients, and the running statistics after two train steps."""
    pytest.importorskip("numba.cuda", reason="numba is not installed")
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA GPU and no simulator (NUMBA_ENABLE_CUDASIM=1)")
    cpu = cnnc.compile(SMALL, dtype="f64")
    gpu = cnnc.compile(SMALL, dtype="f64", target="cuda")
    gpu.set_params({**cpu.params, **cpu.buffers})
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 2, 3, 3)), rng.standard_normal((5, 3))
    np.testing.assert_allclose(gpu.forward(x), cpu.forward(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gpu.forward(x, training=True), cpu.forward(x, training=True),
                               rtol=1e-12, atol=1e-12)
    on_gpu = gpu.gradients(x, y)
    for name, value in cpu.gradients(x, y).items():
        np.testing.assert_allclose(on_gpu[name], value, rtol=1e-10, atol=1e-12)
    for _ in range(2):
        cpu.train_step(x, y)
        gpu.train_step(x, y)
    for name, value in cpu.buffers.items():
        np.testing.assert_allclose(gpu.buffers[name], value, rtol=1e-10, atol=1e-12)


def test_check_grad_differentiates_the_training_loss(tmp_path, capsys):
    """`cnnc check --grad` compares gradients with finite differences of the loss they are
    the gradients of: a training call's (batch statistics, the next dropout mask)."""
    from cnnc.cli.main import main

    path = tmp_path / "g.cnn"
    path.write_text("network g\ninput x: 2x4x4\nconv c: 3 3x3 bias=false\nbatchnorm b -> relu\n"
                    "dropout 0.3\nflatten\ndense d: 3\nloss cross_entropy\n")
    assert main(["check", "--grad", str(path)]) == 0
    assert "5 of 5 parameters within" in capsys.readouterr().out
