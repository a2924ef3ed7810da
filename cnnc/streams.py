"""Standard output and error for the `cnnc` command, made safe to write to.

A closed stdout (`cnnc check x.cnn >&-`), a full disk (`> /dev/full`) or an encoding that
cannot show a character of the output (`PYTHONIOENCODING=ascii` and a file named
`ü.cnn`) would otherwise end the command with a Python exception. Here each becomes a
`CnncOutputError`: one line on stderr and exit 1. Error messages themselves are written
with unshowable characters escaped, so they always get through.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from .diagnostics import CnncError


class CnncOutputError(CnncError):
    """The command's output cannot be written."""


class _Guarded:
    """A text stream whose failed writes raise CnncOutputError (BrokenPipeError passes
    through: a reader that stopped reading, as `| head` does, is not an error)."""

    def __init__(self, stream: TextIO | None, name: str) -> None:
        self._stream = stream
        self._name = name
        self.failed = False

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        if self._stream is not None and not getattr(self._stream, "closed", False):
            self._call("flush")

    def isatty(self) -> bool:
        try:
            return self._stream is not None and bool(self._stream.isatty())
        except (ValueError, OSError):
            return False

    def _call(self, method: str, *args: Any) -> Any:
        if self._stream is None or getattr(self._stream, "closed", False):
            raise CnncOutputError.single(f"cannot write to {self._name}: it is closed")
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            raise
        except UnicodeEncodeError as error:
            self.failed = True
            shown = error.object[error.start:error.end]
            raise CnncOutputError.single(
                f"cannot write to {self._name}: its encoding ({error.encoding}) cannot show "
                f"{shown!r}; set PYTHONIOENCODING=utf-8") from None
        except (OSError, ValueError) as error:
            self.failed = True
            reason = getattr(error, "strerror", None) or str(error)
            raise CnncOutputError.single(f"cannot write to {self._name}: {reason}") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def guarded_streams() -> Iterator[None]:
    """sys.stdout and sys.stderr guarded for the duration of one command."""
    saved = sys.stdout, sys.stderr
    _escape_errors(sys.stderr)
    guarded = _Guarded(saved[0], "standard output"), _Guarded(saved[1], "standard error")
    sys.stdout, sys.stderr = guarded
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for wrapper, stream in zip(guarded, saved, strict=True):
            if wrapper.failed:
                _discard(stream)


def _discard(stream: TextIO | None) -> None:
    """Point a stream that failed at /dev/null: Python flushes it again at exit, and a
    second failure there would print a traceback-like message and exit 120."""
    with contextlib.suppress(AttributeError, ValueError, OSError):
        descriptor = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, descriptor)
        os.close(null)


def _escape_errors(stream: TextIO | None) -> None:
    """Messages that name a file the encoding cannot show still get through, escaped."""
    with contextlib.suppress(AttributeError, ValueError, OSError):
        stream.reconfigure(errors="backslashreplace")
