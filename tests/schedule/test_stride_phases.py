"""The strided forward convolution over stride phases: the input copied once per sample into
S x S dense phase planes, each phase a stride-1 correlation with its own sub-kernel, all into
the same accumulators. Checked against the plain loop nests and an independent numpy
convolution, over drawn shapes, strides, pads, dtypes and thread counts."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import assert_close, random_params

import cnnc
from cnnc.backends.target import host_cpu
from cnnc.passes.fuse import fuse
from cnnc.schedule.apply import lower_blocked
from cnnc.schedule.cost import splits_stride_phases

FEW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _numpy_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: tuple[int, int],
                pad: tuple[int, int, int, int]) -> np.ndarray:
    """out[n, f, i, j] = b[f] + Σ w[f, c, u, v] · padded[n, c, S·i + u, S·j + v], in f64."""
    top, left, bottom, right = pad
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    _, _, kh, kw = w.shape
    oh = (xp.shape[2] - kh) // stride[0] + 1
    ow = (xp.shape[3] - kw) // stride[1] + 1
    out = np.zeros((x.shape[0], w.shape[0], oh, ow))
    for u in range(kh):
        for v in range(kw):
            patch = xp[:, :, u:u + stride[0] * (oh - 1) + 1:stride[0],
                       v:v + stride[1] * (ow - 1) + 1:stride[1]]
            out += np.einsum("nchw,fc->nfhw", patch, w[:, :, u, v].astype(np.float64))
    if b is not None:
        out += b.astype(np.float64)[None, :, None, None]
    return out


@st.composite
def strided_convs(draw):
    channels, filters = draw(st.integers(1, 11)), draw(st.integers(1, 40))
    height, width = draw(st.integers(3, 15)), draw(st.integers(3, 15))
    kh, kw = draw(st.integers(1, min(5, height))), draw(st.integers(1, min(5, width)))
    stride = draw(st.sampled_from([(2, 2), (3, 3), (2, 1), (1, 3), (3, 2)]))
    pad = tuple(draw(st.integers(0, k - 1)) for k in (kh, kw, kh, kw))
    bias = draw(st.booleans())
    activation = draw(st.sampled_from(["", " -> relu"]))
    text = (f"network t\ninput: {channels}x{height}x{width}\n"
            f"conv c: {filters} {kh}x{kw} stride={stride[0]}x{stride[1]} "
            f"pad={pad[0]}x{pad[1]}x{pad[2]}x{pad[3]} bias={'true' if bias else 'false'}"
            f"{activation}\nloss mse\n")
    return text, stride, pad, bias, activation != ""


@FEW
@given(strided_convs(), st.sampled_from(["f32", "f64"]), st.integers(1, 3), st.integers(1, 9))
def test_stride_phases_match_plain_loops_and_numpy(case, dtype, threads, batch):
    text, stride, pad, bias, relu = case
    scheduled = cnnc.compile(text, dtype=dtype, opt_level=1, threads=threads)
    plain = cnnc.compile(text, dtype=dtype, opt_level=1, threads=1, schedule=False)
    params = random_params(scheduled)
    assert ("c.bias" in params) == bias
    plain.set_params(params)
    kind = np.float32 if dtype == "f32" else np.float64
    x = np.random.default_rng(batch).standard_normal((batch, *scheduled.input_shape)).astype(kind)
    want = _numpy_conv(x, params["c.weight"], params.get("c.bias"), stride, pad)
    if relu:
        want = np.maximum(want, 0)
    got, got_plain = scheduled(x), plain(x)
    assert got.dtype == kind
    assert_close(got, want, kind, f"stride phases\n{text}")
    assert_close(got_plain, want, kind, f"plain\n{text}")


def test_a_strided_conv_and_its_fused_pool_match_numpy_on_three_threads():
    """W4's shape, smaller: 32 channels in, 40 out (a block and a part), 3x3 stride 2 pad 1,
    then a max pool that runs in the convolution's batch loop."""
    text = ("network t\ninput: 32x17x21\nconv c: 40 3x3 stride=2 pad=1 -> relu\n"
            "maxpool 2x2\nloss mse\n")
    module = cnnc.compile(text, opt_level=1, threads=3)
    params = random_params(module)
    x = np.random.default_rng(5).standard_normal((7, 32, 17, 21)).astype(np.float32)
    conv = np.maximum(_numpy_conv(x, params["c.weight"], params["c.bias"], (2, 2),
                                  (1, 1, 1, 1)), 0)
    n, f, h, w = conv.shape
    pooled = conv[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, f, h // 2, 2, w // 2, 2)
    assert_close(module(x), pooled.max(axis=(3, 5)), np.float32, "conv + pool")
    one = cnnc.compile(text, opt_level=1, threads=1)
    one.set_params(params)
    np.testing.assert_array_equal(one(x), module(x))  # each sample's planes are its own


def _patterns(text: str) -> dict[str, str]:
    program = fuse(cnnc.check(text))
    machine = host_cpu().machine
    return {k.name: lower_blocked(k, program, machine).schedule.pattern
            for k in program.kernels if k.name.endswith("conv_fwd")}


def test_the_cost_model_splits_strided_ungrouped_undilated_convolutions():
    assert _patterns("network t\ninput: 32x64x64\nconv c: 64 3x3 stride=2 pad=1\n") == \
        {"c_conv_fwd": "correlation over 4 stride phase(s)"}
    # 3x1 taps of stride 2: rows overlap, columns do not; phases (0, 0), (1, 0)
    assert _patterns("network t\ninput: 16x9x9\nconv c: 32 3x1 stride=2\n") == \
        {"c_conv_fwd": "correlation over 2 stride phase(s)"}
    # a 1x1 kernel of stride 2 reads each input once, straight from the input: no copy
    assert _patterns("network t\ninput: 16x9x9\nconv c: 32 1x1 stride=2\n") == \
        {"c_conv_fwd": "correlation"}
    assert _patterns("network t\ninput: 4x20x20\nconv c: 32 5x3 stride=3x1\n") == \
        {"c_conv_fwd": "correlation over 3 stride phase(s)"}
    assert _patterns("network t\ninput: 4x20x20\nconv c: 8 3x3 stride=2 dilation=2\n") == \
        {"c_conv_fwd": "correlation"}
    # stride 1: no phases (the direct correlation, or Winograd where the cost model takes it)
    assert "phase" not in _patterns("network t\ninput: 8x20x20\nconv c: 32 3x3 pad=1\n")[
        "c_conv_fwd"]
    assert not splits_stride_phases((2, 2), (1, 1), 2, (3, 3))
    assert not splits_stride_phases((1, 1), (1, 1), 1, (3, 3))
    assert not splits_stride_phases((2, 2), (1, 1), 1, (2, 2))
    assert splits_stride_phases((1, 3), (1, 1), 1, (1, 5))


def test_explain_schedule_names_the_phases(capsys, tmp_path):
    from cnnc.cli.main import main

    program = tmp_path / "w4.cnn"
    program.write_text("network w4\ninput: 32x64x64\nconv c: 64 3x3 stride=2 pad=1\n"
                       "loss mse\n", encoding="utf-8")
    assert main(["compile", str(program), "--explain-schedule"]) == 0
    out = capsys.readouterr().out.split("c_conv_fwd: ")[1].split("parallel:")[0]
    assert out.startswith("correlation over 4 stride phase(s)")
    assert "input split into stride phases" in out
    assert "reduction loops (kept as loops): stride phase, input channel" in out
