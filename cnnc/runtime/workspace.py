"""One thread's working memory for calls of one batch size: the buffers the kernels write,
and the pointer tables that hand them to an entry point.

A buffer of its own for every value and scratch buffer is the plain table. An entry point
whose module lists shared regions (driver.memory) gets a table of its own, in which each
region's buffers point at one piece of memory: the buffers of a region are never live at
once within that entry point's call, and the one the kernel before left in the cache is the
one the next kernel writes. The regions of every entry point lie in one arena: a thread runs
one call at a time, and what a call returns is copied out before the next.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnc.artifact.manifest import Buffer
from cnnc.runtime.arguments import refuse

# the roles of what the module keeps, or a call gives: no slot of the workspace's own
NOT_OWN = ("input", "param", "state", "buffer", "packed")
ALIGN = 64  # bytes: a cache line, and more than any vector the kernels load


@dataclass
class Table:
    """The arrays of a call's slots and their pointer table (the last slot: the call's
    thread team). `generation`: of the kept arrays whose slots it holds (runtime.cpu)."""

    buffers: list[np.ndarray | None]
    pointers: Any
    generation: int | None = None


class Workspace:
    def __init__(self, storage: Sequence[Buffer], batch: int,
                 shared: dict[str, tuple[tuple[int, ...], ...]], dtype: np.dtype) -> None:
        self.batch = batch
        self._storage = storage
        self._shared = shared  # role -> regions, as slot indices
        self._dtype = dtype
        self._own: list[np.ndarray | None] = [None] * len(storage)  # made when first needed
        self._tables: dict[str | None, Table] = {}
        self._offsets: dict[str, list[int]] = {}  # role -> each region's offset in the arena
        self._arena: np.ndarray | None = None

    def table(self, role: str | None) -> Table:
        """The table of calls of entry point `role` with its shared regions; None: the plain
        table, every buffer its own."""
        found = self._tables.get(role)
        if found is None:
            found = self._tables[role] = self._made(role)
        return found

    def _made(self, role: str | None) -> Table:
        buffers: list[np.ndarray | None] = [None] * len(self._storage)
        if role is not None:
            arena = self._arena_array()
            for region, offset in zip(self._shared[role], self._offsets[role], strict=True):
                for index in region:
                    buffers[index] = self._view(arena, offset, self._storage[index])
        for index, buffer in enumerate(self._storage):
            if buffers[index] is None and buffer.role not in NOT_OWN:
                buffers[index] = self._own_buffer(index)
        pointers = (ctypes.c_void_p * (len(buffers) + 1))(
            *[0 if b is None else b.ctypes.data for b in buffers], 0)
        return Table(buffers, pointers)

    def _arena_array(self) -> np.ndarray:
        """The arena, laid out for every role at once: its largest role's regions."""
        if self._arena is None:
            need = 0
            for role, regions in self._shared.items():
                offsets, end = [], 0
                for region in regions:
                    offsets.append(end)
                    # one cache line more: sizes are often whole 4 KiB pages (a 32 x 32
                    # plane), and regions a page apart map a kernel's input and output
                    # rows to the same L1 sets
                    end += _aligned(max(self._bytes(i) for i in region)) + ALIGN
                self._offsets[role] = offsets
                need = max(need, end)
            self._arena = _allocated((need + ALIGN,), np.dtype(np.uint8), self.batch,
                                     "the shared working memory")
        return self._arena

    def _view(self, arena: np.ndarray, offset: int, buffer: Buffer) -> np.ndarray:
        start = offset + (-arena.ctypes.data % ALIGN)
        dtype = buffer.numpy_dtype
        count = int(np.prod(buffer.sized(self.batch) or (1,)))
        flat = arena[start:start + count * dtype.itemsize].view(dtype)
        return flat.reshape(buffer.sized(self.batch) or (1,))

    def _bytes(self, index: int) -> int:
        buffer = self._storage[index]
        return int(np.prod(buffer.sized(self.batch) or (1,))) * buffer.numpy_dtype.itemsize

    def _own_buffer(self, index: int) -> np.ndarray:
        if self._own[index] is None:
            self._own[index] = self._buffer_for(self._storage[index])
        return self._own[index]

    def _buffer_for(self, buffer: Buffer) -> np.ndarray:
        if buffer.role in ("target", "hyper", "noise"):  # for entries that do not read them
            return np.zeros(8, dtype=buffer.numpy_dtype)
        if buffer.role == "loss":
            return np.zeros(1, dtype=self._dtype)
        return _allocated(buffer.sized(self.batch) or (1,), buffer.numpy_dtype, self.batch,
                          f"the buffer {buffer.name}")


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def _allocated(shape: tuple[int, ...], dtype: np.dtype, batch: int, what: str) -> np.ndarray:
    try:
        return np.empty(shape, dtype=dtype)
    except MemoryError:
        raise refuse(f"forward: a batch of {batch} needs more memory than there is "
                     f"({what} alone is {shape})") from None
