"""Lark's "unexpected token" errors, said in words: what the line needed at that point.

The parser knows which terminals it expected; the statement kind (the first word of the line)
and the token before the fault tell what those terminals mean there, e.g. an INT after
`conv c1:` is "a filter count like 6" while after `dense` it is "a unit count like 120".
"""

from __future__ import annotations

import difflib
import functools

from lark import Lark
from lark.exceptions import LarkError, UnexpectedToken

from cnnc.frontend.grammar import keywords
from cnnc.ops import registry

_INPUT_WORDS = {"INT": "a shape like 1x28x28", "DIMS": "a shape like 1x28x28"}
_PUNCTUATION_WORDS = {"COLON": "':' after the name", "EQUAL": "'=' after the option name",
                      "ARROW": "'->' and an activation", "_NL": "the end of the line",
                      "$END": "the end of the file", "COMMA": "',' and another layer name",
                      "LPAR": "'('", "RPAR": "')'"}
_ORDER = ["NAME", "INT", "DIMS", "FLOAT", "COLON", "EQUAL", "ARROW", "_NL", "$END"]
# inside an activation's parentheses, `clip(0, 6)`
_ARGUMENT = "a number like 0.1, inf or -inf"
_ARGUMENT_WORDS = {"INT": _ARGUMENT, "FLOAT": _ARGUMENT, "NAME": _ARGUMENT, "NEG_INF": _ARGUMENT,
                   "COMMA": "',' and another argument"}


@functools.cache
def statement_keywords() -> tuple[str, ...]:
    return keywords()


@functools.cache
def activation_names() -> tuple[str, ...]:
    """The words `->` takes: every activation op, and none."""
    return (*registry.activations(), "none")


def _either(words: tuple[str, ...] | list[str]) -> str:
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


@functools.cache
def _name_after() -> dict[str, str]:
    return {"ARROW": f"an activation ({_either(activation_names())})",
            "NETWORK": "a network name", "LOSS": f"a loss ({_either(list(registry.losses()))})",
            "TRAIN": f"an optimizer ({_either(list(registry.optimizers()))})",
            "EQUAL": "a value"}


def _words(statement: str | None) -> dict[str, str]:
    """What each terminal means as a positional argument of `statement` (a keyword's
    terminal name, e.g. CONV): from its LayerDef, e.g. INT is "a filter count like 6"."""
    if statement == "INPUT":
        return _INPUT_WORDS
    layer = registry.layers().get((statement or "").lower())
    return dict(layer.positional) if layer else {}


def _after_label(statement: str) -> set[str] | None:
    """After `NAME:` the statement decides what comes next; the LALR tables merge these
    states, so the parser's own expected set is wider than the truth there."""
    if statement == "INPUT":
        return {"DIMS"}
    layer = registry.layers().get(statement.lower())
    if layer is None:
        return None
    return {layer.positional[0][0]} if layer.positional else {"_NL"}


def describe_unexpected_token(error: UnexpectedToken, line_text: str,
                              parser: Lark) -> tuple[str, int, int]:
    """(message, column, width) for an unexpected token on `line_text`."""
    before = _tokens_before(line_text, error.column, parser)
    first_word = line_text.split()[0] if line_text.split() else ""
    if before and before[0].type == "NAME" and first_word not in activation_names():
        return _unknown_statement(first_word, line_text)
    statement = before[0].type if before else None
    previous = before[-1].type if before else None
    expected = set(error.expected)
    if previous == "COLON" and statement and _after_label(statement) is not None:
        expected = _after_label(statement)
    words = _expected_words(expected, statement, previous, _in_arguments(before, statement))
    message = f"expected {words}, got {_got(error)}"
    if "NAME" in expected and str(error.token) in statement_keywords():
        message += f"; {error.token} is a keyword and cannot be a name"
    width = max(1, len(str(error.token))) if error.token.type != "_NL" else 1
    return message, error.column, width


def _unknown_statement(word: str, line_text: str) -> tuple[str, int, int]:
    message = f"unknown statement {word!r}"
    close = difflib.get_close_matches(word, statement_keywords() + activation_names(), n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    else:
        message += "; a line starts with " + ", ".join(statement_keywords()) + " or an activation"
    return message, line_text.index(word) + 1, len(word)


def _tokens_before(line_text: str, column: int, parser: Lark) -> list:
    try:
        return [t for t in parser.lex(line_text[: column - 1]) if t.type != "_NL"]
    except LarkError:
        return []


def _in_arguments(before: list, statement: str | None) -> bool:
    """Whether the fault is inside an activation's parentheses (a block's are its own)."""
    if statement in ("BLOCK", "USE"):
        return False
    depth = sum(1 if t.type == "LPAR" else -1 if t.type == "RPAR" else 0 for t in before)
    return depth > 0


def _expected_words(expected: set[str], statement: str | None, previous: str | None,
                    in_arguments: bool = False) -> str:
    # a block's $parameter may stand for a number, and a dotted name for a name: both are
    # the rarer spelling of what the line wants, so the words name only the common one
    expected = {"NAME" if t == "QNAME" else t for t in expected if t != "PARAM"} or expected
    if "NAME" in expected:  # the keyword pad is an option's key too (conv's pad=1)
        expected = expected - {"PAD"}
    if expected & _keyword_terminals():
        return "a statement (" + ", ".join(statement_keywords()) + " or an activation)"
    words: list[str] = []
    # by _ORDER, then by name: sets iterate in an order that changes from run to run
    for terminal in sorted(expected, key=lambda t: (_ORDER.index(t) if t in _ORDER else 99, t)):
        word = _ARGUMENT_WORDS.get(terminal) if in_arguments else None
        word = word or _describe(terminal, statement, previous)
        if word not in words:
            words.append(word)
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _describe(terminal: str, statement: str | None, previous: str | None) -> str:
    if previous == "EQUAL" and terminal in ("INT", "FLOAT", "DIMS", "NAME"):
        return "a value"
    if terminal == "INT":
        return _words(statement).get("INT", "a number")
    if terminal == "DIMS":
        return _words(statement).get("DIMS", "sizes like 3x3")
    if terminal == "FLOAT":
        return "a number"
    if terminal == "NAME":
        positional = _words(statement).get("NAME")  # activation r1: relu
        if positional and previous == "COLON":
            return positional
        if positional and previous == statement:
            return f"a layer name or {positional}"
        if previous in _name_after():
            return _name_after()[previous]
        if previous in _keyword_terminals():
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


@functools.cache
def _keyword_terminals() -> frozenset[str]:
    return frozenset(word.upper() for word in statement_keywords())
