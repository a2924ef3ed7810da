"""Where a command's text goes: standard output, or the file its -o names."""

from __future__ import annotations

import sys

from cnnc.diagnostics import CnncInputError
from cnnc.support.files import write_atomically


def write_text(text: str, output: str | None) -> None:
    """To standard output, or atomically to a file (a failed write leaves the old one)."""
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_atomically(output, text.encode("utf-8"), CnncInputError)  # a str: keeps a final /
