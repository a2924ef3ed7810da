"""The kernel-program verifier: every example's kernels pass it, and each broken invariant is
caught with a message that names it."""

from __future__ import annotations

import dataclasses

import pytest

from cnnc.diagnostics import Source
from cnnc.driver.pipeline import Options, Stage, run
from cnnc.frontend.source import read_source
from cnnc.graph.verify_kernels import verify_kernels
from conftest import EXAMPLES

TRAINABLE = ("network t\ninput: 1x6x6\nconv c: 2 3x3 -> relu\nmaxpool 2x2\nflatten\n"
             "dense d: 3 -> softmax\nloss cross_entropy\n")


def kernels_of(source: Source):
    return run(source, Options(), until=Stage.FUSE).kernels


@pytest.mark.parametrize("name", ["lenet", "mlp", "vgg_small"])
def test_every_example_passes(name):
    verify_kernels(kernels_of(read_source(EXAMPLES / f"{name}.cnn")))


@pytest.fixture(scope="module")
def program():
    return kernels_of(Source(TRAINABLE))


def with_kernels(program, kernels):
    return dataclasses.replace(program, kernels=tuple(kernels))


def test_a_kernel_that_reads_what_a_later_kernel_writes(program):
    first, second, *rest = program.kernels
    with pytest.raises(AssertionError, match=f"kernel {second.name} reads .* before it is "
                                             "written"):
        verify_kernels(with_kernels(program, [second, first, *rest]))


def test_an_output_written_twice(program):
    first, second, *rest = program.kernels
    again = dataclasses.replace(second, outputs=first.outputs[:1])
    with pytest.raises(AssertionError, match=f"{first.outputs[0]} is written twice "
                                             f"\\(again by {second.name}\\)"):
        verify_kernels(with_kernels(program, [first, again, *rest]))


def test_an_output_without_storage(program):
    first, *rest = program.kernels
    lost = dataclasses.replace(first, outputs=("lost",))
    with pytest.raises(AssertionError, match=f"kernel {first.name} writes lost, which has no "
                                             "storage"):
        verify_kernels(with_kernels(program, [lost, *rest]))


def test_duplicate_kernel_names(program):
    first, second, *rest = program.kernels
    twin = dataclasses.replace(second, name=first.name)
    with pytest.raises(AssertionError, match="duplicate kernel names"):
        verify_kernels(with_kernels(program, [first, twin, *rest]))


def test_an_alias_of_a_tensor_without_storage(program):
    aliases = (*program.aliases, ("flat", "nothing"))
    with pytest.raises(AssertionError, match="flat aliases nothing, which has no storage"):
        verify_kernels(dataclasses.replace(program, aliases=aliases))


def test_an_alias_with_storage_of_its_own(program):
    stored = program.storage[0].name
    aliases = (*program.aliases, (stored, program.storage[1].name))
    with pytest.raises(AssertionError, match=f"{stored} is an alias and has storage"):
        verify_kernels(dataclasses.replace(program, aliases=aliases))


def test_duplicate_storage(program):
    storage = (*program.storage, program.storage[0])
    with pytest.raises(AssertionError, match="duplicate storage tensors"):
        verify_kernels(dataclasses.replace(program, storage=storage))


def test_an_output_no_kernel_writes(program):
    with pytest.raises(AssertionError, match=r"the output .* is never written"):
        verify_kernels(with_kernels(program, program.kernels[:1]))
