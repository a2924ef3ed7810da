"""What a C library's code reads and writes, slot by slot of its kernels' pointer table: the
caller's input and output, the weights (from the weights file, in its order), the weights
repacked once at init, and the workspace a call is given. The layout's hash ties a weights
file to the networks it fits."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cnnc.artifact.format import numpy_dtype
from cnnc.graph.ir import BATCH, DType, Role, Tensor
from cnnc.library.weights import ALIGNMENT, fnv1a64

# what a slot of the table points at, by the tensor's role
KIND_OF_ROLE = {Role.INPUT: "input", Role.PARAM: "weight", Role.BUFFER: "weight",
                Role.PACKED: "packed"}  # every other role: the call's workspace


@dataclass(frozen=True, slots=True)
class Slot:
    name: str
    kind: str  # input, output, weight, packed or work
    role: Role  # the tensor's
    dtype: DType
    shape: tuple[int | str, ...]  # BATCH ("N") for the batch size

    @property
    def itemsize(self) -> int:
        return numpy_dtype(self.dtype).itemsize

    @property
    def bytes(self) -> int:
        """Of one sample where the shape has the batch, else of the whole array."""
        return self.elements * self.itemsize

    @property
    def per_batch(self) -> bool:
        return BATCH in self.shape

    @property
    def elements(self) -> int:
        """Elements of one sample where the shape has the batch, else of the whole array."""
        count = 1
        for dim in self.shape:
            count *= 1 if dim == BATCH else int(dim)
        return count


@dataclass(frozen=True, slots=True)
class Layout:
    net: str  # the C prefix of every symbol
    dtype: DType
    input_shape: tuple[int, ...]  # of one sample
    output_shape: tuple[int, ...]
    slots: tuple[Slot, ...]  # in the order of the kernels' pointer table

    def of_kind(self, kind: str) -> tuple[Slot, ...]:
        return tuple(s for s in self.slots if s.kind == kind)

    @property
    def weights_hash(self) -> int:
        """FNV-1a of every weight's name, dtype and shape, in the file's order: a weights
        file made for another network (or another version of this one) does not match."""
        text = ";".join(f"{s.name}:{s.dtype.value}:{'x'.join(map(str, s.shape))}"
                        for s in self.of_kind("weight"))
        return fnv1a64(text.encode("utf-8"))

    def weight_offsets(self) -> tuple[dict[str, int], int]:
        """Each weight's offset in the weights file's payload (64-byte aligned, in order),
        and the payload's size: what weights.weights_bytes lays out."""
        offsets, end = {}, 0
        for weight in self.of_kind("weight"):
            offsets[weight.name] = aligned(end)
            end = offsets[weight.name] + weight.bytes
        return offsets, end


def make_layout(net: str, dtype: DType, storage: tuple[Tensor, ...], used: list[str],
                input_name: str, output_name: str, input_shape: tuple[int, ...],
                output_shape: tuple[int, ...]) -> Layout:
    """The layout of the tensors `used` (table order) of `storage`."""
    by_name = {t.name: t for t in storage}
    slots = []
    for name in used:
        tensor = by_name[name]
        kind = "output" if name == output_name else KIND_OF_ROLE.get(tensor.role, "work")
        if name == input_name:
            kind = "input"
        slots.append(Slot(name, kind, tensor.role, tensor.dtype, tuple(tensor.shape)))
    return Layout(c_name(net), dtype, input_shape, output_shape, tuple(slots))


def c_name(name: str) -> str:
    """`name` as a C identifier: other characters become _, a leading digit gets a _."""
    text = re.sub(r"[^0-9A-Za-z_]", "_", name) or "net"
    return "_" + text if text[0].isdigit() else text


def aligned(size: int) -> int:
    return (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
