"""cnnc's cuda target against PyTorch with cuDNN on one NVIDIA GPU: W1-W4 of bench.py.

    python benchmarks/gpu_bench.py [--repeats 7] [--only W1,W3] [--json FILE]

float32 with TF32 off in PyTorch (cnnc's kernels do plain float32 arithmetic). Inputs are on
the GPU for both systems; each call returns what cnnc's API returns (the output, the
gradients or the loss on the host), so PyTorch's calls copy the same results back. Every
cnnc result is checked against PyTorch's before it is timed. Not a test: nothing asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import WORKLOADS, data_for, flops

import cnnc


def _torch_call(graph, module, mode: str, x: np.ndarray, y: np.ndarray) -> Callable[[], object]:
    from torch_model import build, step_function

    return step_function(build(graph, module.params | module.buffers), graph, mode, x, y,
                         module, "cuda")


def _cnnc_call(module, mode: str, x_device, x: np.ndarray, y: np.ndarray) -> Callable:
    if mode == "forward":
        return lambda: module(x_device)
    if mode == "fwd+bwd":
        return lambda: module.gradients(x, y)
    return lambda: module.train_step(x, y)


def run_workload(workload, repeats: int, modules: dict) -> list[dict]:
    import torch
    from numba import cuda

    name, program, batch, mode = workload
    if program not in modules:
        started = time.perf_counter()
        modules[program] = cnnc.compile(program, target="cuda")
        print(f"  compiled {name} for cuda in {time.perf_counter() - started:.1f} s", flush=True)
    module = modules[program]
    graph = cnnc.check(program)
    x, y = data_for(module, batch)
    systems = {"cnnc cuda": _cnnc_call(module, mode, cuda.to_device(x), x, y),
               "PyTorch cuDNN": _torch_call(graph, module, mode, x, y)}
    started = time.perf_counter()
    for call in systems.values():
        call()  # warm up: Numba compiles each kernel at its first launch
    print(f"  {name} {mode} batch {batch}: first calls {time.perf_counter() - started:.1f} s",
          flush=True)
    times: dict[str, list[float]] = {s: [] for s in systems}
    for _ in range(repeats):
        for system, call in systems.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            times[system].append(time.perf_counter() - start)
    work = flops(graph, batch, mode)
    return [{"workload": name, "mode": mode, "batch": batch, "system": system,
             "ms": statistics.median(t) * 1e3, "gflops": work / statistics.median(t) / 1e9}
            for system, t in times.items()]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", help="comma-separated workload ids, e.g. W1,W3")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench: PyTorch sees no CUDA GPU here; run it on a machine with one")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    chosen = [w for w in WORKLOADS if not args.only or w[0] in args.only.split(",")]
    rows: list[dict] = []
    modules: dict = {}
    for workload in chosen:
        rows += run_workload(workload, args.repeats, modules)
    print(f"{'workload':<9} {'mode':<11} {'batch':>5}  {'cnnc cuda ms':>12} "
          f"{'cuDNN ms':>9} {'cnnc vs cuDNN':>13}")
    for index in range(0, len(rows), 2):
        ours, theirs = rows[index], rows[index + 1]
        print(f"{ours['workload']:<9} {ours['mode']:<11} {ours['batch']:>5}  "
              f"{ours['ms']:>12.2f} {theirs['ms']:>9.2f} {theirs['ms'] / ours['ms']:>12.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
