"""What a user sees while an epoch runs: a bar with elapsed time and ETA on a terminal, and
on anything else (a log file, CI) a plain line every `every` seconds instead of a redraw
per step."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    """12 -> '0:12', 3725 -> '1:02:05'."""
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """One epoch's progress; `update` after each step, `close` at the epoch's end."""

    WIDTH = 24
    REDRAW_SECONDS = 0.1  # a terminal redraw per step would cost more than small steps

    def __init__(self, epoch: int, epochs: int, total: int, stream: TextIO | None = None,
                 every: float = 30.0) -> None:
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = _is_terminal(self.stream)
        self.every = every
        self.started = time.perf_counter()
        self.last_shown = self.started
        self.drawn = False

    def update(self, seen: int, loss: float) -> None:
        now = time.perf_counter()
        wait = self.REDRAW_SECONDS if self.terminal else self.every
        if now - self.last_shown < wait and seen < self.total:
            return
        if not self.terminal and seen >= self.total:
            return  # the epoch line follows at once and says it all
        self.last_shown = now
        elapsed = now - self.started
        left = elapsed * (self.total - seen) / seen if seen else 0.0
        if self.terminal:
            done = int(self.WIDTH * seen / self.total)
            self._write(f"\repoch {self.epoch}/{self.epochs} [{'#' * done}"
                        f"{'.' * (self.WIDTH - done)}] {seen:,}/{self.total:,} loss {loss:.4f} "
                        f"{seen / max(elapsed, 1e-9):,.0f} samples/s {clock(elapsed)}<"
                        f"{clock(left)}")
            self.drawn = True
        else:
            self._write(f"epoch {self.epoch}/{self.epochs}: {seen:,}/{self.total:,} samples, "
                        f"loss {loss:.4f}, {clock(elapsed)} elapsed, about {clock(left)} "
                        "left\n")

    def close(self) -> None:
        """End the bar's line, so what follows starts on a line of its own."""
        if self.drawn:
            self._write("\n")
            self.drawn = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
