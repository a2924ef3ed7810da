"""Winograd F(2x2, 3x3) (schedule/winograd.py): stride-1 3x3 convolutions and their input
gradients as 16 matrix products between additions-only transforms. Checked against PyTorch
in float64 and against the plain loop nests, over drawn shapes (odd sizes, so the last tile
row and column stick out; channel counts that are not whole vectors; pads 0 to 2 on each
side), dtypes, batch sizes and thread counts; and --no-winograd keeps the direct
correlation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import against_torch_and_plain, assert_close, random_params

import cnnc
from cnnc.backends.target import host_cpu
from cnnc.cli.main import main
from cnnc.driver.pipeline import Options, Stage, run
from cnnc.frontend.source import to_source

torch = pytest.importorskip("torch")

FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WINOGRAD = "winograd F(2x2, 3x3)"


def _patterns(text: str, winograd: bool = True) -> dict[str, str]:
    """Each scheduled kernel's pattern, as the cost model chose it."""
    target = host_cpu().with_winograd(winograd)
    lowered = run(to_source(text), Options(target), until=Stage.LOWER).lowered
    return {s.kernel: s.pattern for s in lowered.schedules}


def _torch_conv(x: np.ndarray, params: dict, pad: tuple[int, int, int, int],
                relu: bool) -> np.ndarray:
    top, left, bottom, right = pad
    xt = torch.nn.functional.pad(torch.from_numpy(x.astype(np.float64)),
                                 (left, right, top, bottom))
    bias = params.get("c.bias")
    y = torch.nn.functional.conv2d(
        xt, torch.from_numpy(params["c.weight"].astype(np.float64)),
        None if bias is None else torch.from_numpy(bias.astype(np.float64)))
    return (torch.relu(y) if relu else y).numpy()


@st.composite
def convs(draw):
    channels, filters = draw(st.integers(16, 40)), draw(st.integers(12, 40))
    height, width = draw(st.integers(2, 13)), draw(st.integers(2, 13))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    if height + pad[0] + pad[2] < 3 or width + pad[1] + pad[3] < 3:
        pad = (1, 1, 1, 1)
    bias = draw(st.booleans())
    relu = draw(st.booleans())
    text = (f"network t\ninput: {channels}x{height}x{width}\n"
            f"conv c: {filters} 3x3 pad={pad[0]}x{pad[1]}x{pad[2]}x{pad[3]} "
            f"bias={'true' if bias else 'false'}{' -> relu' if relu else ''}\nloss mse\n")
    return text, pad, relu


@FEW
@given(convs(), st.sampled_from(["f32", "f64"]), st.integers(1, 3), st.integers(1, 4))
def test_winograd_forward_matches_pytorch_and_the_plain_loops(case, dtype, threads, batch):
    text, pad, relu = case
    scheduled = cnnc.compile(text, dtype=dtype, opt_level=1, threads=threads, cache=False)
    plain = cnnc.compile(text, dtype=dtype, opt_level=1, schedule=False, cache=False)
    params = random_params(scheduled)
    plain.set_params(params)
    kind = np.float32 if dtype == "f32" else np.float64
    x = np.random.default_rng(batch).standard_normal((batch, *scheduled.input_shape))
    x = x.astype(kind)
    want = _torch_conv(x, params, pad, relu)
    got = scheduled(x)
    assert got.dtype == kind and got.shape == want.shape
    assert_close(got, want, kind, f"winograd\n{text}")
    assert_close(plain(x), want, kind, f"plain\n{text}")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(20, 36), st.integers(20, 36), st.integers(5, 11), st.integers(5, 11),
       st.integers(0, 2), st.integers(1, 3))
