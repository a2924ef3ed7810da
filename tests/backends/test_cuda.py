"""The CUDA backend: every kernel kind against the numpy reference, forward and backward.

Without a GPU these run in Numba's CUDA simulator (tests/conftest.py sets
NUMBA_ENABLE_CUDASIM=1 unless it is set already), on small shapes: the simulator runs each
GPU thread as a Python thread. `benchmarks/gpu_check.sh` runs them on a real GPU with
NUMBA_ENABLE_CUDASIM=0, where the tests marked `gpu` also run, on larger shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from numerics import assert_close, random_params

import cnnc
from cnnc.backends.cuda.launch import (
    BLOCK_THREADS,
    Launch,
    grid,
    launch_from_json,
    launches_to_json,
)
from cnnc.passes import reference
from cnnc.passes.autodiff import differentiate
from conftest import EXAMPLES

cuda = pytest.importorskip("numba.cuda", reason="numba is not installed")
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not cuda.is_available():
    pytest.skip("no CUDA GPU and no simulator (NUMBA_ENABLE_CUDASIM=1)", allow_module_level=True)
gpu = pytest.mark.skipif(SIMULATED, reason="needs a real NVIDIA GPU (NUMBA_ENABLE_CUDASIM=0)")


def _expected(text: str, x, y, params, dtype: str):
    graph = differentiate(cnnc.check(text, dtype=dtype))
    values = reference.run(graph, x, params, y)
    wanted = {"output": values[graph.output], "loss": values[graph.loss],
              "input gradient": values[dict(graph.gradients)[graph.input]]}
    wanted.update({name: values[g] for name, g in graph.gradients if name != graph.input})
    return wanted, values


def check_against_reference(text: str, batch: int, dtype: str = "f32") -> cnnc.Module:
    """Forward, every activation and argmax, the loss, the input gradient and every
    parameter gradient of the cuda module, against the reference interpreter."""
    numpy_dtype = np.float32 if dtype == "f32" else np.float64
    module = cnnc.compile(text, target="cuda", dtype=dtype)
    params = random_params(module)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, *module.input_shape)).astype(numpy_dtype)
    if module.manifest["loss"]["kind"] == "cross_entropy":
        y = rng.integers(0, module.output_shape[0], batch)
    else:
        y = rng.standard_normal((batch, *module.output_shape)).astype(numpy_dtype)
    want, values = _expected(text, x, y, params, dtype)
    got = {"output": module(x), "loss": np.array(module.loss(x, y)),
           "input gradient": module.input_gradient(x, y), **module.gradients(x, y)}
    for name, value in want.items():
        assert_close(got[name], np.asarray(value).reshape(got[name].shape), numpy_dtype,
                     f"{name}\n{text}")
    for name, value in module.activations(x).items():
        if not name.endswith(".argmax"):
            assert_close(value, values[name], numpy_dtype, name)
    return module


def net(shape: str, *lines: str, loss: str = "loss mse") -> str:
    return f"network k\ninput: {shape}\n" + "\n".join(lines) + f"\n{loss}\n"


@pytest.mark.parametrize("conv", [
    "conv c: 3 3x3", "conv c: 2 3x3 stride=2 pad=1 -> relu", "conv c: 2 2x3 stride=2x1 pad=1x0",
    "conv c: 3 1x1 bias=false -> tanh",
    "conv c: 2 5x5 pad=2 -> sigmoid",
])
def test_convolutions_forward_and_backward(conv):
    check_against_reference(net("2x5x4", conv, "flatten", "dense d: 2"), batch=2)


@pytest.mark.parametrize("pool", ["maxpool p: 2x2", "maxpool p: 3x3 stride=2 pad=1",
                                  "avgpool p: 2x2", "avgpool p: 3x3 stride=1 pad=1"])
def test_pooling_overlapping_and_padded_with_its_gradient(pool):
    check_against_reference(net("2x5x4", "conv c: 2 1x1", pool, "flatten", "dense d: 1"),
                            batch=2)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "softmax"])
def test_dense_activations_and_cross_entropy(activation):
    loss = "loss cross_entropy" if activation == "softmax" else "loss mse"
    check_against_reference(net("7", "dense a: 5 -> relu", f"dense b: 4 -> {activation}",
                                loss=loss), batch=3)


def test_lenet_shaped_network_in_float64():
    check_against_reference(net("1x8x8", "conv c1: 2 3x3 -> relu", "maxpool 2x2",
                                "conv c2: 3 2x2 -> relu", "maxpool 2x2 stride=1", "flatten",
                                "dense d: 3 -> softmax", loss="loss cross_entropy"),
                            batch=2, dtype="f64")


TRAINABLE = ("network t\ninput: 1x5x5\nconv c: 2 3x3 -> relu\nmaxpool 2x2 stride=1\nflatten\n"
             "dense d: 3 -> softmax\nloss cross_entropy\ntrain {optimizer}\n")


@pytest.mark.parametrize("optimizer", ["sgd lr=0.1 momentum=0.9", "adam lr=0.01"])
def test_training_steps_match_the_cpu_module_checked_against_the_reference(optimizer):
    """Three steps on the GPU and on the CPU from the same start: the CPU's optimizer and
    gradients are checked against the reference and finite differences elsewhere."""
    text = TRAINABLE.format(optimizer=optimizer)
    gpu_module, cpu_module = cnnc.compile(text, target="cuda"), cnnc.compile(text, threads=1)
    cpu_module.set_params(random_params(gpu_module))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 5, 5)).astype(np.float32)
    y = rng.integers(0, 3, 3)
    params = gpu_module.params
    want, _ = _expected(text, x, y, params, "f32")
    first = gpu_module.train_step(x, y)
    assert first == pytest.approx(float(want["loss"]), rel=1e-5)
    assert first == pytest.approx(cpu_module.train_step(x, y), rel=1e-5)
    for _ in range(2):
        assert gpu_module.train_step(x, y) == pytest.approx(cpu_module.train_step(x, y),
                                                            rel=1e-5)
    for name, value in cpu_module.params.items():
        assert_close(gpu_module.params[name], value, np.float32, name)
    assert not np.allclose(gpu_module.params["d.weight"], params["d.weight"])
    state = gpu_module.optimizer_state()
    for name, value in cpu_module.optimizer_state().items():
        np.testing.assert_allclose(state[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_gradients_and_loss_then_apply_gradients_on_the_device_match_the_cpu():
    """The halves of a step that data-parallel training uses, on the GPU and on the CPU."""
    text = TRAINABLE.format(optimizer="adam lr=0.01")
    gpu_module, cpu_module = cnnc.compile(text, target="cuda"), cnnc.compile(text, threads=1)
    cpu_module.set_params(gpu_module.params)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 1, 5, 5)).astype(np.float32)
    y = rng.integers(0, 3, 3)
    for _ in range(2):
        on_gpu, gpu_loss = gpu_module.gradients_and_loss(x, y)
        on_cpu, cpu_loss = cpu_module.gradients_and_loss(x, y)
        assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
        for name, value in on_cpu.items():
            assert_close(on_gpu[name], value, np.float32, name)
        gpu_module.apply_gradients(on_cpu)
        cpu_module.apply_gradients(on_cpu)
    for name, value in cpu_module.params.items():
        assert_close(gpu_module.params[name], value, np.float32, name)


def test_module_round_trip_in_a_fresh_process(tmp_path):
    text = TRAINABLE.format(optimizer="sgd lr=0.1")
    module = cnnc.compile(text, target="cuda")
    params = random_params(module)
    module.save(tmp_path / "m.cnnm")
    x = np.random.default_rng(1).standard_normal((2, 1, 5, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np, cnnc\n"
              "m = cnnc.load(sys.argv[1])\n"
              "assert m.target == 'cuda', m\n"
              "np.save(sys.argv[3], m(np.load(sys.argv[2])))\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.cnnm"),
                    str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], check=True,
                   env={**os.environ})
    expected = reference.run(cnnc.check(text), x, params)
    got = np.load(tmp_path / "y.npy")
    assert_close(got, expected[cnnc.check(text).output], np.float32, "output after load")
    assert_close(module(x), got, np.float32, "same module before and after")


def test_forward_reads_a_device_array_in_place_and_checks_it():
    module = cnnc.compile(TRAINABLE.format(optimizer="sgd"), target="cuda")
    x = np.random.default_rng(2).standard_normal((2, 1, 5, 5)).astype(np.float32)
    on_device = cuda.to_device(x)
    np.testing.assert_array_equal(module(on_device), module(x))
    with pytest.raises(cnnc.CnncRuntimeError, match="dtype float32"):
        module(cuda.to_device(x.astype(np.float64)))
    with pytest.raises(cnnc.CnncRuntimeError, match=r"shape \(N, 1, 5, 5\)"):
        module(cuda.to_device(x[:, 0]))
    with pytest.raises(cnnc.CnncRuntimeError, match="label 7"):
        module.train_step(x, np.array([0, 7]))


def test_emit_cuda_and_compile_target_cuda_from_the_command_line(tmp_path, capsys):
    from cnnc.cli.main import main

    program = tmp_path / "t.cnn"
    program.write_text(TRAINABLE.format(optimizer="sgd"))
    assert main(["compile", str(program), "--emit", "cuda"]) == 0
    source = capsys.readouterr().out
    assert "@cuda.jit\ndef c_conv_relu_maxpool_fwd_0(N, b0, b1, b2, b3):" in source
    compile(source, "emitted", "exec")  # valid Python
    assert main(["compile", str(program), "--target", "cuda", "-o",
                 str(tmp_path / "t.cnnm")]) == 0
    assert "target cuda" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "t.cnnm"), "--cuda"]) == 0
    assert capsys.readouterr().out == source
    assert main(["inspect", str(tmp_path / "t.cnnm"), "--llvm"]) == 1
    assert "cuda module and holds no LLVM IR" in capsys.readouterr().err
    assert main(["compile", str(program), "--target", "cuda", "--emit", "llvm"]) == 2


def test_thread_grid_covers_every_output_once():
    assert grid(Launch("k", (), ()), 5) == (1, 32)
    assert grid(Launch("k", (), ("N", 6, 28, 28)), 64) == (-(-64 * 6 * 28 * 28 // 128), 128)
    assert grid(Launch("k", (), (10,)), 1) == (1, 32)
    assert grid(Launch("k", (), (6, 1, 5, 5), block_reduce=True), 64) == (150, BLOCK_THREADS)
    assert grid(Launch("k", (), (), block_reduce=True), 64, 8) == (1, 8)
    # a kernel's shared arrays are sized for its block width, which the module file records
    narrow = Launch("k", ("x",), ("N", 6, 28, 28), block_threads=64)
    assert grid(narrow, 64) == (64 * 6 * 28 * 28 // 64, 64)
    assert launch_from_json(launches_to_json({"k": (narrow,)})["k"][0]) == narrow


def test_reductions_and_scatters_get_race_free_thread_grids():
    """Threads never share an element they write: sums over the batch get a block per
    result, max pooling's backward a thread per (sample, channel) plane."""
    module = cnnc.compile(TRAINABLE.format(optimizer="sgd"), target="cuda")
    launches = {launch["kernel"]: (launch["threads"], launch["block_reduce"])
                for launch in module.manifest["entry_points"]["input_gradient"]}
    assert launches["c_conv2d_grad_weight_bwd_0"] == ([2, 1, 3, 3], True)
    assert launches["c_bias_grad_bwd_0"] == ([2], True)
    assert launches["d_dense_grad_weight_bwd_0"] == ([3, 8], True)
    assert launches["maxpool1_maxpool2d_grad_bwd_0"] == (["N", 2, 9], False)  # zero fill
    assert launches["maxpool1_maxpool2d_grad_bwd_1"] == (["N", 2], False)  # scatter
    assert launches["loss_cross_entropy_0"] == ([], True)  # one block sums the batch
    assert launches["c_conv_relu_maxpool_fwd_0"] == (["N", 2, 3, 3], False)


