"""cnnc: a compiler for small convolutional neural networks."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

from .diagnostics import (
    CnncError,
    CnncInputError,
    CnncSemanticError,
    CnncSyntaxError,
)
from .ir import Graph


def check(program: str | Path, dtype: str | None = None) -> Graph:
    """Parse and shape-check a program (its text, or a path to a .cnn file).

    Returns the typed graph; raises a CnncError holding every error of the program.
    """
    from .pipeline import front_end, to_source

    return front_end(to_source(program), dtype)


__all__ = ["CnncError", "CnncInputError", "CnncSemanticError", "CnncSyntaxError", "Graph",
           "__version__", "check"]