def test_winograd_input_gradients_match_the_plain_loops(channels, filters, height, width,
                                                         padding, threads):
    """Two layers, so that both the second convolution's input gradient (the δ of the first)
    and the first's (the gradient of the input) may run as Winograd, as the cost model
    decides for the drawn sizes (W3's test below pins the choice)."""
    text = (f"network t\ninput: {channels}x{height}x{width}\n"
            f"conv a: {filters} 3x3 pad={padding} -> relu\n"
            f"conv c: {channels} 3x3 pad=1 -> relu\nloss mse\n")
    scheduled = cnnc.compile(text, opt_level=1, threads=threads, cache=False)
    plain = cnnc.compile(text, opt_level=1, schedule=False, cache=False)
    params = random_params(scheduled)
    plain.set_params(params)
    rng = np.random.default_rng(channels)
    x = rng.standard_normal((2, *scheduled.input_shape)).astype(np.float32)
    y = rng.standard_normal((2, *scheduled.output_shape)).astype(np.float32)
    got, want = scheduled.gradients(x, y), plain.gradients(x, y)
    for name in want:
        assert_close(got[name], want[name], np.float32, name)
    assert_close(scheduled.input_gradient(x, y), plain.input_gradient(x, y), np.float32,
                 "input gradient")


W3 = "network w3\ninput: 64x28x28\nconv c: 64 3x3 pad=1 -> relu\nloss mse\n"


def test_the_cost_model_picks_winograd_for_wide_layers_only():
    """64 channels each way: Winograd; 3 input channels (a network's first layer): the
    transforms cost more than the products save, so the direct correlation; strided,
    grouped or 5x5 layers have no Winograd schedule."""
    assert _patterns(W3)["c_conv_relu_fwd"] == WINOGRAD
    assert _patterns(W3)["c_conv2d_grad_input_bwd"] == WINOGRAD + " of δ"
    first = "network t\ninput: 3x32x32\nconv c: 16 3x3 pad=1\nloss mse\n"
    assert _patterns(first)["c_conv_fwd"] != WINOGRAD
    for layer in ("64 3x3 stride=2 pad=1", "64 3x3 pad=1 groups=2", "64 5x5 pad=2",
                  "64 3x3 pad=2 dilation=2"):
        text = f"network t\ninput: 64x28x28\nconv c: {layer}\nloss mse\n"
        assert not any(p.startswith("winograd") for p in _patterns(text).values()), layer


def test_no_winograd_keeps_the_direct_correlation_and_is_recorded(tmp_path, capsys):
    assert all(not p.startswith("winograd") for p in _patterns(W3, winograd=False).values())
    program = tmp_path / "w3.cnn"
    program.write_text(W3)
    for flags, expected in (([], True), (["--no-winograd"], False)):
        assert main(["compile", str(program), "--explain-schedule", *flags]) == 0
        text = capsys.readouterr().out
        assert (WINOGRAD in text) == expected, text
        assert ("Winograd off (--no-winograd)" in text) == (not expected)
        output = tmp_path / f"w3{len(flags)}.cnnm"
        assert main(["compile", str(program), "-o", str(output), "--no-cache", *flags]) == 0
        module = cnnc.load(output)  # the record of the build agrees with its program
        assert module.manifest["build"]["machine"].get("winograd", True) == expected


def test_winograd_and_direct_agree_within_float32_rounding():
    """The documented bound: on W3's shape (576 terms a sum) the Winograd result is within
    1e-5 of the largest output of the float64 result, as the direct one is."""
    fast = cnnc.compile(W3, cache=False)
    direct = cnnc.compile(W3, cache=False, winograd=False)
    params = random_params(fast)
    direct.set_params(params)
    x = np.random.default_rng(3).standard_normal((2, 64, 28, 28)).astype(np.float32)
    want = _torch_conv(x, params, (1, 1, 1, 1), True)
    scale = np.abs(want).max()
    fast_error = np.abs(fast(x) - want).max() / scale
    direct_error = np.abs(direct(x) - want).max() / scale
    assert fast_error < 1e-5 and direct_error < 1e-5, (fast_error, direct_error)


