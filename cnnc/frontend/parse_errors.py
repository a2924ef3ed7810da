"""Lark's "unexpected token" errors, said in words: what the line needed at that point.

The parser knows which terminals it expected; the statement kind (the first word of the line)
and the token before the fault tell what those terminals mean there, e.g. an INT after
`conv c1:` is "a filter count like 6" while after `dense` it is "a unit count like 120".
"""

from __future__ import annotations

import difflib

from lark import Lark
from lark.exceptions import LarkError, UnexpectedToken

STATEMENT_KEYWORDS = ("network", "input", "conv", "maxpool", "avgpool", "dense", "flatten",
                      "loss", "train")
ACTIVATION_NAMES = ("relu", "sigmoid", "tanh", "softmax", "none")

_KEYWORD_TERMINALS = {word.upper() for word in STATEMENT_KEYWORDS}

_COUNT_WORDS = {"CONV": "a filter count like 6", "DENSE": "a unit count like 120",
                "INPUT": "a shape like 1x28x28"}
_DIMS_WORDS = {"CONV": "a kernel size like 5x5", "MAXPOOL": "a window size like 2x2",
               "AVGPOOL": "a window size like 2x2", "INPUT": "a shape like 1x28x28"}
_NAME_AFTER = {"ARROW": "an activation (relu, sigmoid, tanh, softmax or none)",
               "NETWORK": "a network name", "LOSS": "a loss (cross_entropy or mse)",
               "TRAIN": "an optimizer (sgd or adam)", "EQUAL": "a value"}
_PUNCTUATION_WORDS = {"COLON": "':' after the name", "EQUAL": "'=' after the option name",
                      "ARROW": "'->' and an activation", "_NL": "the end of the line",
                      "$END": "the end of the file"}
# After `NAME:` the statement decides what comes next; the LALR tables merge these states,
# so the parser's own expected set is wider than the truth there.
_AFTER_LABEL = {"CONV": {"INT"}, "DENSE": {"INT"}, "MAXPOOL": {"DIMS"}, "AVGPOOL": {"DIMS"},
                "INPUT": {"DIMS"}, "FLATTEN": {"_NL"}}
_ORDER = ["NAME", "INT", "DIMS", "FLOAT", "COLON", "EQUAL", "ARROW", "_NL", "$END"]


def describe_unexpected_token(error: UnexpectedToken, line_text: str,
                              parser: Lark) -> tuple[str, int, int]:
    """(message, column, width) for an unexpected token on `line_text`."""
    before = _tokens_before(line_text, error.column, parser)
    first_word = line_text.split()[0] if line_text.split() else ""
    if before and before[0].type == "NAME" and first_word not in ACTIVATION_NAMES:
        return _unknown_statement(first_word, line_text)
    statement = before[0].type if before else None
    previous = before[-1].type if before else None
    expected = set(error.expected)
    if previous == "COLON" and statement in _AFTER_LABEL:
        expected = _AFTER_LABEL[statement]
    message = f"expected {_expected_words(expected, statement, previous)}, got {_got(error)}"
    if "NAME" in expected and str(error.token) in STATEMENT_KEYWORDS:
        message += f"; {error.token} is a keyword and cannot be a name"
    width = max(1, len(str(error.token))) if error.token.type != "_NL" else 1
    return message, error.column, width


def _unknown_statement(word: str, line_text: str) -> tuple[str, int, int]:
    message = f"unknown statement {word!r}"
    close = difflib.get_close_matches(word, STATEMENT_KEYWORDS + ACTIVATION_NAMES, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    else:
        message += "; a line starts with " + ", ".join(STATEMENT_KEYWORDS) + " or an activation"
    return message, line_text.index(word) + 1, len(word)


def _tokens_before(line_text: str, column: int, parser: Lark) -> list:
    try:
        return [t for t in parser.lex(line_text[: column - 1]) if t.type != "_NL"]
    except LarkError:
        return []


def _expected_words(expected: set[str], statement: str | None, previous: str | None) -> str:
    if expected & _KEYWORD_TERMINALS:
        return "a statement (" + ", ".join(STATEMENT_KEYWORDS) + " or an activation)"
    words: list[str] = []
    for terminal in sorted(expected, key=lambda t: _ORDER.index(t) if t in _ORDER else 99):
        word = _describe(terminal, statement, previous)
        if word not in words:
            words.append(word)
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _describe(terminal: str, statement: str | None, previous: str | None) -> str:
    if previous == "EQUAL" and terminal in ("INT", "FLOAT", "DIMS", "NAME"):
        return "a value"
    if terminal == "INT":
        return _COUNT_WORDS.get(statement or "", "a number")
    if terminal == "DIMS":
        return _DIMS_WORDS.get(statement or "", "sizes like 3x3")
    if terminal == "FLOAT":
        return "a number"
    if terminal == "NAME":
        if previous in _NAME_AFTER:
            return _NAME_AFTER[previous]
        if previous in _KEYWORD_TERMINALS:
            return "a layer name" if statement != "NETWORK" else "a network name"
        return "an option like stride=2"
    return _PUNCTUATION_WORDS.get(terminal, terminal.lower())


def _got(error: UnexpectedToken) -> str:
    token = error.token
    if token.type == "_NL":
        return "the end of the line"
    if token.type == "$END":
        return "the end of the file"
    return f'"{token}"'
