"""A max pool fused into a scheduled convolution shares its channels among a call's thread
team (schedule.apply): forward against PyTorch in float64, gradients and the input's
gradient against the plain loops, on 1-3 threads, at batch 1 (one piece, on the team) and
batch 3."""

from __future__ import annotations

import numpy as np
import pytest
from numerics import assert_close, random_params

import cnnc
from cnnc.backends.target import host_cpu
from cnnc.driver.pipeline import Options, Stage, run
from cnnc.frontend.source import to_source

torch = pytest.importorskip("torch")

# (program, kernel, pool padding): ResNet-18's stem pool (padded: the plain scalar loops)
# after a strided convolution, and an unpadded one after a stride-1 convolution; each pool
# has over a million comparisons a sample, so its channels are shared
CASES = [
    ("network s\ninput: 3x176x176\nconv c: 60 7x7 stride=2 pad=3 -> relu\n"
     "maxpool 3x3 stride=2 pad=1\nloss mse\n", "c_conv_relu_maxpool_fwd", (7, 2, 3), (3, 2, 1)),
    ("network u\ninput: 5x98x94\nconv c: 53 3x3 pad=1 bias=true -> relu\n"
     "maxpool 3x3 stride=2\nloss mse\n", "c_conv_relu_maxpool_fwd", (3, 1, 1), (3, 2, 0)),
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("text, kernel, conv, pool", CASES)
def test_a_fused_pool_shares_its_channels_and_matches_torch_and_plain(text, kernel, conv,
                                                                       pool, threads):
    lowered = run(to_source(text), Options(host_cpu()), until=Stage.LOWER).lowered
    schedule = next(s for s in lowered.schedules if s.kernel == kernel)
    assert "channels shared by a call's thread team" in schedule.fused, schedule.fused
    scheduled = cnnc.compile(text, opt_level=1, threads=threads, cache=False)
    plain = cnnc.compile(text, opt_level=1, schedule=False, cache=False)
    params = random_params(scheduled)
    plain.set_params(params)
    w = {k: torch.from_numpy(v.astype(np.float64)) for k, v in params.items()}
    (_, stride, pad), (size, pool_stride, pool_pad) = conv, pool
    for batch in (1, 3):
        rng = np.random.default_rng(batch)
        x = rng.standard_normal((batch, *scheduled.input_shape)).astype(np.float32)
        y = rng.standard_normal((batch, *scheduled.output_shape)).astype(np.float32)
        h = torch.relu(torch.nn.functional.conv2d(
            torch.from_numpy(x.astype(np.float64)), w["c.weight"], w.get("c.bias"),
            stride=stride, padding=pad))
        want = torch.nn.functional.max_pool2d(h, size, pool_stride, pool_pad).numpy()
        assert_close(scheduled(x), want, np.float32, "forward")
        got, expected = scheduled.gradients(x, y), plain.gradients(x, y)
        for name in expected:
            assert_close(got[name], expected[name], np.float32, name)
        assert_close(scheduled.input_gradient(x, y), plain.input_gradient(x, y), np.float32,
                     "input gradient")
