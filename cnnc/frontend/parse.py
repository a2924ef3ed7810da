"""Text → AST: the Lark grammar in grammar/cnn.lark, a Transformer that builds frozen AST
nodes with spans, and the translation of Lark's exceptions into cnnc errors in words."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from cnnc.diagnostics import CnncSyntaxError, Diagnostic, Source, Span
from cnnc.frontend import syntax as ast
from cnnc.frontend.grammar import grammar_text
from cnnc.frontend.parse_errors import describe_unexpected_token

# A file with this many broken lines is not worth reading further.
MAX_SYNTAX_ERRORS = 50


@functools.cache
def _parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", lexer="basic", propagate_positions=True,
                maybe_placeholders=False)


def parse(source: Source) -> ast.Program:
    """Parse a whole program; every line with a syntax error is reported in one CnncSyntaxError.

    Statements are one a line, so after an error the broken line is blanked out and the rest
    of the file parsed again: each error is found without cascading into the next line.
    """
    text = source.text if source.text.endswith("\n") else source.text + "\n"
    diagnostics: list[Diagnostic] = []
    while True:
        try:
            tree = _parser().parse(text)
        except UnexpectedInput as error:
            diagnostics.append(_diagnostic_for(error, text, source.name))
            if len(diagnostics) >= MAX_SYNTAX_ERRORS or error.line < 1:
                break
            text = _blank_line(text, error.line)
            continue
        break
    if diagnostics:
        raise CnncSyntaxError(diagnostics, source)
    statements = _ToAst(source.name).transform(tree)
    return ast.Program(tuple(statements), source.name)


def _blank_line(text: str, line: int) -> str:
    lines = text.split("\n")
    lines[line - 1] = " " * len(lines[line - 1])
    return "\n".join(lines)


def _diagnostic_for(error: UnexpectedInput, text: str, file: str) -> Diagnostic:
    if error.line < 1:  # Lark knows no position, e.g. at the very end of the input
        return Diagnostic("unexpected end of the program", None)
    line_text = text.split("\n")[error.line - 1]
    if isinstance(error, UnexpectedCharacters):
        char = line_text[error.column - 1] if error.column - 1 < len(line_text) else "?"
        return Diagnostic(f"unexpected character {char!r}; names use letters, digits and _",
                          Span.point(file, error.line, error.column))
    if isinstance(error, UnexpectedToken):
        message, column, width = describe_unexpected_token(error, line_text, _parser())
        return Diagnostic(message, Span(file, error.line, column, error.line, column + width))
    return Diagnostic("unexpected end of the program", Span.point(file, error.line, 1))


def _span(file: str, token: Token) -> Span:
    return Span(file, token.line, token.column, token.end_line, token.end_column)


# Python refuses to convert very long digit strings; any size this long is an error anyway,
# which irgen reports as "too large" with the number as written.
_MAX_DIGITS = 30


def _to_int(text: str) -> int:
    digits = text.lstrip("-")
    sign = -1 if text.startswith("-") else 1
    return sign * 10**_MAX_DIGITS if len(digits) > _MAX_DIGITS else int(text)


class _ToAst(Transformer):
    """Builds AST nodes only; every judgement about meaning is left to irgen."""

    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file

    # -- leaves -----------------------------------------------------------------------------
    def NAME(self, token: Token) -> ast.Word:
        return ast.Word(str(token), _span(self.file, token))

    def QNAME(self, token: Token) -> ast.Word:
        return ast.Word(str(token), _span(self.file, token))

    def PARAM(self, token: Token) -> ast.Param:
        return ast.Param(str(token)[1:], str(token), _span(self.file, token))

    def INT(self, token: Token) -> ast.Number:
        return ast.Number(_to_int(str(token)), str(token), _span(self.file, token))

    def FLOAT(self, token: Token) -> ast.Number:
        return ast.Number(float(token), str(token), _span(self.file, token))

    def NEG_INF(self, token: Token) -> ast.Number:
        return ast.Number(-math.inf, str(token), _span(self.file, token))

    def DIMS(self, token: Token) -> ast.Dims:
        values = tuple(_to_int(part) for part in str(token).split("x"))
        return ast.Dims(values, str(token), _span(self.file, token))

    # -- pieces of statements ---------------------------------------------------------------
    def label(self, children: list) -> _Label:
        return _Label(children[0])

    def name_label(self, children: list) -> _Label:
        item = children[0]
        return item if isinstance(item, _Label) else _Label(item)

    def refs(self, children: list) -> _Refs:
        return _Refs(tuple(children))

    def act_suffix(self, children: list) -> _Activation:
        return _Activation(children[-1])

    @v_args(meta=True)
    def act(self, meta, children: list) -> ast.Act:
        args = tuple(_infinity(arg) for arg in children[1:])
        return ast.Act(children[0], args, _meta_span(self.file, meta))

    def count(self, children: list) -> ast.Number | ast.Param:
        return children[0]

    def kernel(self, children: list) -> ast.Dims | ast.Param:
        return children[0]

    def rate(self, children: list) -> ast.Number | ast.Param:
        return children[0]

    def option_key(self, children: list) -> ast.Word:
        key = children[0]  # a NAME, or the keyword pad
        return key if isinstance(key, ast.Word) else ast.Word(str(key), _span(self.file, key))

    def pad_sizes(self, children: list) -> ast.Number | ast.Dims | ast.Param:
        return children[0]

    def merge_kind(self, children: list) -> ast.Word:
        return ast.Word(str(children[0]), _span(self.file, children[0]))

    def global_kind(self, children: list) -> ast.Word:
        return ast.Word(str(children[0]), _span(self.file, children[0]))

    def block_param(self, children: list) -> ast.BlockParam:
        return ast.BlockParam(children[0], children[1] if len(children) > 1 else None)

    def block_arg(self, children: list) -> ast.BlockArg:
        if len(children) == 2:
            return ast.BlockArg(children[0], children[1])
        return ast.BlockArg(None, children[0])

    def shape(self, children: list) -> ast.Dims:
        item = children[0]
        if isinstance(item, ast.Number):  # a flat feature vector: `input x: 784`
            return ast.Dims((int(item.value),), item.text, item.span)
        return item

    def pool_kind(self, children: list) -> ast.Word:
        return ast.Word(str(children[0]), _span(self.file, children[0]))

    @v_args(meta=True)
    def option(self, meta, children: list) -> ast.Option:
        key, value = children
        return ast.Option(key, value, _meta_span(self.file, meta))

    # -- statements -------------------------------------------------------------------------
    def start(self, children: list) -> list:
        return children

    @v_args(meta=True)
    def network(self, meta, children: list) -> ast.NetworkStmt:
        return ast.NetworkStmt(children[0], _meta_span(self.file, meta))

    @v_args(meta=True)
    def input(self, meta, children: list) -> ast.InputStmt:
        parts = _Parts(children)
        return ast.InputStmt(parts.name, parts.positional[0], parts.options,
                             _meta_span(self.file, meta))

    @v_args(meta=True)
    def conv(self, meta, children: list) -> ast.ConvStmt:
        parts = _Parts(children)
        filters, kernel = parts.positional
        return ast.ConvStmt(parts.name, filters, kernel, parts.options, parts.activation,
                            _meta_span(self.file, meta))

    @v_args(meta=True)
    def pool(self, meta, children: list) -> ast.PoolStmt:
        parts = _Parts(children)
        kind, window = parts.positional
        return ast.PoolStmt(kind, parts.name, window, parts.options, _meta_span(self.file, meta),
                            parts.activation)

    @v_args(meta=True)
    def dense(self, meta, children: list) -> ast.DenseStmt:
        parts = _Parts(children)
        return ast.DenseStmt(parts.name, parts.positional[0], parts.options, parts.activation,
                             _meta_span(self.file, meta))

    @v_args(meta=True)
    def flatten(self, meta, children: list) -> ast.FlattenStmt:
        parts = _Parts(children)
        return ast.FlattenStmt(parts.name, _meta_span(self.file, meta), parts.options)

    @v_args(meta=True)
    def merge(self, meta, children: list) -> ast.MergeStmt:
        parts = _Parts(children)
        kind, refs = parts.positional
        return ast.MergeStmt(kind, parts.name, refs.words, parts.options, parts.activation,
                             _meta_span(self.file, meta))

    @v_args(meta=True)
    def batchnorm(self, meta, children: list) -> ast.BatchNormStmt:
        parts = _Parts(children)
        return ast.BatchNormStmt(parts.name, parts.options, parts.activation,
                                 _meta_span(self.file, meta))

    @v_args(meta=True)
    def dropout(self, meta, children: list) -> ast.DropoutStmt:
        parts = _Parts(children)
        return ast.DropoutStmt(parts.name, parts.positional[0], parts.options,
                               _meta_span(self.file, meta))

    @v_args(meta=True)
    def global_pool(self, meta, children: list) -> ast.GlobalPoolStmt:
        parts = _Parts(children)
        return ast.GlobalPoolStmt(parts.positional[0], parts.name, parts.options,
                                  parts.activation, _meta_span(self.file, meta))

    @v_args(meta=True)
    def upsample(self, meta, children: list) -> ast.UpsampleStmt:
        parts = _Parts(children)
        return ast.UpsampleStmt(parts.name, parts.positional[0], parts.options,
                                _meta_span(self.file, meta))

    @v_args(meta=True)
    def block(self, meta, children: list) -> ast.BlockStmt:
        return ast.BlockStmt(children[0], tuple(children[1:]), _meta_span(self.file, meta))

    @v_args(meta=True)
    def end(self, meta, children: list) -> ast.EndStmt:
        return ast.EndStmt(_meta_span(self.file, meta))

    @v_args(meta=True)
    def use(self, meta, children: list) -> ast.UseStmt:
        parts = _Parts(children)
        block, *args = parts.positional
        return ast.UseStmt(parts.name, block, tuple(args), _meta_span(self.file, meta))

    @v_args(meta=True)
    def activation(self, meta, children: list) -> ast.ActivationStmt:
        return ast.ActivationStmt(children[0], _meta_span(self.file, meta))

    @v_args(meta=True)
    def activation_layer(self, meta, children: list) -> ast.ActivationLayerStmt:
        parts = _Parts(children)
        kind = ast.Word("activation", Span(self.file, meta.line, meta.column, meta.line,
                                           meta.column + len("activation")))
        return ast.ActivationLayerStmt(kind, parts.name, parts.positional[0], parts.options,
                                       _meta_span(self.file, meta))

    @v_args(meta=True)
    def pad(self, meta, children: list) -> ast.PadStmt:
        parts = _Parts(children)
        return ast.PadStmt(parts.name, parts.positional[0], parts.options,
                           _meta_span(self.file, meta))

    @v_args(meta=True)
    def loss(self, meta, children: list) -> ast.LossStmt:
        parts = _Parts(children)
        return ast.LossStmt(parts.positional[0], parts.options, _meta_span(self.file, meta))

    @v_args(meta=True)
    def train(self, meta, children: list) -> ast.TrainStmt:
        parts = _Parts(children)
        return ast.TrainStmt(parts.positional[0], parts.options, _meta_span(self.file, meta))


@dataclass(frozen=True, slots=True)
class _Label:
    word: ast.Word


@dataclass(frozen=True, slots=True)
class _Activation:
    word: ast.Act


@dataclass(frozen=True, slots=True)
class _Refs:
    words: tuple[ast.Word, ...]


class _Parts:
    """A statement's children sorted into its name, positional items, options and activation."""

    def __init__(self, children: list) -> None:
        self.name = next((c.word for c in children if isinstance(c, _Label)), None)
        self.activation = next((c.word for c in children if isinstance(c, _Activation)), None)
        self.options = tuple(c for c in children if isinstance(c, ast.Option))
        self.positional = [c for c in children
                           if not isinstance(c, (_Label, _Activation, ast.Option))]


def _infinity(arg: ast.Number | ast.Word) -> ast.Number | ast.Word:
    """An activation's argument: the word `inf` is the number."""
    if isinstance(arg, ast.Word) and arg.text == "inf":
        return ast.Number(math.inf, arg.text, arg.span)
    return arg


def _meta_span(file: str, meta) -> Span:
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)
