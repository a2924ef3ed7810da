"""A cuda module is a `Module` with the GPU's engine: the same attributes and methods as a CPU
module, each giving what the CPU module gives. Runs in Numba's CUDA simulator without a GPU
(tests/conftest.py), on a network small enough for it."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from numerics import assert_close

import cnnc

cuda = pytest.importorskip("numba.cuda", reason="numba is not installed")
if not cuda.is_available():
    pytest.skip("no CUDA GPU and no simulator (NUMBA_ENABLE_CUDASIM=1)", allow_module_level=True)

from cnnc.runtime.cuda import CudaModule  # noqa: E402  (numba is there)

TEXT = ("network t\ninput: 1x5x5\nconv c: 2 3x3 -> relu\nmaxpool 2x2 stride=1\nflatten\n"
        "dense d: 3 -> softmax\nloss cross_entropy\ntrain sgd lr=0.1 momentum=0.9\n")


@pytest.fixture(scope="module")
def pair() -> tuple[cnnc.Module, cnnc.Module]:
    gpu, cpu = cnnc.compile(TEXT, target="cuda"), cnnc.compile(TEXT, threads=1)
    cpu.set_params(gpu.params)
    return gpu, cpu


def test_a_gpu_module_has_every_attribute_of_a_cpu_module(pair):
    gpu, cpu = pair
    assert isinstance(gpu, CudaModule) and isinstance(gpu, cnnc.Module)
    assert not isinstance(cpu, CudaModule)
    # one construction path: the instance's own fields are the same on both
    assert set(vars(gpu)) == set(vars(cpu))
    public = {name for name in dir(cpu) if not name.startswith("_")}
    assert public <= set(dir(gpu))
    for name in ("name", "input_shape", "output_shape", "dtype", "optimizer"):
        assert getattr(gpu, name) == getattr(cpu, name), name
    assert (gpu.target, cpu.target) == ("cuda", "cpu")
    # the buffers that share memory are the CPU runtime's (driver.memory)
    assert gpu.manifest.keys() == cpu.manifest.keys() - {"shared"}
    assert gpu.threads == 1
    gpu.set_threads(4)  # host threads do not apply to the GPU
    assert gpu.threads == 1
    assert repr(gpu) == repr(cpu).replace("t:", "t (cuda):")
    assert str(gpu.summary()) == str(cpu.summary())


def test_every_call_gives_what_the_cpu_module_gives(pair, tmp_path):
    gpu, cpu = pair
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 1, 5, 5)).astype(np.float32)
    y = rng.integers(0, 3, 4)
    for name in ("forward", "__call__", "input_gradient"):
        args = (x,) if name != "input_gradient" else (x, y)
        assert_close(getattr(gpu, name)(*args), getattr(cpu, name)(*args), np.float32, name)
    gpu_activations = gpu.activations(x)  # once: each call runs the whole network
    for name, value in cpu.activations(x).items():
        assert_close(gpu_activations[name], value, np.float32, name)
    assert gpu.loss(x, y) == pytest.approx(cpu.loss(x, y), rel=1e-5)
    gradients, loss = gpu.gradients_and_loss(x, y)
    assert loss == pytest.approx(cpu.loss(x, y), rel=1e-5)
    gpu_gradients = gpu.gradients(x, y)
    for name, value in cpu.gradients(x, y).items():
        assert_close(gradients[name], value, np.float32, name)
        assert_close(gpu_gradients[name], value, np.float32, name)
    assert gpu.train_step(x, y) == pytest.approx(cpu.train_step(x, y), rel=1e-5)
    gpu.apply_gradients(cpu.gradients(x, y), lr=0.05)
    cpu.apply_gradients(cpu.gradients(x, y), lr=0.05)
    for name, value in cpu.params.items():
        assert_close(gpu.params[name], value, np.float32, name)
    state = cpu.optimizer_state()
    assert int(gpu.optimizer_state()["optimizer.step"]) == int(state["optimizer.step"]) == 2
    gpu.set_optimizer_state(state)
    for name, value in state.items():
        np.testing.assert_allclose(gpu.optimizer_state()[name], value, rtol=1e-6, err_msg=name)
    with pytest.raises(cnnc.CnncRuntimeError, match="label 9"):
        gpu.loss(x, np.full(4, 9))


def test_files_and_training_from_python_on_the_gpu(pair, tmp_path):
    gpu, _ = pair
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 1, 5, 5)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    gpu.save_weights(tmp_path / "w.npz")
    gpu.set_params({name: np.zeros_like(value) for name, value in gpu.params.items()})
    gpu.load_weights(tmp_path / "w.npz")
    gpu.save(tmp_path / "m.cnnm")
    loaded = cnnc.load(tmp_path / "m.cnnm")
    assert isinstance(loaded, CudaModule)
    np.testing.assert_array_equal(loaded(x), gpu(x))
    history = gpu.fit(x, y, epochs=1, batch=3, checkpoint=tmp_path / "c.npz")
    assert history.steps == 2
    assert set(gpu.evaluate(x, y)) == {"loss", "accuracy"}


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                    reason="the simulator's launches only")
def test_simulated_launches_switch_threads_quickly_and_restore_the_interval(pair, monkeypatch):
    """While a simulated launch runs, the interpreter switches threads every 0.2 ms (its
    poll loop held the GIL 5 ms at a time); after it, the interval is the caller's again.
    Uses that overlap (nested here, as two threads' launches would) restore it only when
    the last one ends."""
    from cnnc.runtime import cuda as engine

    gpu, cpu = pair
    cpu.set_params(gpu.params)  # the tests before may have trained either
    seen = []
    real_launch_all = engine.CudaEngine._launch_all

    def spying(self, *args):
        seen.append(sys.getswitchinterval())
        return real_launch_all(self, *args)

    monkeypatch.setattr(engine.CudaEngine, "_launch_all", spying)
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        x = np.random.default_rng(3).standard_normal((2, 1, 5, 5)).astype(np.float32)
        assert_close(gpu(x), cpu(x), np.float32, "forward")
        assert seen and all(s == pytest.approx(engine.SIMULATOR_SWITCH_INTERVAL) for s in seen)
        assert sys.getswitchinterval() == pytest.approx(0.004)
        with engine._quick_thread_switches():
            with engine._quick_thread_switches():
                pass
            assert sys.getswitchinterval() == pytest.approx(engine.SIMULATOR_SWITCH_INTERVAL)
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(before)
