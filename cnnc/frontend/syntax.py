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


@dataclass(frozen=True, slots=True)
class Param:
    """`$planes`: a parameter of the block the line is in, replaced by its value when the
    block is used."""

    name: str
    text: str
    span: Span


Value = Word | Number | Dims | Param


@dataclass(frozen=True, slots=True)
class Act:
    """An activation as written after `->` or on a line of its own: `relu`, or one with
    arguments in parentheses, `leaky_relu(0.1)`, `clip(0, 6)`. An argument is a number (the
    word `inf` and `-inf` are the infinities) or, mistakenly, another word."""

    name: Word
    args: tuple[Number | Word, ...]
    span: Span

    @property
    def text(self) -> str:
        return self.name.text

    @property
    def arg(self) -> Number | Word | None:
        """The first argument, if any."""
        return self.args[0] if self.args else None


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
    filters: Number | Param
    kernel: Dims | Param
    options: tuple[Option, ...]
    activation: Act | None
    span: Span


@dataclass(frozen=True, slots=True)
class PoolStmt:
    kind: Word  # the pooling keyword the grammar matched
    name: Word | None
    window: Dims | Param
    options: tuple[Option, ...]
    span: Span
    activation: Act | None = None


@dataclass(frozen=True, slots=True)
class DenseStmt:
    name: Word | None
    units: Number | Param
    options: tuple[Option, ...]
    activation: Act | None
    span: Span


@dataclass(frozen=True, slots=True)
class FlattenStmt:
    name: Word | None
    span: Span
    options: tuple[Option, ...] = ()


@dataclass(frozen=True, slots=True)
class MergeStmt:
    """`add`, `concat` or `mul` of the named layers: `add b1: b1_bn2, stem_bn -> relu`."""

    kind: Word
    name: Word
    inputs: tuple[Word, ...]
    options: tuple[Option, ...]
    activation: Act | None
    span: Span


@dataclass(frozen=True, slots=True)
class BatchNormStmt:
    name: Word | None
    options: tuple[Option, ...]
    activation: Act | None
    span: Span


@dataclass(frozen=True, slots=True)
class DropoutStmt:
    name: Word | None
    rate: Number | Param
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class GlobalPoolStmt:
    kind: Word  # globalavgpool or globalmaxpool
    name: Word | None
    options: tuple[Option, ...]
    activation: Act | None
    span: Span


@dataclass(frozen=True, slots=True)
class UpsampleStmt:
    name: Word | None
    factor: Dims | Param
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class ActivationStmt:
    """An activation on a line of its own: it applies to the layer above."""

    activation: Act
    span: Span


@dataclass(frozen=True, slots=True)
class ActivationLayerStmt:
    """`activation NAME: ACT`: a layer of its own whose value is ACT of its input (the line
    above, or `from=`)."""

    kind: Word  # the keyword, as PoolStmt's
    name: Word | None
    activation: Act
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class PadStmt:
    """`pad NAME: P|PHxPW|TxLxBxR [value=V]`: constant padding of a CxHxW tensor's H and W."""

    name: Word | None
    pads: Number | Dims | Param
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class BlockParam:
    name: Word
    default: Value | None


@dataclass(frozen=True, slots=True)
class BlockStmt:
    """`block basic(planes, stride=1):` opens the definition of a block, up to `end`."""

    name: Word
    params: tuple[BlockParam, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class EndStmt:
    span: Span


@dataclass(frozen=True, slots=True)
class BlockArg:
    key: Word | None  # None: positional
    value: Value


@dataclass(frozen=True, slots=True)
class UseStmt:
    """`use layer1.0: basic(16, stride=2)`: the block's lines, here, with its names
    prefixed by the use's name."""

    name: Word | None
    block: Word
    args: tuple[BlockArg, ...]
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


@dataclass(frozen=True, slots=True)
class ScopeStmt:
    """Where the lines of a used block start (`opening`) and end, in the program after its
    blocks are expanded (frontend/blocks.py): names inside are PREFIX.NAME, `PREFIX.in` is
    what the line above the use made, and PREFIX names the block's last line."""

    prefix: Word  # the use's name
    block: Word  # the block's name, at its definition
    opening: bool
    span: Span  # the use line


LayerStmt = (ConvStmt | PoolStmt | DenseStmt | FlattenStmt | MergeStmt | BatchNormStmt
             | DropoutStmt | GlobalPoolStmt | UpsampleStmt | ActivationLayerStmt | PadStmt)
Statement = (NetworkStmt | InputStmt | LayerStmt | ActivationStmt | LossStmt | TrainStmt
             | BlockStmt | EndStmt | UseStmt | ScopeStmt)


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
    if isinstance(value, bool):  # a scope marker's `opening`
        return str(value).lower()
    if isinstance(value, (Word, Number, Dims, Param)):
        return value.text
    if isinstance(value, Act):
        if not value.args:
            return value.text
        return f"{value.text}({', '.join(arg.text for arg in value.args)})"
    if isinstance(value, (BlockParam, BlockArg)):
        key, val = (value.name, value.default) if isinstance(value, BlockParam) else \
            (value.key, value.value)
        if key is None:
            return _format_value(val)
        return key.text if val is None else f"{key.text}={_format_value(val)}"
    if isinstance(value, tuple):
        return "(" + " ".join(_format_value(v) for v in value) + ")"
    if isinstance(value, Option):
        return f"{value.key.text}={_format_value(value.value)}"
    raise TypeError(f"no AST format for {type(value).__name__}")
