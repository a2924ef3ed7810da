"""Kernel launches of a CUDA module: what the code generator records for each kernel, as
JSON in the manifest, and the grid the runtime launches it with."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Threads a block: a multiple of the 32 of a warp, small enough for any kernel's registers.
BLOCK_THREADS = 128


@dataclass(frozen=True, slots=True)
class Launch:
    """One kernel launch: its Python function, the storage buffers it takes (in order, after
    the batch size), and the extents of the loops its threads cover ("N": the batch)."""

    kernel: str
    buffers: tuple[str, ...]
    threads: tuple[int | str, ...]
    block_reduce: bool = False  # a block per thread of `threads`, summing in shared memory
    # the widest block the kernel was generated for: its shared arrays are sized for it
    block_threads: int = BLOCK_THREADS


def launches_to_json(launches: dict[str, tuple[Launch, ...]]) -> dict[str, list[dict]]:
    return {name: [{"kernel": launch.kernel, "buffers": list(launch.buffers),
                    "threads": list(launch.threads), "block_reduce": launch.block_reduce,
                    "block_threads": launch.block_threads}
                   for launch in group]
            for name, group in launches.items()}


def launch_from_json(item: dict) -> Launch:
    return Launch(str(item["kernel"]), tuple(map(str, item["buffers"])),
                  tuple(t if t == "N" else int(t) for t in item["threads"]),
                  bool(item.get("block_reduce", False)),
                  int(item.get("block_threads", BLOCK_THREADS)))


def thread_count(threads: tuple[int | str, ...], batch: int) -> int:
    return math.prod(batch if t == "N" else t for t in threads)


def grid(launch: Launch, batch: int, sum_threads: int = BLOCK_THREADS) -> tuple[int, int]:
    """(blocks, threads a block): a thread per iteration of the thread loops, or for a block
    reduction a block of `sum_threads` (a power of two up to BLOCK_THREADS) per result."""
    total = max(1, thread_count(launch.threads, batch))
    widest = launch.block_threads
    if launch.block_reduce:
        assert 0 < sum_threads <= widest and sum_threads & (sum_threads - 1) == 0
        return total, sum_threads
    per_block = min(widest, -(-total // 32) * 32)
    return -(-total // per_block), per_block