# 128 filters: with fewer, one more transform of the input costs more than COPY_LIMIT
# where the vectors are 512 bits wide, and AVX-512 hosts do not split them
GROUPED = ("network g\ninput: 64x8x8\nconv a: 128 3x3 pad=1 -> relu\n"
           "conv c: 128 3x3 pad=1 bias=true -> relu\nloss mse\n")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_one_chunk_sample_is_shared_in_filter_groups_and_stays_exact(threads):
    """An 8x8 plane is one chunk of tiles a sample: its filter blocks are split into groups
    (each transforming the chunk's input again) so that a batch of one still offers the
    thread team several iterations; forward and gradients match PyTorch and the plain
    loops at batch 1 (one piece, on the team) and batch 3."""
    lowered = run(to_source(GROUPED), Options(host_cpu()), until=Stage.LOWER).lowered
    shared = {s.kernel: s.shared for s in lowered.schedules if s.pattern.startswith(WINOGRAD)}
    assert "groups of" in shared["c_conv_relu_fwd"], shared
    assert "groups of" in shared["c_conv2d_grad_input_bwd"], shared

    def reference(x, w):
        h = torch.relu(torch.nn.functional.conv2d(x, w["a.weight"], w.get("a.bias"),
                                                  padding=1))
        return torch.relu(torch.nn.functional.conv2d(h, w["c.weight"], w["c.bias"], padding=1))
    against_torch_and_plain(GROUPED, threads, (1, 3), reference)


POOLED = ("network p\ninput: 32x32x32\nconv c: 32 3x3 pad=1 -> relu\nmaxpool 2x2\n"
          "loss mse\n")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_pool_after_a_shared_winograd_layer_runs_after_all_its_samples(threads):
    """A max pool fused into a Winograd layer whose thread team shares samples and tiles
    cannot run inside a sample's iteration (the sample is not done there): it runs after
    the shared loops, over the whole batch. Output, argmax-routed gradients and
    --explain-schedule's words, against PyTorch and the plain loops."""
    lowered = run(to_source(POOLED), Options(host_cpu()), until=Stage.LOWER).lowered
    schedule = next(s for s in lowered.schedules if s.kernel == "c_conv_relu_maxpool_fwd")
    assert schedule.pattern == WINOGRAD and schedule.shared, schedule
    assert "after the anchor's loops" in schedule.fused, schedule.fused

    def reference(x, w):
        conv = torch.nn.functional.conv2d(x, w["c.weight"], w.get("c.bias"), padding=1)
        return torch.nn.functional.max_pool2d(torch.relu(conv), 2)
    against_torch_and_plain(POOLED, threads, (1, 4), reference)


# planes of 4 KiB (32 x 32, 5 x 1024 has odd rows): one filter vector's outputs share one
# L1 set, so the output transform goes through the staging buffer O (winograd.staged)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("channels, filters, height, width",
                         [(20, 40, 32, 32), (24, 40, 5, 1024)])
def test_an_output_transform_staged_for_aliasing_planes_matches_torch_and_plain(
        threads, channels, filters, height, width):
    """Where the output planes alias in L1 the output transform stores to O and then copies
    each channel's rows out; channel counts that are not whole vectors, an odd plane height
    (the last tile row sticks out), batch 1 and 3: forward against PyTorch (float64) and
    gradients against the plain loops."""
    text = (f"network s\ninput: {channels}x{height}x{width}\n"
            f"conv a: {filters} 3x3 pad=1 bias=true -> relu\nloss mse\n")
    lowered = run(to_source(text), Options(host_cpu()), until=Stage.LOWER).lowered
    staged = [f.name for f in lowered.functions
              if any(b.name.endswith(".wino_o") for b in f.buffers)]
    assert staged, [s.pattern for s in lowered.schedules]  # else this tests nothing staged

    def reference(x, w):
        conv = torch.nn.functional.conv2d(x, w["a.weight"], w["a.bias"], padding=1)
        return torch.relu(conv)
    against_torch_and_plain(text, threads, (1, 3), reference)
