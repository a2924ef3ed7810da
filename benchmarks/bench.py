"""Side-by-side speed of cnnc and the tools people use today, on this machine, in one run.

    python benchmarks/bench.py [--repeats 7] [--json results.json] [--only W1,W3] [--threads 2]

Workloads W1-W4 (see issue 5 in the project's tracker and README "Performance"), and the
graph networks W5 (ResNet-20) and W6 (MobileNetV2) of issue 15 (docs/performance.md), and W7:
torchvision's ResNet-18 at 224 x 224, exported from PyTorch to ONNX and imported. cnnc's
result is checked against its numpy reference, and every peer's against cnnc's, before
anything is timed (for a training step, one step's loss and changes too, where the network
has no dropout: torch_model.py); timings are medians of interleaved repeats (each repeat
runs every system once, in turn). Peers that are not installed are left out of the table.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Several thread pools share two cores here: numpy's BLAS (for the reference checks),
# PyTorch's OpenMP, ONNX Runtime's and cnnc's. Idle pools that spin-wait steal the cores
# from whichever system runs next, and the interleaved timings measured 2-4x slow for every
# system. So no pool spins: BLAS has one thread in this process (the peak is measured in a
# child process with `--threads` BLAS threads), OpenMP waits passively, and ONNX Runtime's
# spinning is turned off.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402

import cnnc  # noqa: E402
from cnnc.passes import reference  # noqa: E402
from cnnc.passes.summary import summarize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONV_W3 = "network w3\ninput: 64x56x56\nconv c: 64 3x3 pad=1 -> relu\nloss mse\n"
CONV_W4 = "network w4\ninput: 32x64x64\nconv c: 64 3x3 stride=2 pad=1\nloss mse\n"
WORKLOADS = [  # (id, program, batch, mode)
    ("W1", ROOT / "examples/lenet.cnn", 64, "forward"),
    ("W1", ROOT / "examples/lenet.cnn", 64, "train step"),
    ("W1", ROOT / "examples/lenet.cnn", 256, "train step"),
    ("W1", ROOT / "examples/lenet.cnn", 1, "forward"),
    ("W2", ROOT / "examples/vgg_small.cnn", 64, "forward"),
    ("W2", ROOT / "examples/vgg_small.cnn", 64, "train step"),
    ("W3", CONV_W3, 8, "forward"),
    ("W3", CONV_W3, 8, "fwd+bwd"),
    ("W4", CONV_W4, 16, "forward"),
    ("W4", CONV_W4, 16, "fwd+bwd"),
    ("W5", ROOT / "examples/resnet20.cnn", 64, "forward"),
    ("W5", ROOT / "examples/resnet20.cnn", 64, "train step"),
    ("W6", ROOT / "examples/mobilenet_v2.cnn", 16, "forward"),
    ("W6", ROOT / "examples/mobilenet_v2.cnn", 1, "forward"),
    ("W7", "resnet18.onnx", 1, "forward"),  # made by resnet18_onnx when it runs
]
W7_MODEL = "resnet18.onnx"


PEAK_SCRIPT = """
import sys, time
import numpy as np
a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
a @ a
best = float("inf")
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - start)
print(2 * 2048**3 / best / 1e9)
"""


def peak_gflops(repeats: int, threads: int) -> float:
    """numpy's float32 2048³ matmul with `threads` BLAS threads: the practical peak,
    measured in a child process so that its BLAS threads are gone before any timing here."""
    environment = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads),
                       MKL_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(repeats)], env=environment,
                            capture_output=True, text=True, check=True)
    return float(result.stdout)


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def flops(graph, batch: int, mode: str) -> float:
    """2 × multiply-adds of conv and dense layers; backward counted as twice forward."""
    forward = sum(r.flops for r in summarize(graph).rows) * batch
    return forward if mode == "forward" else 3 * forward


def data_for(module: cnnc.Module, batch: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *module.input_shape)).astype(np.float32)
    if module.takes_labels:
        return x, rng.integers(0, module.output_shape[0], batch)
    return x, rng.standard_normal((batch, *module.output_shape)).astype(np.float32)


def cnnc_call(module: cnnc.Module, mode: str, x, y) -> Callable[[], object]:
    if mode == "forward":
        return lambda: module(x)
    if mode == "fwd+bwd":
        return lambda: module.gradients(x, y)
    return lambda: module.train_step(x, y)


def torch_peers(graph, module: cnnc.Module, mode: str, x, y, compiled: bool) -> dict:
    """PyTorch eager (and torch.compile) doing the same work, checked before timing."""
    try:
        import torch
    except ImportError:
        return {}
    from torch_model import build, step_function

    torch.set_num_threads(module.threads)
    model = build(graph, module.params | module.buffers)
    peers = {"PyTorch eager": step_function(model, graph, mode, x, y, module)}
    if compiled:
        peers["torch.compile"] = step_function(torch.compile(model), graph, mode, x, y, module)
    if mode == "forward":
        from torch_model import onnx_runtime

        runner = onnx_runtime(model, x, module.threads)
        if runner is not None:
            peers["ONNX Runtime"] = runner
    return peers


def fresh_module(program, threads: int, folder: Path) -> cnnc.Module:
    """The program's module, as compiled: the first time compiled and saved to `folder`,
    later loaded from there (ResNet-20 and MobileNetV2 take a minute to compile)."""
    key = str(program) if isinstance(program, Path) else f"inline-{abs(hash(program))}"
    path = folder / f"{Path(key).stem}-{threads}.cnnm"
    if not path.exists():
        cnnc.compile(program, threads=threads).save(path)
    return cnnc.load(path, threads=threads)


def set_statistics(module: cnnc.Module, graph) -> None:
    """Batch norm's scale, shift and running statistics set away from 1 and 0, so that the
    checks below see them used (folded into the convolution at inference); no change to a
    network without batch norm. Timings do not depend on the values."""
    rng = np.random.default_rng(1)
    values = {}
    for node in graph.nodes:
        if node.op != "batchnorm":
            continue
        weight, bias, mean, var = node.inputs[1:5]
        size = graph.tensor(weight).shape[0]
        values[weight] = rng.uniform(0.5, 1.5, size).astype(np.float32)
        values[bias] = (0.1 * rng.standard_normal(size)).astype(np.float32)
        values[mean] = (0.1 * rng.standard_normal(size)).astype(np.float32)
        values[var] = rng.uniform(0.5, 1.5, size).astype(np.float32)
    if values:
        module.set_params(values)


def resnet18_onnx(folder: Path) -> Path:
    """W7's model: torchvision's ResNet-18 (as tests/onnx/torch_models.py writes it, with
    1000 classes and random weights) exported by torch in eval mode, batch norm folded."""
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "onnx"))
    from torch_models import ResNet18, randomized

    path = folder / W7_MODEL
    if not path.exists():
        model = randomized(ResNet18(classes=1000)).eval()
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), path, dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    return path


def run_workload(workload, repeats: int, threads: int, compiled: bool,
                 folder: Path) -> list[dict]:
    name, program, batch, mode = workload
    if program == W7_MODEL:
        program = resnet18_onnx(folder)
    module = fresh_module(program, threads, folder)
    graph = cnnc.check(program)
    set_statistics(module, graph)
    x, y = data_for(module, batch)
    expected = reference.forward(graph, x, module.params | module.buffers)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(module(x), expected, rtol=1e-4, atol=1e-5 * scale)
    systems = {"cnnc": cnnc_call(module, mode, x, y)}
    systems |= torch_peers(graph, module, mode, x, y, compiled)
    for call in systems.values():
        call()  # warm up (and compile, for torch.compile)
    times: dict[str, list[float]] = {s: [] for s in systems}
    for _ in range(repeats):
        for system, call in systems.items():
            times[system].append(_seconds(call))
    work = flops(graph, batch, mode)
    return [{"workload": name, "mode": mode, "batch": batch, "system": system,
             "ms": statistics.median(t) * 1e3, "gflops": work / statistics.median(t) / 1e9}
            for system, t in times.items()]


def compile_and_load_seconds(repeats: int) -> tuple[float, float]:
    """Median wall time of compiling LeNet-5 forward + backward at -O3 (front end included,
    the compile cache not used), and of loading the saved module file."""
    program = ROOT / "examples/lenet.cnn"
    compiles, loads = [], []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lenet.cnnm"
        for _ in range(max(3, repeats // 2)):
            compiles.append(_seconds(lambda: cnnc.compile(program, cache=False).save(path)))
            loads.append(_seconds(lambda: cnnc.load(path)))
    return statistics.median(compiles), statistics.median(loads)


def print_table(rows: list[dict], peak: float) -> None:
    print(f"peak (numpy float32 2048^3 matmul): {peak:.0f} GFLOP/s")
    print(f"{'workload':<10} {'mode':<11} {'batch':>5}  {'system':<14} {'ms':>9} "
          f"{'GFLOP/s':>8} {'of peak':>8} {'vs best peer':>12}")
    for key in dict.fromkeys((r["workload"], r["mode"], r["batch"]) for r in rows):
        group = [r for r in rows if (r["workload"], r["mode"], r["batch"]) == key]
        peers = [r["ms"] for r in group if r["system"] != "cnnc"]
        best = min(peers) if peers else math.nan
        for r in group:
            ratio = best / r["ms"] if r["system"] == "cnnc" and peers else math.nan
            shown = f"{ratio:.2f}x" if not math.isnan(ratio) else ""
            print(f"{r['workload']:<10} {r['mode']:<11} {r['batch']:>5}  {r['system']:<14} "
                  f"{r['ms']:>9.2f} {r['gflops']:>8.1f} {r['gflops'] / peak:>8.0%} "
                  f"{shown:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated workload ids, e.g. W1,W3")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    chosen = [w for w in WORKLOADS if not args.only or w[0] in args.only.split(",")]
    peak = peak_gflops(args.repeats, args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for workload in chosen:
            rows += run_workload(workload, args.repeats, args.threads, args.torch_compile,
                                 Path(folder))
    print_table(rows, peak)
    compile_s, load_s = compile_and_load_seconds(args.repeats)
    print(f"compile LeNet-5 forward + backward at -O3, and save: {compile_s:.2f} s; "
          f"cnnc.load: {load_s * 1e3:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_gflops": peak, "rows": rows,
                                               "compile_lenet_s": compile_s,
                                               "load_lenet_s": load_s}, indent=2))


if __name__ == "__main__":
    main()
