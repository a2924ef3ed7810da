"""Standard output and error for the `cnnc` command, made safe to write to.

A closed stdout (`cnnc check x.cnn >&-`), a full disk (`> /dev/full`) or an encoding that
cannot show a character of the output (`PYTHONIOENCODING=ascii` and a file named
`ü.cnn`) would otherwise end the command with a Python exception. Here each becomes a
`CnncOutputError`: one line on stderr and exit 1. Error messages themselves are written
with unshowable characters escaped, so they always get through. Standard error only
carries messages about the work (progress, warnings, errors), so a failed write there is
dropped rather than allowed to stop the work: `cnnc train ... 2>&-` still trains.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from cnnc.diagnostics import CnncError


class CnncOutputError(CnncError):
    """The command's output cannot be written."""


class _Guarded:
    """A text stream whose failed writes raise CnncOutputError (BrokenPipeError passes
    through: a reader that stopped reading, as `| head` does, is not an error). A `lossy`
    one drops what it cannot write instead."""

    def __init__(self, stream: TextIO | None, name: str, lossy: bool = False) -> None:
        self._stream = stream
        self._name = name
        self._lossy = lossy
        self.failed = False

    def write(self, text: str) -> int:
        if not self._lossy:
            return self._call("write", text)
        with contextlib.suppress(CnncOutputError, BrokenPipeError):
            return self._call("write", text)
        self.failed = True  # closed or broken too: pointed at /dev/null when the command ends
        return len(text)

    def flush(self) -> None:
        if self._stream is None or getattr(self._stream, "closed", False):
            return
        if not self._lossy:
            self._call("flush")
            return
        with contextlib.suppress(CnncOutputError, BrokenPipeError):
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
    # A file name's undecodable bytes are lone surrogates in a str (PEP 383): on stdout
    # they go out as the bytes they came from, as `ls` shows them (characters the encoding
    # lacks still fail, with the message that says so). On stderr, anything unshowable in
    # a message is escaped, so the message always gets through.
    handlers = (_set_errors(saved[0], "surrogateescape", only_from="strict"),
                _set_errors(saved[1], "backslashreplace"))
    guarded = (_Guarded(saved[0], "standard output"),
               _Guarded(saved[1], "standard error", lossy=True))
    sys.stdout, sys.stderr = guarded
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for wrapper, stream, handler in zip(guarded, saved, handlers, strict=True):
            if wrapper.failed:
                _discard(stream)
            elif handler is not None:  # main() called from Python: leave its streams as found
                _set_errors(stream, handler)


def _discard(stream: TextIO | None) -> None:
    """Point a stream that failed at /dev/null: Python flushes it again at exit, and a
    second failure there would print a traceback-like message and exit 120."""
    with contextlib.suppress(AttributeError, ValueError, OSError):
        descriptor = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, descriptor)
        os.close(null)


def _set_errors(stream: TextIO | None, errors: str, only_from: str | None = None) -> str | None:
    """Switch a text stream's encoding error handler to `errors` (only from `only_from`,
    when given); the handler it had, to put back, or None when nothing changed (already
    so, not a TextIOWrapper, closed)."""
    try:
        before = stream.errors
        if before == errors or only_from not in (None, before):
            return None
        stream.reconfigure(errors=errors)
    except (AttributeError, ValueError, OSError):
        return None
    return before