def test_staged_filters_across_block_boundaries():
    """9x9 outputs a filter: a block of 128 threads spans two or three filters' slots, and
    blocks run past one sample's last filter into the next sample's first; the last block
    is partly idle (2 * 3 * 81 = 486 threads). The input's gradient stages the filters by
    input channel (121 threads a channel)."""
    check_against_reference(net("2x11x11", "conv c: 3 3x3 -> relu", "flatten", "dense d: 1"),
                            batch=2)


def _kernel_sources(text: str) -> dict[str, str]:
    from cnnc.diagnostics import Source
    from cnnc.driver.modules import compile_cuda_module

    source = compile_cuda_module(cnnc.check(text), Source(text)).sections["cuda"].decode()
    return {part.split("(")[0]: part for part in source.split("@cuda.jit\ndef ")[1:]}


def test_which_buffers_are_staged_in_shared_memory():
    kernels = _kernel_sources(net("3x12x12", "conv c: 4 3x3 -> relu", "flatten",
                                  "dense d: 2", loss="loss mse"))
    forward = kernels["c_conv_relu_fwd_0"]
    # the filters (3 * 3 * 3 taps each) of the at most 3 filters a block's threads use
    assert "staged0 = cuda.shared.array(81, F)" in forward
    assert forward.count("cuda.shared.array") == 1  # not the bias, read once a thread
    assert "staged0[staged0_slot * 27 + " in forward
    assert forward.index("cuda.syncthreads()") < forward.index("if thread_index >= threads")
    # by input channel, 144 threads each: 2 slots of 4 filters' taps of that channel
    assert "staged0 = cuda.shared.array(72, F)" in kernels["c_conv2d_grad_input_bwd_0"]
    # the dense unit is the innermost thread loop: no two neighbours share a row
    assert "cuda.shared.array" not in kernels["d_dense_fwd_0"]
    # 33 slots of 64 * 3 * 3 taps would pass the shared-memory budget
    wide = _kernel_sources(net("64x4x4", "conv c: 8 3x3", "flatten", "dense d: 2"))
    assert "cuda.shared.array" not in wide["c_conv_fwd_0"]
    # 1x1 outputs: each thread its own filter, nothing shared (130 filters > 128 slots)
    single = _kernel_sources(net("1x3x3", "conv c: 130 3x3", "flatten", "dense d: 2"))
    assert "cuda.shared.array" not in single["c_conv_fwd_0"]


