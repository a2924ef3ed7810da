"""Convolution schedules whose loops over one sample's channel blocks and rows are parallel
(blocks.shared_nest, chosen by cost.shares_sample): run on a thread team of 0-2 helpers
against an independent numpy convolution, and bit-identical for any thread count. The
FLOP thresholds are lowered so that small, fast shapes take the parallel path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import assert_close, random_params
from test_stride_phases import _numpy_conv

import cnnc
from cnnc.backends.target import host_cpu
from cnnc.driver.pipeline import Options, Stage, run
from cnnc.frontend.source import to_source
from cnnc.loops.ir import For, LoopKind
from cnnc.loops.walk import walk
from cnnc.runtime import team
from cnnc.schedule import cost
from cnnc.schedule.apply import lower_blocked

FEW = settings(max_examples=6, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture
def always_shared(monkeypatch):
    """Every convolution's loops parallel, and a team for every call in one piece."""
    monkeypatch.setattr(cost, "PARALLEL_MIN_FLOPS", 0)
    monkeypatch.setattr(team, "TEAM_MIN_FLOPS", 0)


@st.composite
def convs(draw):
    channels, filters = draw(st.integers(1, 11)), draw(st.integers(1, 21))
    height, width = draw(st.integers(3, 12)), draw(st.integers(3, 12))
    kh, kw = draw(st.integers(1, min(3, height))), draw(st.integers(1, min(3, width)))
    stride = draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
    pad = tuple(draw(st.integers(0, k - 1)) for k in (kh, kw, kh, kw))
    text = (f"network t\ninput: {channels}x{height}x{width}\n"
            f"conv c: {filters} {kh}x{kw} stride={stride[0]}x{stride[1]} "
            f"pad={pad[0]}x{pad[1]}x{pad[2]}x{pad[3]}\nloss mse\n")
    return text, stride, pad


def _parallel_kernels(text: str) -> set[str]:
    target = host_cpu()
    program = run(to_source(text), Options(target), until=Stage.FUSE).kernels
    machine = target.machine
    found = set()
    for kernel in program.kernels:
        lowered = lower_blocked(kernel, program, machine)
        if lowered is not None and any(isinstance(node, For) and node.kind is LoopKind.PARALLEL
                                       for node in walk(lowered.function)):
            assert lowered.schedule.shared, kernel.name  # --explain-schedule says so
            found.add(kernel.name)
    return found


@FEW
@given(case=convs(), batch=st.integers(1, 3))
def test_shared_forward_and_input_gradient_match_numpy_on_one_to_three_threads(
        always_shared, case, batch):
    text, stride, pad = case
    assert {"c_conv_fwd", "c_conv2d_grad_input_bwd",
            "c_conv2d_grad_weight_bwd"} <= _parallel_kernels(text)
    modules = [cnnc.compile(text, opt_level=1, threads=t, cache=False) for t in (1, 2, 3)]
    plain = cnnc.compile(text, opt_level=1, threads=1, cache=False, schedule=False)
    params = random_params(modules[0])
    plain.set_params(params)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, *modules[0].input_shape)).astype(np.float32)
    want = _numpy_conv(x, params["c.weight"], params["c.bias"], stride, pad)
    y = rng.standard_normal(want.shape).astype(np.float32)
    results = []
    for module in modules:
        module.set_params(params)
        results.append((module(x), module.input_gradient(x, y), module.gradients(x, y)))
    assert_close(results[0][0], want, np.float32, f"shared loops\n{text}")
    assert_close(results[0][1], plain.input_gradient(x, y), np.float32, "input gradient")
    for name, value in plain.gradients(x, y).items():
        assert_close(results[0][2][name], value, np.float32, name)
    for forward, input_gradient, gradients in results[1:]:
        np.testing.assert_array_equal(forward, results[0][0])
        np.testing.assert_array_equal(input_gradient, results[0][1])
        for name, value in gradients.items():
            np.testing.assert_array_equal(value, results[0][2][name], err_msg=name)


@FEW
@given(channels=st.integers(2, 11), size=st.integers(3, 13), stride=st.integers(1, 2),
       batch=st.integers(1, 3))
