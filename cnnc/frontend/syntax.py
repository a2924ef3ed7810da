"""The abstract syntax tree of a .cnn program: frozen dataclasses, each with its source span.

The tree mirrors the text one statement a line and judges nothing: option keys, activation
names and the order of lines are checked later, by irgen, where the error can name the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from cnnc.diagnostics import Span


@dataclass(frozen=True, slots=True)
class Word:
    """A name as written: a layer name, an activation, an option key or a word value."""

    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class Number:
    value: int | float
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class Dims:
    """`5x5`, `1x28x28`, or a single `784`: sizes separated by `x`."""

    values: tuple[int, ...]
    text: str
    span: Span


Value = Word | Number | Dims


@dataclass(frozen=True, slots=True)
class Option:
    key: Word
    value: Value
    span: Span


@dataclass(frozen=True, slots=True)
class NetworkStmt:
    name: Word
    span: Span


@dataclass(frozen=True, slots=True)
class InputStmt:
    name: Word | None
    shape: Dims
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class ConvStmt:
    name: Word | None
    filters: Number
    kernel: Dims
    options: tuple[Option, ...]
    activation: Word | None
    span: Span


@dataclass(frozen=True, slots=True)
class PoolStmt:
    kind: Word  # the pooling keyword the grammar matched
    name: Word | None
    window: Dims
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class DenseStmt:
    name: Word | None
    units: Number
    options: tuple[Option, ...]
    activation: Word | None
    span: Span


@dataclass(frozen=True, slots=True)
class FlattenStmt:
    name: Word | None
    span: Span


@dataclass(frozen=True, slots=True)
class ActivationStmt:
    """An activation on a line of its own: it applies to the layer above."""

    activation: Word
    span: Span


@dataclass(frozen=True, slots=True)
class LossStmt:
    kind: Word
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class TrainStmt:
    optimizer: Word
    options: tuple[Option, ...]
    span: Span


Statement = (NetworkStmt | InputStmt | ConvStmt | PoolStmt | DenseStmt | FlattenStmt
             | ActivationStmt | LossStmt | TrainStmt)
LayerStmt = ConvStmt | PoolStmt | DenseStmt | FlattenStmt


@dataclass(frozen=True, slots=True)
class Program:
    statements: tuple[Statement, ...]
    file: str


def format_program(program: Program) -> str:
    """One line a statement, fields as `key=value`, spans as `@line:col-col`: stable for diffs."""
    lines = [f"program {program.file}"]
    for stmt in program.statements:
        parts = [_statement_kind(stmt), _format_span(stmt.span)]
        for f in fields(stmt):
            value = getattr(stmt, f.name)
            if f.name == "span" or value is None or value == ():
                continue
            parts.append(f"{f.name}={_format_value(value)}")
        lines.append("  " + " ".join(parts))
    return "\n".join(lines) + "\n"


def _statement_kind(stmt: Statement) -> str:
    return type(stmt).__name__.removesuffix("Stmt").lower()


def _format_span(span: Span) -> str:
    return f"@{span.line}:{span.col}-{span.end_col}"


def _format_value(value: object) -> str:
    if isinstance(value, (Word, Number, Dims)):
        return value.text
    if isinstance(value, tuple):
        return "(" + " ".join(_format_value(v) for v in value) + ")"
    if isinstance(value, Option):
        return f"{value.key.text}={_format_value(value.value)}"
    raise TypeError(f"no AST format for {type(value).__name__}")