def test_a_few_small_filters_are_staged_whole():
    """2x2 outputs: a block spans up to 33 filters, but there are 7: each is copied once and
    read at the slot of its own index, in blocks that wrap around the filters."""
    text = net("1x3x3", "conv c: 7 2x2 -> tanh", "flatten", "dense d: 2")
    forward = _kernel_sources(text)["c_conv_tanh_fwd_0"]
    assert "staged0 = cuda.shared.array(28, F)" in forward
    assert "staged0_slot = (thread_index // 4) % 7" in forward
    check_against_reference(text, batch=5)  # 5 * 7 * 4 = 140 threads: two blocks


@pytest.mark.parametrize("batch", [1, 2, 19])
def test_block_sums_with_more_terms_than_threads_and_fewer(batch):
    """19 samples: the threads of a block take two or three terms of the bias gradient sum
    (4 threads a block in the simulator, 128 on a GPU)."""
    check_against_reference(net("1x1x1", "dense d: 2 -> tanh"), batch=batch)


@gpu
@pytest.mark.parametrize("batch", [1, 37, 256])
def test_lenet_on_a_real_gpu_matches_the_reference(batch):
    check_against_reference((EXAMPLES / "lenet.cnn").read_text(), batch)


def test_train_command_on_cuda_ends_where_the_cpu_does(tmp_path, monkeypatch, capsys):
    """Same program, data, seed and order: the GPU's weights after training equal the
    CPU's (whose training is checked against the reference elsewhere)."""
    from cnnc.cli.main import main

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((10, 1, 5, 5)).astype(np.float32),
             y=rng.integers(0, 3, 10))
    (tmp_path / "t.cnn").write_text(TRAINABLE.format(optimizer="sgd lr=0.1 momentum=0.9"))
    for target in ("cuda", "cpu"):
        assert main(["train", "t.cnn", "--data", "d.npz", "--epochs", "1", "--batch", "4",
                     "--target", target, "--out", f"{target}.npz", "--no-progress"]) == 0
        assert f"training t on {target}: sgd" in capsys.readouterr().out
    on_gpu, on_cpu = np.load(tmp_path / "cuda.npz"), np.load(tmp_path / "cpu.npz")
    for name in on_cpu.files:
        assert_close(on_gpu[name], on_cpu[name], np.float32, name)
    assert main(["compile", "t.cnn", "-o", "t.cnnm"]) == 0
    assert main(["train", "t.cnnm", "--data", "d.npz", "--target", "cuda"]) == 1
    assert "t.cnnm is a cpu module" in capsys.readouterr().err


