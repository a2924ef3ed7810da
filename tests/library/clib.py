"""Helpers of the C library tests: the tools (a test skips, saying which is missing, where
one is not installed), building a library, and the harness program (harness.c.in) that
runs a library's forward from C."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cnnc
from cnnc.driver.pipeline import Options
from cnnc.frontend.source import to_source
from cnnc.library.build import Library, build_library

# batch norm (folded at init: the pack entry), a residual add, depthwise, strided, tanh and
# sigmoid, gelu (erf: the C library's, or the wasm loader's), global pooling, softmax
GRAPH = """network tiny_graph
input image: 3x11x11
conv c1: 8 3x3 pad=1 bias=false
batchnorm bn1 -> relu
conv dw: 8 3x3 pad=1 groups=8 bias=false
batchnorm bn2 -> tanh
add res: bn2, bn1
conv c2: 5 3x3 stride=2 pad=1 -> sigmoid
globalavgpool pool
dense hidden: 9 -> gelu
dense fc: 7 -> softmax
"""


def perturbed(module: cnnc.Module, seed: int) -> dict[str, np.ndarray]:
    """Every parameter and buffer changed (running variances kept positive)."""
    rng = np.random.default_rng(seed)
    values = {**module.params, **{k: v for k, v in module.buffers.items()
                                  if not k.endswith("num_batches_tracked")}}
    return {k: (np.abs(v) + rng.uniform(0.5, 1.5, v.shape) if k.endswith("running_var")
                else v + rng.normal(0, 0.3, v.shape)).astype(v.dtype) for k, v in values.items()}


HERE = Path(__file__).resolve().parent
HOST_CC = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (tools/install-test-tools.sh installs "
                    "them on Debian)")


def host_cc() -> str:
    if HOST_CC is None:
        pytest.skip("no C compiler (cc, gcc or clang) installed")
    return HOST_CC


def build(out: Path, program: str | Path, target=None, weights=None, embed=False) -> Library:
    """The library of `program` (a path or a program's text) for `target` (default: host)."""
    from cnnc.backends.target import host_cpu
    from cnnc.cli.compile import program_source

    stored = None  # an ONNX model's own weights
    if isinstance(program, Path):
        source, stored = program_source(str(program))
    else:
        source = to_source(program)
    return build_library(source, out, Options(target or host_cpu()),
                         {**(stored or {}), **(weights or {})}, embed)


def harness(library: Library, out: Path, cc: list[str], suffix: str = "",
            flags: tuple[str, ...] = ()) -> Path:
    """harness.c.in for `library`, compiled with `cc` against its static library."""
    net = library.layout.net
    source = out / f"harness_{net}.c"
    text = (HERE / "harness.c.in").read_text()
    source.write_text(text.replace("@UNET@", net.upper()).replace("@NET@", net))
    program = out / f"harness_{net}{suffix}"
    subprocess.run([*cc, "-O1", "-std=c99", f"-I{out}", str(source), str(out / f"lib{net}.a"),
                    *flags, "-lm", "-lpthread", "-o", str(program)], check=True)
    return program


def run_harness(program: Path, weights: str, x: np.ndarray, out: Path, threads: int = 1,
                runner: tuple[str, ...] = (), dtype=np.float32) -> np.ndarray:
    """The harness's output for the batch x."""
    x_path, y_path = out / "x.bin", out / "y.bin"
    np.ascontiguousarray(x, dtype=dtype).tofile(x_path)
    done = subprocess.run([*runner, str(program), weights, str(x_path), str(len(x)),
                           str(y_path), str(threads)], capture_output=True, text=True)
    assert done.returncode == 0, (done.returncode, done.stderr)
    return np.fromfile(y_path, dtype=dtype)
