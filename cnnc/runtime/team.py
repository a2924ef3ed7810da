"""A call's thread team: the block of words that generated code and its helper threads
share (the protocol is in backends.llvm.team), and when a call gets one.

A call gets a team when it runs in one piece (a batch too small to cut among threads, or a
training call of a network with batch norm) and is big enough that the helpers' start,
some tens of microseconds, is repaid. Helpers run in the engine's thread pool and leave
when the call ends; the block stays alive until they do, since each holds it.
"""

from __future__ import annotations

from concurrent.futures import Future, wait
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cnnc.runtime.cpu import CpuEngine

# word offsets in the team block (64-bit words); fields that different threads write lie
# on different 64-byte lines
EPOCH, FN, CTX, EXTENT, CHUNK = 0, 1, 2, 3, 4
NEXT = 8
DONE = 16
PRESENT, WANTED, STOP = 24, 25, 26
JOINED = 32  # the calling thread's own: helpers that joined, -1 until it closed the team
TEAM_WORDS = 40
CLOSED = 1 << 62  # in PRESENT: the team is fixed, a late helper leaves

# Below this many floating-point operations (a sample's forward pass times the batch) a
# call runs on its own thread: a helper's start (a pool hand-off, then the GIL) is tens of
# microseconds, the time of millions of operations (docs/performance.md, "Threads inside
# one sample", says what has been measured so far).
TEAM_MIN_FLOPS = 4_000_000


class Team:
    """The helpers of one call, started in the engine's pool."""

    def __init__(self, block: np.ndarray, helpers: list[Future]) -> None:
        self.block = block
        self.helpers = helpers

    @classmethod
    def start(cls, engine: CpuEngine, batch: int) -> Team | None:
        """A team for a call of `batch` samples, or None where it would not pay (one
        thread, little work, code without a team entry point, or a pool shut down)."""
        helpers = engine.threads - 1
        worker = engine.worker
        if helpers < 1 or worker is None or batch * engine.flops < TEAM_MIN_FLOPS:
            return None
        block = np.zeros(TEAM_WORDS, dtype=np.int64)
        block[WANTED], block[JOINED] = helpers, -1
        started: list[Future] = []
        try:
            pool = engine.thread_pool()
            for _ in range(helpers):
                started.append(pool.submit(_help, worker, block))
        except RuntimeError:  # set_threads shut the pool down meanwhile
            pass
        if not started:
            return None
        block[WANTED] = len(started)  # the calling thread waits for no more than these
        return cls(block, started)

    @property
    def address(self) -> int:
        return self.block.ctypes.data

    def finish(self) -> None:
        """Send the helpers home, also where the call never reached its native code (the
        entry point does this itself at its end)."""
        self.block[STOP] = 1
        # No helper outlives its call: one still queued is cancelled, and one that started
        # sees STOP and leaves at once. Otherwise it could run the module's code after the
        # module was freed, or free the module itself in a pool thread (llvmlite's lock
        # taken there while another thread forks the compiler's workers: they deadlock).
        running = [helper for helper in self.helpers if not helper.cancel()]
        if running:
            wait(running)


def _help(worker, block: np.ndarray) -> None:
    worker(block.ctypes.data)  # `block` is held here until the helper leaves
