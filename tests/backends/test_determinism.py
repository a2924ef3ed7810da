"""`forward` is bit-identical for any thread count (README, "From Python").

The runtime runs each thread's slice of the batch on its own, so a sample's output must not
depend on which slice it lands in, nor on where in the slice. Two things make that hard: a
dense layer's register block runs over the batch, so a sample takes the full block or the
tail depending on the slicing, and LLVM vectorizes plain loops over the batch with a scalar
remainder. Both paths must do the same arithmetic, to the bit, at every -O level.

The oracles are the module on one thread and the module on each sample alone (a slicing no
thread count makes): exact equality, no tolerance. The backend spells out every fused
multiply-add rather than leave it to LLVM, so modules built at -O0 and -O3 must agree too.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from programs import conv_programs, valid_programs

import cnnc
from cnnc.backends.target import CpuTarget, host_cpu
from cnnc.diagnostics import Source
from cnnc.driver.modules import compile_module

# Uneven slices for 2, 3 and 4 threads (at least 4 samples a slice), and on one thread both
# whole register blocks of samples and a tail, for blocks of 4 to 16 rows.
BATCHES = (13, 17, 37, 50)
THREADS = (2, 3, 4)

# The fuzzer's case: at -O0 LLVM fused the multiply-adds of 15 of the 16 rows of the dense
# register block and not those of the 16th, nor of the tail's single row.
DENSE = "network t\ninput: 1x5x7\ndense d: 13 -> relu\ndense out: 10 -> softmax\n"

# Every forward schedule: a block over output columns (3 channels) with a fused vector max
# pool, a block over channels at stride 2 with padding, an asymmetric stride, dense blocks.
CONV = ("network t\ninput: 2x12x16\nconv c1: 3 3x3 pad=1 -> relu\nmaxpool 2x2\n"
        "conv c2: 20 3x3 stride=2 pad=1 -> tanh\nconv c3: 5 2x1 stride=2x1\n"
        "dense d: 9 -> relu\ndense out: 4 -> softmax\n")

# Unscheduled: at -O1 LLVM unrolls the dot products and vectorizes the batch loop, and the
# scalar remainder used to pair its multiplies into one vector and add them one at a time.
PLAIN = ("network t\ninput: 2x3x3\nconv c: 1 1x1\navgpool 2x2 stride=1 pad=1\n"
         "dense d: 1 -> sigmoid\n")


@functools.cache
def compiled(program: str, dtype: str, opt_level: int, schedule: bool = True) -> cnnc.Module:
    """One module per build, shared by the tests (each sets its own thread count)."""
    return cnnc.compile(program, dtype=dtype, opt_level=opt_level, threads=1,
                        schedule=schedule)


def assert_thread_counts_agree(module: cnnc.Module, batches: tuple[int, ...] = BATCHES,
                               seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for batch in batches:
        x = rng.standard_normal((batch, *module.input_shape)).astype(module.dtype)
        module.set_threads(1)
        whole = module.forward(x)
        for threads in THREADS:
            module.set_threads(threads)
            np.testing.assert_array_equal(module.forward(x), whole,
                                          err_msg=f"{threads} threads, batch {batch}")
    module.set_threads(1)
    alone = np.concatenate([module.forward(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(alone, whole, err_msg=f"each sample alone, batch {len(x)}")


def test_the_reported_o0_dense_layer():
    assert_thread_counts_agree(compiled(DENSE, "f32", 0), (7, 11, 13, 17, 50))


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("opt_level", [0, 1, 2, 3])
@pytest.mark.parametrize("program", [DENSE, CONV], ids=["dense", "conv"])
def test_scheduled_kernels_at_every_opt_level(program, opt_level, dtype):
    assert_thread_counts_agree(compiled(program, dtype, opt_level))


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("opt_level", [0, 1, 3])
@pytest.mark.parametrize("program", [PLAIN, CONV], ids=["plain", "conv"])
def test_plain_loops_at_several_opt_levels(program, opt_level, dtype):
    assert_thread_counts_agree(compiled(program, dtype, opt_level, schedule=False))


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize(("program", "schedule"), [(DENSE, True), (CONV, True), (PLAIN, False)],
                         ids=["dense", "conv", "plain"])
def test_every_opt_level_gives_the_same_bits(program, schedule, dtype):
    """LLVM may vectorize and unroll more at -O3, but not round differently."""
    modules = [compiled(program, dtype, level, schedule) for level in (0, 1, 2, 3)]
    x = np.random.default_rng(5).standard_normal((37, *modules[0].input_shape))
    x = x.astype(modules[0].dtype)
    for module in modules:
        module.set_threads(1)
    at_o0 = modules[0].forward(x)
    for level, module in enumerate(modules[1:], start=1):
        np.testing.assert_array_equal(module.forward(x), at_o0, err_msg=f"-O{level}")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(valid_programs().map(lambda case: case[0]), conv_programs()),
       st.integers(0, 3), st.sampled_from(["f32", "f64"]), st.booleans())
def test_drawn_programs(text, opt_level, dtype, schedule):
    module = cnnc.compile(text, dtype=dtype, opt_level=opt_level, threads=1,
                          schedule=schedule)
    assert_thread_counts_agree(module, (17, 37))


def test_hosts_without_fma_multiply_then_add():
    """Where llvm.fma would be a slow libm call the backend multiplies and adds, and that
    path must be as deterministic: built here for this CPU with FMA turned off."""
    host = host_cpu()
    if not host.triple.startswith(("x86_64", "i386", "i686")):
        pytest.skip("FMA is part of the base instruction set of this CPU")
    features = [f for f in host.features.split(",") if f not in ("+fma", "-fma")]
    no_fma = dataclasses.replace(host, features=",".join([*features, "-fma"]))
    assert not no_fma.has_fma

    def module_file(level: int, target: CpuTarget):
        return compile_module(cnnc.check(DENSE), Source(DENSE), opt_level=level, target=target)

    assert ("llvm.fma" in module_file(3, host).sections["llvm_ir"].decode()) == host.has_fma
    for level in (0, 3):
        file = module_file(level, no_fma)
        assert "llvm.fma" not in file.sections["llvm_ir"].decode()
        assert_thread_counts_agree(cnnc.Module(file, threads=1), (17, 37))
