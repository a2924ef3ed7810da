"""The lock that makes one module safe to use from several threads.

Calls that only read a module's state (forward, loss, gradients, params, save) run at the
same time as each other; calls that change it (train_step, apply_gradients, set_params,
load_weights, set_optimizer_state, set_threads) run alone, so no update is lost and no
reader sees parameters half-way through a step.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class StateLock:
    """Readers together or one writer alone, a waiting writer before new readers. A writer
    may call readers and other writers of the same module (its own thread passes);
    `exclusive` makes every call a writer, for a runtime whose calls share one workspace
    (the GPU's)."""

    def __init__(self, exclusive: bool = False) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer: int | None = None  # the writing thread's ident
        self._depth = 0  # the writer's nested calls
        self._exclusive = exclusive
        self._waiting_writers = 0
        self._reads = threading.local()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        if self._exclusive:
            with self.writing():
                yield
            return
        me = threading.get_ident()
        depth = getattr(self._reads, "depth", 0)  # this thread's reads already inside
        with self._condition:
            inside_writer = self._writer == me
            # a waiting writer goes first, or a stream of readers could keep it out for
            # ever; a thread already reading passes (it would wait for itself)
            while not inside_writer and (self._writer is not None or
                                         (self._waiting_writers and depth == 0)):
                self._condition.wait()
            if not inside_writer:
                self._readers += 1
        self._reads.depth = depth + 1
        try:
            yield
        finally:
            self._reads.depth = depth
            if not inside_writer:
                with self._condition:
                    self._readers -= 1
                    self._condition.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._condition:
            if self._writer != me:
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._condition.wait()
                finally:
                    self._waiting_writers -= 1
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._condition:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                    self._condition.notify_all()
