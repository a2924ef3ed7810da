"""The invariants of a kernel program that lowering and the module's buffer table rely on.

Lowering gives each kernel a buffer for every tensor it names and the entry points run the
kernels in order, so a kernel may only read memory that exists before it runs: the input,
the parameters and the targets, or what an earlier kernel wrote. Each storage tensor is one
buffer, written by one kernel, and an alias (a flatten or reshape) is only a second name for
one of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnc.graph.ir import Role

if TYPE_CHECKING:
    from cnnc.graph.kernels import KernelProgram

# What the caller fills in before the first kernel runs.
GIVEN = (Role.INPUT, Role.PARAM, Role.TARGET, Role.BUFFER, Role.NOISE)


def verify_kernels(program: KernelProgram) -> None:
    """Raises AssertionError naming the first broken invariant of `program`."""
    names = [t.name for t in program.storage]
    storage = set(names)
    assert len(names) == len(storage), f"duplicate storage tensors in {names}"
    _verify_aliases(program, storage)
    kernel_names = [k.name for k in program.kernels]
    assert len(kernel_names) == len(set(kernel_names)), \
        f"duplicate kernel names in {kernel_names}"
    by_name = {k.name: k for k in program.kernels}
    training = [k for k in program.kernels if k.phase != "inference"]
    _verify_run(program, training, storage)
    if program.inference:
        assert all(name in by_name for name in program.inference), \
            "the inference pass names a kernel that does not exist"
        _verify_run(program, [by_name[name] for name in program.inference], storage)


def _verify_run(program: KernelProgram, kernels: list, storage: set[str]) -> None:
    """One pass's kernels in the order they run: each reads what exists, writes once."""
    written = {t.name for t in program.storage if t.role in GIVEN}
    for kernel in kernels:
        for name in kernel.inputs:
            home = program.storage_of(name)
            assert home in written, f"kernel {kernel.name} reads {name} before it is written"
        for name in kernel.outputs:
            assert name in storage, f"kernel {kernel.name} writes {name}, which has no storage"
            assert name not in written, f"{name} is written twice (again by {kernel.name})"
            written.add(name)
    assert program.output in written, f"the output {program.output} is never written"


def _verify_aliases(program: KernelProgram, storage: set[str]) -> None:
    for name, home in program.aliases:
        assert home in storage, f"{name} aliases {home}, which has no storage"
        assert name not in storage, f"{name} is an alias and has storage of its own"
