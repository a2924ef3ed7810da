"""Depthwise convolutions (groups = channels), forward, side by side, one thread: the
depthwise schedule, the correlation schedule it replaces (vectorized over output width, a
group's one filter a block row), the plain loops, and PyTorch's CPU conv2d.

    python benchmarks/depthwise.py [--batch 8] [--repeats 7] [--dtype f32]

Prints milliseconds a call and the ratios to the depthwise schedule. Not a test: nothing is
asserted, and the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import numpy as np

import cnnc

# MobileNet-shaped depthwise layers: channels x size, stride
LAYERS = [(32, 56, 1), (64, 56, 2), (128, 28, 1), (256, 14, 1), (512, 7, 1)]


def _median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _module(text: str, dtype: str, schedule: bool, depthwise: bool) -> cnnc.Module:
    if depthwise:
        return cnnc.compile(text, dtype=dtype, threads=1, schedule=schedule)
    # the estimate the choice of pattern reads, made 0: the correlation schedules instead
    with mock.patch("cnnc.schedule.depthwise.estimate", return_value=0.0):
        return cnnc.compile(text, dtype=dtype, threads=1, schedule=schedule)


def _layer(channels: int, size: int, stride: int, args) -> list[float]:
    """Milliseconds a forward call: depthwise, correlation, plain, torch."""
    import torch

    text = (f"network dw\ninput: {channels}x{size}x{size}\n"
            f"conv c: {channels} 3x3 stride={stride} pad=1 groups={channels} -> relu\n")
    numpy_dtype = np.float32 if args.dtype == "f32" else np.float64
    x = np.random.default_rng(0).standard_normal((args.batch, channels, size, size))
    x = x.astype(numpy_dtype)
    modules = [_module(text, args.dtype, True, True), _module(text, args.dtype, True, False),
               _module(text, args.dtype, False, True)]
    params = modules[0].params
    want = modules[0].forward(x)
    for module in modules[1:]:
        module.set_params(params)
        np.testing.assert_allclose(module.forward(x), want, rtol=1e-4, atol=1e-4)
    times = [_median_ms(lambda m=m: m.forward(x), args.repeats) for m in modules]
    tx = torch.from_numpy(x)
    tw, tb = (torch.from_numpy(params[f"c.{p}"]) for p in ("weight", "bias"))
    times.append(_median_ms(lambda: torch.relu(torch.nn.functional.conv2d(
        tx, tw, tb, stride=stride, padding=1, groups=channels)), args.repeats))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["f32", "f64"], default="f32")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"{'layer':<18} {'depthwise':>10} {'correl.':>10} {'plain':>10} {'torch':>10}"
          "   correl./dw  plain/dw  torch/dw")
    for channels, size, stride in LAYERS:
        times = _layer(channels, size, stride, args)
        ratios = "  ".join(f"{t / times[0]:>9.2f}" for t in times[1:])
        print(f"{f'{channels}x{size}x{size} s{stride}':<18} "
              + " ".join(f"{t:>10.3f}" for t in times) + f"   {ratios}")


if __name__ == "__main__":
    main()
