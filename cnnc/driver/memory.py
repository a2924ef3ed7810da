"""Which working buffers of an entry point may share memory.

A call's kernels run one after another, and most of what they write is read only by the
next few: a convolution's zero-padded input copy by the convolution itself, an activation
by the layer after it. With a buffer of its own for each, a forward pass of ResNet-20 at
batch 64 writes 50 MiB of padded copies and 40 activations, all cold in the cache each time
a kernel touches them. Here each entry point's transient buffers are put into regions: the
buffers of a region are never live at once, so the runtime (runtime.workspace) gives them one
piece of memory, which the kernel before has just used and left in the cache.

A buffer is transient in an entry point when it is a value or scratch buffer, the first of
the entry's kernels that uses it writes it, and no caller reads it after the call (the
network's output, the loss, the gradients: `kept`). It is live from the first kernel that
uses it to the last, both included, so no kernel is given two buffers of one region (the
kernels' pointer arguments do not alias). A region's size is its largest buffer's, at the
call's batch size; the runtime allocates it.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

from cnnc.artifact.format import numpy_dtype
from cnnc.graph.ir import BATCH, Role, Tensor
from cnnc.loops.ir import LoopFunction

TRANSIENT_ROLES = (Role.VALUE, Role.SCRATCH)
# the batch at which buffers are compared to choose a region (the runtime sizes each region
# at the call's batch): a training batch's typical size
SIZING_BATCH = 64


@dataclass
class _Region:
    members: list[str] = field(default_factory=list)
    free_after: int = -1  # the last kernel that uses its newest member
    size: int = 0  # bytes at SIZING_BATCH


def regions(kernels: list[LoopFunction], storage: tuple[Tensor, ...],
            kept: Collection[str]) -> list[list[str]]:
    """The transient buffers of an entry point that runs `kernels` in order, in regions of
    buffers never live at once; each region's buffers in the order the kernels first use
    them. Buffers that are not transient are in no region."""
    tensors = {t.name: t for t in storage}
    spans = _spans(kernels, tensors, kept)
    found: list[_Region] = []
    for name, (first, last) in sorted(spans.items(), key=lambda item: item[1]):
        size = _bytes(tensors[name])
        region = _best_free(found, first, size)
        if region is None:
            region = _Region()
            found.append(region)
        region.members.append(name)
        region.free_after = last
        region.size = max(region.size, size)
    return [region.members for region in found]


def _spans(kernels: list[LoopFunction], tensors: dict[str, Tensor],
           kept: Collection[str]) -> dict[str, tuple[int, int]]:
    """Each transient buffer's first and last kernel (indices into `kernels`)."""
    spans: dict[str, tuple[int, int]] = {}
    outside: set[str] = set(kept)  # read before any kernel writes it, or read by the caller
    for index, kernel in enumerate(kernels):
        for buffer in kernel.buffers:
            name = buffer.name
            if name in outside or tensors[name].role not in TRANSIENT_ROLES:
                continue
            if name not in spans and not buffer.is_output:  # what an earlier call left
                outside.add(name)
                continue
            spans[name] = (spans.get(name, (index, index))[0], index)
    return spans


def _best_free(found: list[_Region], first: int, size: int) -> _Region | None:
    """Of the regions free before kernel `first`, the smallest that holds `size` bytes, else
    the largest (which grows); None when none is free."""
    free = [r for r in found if r.free_after < first]
    if not free:
        return None
    holding = [r for r in free if r.size >= size]
    if holding:
        return min(holding, key=lambda r: r.size)
    return max(free, key=lambda r: r.size)


def _bytes(tensor: Tensor) -> int:
    shape = [SIZING_BATCH if dim == BATCH else int(dim) for dim in tensor.shape]
    return math.prod(shape) * numpy_dtype(tensor.dtype).itemsize
