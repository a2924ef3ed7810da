"""Libraries for other machines, run here: an aarch64 build under qemu-aarch64, and a wasm32
build under Node.js through examples/wasm's loader, against the Python module's forward
within float32 rounding (their math functions and vector widths are not this CPU's)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from clib import GRAPH, build, harness, need, perturbed, run_harness

import cnnc
from cnnc.backends.target import named_target
from conftest import EXAMPLES, REPO

TOLERANCE = {"rtol": 2e-5, "atol": 2e-6}


@pytest.fixture(scope="module")
def graph_module():
    module = cnnc.compile(GRAPH)
    weights = perturbed(module, 5)
    module.set_params(weights)
    return module, weights


# triple, its C compiler, qemu's user-mode emulator, the ELF machine number (e_machine)
LINUX_TARGETS = [("aarch64-linux-gnu", "aarch64-linux-gnu-gcc", "qemu-aarch64", 183),
                 ("arm", "arm-linux-gnueabihf-gcc", "qemu-arm", 40),
                 ("riscv64", "riscv64-linux-gnu-gcc", "qemu-riscv64", 243)]


@pytest.mark.parametrize(("triple", "cc", "qemu", "machine"), LINUX_TARGETS,
                         ids=[t[0].split("-")[0] for t in LINUX_TARGETS])
def test_linux_library_under_qemu(triple, cc, qemu, machine, tmp_path, graph_module):
    need(cc, qemu)
    module, weights = graph_module
    target = named_target(triple, "generic")
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 11, 11)).astype(np.float32)
    cases = [(GRAPH, weights, x, module.forward(x))]
    if triple.startswith("aarch64"):  # the target: LeNet-5 too
        lenet_x = np.random.default_rng(1).uniform(0, 1, (3, 1, 28, 28)).astype(np.float32)
        cases.append((EXAMPLES / "lenet.cnn", None, lenet_x,
                      cnnc.compile(EXAMPLES / "lenet.cnn").forward(lenet_x)))
    for number, (program, given, batch, expected) in enumerate(cases):
        out = tmp_path / str(number)
        library = build(out, program, target, weights=given)
        net = library.layout.net
        shared = (out / f"lib{net}.so").read_bytes()
        assert int.from_bytes(shared[18:20], "little") == machine
        runnable = harness(library, out, [cc], flags=("-static",))
        y = run_harness(runnable, str(out / f"{net}.weights.bin"), batch, out, threads=2,
                        runner=(qemu,))
        np.testing.assert_allclose(y.reshape(expected.shape), expected, **TOLERANCE)


def test_wasm32_library_under_node(tmp_path, graph_module):
    need("clang", "wasm-ld", "llvm-ar", "node")
    module, weights = graph_module
    target = named_target("wasm32", "generic")
    x = np.random.default_rng(2).normal(0, 1, (3, 3, 11, 11)).astype(np.float32)
    library = build(tmp_path, GRAPH, target, weights=weights)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tiny_graph.h", "libtiny_graph.a", "tiny_graph.wasm", "tiny_graph.weights.bin"}
    done, y = run_node(tmp_path, tmp_path / "tiny_graph.weights.bin", x)
    assert done.returncode == 0, done.stderr
    y = y.reshape(3, 7)
    np.testing.assert_allclose(y, module.forward(x), **TOLERANCE)
    assert library.layout.net == "tiny_graph"
    # another network's weights: the loader reports the library's status in words
    other = build(tmp_path / "lenet", EXAMPLES / "lenet.cnn", target)
    done, _ = run_node(tmp_path, tmp_path / "lenet" / "lenet5.weights.bin", x)
    assert done.returncode == 1 and "not this network's" in done.stderr
    assert other.layout.net == "lenet5"


def test_wasm32_float64_network_under_node(tmp_path):
    """The loader takes Float64Arrays for a float64 network (NET_scalar_size is 8)."""
    need("clang", "wasm-ld", "llvm-ar", "node")
    from cnnc.driver.pipeline import Options
    from cnnc.frontend.source import to_source
    from cnnc.library.build import build_library

    build_library(to_source(GRAPH), tmp_path, Options(named_target("wasm32"), dtype="f64"))
    x = np.random.default_rng(3).normal(0, 1, (2, 3, 11, 11))
    done, y = run_node(tmp_path, tmp_path / "tiny_graph.weights.bin", x)
    assert done.returncode == 0, done.stderr
    y = y.reshape(2, 7)
    np.testing.assert_allclose(y, cnnc.compile(GRAPH, dtype="f64").forward(x), rtol=1e-12,
                               atol=1e-14)


def run_node(folder, weights, x: np.ndarray):
    """examples/wasm/run.mjs on folder's tiny_graph.wasm: its result and output (x's dtype)."""
    x.tofile(folder / "x.bin")
    done = subprocess.run(["node", str(REPO / "examples/wasm/run.mjs"),
                           str(folder / "tiny_graph.wasm"), str(weights), str(folder / "x.bin"),
                           str(len(x)), str(folder / "y.bin")], capture_output=True, text=True)
    output = np.fromfile(folder / "y.bin", dtype=x.dtype) if done.returncode == 0 else None
    return done, output
