"""How many host threads a CPU module uses, and how a batch is cut among them."""

from __future__ import annotations

import os

from cnnc.runtime.arguments import refuse

# Below this many samples a thread, the hand-off to a thread costs more than it saves.
MIN_SAMPLES_PER_THREAD = 4


def thread_count(requested: int | None) -> int:
    """The argument, else the CNNC_NUM_THREADS environment variable, else every core."""
    if requested is None:
        text = os.environ.get("CNNC_NUM_THREADS", "")
        if not text:
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else os.cpu_count() or 1)
        try:
            requested = int(text)
        except ValueError:
            raise refuse(f"CNNC_NUM_THREADS must be a whole number, got {text!r}") from None
    if type(requested) is not int or requested < 1:
        raise refuse(f"the thread count must be a whole number of at least 1, got "
                     f"{requested!r}")
    return requested


def batch_slices(batch: int, threads: int) -> list[slice]:
    """Near-equal consecutive slices, one a thread, none smaller than the hand-off is worth."""
    count = max(1, min(threads, batch // MIN_SAMPLES_PER_THREAD))
    if count == 1:  # a batch-1 call's few microseconds
        return [slice(0, batch)]
    bounds = [batch * i // count for i in range(count + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]
