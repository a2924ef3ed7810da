"""A max pool fused into a scheduled convolution shares its channels among a call's thread
team (schedule.apply): forward against PyTorch in float64, gradients and the input's
gradient against the plain loops, on 1-3 threads, at batch 1 (one piece, on the team) and
batch 3."""

from __future__ import annotations

import pytest
from numerics import against_torch_and_plain

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
    (_, stride, pad), (size, pool_stride, pool_pad) = conv, pool

    def reference(x, w):
        h = torch.relu(torch.nn.functional.conv2d(x, w["c.weight"], w.get("c.bias"),
                                                  stride=stride, padding=pad))
        return torch.nn.functional.max_pool2d(h, size, pool_stride, pool_pad)
    against_torch_and_plain(text, threads, (1, 3), reference)
