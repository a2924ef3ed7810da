"""Kernels that are copies of one another are compiled once (loops.canonical): the copies
are found, the object code holds one function for them, and each copy still reads and
writes its own buffers (every activation and gradient against the numpy reference)."""

from __future__ import annotations

import dataclasses

import numpy as np
from numerics import compare_with_reference

import cnnc
from cnnc.backends.target import host_cpu
from cnnc.driver.pipeline import Build, Options, Stage, advance
from cnnc.frontend.source import to_source
from cnnc.loops.canonical import code_key, shared_code
from conftest import EXAMPLES

# three convolutions of one shape in a row, then one of another
REPEATED = """network r
input: 4x9x9
conv a: 4 3x3 pad=1 -> relu
conv b: 4 3x3 pad=1 -> relu
conv c: 4 3x3 pad=1 -> relu
conv d: 3 3x3 pad=1
dense out: 5
loss mse
"""


def lowered(text: str):
    return advance(Build(to_source(text)), Options(host_cpu()), Stage.CODEGEN)


def test_the_copies_are_found_and_compiled_once():
    build = lowered(REPEATED)
    shared = shared_code(build.lowered.functions)
    forward = [n for n in build.lowered.entries["cnnc_forward"] if not n.startswith("out")]
    first = forward[0]
    assert [shared[n] for n in forward] == [first, first, first, forward[3]]
    defined = {line.split("@")[1].split("(")[0].strip('"') for line in
               build.code.llvm_ir.splitlines() if line.startswith("define")}
    assert first in defined and not {forward[1], forward[2]} & defined
    assert forward[3] in defined  # another shape: its own code


def test_each_copy_reads_and_writes_its_own_buffers():
    compare_with_reference(REPEATED, batch=3)
    module = cnnc.compile(REPEATED)
    x = np.random.default_rng(0).normal(0, 1, (2, 4, 9, 9)).astype(np.float32)
    y = np.random.default_rng(1).normal(0, 1, (2, 5)).astype(np.float32)
    gradients = module.gradients(x, y)
    # distinct weights give distinct gradients: a copy given another's pointers would not
    assert not np.array_equal(gradients["a.weight"], gradients["b.weight"])
    assert not np.array_equal(gradients["b.weight"], gradients["c.weight"])


def test_a_key_sees_every_field_but_the_names():
    build = lowered(REPEATED)
    a, b = build.lowered.functions[0], build.lowered.functions[1]
    assert code_key(a) == code_key(b)
    other_dtype = dataclasses.replace(b, buffers=(dataclasses.replace(
        b.buffers[0], is_output=not b.buffers[0].is_output), *b.buffers[1:]))
    assert code_key(other_dtype) != code_key(a)
    swapped = dataclasses.replace(b, buffers=(b.buffers[1], b.buffers[0], *b.buffers[2:]))
    assert code_key(swapped) != code_key(a)  # the same body, the buffers in another order


def test_resnet20s_blocks_share_their_kernels():
    text = (EXAMPLES / "resnet20.cnn").read_text()
    build = advance(Build(to_source(text)), Options(host_cpu()), Stage.LOWER)
    shared = shared_code(build.lowered.functions)
    assert shared["layer1.1.conv1_conv_relu_infer"] == shared["layer1.2.conv1_conv_relu_infer"]
    assert shared["layer1.1.conv1_conv_relu_infer"] != shared["layer2.1.conv1_conv_relu_infer"]
    assert len(set(shared.values())) < len(shared) / 2
