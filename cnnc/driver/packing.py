"""What a module computes from its parameters alone runs once per change of them, not on
every call: the `pack` entry point. It runs, in order,

- the kernels of the inference forward pass that read only parameters and buffers (batch
  norm folded into a convolution's weights and bias), whose results the module keeps;
- each scheduled kernel's repacking of those weights into its channel-blocked layout
  (`schedule.prepack`).

Their results get the role `packed`: the runtime keeps them between calls and runs `pack`
before the first call after the parameters or buffers change (runtime.cpu)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cnnc.graph.ir import Role, Tensor
from cnnc.graph.kernels import KernelProgram
from cnnc.schedule.prepack import split_packing


@dataclass(frozen=True)
class Packing:
    """The pack entry point's kernels in order, and the tensors it fills."""

    entry: tuple[str, ...]
    packed: frozenset[str]

    def role_of(self, tensor: Tensor) -> Tensor:
        """`tensor`, with the role `packed` if the pack entry point fills it."""
        if tensor.name in self.packed:
            return dataclasses.replace(tensor, role=Role.PACKED)
        return tensor


def packed_once(program: KernelProgram, kernels: list, scratch: list
                ) -> tuple[list, list, Packing]:
    """The kernels (each without its packing loops, then the packing functions), the scratch
    tensors (those the packing fills with the role `packed`), and the pack entry point."""
    folds, folded = constant_kernels(program)
    constant = {t.name for t in program.storage if t.role is Role.PARAM} | folded
    scratch_of = {t.name: t for t in scratch}
    split_kernels, packs = [], []
    for name, (function, *rest) in kernels:
        own = tuple(scratch_of[b.name] for b in function.buffers if b.name in scratch_of)
        split = split_packing(function, own, frozenset(constant))
        split_kernels.append((name, (split.kernel, *rest)))
        if split.pack is not None:
            packs.append(split.pack)
            scratch_of.update((t.name, t) for t in split.scratch)
    split_kernels += [(f.name, (f,)) for f in packs]
    packed = {t.name for t in scratch_of.values() if t.role is Role.PACKED} | folded
    entry = (*folds, *(f.name for f in packs))
    return split_kernels, [scratch_of[t.name] for t in scratch], Packing(entry, frozenset(packed))


def constant_kernels(program: KernelProgram) -> tuple[list[str], set[str]]:
    """The inference forward pass's kernels whose inputs are parameters, buffers or the
    results of such kernels, and whose results are of a fixed shape, written by no other
    kernel: the same on every call until the parameters change. Returns them and the
    storage tensors they write."""
    by_name = {k.name: k for k in program.kernels}
    roles = {t.name: t for t in program.storage}
    constant = {name for name, t in roles.items() if t.role in (Role.PARAM, Role.BUFFER)}
    writers: dict[str, int] = {}
    for kernel in program.kernels:
        for out in kernel.outputs:
            writers[program.storage_of(out)] = writers.get(program.storage_of(out), 0) + 1
    found, written = [], set()
    for name in program.forward_kernels(False):
        kernel = by_name[name]
        outputs = [program.storage_of(out) for out in kernel.outputs]
        if all(program.storage_of(i) in constant for i in kernel.inputs) and all(
                out in roles and roles[out].role is Role.VALUE and writers[out] == 1
                and all(isinstance(d, int) for d in roles[out].shape) for out in outputs):
            found.append(name)
            constant |= set(outputs)
            written |= set(outputs)
    return found, written