def test_shared_depthwise_convolutions_match_numpy_on_one_to_three_threads(
        always_shared, channels, size, stride, batch):
    text = (f"network t\ninput: {channels}x{size}x{size + 2}\n"
            f"conv c: {channels} 3x3 stride={stride} pad=1 groups={channels} -> relu\n")
    assert "c_conv_relu_fwd" in _parallel_kernels(text)
    modules = [cnnc.compile(text, opt_level=1, threads=t, cache=False) for t in (1, 2, 3)]
    params = random_params(modules[0])
    x = np.random.default_rng(size).standard_normal((batch, channels, size, size + 2))
    x = x.astype(np.float32)
    want = np.concatenate([_numpy_conv(x[:, c:c + 1], params["c.weight"][c:c + 1],
                                       params["c.bias"][c:c + 1], (stride, stride),
                                       (1, 1, 1, 1)) for c in range(channels)], axis=1)
    results = []
    for module in modules:
        module.set_params(params)
        results.append(module(x))
    assert_close(results[0], np.maximum(want, 0), np.float32, text)
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_a_shared_kernel_shares_its_copies_too(always_shared):
    """The zero-padded copies (and the filter gradient's transposed δ) of a kernel whose
    loops are shared are shared as well: a call run in one piece does not copy on one
    thread while the others wait. The kernels' results are tested above."""
    text = "network t\ninput: 3x9x9\nconv c: 5 3x3 pad=1\nloss mse\n"
    target = host_cpu()
    program = run(to_source(text), Options(target), until=Stage.FUSE).kernels
    copies = {"c_conv_fwd": "pn", "c_conv2d_grad_input_bwd": "pn",
              "c_conv2d_grad_weight_bwd": "tn"}
    for kernel in program.kernels:
        if kernel.name in copies:
            lowered = lower_blocked(kernel, program, target.machine)
            loops = {node.var: node.kind for node in walk(lowered.function)
                     if isinstance(node, For)}
            assert loops[copies[kernel.name]] is LoopKind.PARALLEL, kernel.name


def test_a_network_with_batch_norm_trains_identically_on_one_and_three_threads(always_shared):
    """A training call with batch norm runs in one piece, so its shared loops take the
    team; the loss and every parameter after two steps match one thread's bit for bit."""
    text = ("network q\ninput: 5x9x9\nconv c1: 12 3x3 pad=1 bias=false\nbatchnorm bn1 -> relu\n"
            "conv c2: 7 3x3 stride=2 bias=false\nbatchnorm bn2 -> relu\ndense d: 3 -> softmax\n"
            "loss cross_entropy\n")
    x = np.random.default_rng(3).standard_normal((6, 5, 9, 9)).astype(np.float32)
    y = np.arange(6) % 3
    runs = []
    for threads in (1, 3):
        module = cnnc.compile(text, threads=threads, cache=False)
        losses = [module.train_step(x, y, lr=0.1) for _ in range(2)]
        runs.append((losses, module.params, module(x)))
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        np.testing.assert_array_equal(value, runs[1][1][name], err_msg=name)
    np.testing.assert_array_equal(runs[0][2], runs[1][2])


def test_the_cost_model_shares_only_large_convolutions():
    assert not _parallel_kernels("network t\ninput: 8x16x16\nconv c: 8 3x3 pad=1\n")  # 0.3 M
    assert _parallel_kernels("network t\ninput: 64x56x56\nconv c: 64 3x3 pad=1\n") == \
        {"c_conv_fwd"}  # 231 MFLOP a sample


DROPPED = """
import gc, sys
import numpy as np
import cnnc
from cnnc.runtime import team
team.TEAM_MIN_FLOPS = 0
x = np.ones((1, 8, 9, 9), np.float32)
for _ in range(40):
    module = cnnc.load(sys.argv[1], threads=3)
    module(x)
    del module
    gc.collect()
print("done")
"""


def test_helpers_that_start_after_their_module_is_dropped_find_its_code(always_shared,
                                                                         tmp_path):
    """A helper queued for a call may start after the call returned and the module was
    freed; it must still find the code it runs (it then leaves at once)."""
    import subprocess
    import sys

    text = "network t\ninput: 8x9x9\nconv c: 8 3x3 pad=1 groups=8\nconv d: 6 3x3\n"
    cnnc.compile(text, cache=False).save(tmp_path / "t.cnnm")
    done = subprocess.run([sys.executable, "-c", DROPPED, str(tmp_path / "t.cnnm")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]