def test_without_a_gpu_or_the_simulator_the_error_says_how_to_run_it(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "from numba import cuda; "
                            "print(cuda.is_available())"], capture_output=True, text=True,
                           env={**os.environ, "NUMBA_ENABLE_CUDASIM": "0"})
    if probe.stdout.strip() != "False":
        pytest.skip("this machine has a CUDA GPU")
    (tmp_path / "t.cnn").write_text(TRAINABLE.format(optimizer="sgd"))
    assert cnnc_cli(["compile", str(tmp_path / "t.cnn"), "--target", "cuda", "-o",
                     str(tmp_path / "t.cnnm")]).returncode == 0
    loaded = cnnc_cli(["inspect", str(tmp_path / "t.cnnm")])
    assert loaded.returncode == 0 and "target   cuda" in loaded.stdout
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 5, 5), np.float32), y=np.zeros(4, int))
    run = cnnc_cli(["train", str(tmp_path / "t.cnnm"), "--data", str(tmp_path / "d.npz")])
    assert run.returncode == 1 and "no CUDA GPU is available" in run.stderr
    assert "NUMBA_ENABLE_CUDASIM=1" in run.stderr and "Traceback" not in run.stderr


def cnnc_cli(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnc", *arguments], capture_output=True,
                          text=True, env={**os.environ, "NUMBA_ENABLE_CUDASIM": "0"})
