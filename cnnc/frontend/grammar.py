"""The grammar of the language (grammar/cnn.lark) as text, and the words it reserves."""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path


@functools.cache
def grammar_text() -> str:
    """The grammar file, found through the package so an installed wheel finds it too."""
    try:
        grammar = resources.files("cnnc.grammar").joinpath("cnn.lark")
    except ModuleNotFoundError:
        # Imported straight from a source checkout (not installed, or installed elsewhere):
        # the grammar sits beside the package, in grammar/ at the top of the repository.
        grammar = Path(__file__).resolve().parents[2] / "grammar" / "cnn.lark"
    return grammar.read_text(encoding="utf-8")


@functools.cache
def keywords() -> tuple[str, ...]:
    """The words that start a statement, in the order the grammar lists them: every quoted
    word of the grammar is one (`network`, `input`, `conv`, `maxpool`, ...)."""
    return tuple(dict.fromkeys(re.findall(r'"([a-z_]+)"', grammar_text())))
