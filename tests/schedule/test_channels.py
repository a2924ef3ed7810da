"""Per-channel kernels (schedule/channels.py): batch norm's statistics, normalization and
gradients vectorized over each channel's positions and shared over channels by the thread
team, and the bias gradient (schedule/reduction.py) shared over channels the same way.
Checked against PyTorch in float64 (forward in training mode, input and parameter
gradients) and against the plain loop nests, over drawn shapes (positions that are not
whole vectors, fewer positions than lanes, one channel), dtypes, batch sizes and thread
counts, with the channel loop parallel from one sample up and at its own threshold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnc
from cnnc.backends.target import host_cpu
from cnnc.driver.pipeline import Options, Stage, run
from cnnc.frontend.source import to_source
from cnnc.graph.ir import DType
from cnnc.schedule import channels

torch = pytest.importorskip("torch")

FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _program(c: int, h: int, w: int) -> str:
    return (f"network b\ninput: {c}x{h}x{w}\nbatchnorm n eps=1e-3\nconv k: 2 1x1\n"
            "loss mse\n")


def _torch(x: np.ndarray, params: dict, y: np.ndarray):
    """Training-mode forward of torch's BatchNorm2d and a 1x1 conv, and the gradients of the
    mean squared error (the mean over all elements)."""
    t = {k: torch.from_numpy(v.astype(np.float64)).requires_grad_() for k, v in params.items()
         if not k.startswith("n.running")}
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    bn = torch.nn.functional.batch_norm(xt, None, None, t["n.weight"], t["n.bias"],
                                        training=True, eps=1e-3)
    out = torch.nn.functional.conv2d(bn, t["k.weight"], t["k.bias"])
    loss = ((out - torch.from_numpy(y.astype(np.float64))) ** 2).mean()
    loss.backward()
    grads = {k: v.grad.numpy() for k, v in t.items()}
    return out.detach().numpy(), grads, xt.grad.numpy()


def _params(m: cnnc.Module, rng: np.random.Generator) -> dict:
    params = {k: rng.uniform(0.5, 1.5, v.shape).astype(v.dtype) if k == "n.weight"
              else rng.normal(0, 0.5, v.shape).astype(v.dtype)
              for k, v in m.params.items() if not k.startswith("n.running")}
    m.set_params(params)
    return params


def _check(c, h, w, batch, dtype, threads, seed) -> None:
    text = _program(c, h, w)
    scheduled = cnnc.compile(text, dtype=dtype, opt_level=1, threads=threads, cache=False)
    plain = cnnc.compile(text, dtype=dtype, opt_level=1, schedule=False, cache=False)
    rng = np.random.default_rng(seed)
    params = _params(scheduled, rng)
    plain.set_params(params)
    x = (rng.standard_normal((batch, c, h, w)) * 2 + 1).astype(scheduled.dtype)
    y = rng.standard_normal((batch, 2, h, w)).astype(scheduled.dtype)
    want, want_grads, want_dx = _torch(x, params, y)
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == "f32" else dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scheduled.forward(x, training=True), want, **tol)
    got = scheduled.gradients(x, y)
    for name, value in want_grads.items():
        np.testing.assert_allclose(got[name], value, **tol, err_msg=name)
    np.testing.assert_allclose(scheduled.input_gradient(x, y), want_dx, **tol)
    expected = plain.gradients(x, y)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], **tol, err_msg=name)


@FEW
@given(c=st.integers(1, 12), h=st.integers(1, 9), w=st.integers(1, 11),
       batch=st.integers(2, 5), dtype=st.sampled_from(["f32", "f64"]),
       threads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_batch_norm_kernels_match_torch_with_channels_shared_from_one_sample(
        c, h, w, batch, dtype, threads, seed):
    """The threshold lowered to nothing: every drawn shape takes the parallel channel loop
    (where its positions fill a vector)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(channels, "PARALLEL_MIN_FLOPS", 1)
        _check(c, h, w, batch, dtype, threads, seed)


@FEW
@given(h=st.integers(3, 9), w=st.integers(3, 11), batch=st.integers(2, 5),
       threads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_batch_norm_kernels_match_torch_at_the_threshold(h, w, batch, threads, seed):
    """The shipped threshold: these small planes run the serial channel loop below it."""
    _check(5, h, w, batch, "f32", threads, seed)


def test_explain_says_what_is_vectorized_and_from_how_many_samples_it_is_shared():
    lowered = run(to_source(_program(16, 32, 32)), Options(host_cpu()),
                  until=Stage.LOWER).lowered
    schedules = {s.kernel: s for s in lowered.schedules}
    lanes = host_cpu().machine.lanes(DType.F32)
    for kernel, passes in [("n_batchnorm_fwd", 6), ("n_batchnorm_grad_input_bwd", 10),
                           ("n_batchnorm_grad_weight_bwd", 4)]:
        s = schedules[kernel]
        assert s.pattern == "per channel" and s.vector_extent == 32 * 32
        samples = -(-channels.PARALLEL_MIN_FLOPS // (passes * 16 * 32 * 32))
        assert f"from {samples} samples up" in s.shared, s.shared
        assert f"{lanes} lanes" in s.reason
    assert "from 1 samples up" not in schedules["k_bias_grad_bwd"].shared
    samples = -(-channels.PARALLEL_MIN_FLOPS // (2 * 32 * 32))
    assert f"from {samples} samples up" in schedules["k_bias_grad_bwd"].shared
    # a vector after flatten has one position a channel: the plain loops
    vector = "network v\ninput: 6\nbatchnorm n\ndense d: 2\nloss mse\n"
    lowered = run(to_source(vector), Options(host_cpu()), until=Stage.LOWER).lowered
    assert not [s for s in lowered.schedules if s.pattern == "per channel"]
