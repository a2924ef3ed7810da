"""Blocks: `block NAME(params):` ... `end` defines lines once, `use PREFIX: NAME(args)` puts
them in the program. Expansion turns a program with blocks into one without.

Each use becomes an opening `ScopeStmt`, the block's lines, and a closing one. In those
lines every `$p` is replaced by the use's value (with the span of the `$p`, so later errors
point at the line in the block), every name the block gives is prefixed `PREFIX.NAME`, and
so is every reference to such a name; `in` becomes `PREFIX.in`. irgen reads the markers:
it names what the line above the use made `PREFIX.in`, and the block's last line `PREFIX`.

Errors are collected like irgen's. A use that cannot be expanded (an unknown block, a
block that would contain itself) becomes an empty scope, which passes its input through,
so that the lines below it can still be checked; a `$p` without a value gets a harmless
placeholder for the same reason.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import Counter
from dataclasses import dataclass, field

from cnnc.diagnostics import Diagnostic, Note, Span
from cnnc.frontend import syntax as ast

# Lines that belong to the whole program, never to a block.
_PROGRAM_LINES = {ast.NetworkStmt: "network", ast.InputStmt: "input", ast.LossStmt: "loss",
                  ast.TrainStmt: "train"}

# Statement fields that may be a `$p`: what they are called and what they take (irgen
# would fail on a word where it reads a count; an option's value it checks itself).
_SLOTS: dict[str, tuple[str, str]] = {
    "filters": ("the filter count", "a whole number like 16"),
    "units": ("the unit count", "a whole number like 120"),
    "rate": ("the rate", "a number like 0.5"),
    "kernel": ("the kernel", "sizes like 3x3"),
    "window": ("the window", "sizes like 2x2"),
    "factor": ("the factor", "sizes like 2x2"),
    "pads": ("the padding", "a number or sizes like 1 or 1x2"),
}
_WHOLE = ("filters", "units")
_SIZES = ("kernel", "window", "factor")

IN = "in"  # inside a block: what the line above the use made


@dataclass
class _Definition:
    stmt: ast.BlockStmt
    index: int  # of its block line among the program's statements
    body: list[ast.Statement] = field(default_factory=list)
    params: dict[str, ast.BlockParam] = field(default_factory=dict)  # the valid ones

    @property
    def name(self) -> str:
        return self.stmt.name.text


@dataclass(frozen=True)
class _Frame:
    """One use being expanded: its prefix, the names its block gives, its parameters'
    values (None: no usable value, already reported) and the uses it is inside."""

    definition: _Definition
    prefix: str
    labels: frozenset[str]
    use_labels: frozenset[str]
    values: dict[str, ast.Value | None]
    notes: tuple[Note, ...]  # "in block B, used as P here", innermost first

    def reference(self, word: ast.Word) -> ast.Word:
        """A name a line of the block reads: its own names and `in` get the prefix; any
        other name is a layer outside, above the use."""
        text = word.text
        local = text == IN or text in self.labels or \
            any(text.startswith(label + ".") for label in self.use_labels)
        return dataclasses.replace(word, text=f"{self.prefix}.{text}") if local else word

    def value(self, param: ast.Param) -> ast.Value | None:
        if param.name in self.values:
            return self.values[param.name]
        # Not a parameter (reported with the definition): go on as if the suggested one
        # was meant, so that one typo does not become a shape error too.
        close = difflib.get_close_matches(param.name, list(self.values), n=1, cutoff=0.6)
        return self.values[close[0]] if close else None


def expand(program: ast.Program) -> tuple[ast.Program, list[Diagnostic]]:
    """The program with every use replaced by its block's lines, and the errors found."""
    expander = _Expander()
    top = expander.collect(program.statements)
    for definition in expander.all_definitions:
        expander.check_definition(definition)
    expander.check_cycles()
    statements: list[ast.Statement] = []
    for index, stmt in top:
        if isinstance(stmt, ast.UseStmt):
            statements += expander.use(stmt, None, index)
        else:
            statements.append(expander.fill(stmt, None))
    return ast.Program(tuple(statements), program.file), expander.diagnostics


def _did_you_mean(word: str, valid: list[str], sigil: str = "") -> str:
    """`; did you mean 'x'?` for a name, `; did you mean $x?` for a parameter's `$x`."""
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {sigil}{close[0]}?" if sigil else f"; did you mean {close[0]!r}?"


def _owner(stmt: ast.Statement) -> str:
    """The layer as messages name it: `conv conv1`, or `conv` for an unnamed one."""
    kind = getattr(stmt, "kind", None)
    keyword = kind.text if isinstance(kind, ast.Word) else \
        type(stmt).__name__.removesuffix("Stmt").lower()
    name = getattr(stmt, "name", None)
    return f"{keyword} {name.text}" if name is not None else keyword


class _Expander:
    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []
        self._said: set[tuple[str, Span | None]] = set()
        self.definitions: dict[str, _Definition] = {}  # the first of each name
        self.all_definitions: list[_Definition] = []
        self.use_counts: Counter[str] = Counter()
        self._early_use_said: set[str] = set()
        self._bad_values: set[Span] = set()
        self._stack: list[str] = []  # the blocks being expanded, outermost first

    def error(self, message: str, span: Span | None, notes: tuple[Note, ...] = ()) -> None:
        """Report once: a block used several times would repeat its errors."""
        if (message, span) not in self._said:
            self._said.add((message, span))
            self.diagnostics.append(Diagnostic(message, span, notes))

    # -- definitions --------------------------------------------------------------------------
    def collect(self, statements: tuple[ast.Statement, ...]) -> list[tuple[int, ast.Statement]]:
        """Sort the statements into block definitions and the program's own lines."""
        top: list[tuple[int, ast.Statement]] = []
        current: _Definition | None = None
        for index, stmt in enumerate(statements):
            if isinstance(stmt, ast.BlockStmt):
                if current is not None:
                    self.error(f"block {stmt.name.text} starts inside block {current.name}; "
                               f"blocks are not nested: end block {current.name} first (a "
                               "block may use another one with 'use')", stmt.span,
                               (Note(f"block {current.name} starts here", current.stmt.span),))
                    self._close(current)
                current = self._open(stmt, index)
            elif isinstance(stmt, ast.EndStmt):
                if current is None:
                    self.error("'end' without a block; it closes the lines of a "
                               "'block NAME(...)' line above", stmt.span)
                else:
                    self._close(current)
                current = None
            elif current is not None and type(stmt) not in _PROGRAM_LINES:
                current.body.append(stmt)
            else:
                if isinstance(stmt, ast.NetworkStmt) and self.all_definitions:
                    self._network_below(stmt)
                if current is not None:  # reported, and kept where irgen expects it
                    self.error(f"the {_PROGRAM_LINES[type(stmt)]} line cannot be inside "
                               f"block {current.name}; a block holds layers and uses of "
                               "blocks", stmt.span,
                               (Note(f"block {current.name} starts here", current.stmt.span),))
                top.append((index, stmt))
        if current is not None:
            self.error(f"block {current.name} has no 'end'; a line 'end' closes its lines",
                       current.stmt.span)
            self._close(current)
        return top

    def _network_below(self, stmt: ast.NetworkStmt) -> None:
        """irgen sees the program without its definitions, where this line is first."""
        first = self.all_definitions[0].stmt
        self.error("the network line must be the first line of the program", stmt.span,
                   (Note(f"block {first.name.text} is defined above it", first.span),))

    def _open(self, stmt: ast.BlockStmt, index: int) -> _Definition:
        definition = _Definition(stmt, index)
        first = self.definitions.get(definition.name)
        if first is not None:
            self.error(f"a second block named {definition.name}; block names are unique",
                       stmt.name.span, (Note(f"block {definition.name} is first defined here",
                                             first.stmt.name.span),))
        else:
            self.definitions[definition.name] = definition
        self.all_definitions.append(definition)
        return definition

    def _close(self, definition: _Definition) -> None:
        if not definition.body:
            self.error(f"block {definition.name} has no lines", definition.stmt.span)

    def check_definition(self, definition: _Definition) -> None:
        """What can be judged without a use: parameters, `$p`s, names and nested uses."""
        self._check_params(definition)
        body = definition.body
        if body and isinstance(body[0], ast.ActivationStmt):
            act = body[0].activation.text
            self.error(f"{act} on a line of its own applies to the layer above, but it is the "
                       f"first line of block {definition.name}; a block starts with a layer "
                       "or a use", body[0].span)
            del body[0]
        for stmt in body:
            name = getattr(stmt, "name", None)
            if isinstance(name, ast.Word) and name.text == IN:
                self.error(f"in block {definition.name}, the name 'in' means what the line "
                           "above the use made; give this line another name", name.span)
            for param in _params_of(stmt):
                self._check_param_use(definition, param)
            if isinstance(stmt, ast.UseStmt):
                self._check_nested_use(definition, stmt)

    def _check_params(self, definition: _Definition) -> None:
        for param in definition.stmt.params:
            name = param.name.text
            if name == IN:
                self.error(f"block {definition.name}: the parameter name 'in' is reserved; in "
                           "a block, in means what the line above the use made",
                           param.name.span)
            elif name in definition.params:
                self.error(f"block {definition.name}: the parameter {name} is declared twice",
                           param.name.span, (Note("first declared here",
                                                  definition.params[name].name.span),))
            elif isinstance(param.default, ast.Param):
                self.error(f"block {definition.name}: the default of {name} must be a value "
                           f"like 1 or 3x3, not {param.default.text}", param.default.span)
                definition.params[name] = dataclasses.replace(param, default=None)
            else:
                definition.params[name] = param

    def _check_param_use(self, definition: _Definition, param: ast.Param) -> None:
        if param.name in definition.params:
            return
        names = list(definition.params)
        hint = _did_you_mean(param.name, names, "$")
        if not hint:
            hint = ("; its parameters are " + ", ".join(f"${n}" for n in names)) if names \
                else "; it has no parameters"
        self.error(f"block {definition.name} has no parameter {param.text}{hint}", param.span)

    def _check_nested_use(self, definition: _Definition, use: ast.UseStmt) -> None:
        used = self.definitions.get(use.block.text)
        if used is None:
            self._unknown_block(use)
        elif used.index > definition.index:
            self.error(f"block {used.name} is used before its definition; a block is "
                       "defined above its first use", use.block.span,
                       (Note(f"block {used.name} is defined here", used.stmt.name.span),))

    def _unknown_block(self, use: ast.UseStmt, notes: tuple[Note, ...] = ()) -> None:
        names = list(self.definitions)
        hint = _did_you_mean(use.block.text, names)
        if not hint:
            hint = ("; the blocks defined are " + ", ".join(names)) if names else \
                "; no block is defined (with 'block NAME(...)' ... 'end' above its use)"
        self.error(f"unknown block {use.block.text!r}{hint}", use.block.span, notes)

    def check_cycles(self) -> None:
        """A block that uses itself, directly or through others, would never end: said once
        a cycle, at the first use in it."""
        uses = {name: [s for s in d.body if isinstance(s, ast.UseStmt)
                       and s.block.text in self.definitions]
                for name, d in self.definitions.items()}
        said: set[str] = set()
        for name, stmts in uses.items():
            for use in stmts:
                other = use.block.text
                if name in said or name not in _reaching(other, uses):
                    continue
                through = "" if other == name else f" through block {other}"
                self.error(f"block {name} uses itself{through}; a block cannot contain its "
                           "own lines", use.block.span)
                said |= {b for b in _reaching(other, uses) if other in _reaching(b, uses)}

    # -- uses ---------------------------------------------------------------------------------
    def use(self, use: ast.UseStmt, outer: _Frame | None, index: int = -1) -> list[ast.Statement]:
        """The lines of one use, between its scope markers."""
        notes = outer.notes if outer else ()
        self.use_counts[use.block.text] += 1
        prefix = self._use_name(use, outer)
        definition = self.definitions.get(use.block.text)
        if definition is None:
            self._unknown_block(use, notes)
            return _scope(prefix, use.block, use.span)
        if outer is None and definition.index > index and definition.name not in \
                self._early_use_said:
            self._early_use_said.add(definition.name)
            self.error(f"block {definition.name} is used before its definition; a block is "
                       "defined above its first use", use.block.span,
                       (Note(f"block {definition.name} is defined here",
                             definition.stmt.name.span),))
        if definition.name in self._stack:  # a cycle, reported with the definitions
            return _scope(prefix, definition.stmt.name, use.span)
        frame = self._frame(definition, use, prefix, outer)
        self._stack.append(definition.name)
        lines: list[ast.Statement] = []
        for stmt in definition.body:
            if isinstance(stmt, ast.UseStmt):
                lines += self.use(stmt, frame)
            else:
                lines.append(self.fill(_prefixed(stmt, frame), frame))
        self._stack.pop()
        opening, closing = _scope(prefix, definition.stmt.name, use.span)
        return [opening, *lines, closing]

    def _use_name(self, use: ast.UseStmt, outer: _Frame | None) -> ast.Word:
        """The given name (prefixed inside a block), or, like an unnamed layer's, the
        block's name and how many uses of it this is."""
        if use.name is None:
            return ast.Word(f"{use.block.text}{self.use_counts[use.block.text]}", use.span)
        if outer is None:
            return use.name
        return dataclasses.replace(use.name, text=f"{outer.prefix}.{use.name.text}")

    def _frame(self, definition: _Definition, use: ast.UseStmt, prefix: ast.Word,
               outer: _Frame | None) -> _Frame:
        notes = (outer.notes if outer else ())
        labels = frozenset(s.name.text for s in definition.body
                           if isinstance(getattr(s, "name", None), ast.Word))
        use_labels = frozenset(s.name.text for s in definition.body
                               if isinstance(s, ast.UseStmt) and s.name is not None)
        here = Note(f"in block {definition.name}, used as {prefix.text} here", use.span)
        frame = _Frame(definition, prefix.text, labels, use_labels, {}, (here, *notes))
        args = [dataclasses.replace(arg, value=self._outer_value(arg.value, outer))
                for arg in use.args]
        frame.values.update(self._bind(definition, args, use, notes))
        for name, param in definition.params.items():
            # a default is written in the block: `in` or a name there is the block's own
            if name not in frame.values:
                default = param.default
                is_name = isinstance(default, ast.Word)
                frame.values[name] = frame.reference(default) if is_name else default
        return frame

    def _outer_value(self, value: ast.Value, outer: _Frame | None) -> ast.Value | None:
        """An argument as the use's surroundings give it: a `$p` of the enclosing block
        replaced (keeping the span of where its value was written), a name of the
        enclosing block prefixed."""
        if isinstance(value, ast.Param):
            if outer is None:
                self._outside(value)
                return None
            return outer.value(value)
        if isinstance(value, ast.Word) and outer is not None:
            return outer.reference(value)
        return value

    def _bind(self, definition: _Definition, args: list[ast.BlockArg], use: ast.UseStmt,
              notes: tuple[Note, ...]) -> dict[str, ast.Value | None]:
        """The value of each parameter given: positional arguments in order, then
        keywords (None where there is no usable value)."""
        names = list(definition.params)
        here = (Note(f"block {definition.name} is defined here", definition.stmt.span), *notes)
        values: dict[str, ast.Value | None] = {}
        given: dict[str, Span] = {}
        positional = 0
        keyword_seen = False
        for arg, original in zip(args, use.args, strict=True):
            if arg.key is None:
                if keyword_seen:
                    self.error(f"block {definition.name}: an argument without a name after "
                               "one with a name; the ones without come first",
                               original.value.span, notes)
                    continue
                positional += 1
                if positional > len(names):
                    if positional == len(names) + 1:
                        self._too_many(definition, original.value.span, here)
                    continue
                name, span = names[positional - 1], original.value.span
            else:
                keyword_seen = True
                name, span = arg.key.text, arg.key.span
                if name not in definition.params:
                    self._no_such_keyword(definition, arg.key, here)
                    continue
            if name in given:
                self.error(f"block {definition.name}: the parameter {name} is given twice",
                           span, (Note("first given here", given[name]), *notes))
                continue
            given[name] = span
            values[name] = arg.value
        missing = [definition.params[n] for n in names if n not in values
                   and definition.params[n].default is None]
        if missing:
            self._missing(definition, missing, use, notes)
            values.update((p.name.text, None) for p in missing)
        return values

    def _too_many(self, definition: _Definition, span: Span, notes: tuple[Note, ...]) -> None:
        names = list(definition.params)
        takes = f"{len(names)} ({', '.join(names)})" if names else "none"
        self.error(f"too many arguments: block {definition.name} takes {takes}", span, notes)

    def _no_such_keyword(self, definition: _Definition, key: ast.Word,
                         notes: tuple[Note, ...]) -> None:
        names = list(definition.params)
        hint = _did_you_mean(key.text, names)
        if not hint:
            hint = ("; its parameters are " + ", ".join(names)) if names else \
                "; it has no parameters"
        self.error(f"block {definition.name} has no parameter {key.text!r}{hint}", key.span,
                   notes)

    def _missing(self, definition: _Definition, missing: list[ast.BlockParam],
                 use: ast.UseStmt, notes: tuple[Note, ...]) -> None:
        words = [p.name.text for p in missing]
        listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        which = "which has" if len(words) == 1 else "which have"
        declared = tuple(Note(f"{p.name.text} is declared here", p.name.span) for p in missing)
        self.error(f"block {definition.name} needs a value for {listed}, {which} no default",
                   use.span, declared + notes)

    def _outside(self, param: ast.Param) -> None:
        self.error(f"{param.text} is a block's parameter, but this line is in no block",
                   param.span)

    # -- the lines of a use -------------------------------------------------------------------
    def fill(self, stmt: ast.Statement, frame: _Frame | None) -> ast.Statement:
        """`stmt` with every `$p` replaced: by the use's value inside a block, by a
        placeholder (and an error) outside one. The grammar allows `$p` only as a whole
        field (a count, kernel or rate) and as an option's value."""
        changes: dict[str, object] = {}
        for f in dataclasses.fields(stmt):
            value = getattr(stmt, f.name)
            if isinstance(value, ast.Param):
                changes[f.name] = self._slot(stmt, f.name, value, frame)
            elif f.name == "options" and any(isinstance(o.value, ast.Param) for o in value):
                changes[f.name] = tuple(o for o in (self._option(o, frame) for o in value)
                                        if o is not None)
        return dataclasses.replace(stmt, **changes) if changes else stmt

    def _slot(self, stmt: ast.Statement, slot: str, param: ast.Param,
              frame: _Frame | None) -> ast.Value:
        if frame is None:
            self._outside(param)
            return _placeholder(slot, param.span)
        value = frame.value(param)
        if value is None:
            return _placeholder(slot, param.span)
        if not _fits(slot, value):
            if value.span in self._bad_values:  # said where the value is first used
                return _placeholder(slot, param.span)
            self._bad_values.add(value.span)
            what, takes = _SLOTS[slot]
            self.error(f"{param.text} is {what} of {_owner(stmt)} in block "
                       f"{frame.definition.name}, {takes}; got {value.text}", value.span,
                       (Note(f"{param.text} is used here", param.span), *frame.notes))
            return _placeholder(slot, param.span)
        return dataclasses.replace(value, span=param.span)

    def _option(self, option: ast.Option, frame: _Frame | None) -> ast.Option | None:
        """The option with its value; without a usable value it is left out, so its
        default applies."""
        if not isinstance(option.value, ast.Param):
            return option
        if frame is None:
            self._outside(option.value)
            return None
        value = frame.value(option.value)
        if value is None:
            return None
        return dataclasses.replace(option, value=dataclasses.replace(value,
                                                                     span=option.value.span))


def _params_of(stmt: ast.Statement) -> list[ast.Param]:
    """Every `$p` of a statement of a block's body."""
    if isinstance(stmt, ast.UseStmt):
        values: list[object] = [arg.value for arg in stmt.args]
    else:
        values = [getattr(stmt, f.name) for f in dataclasses.fields(stmt)]
        values += [o.value for o in getattr(stmt, "options", ())]
    return [v for v in values if isinstance(v, ast.Param)]


def _prefixed(stmt: ast.Statement, frame: _Frame) -> ast.Statement:
    """The line's name and the block's own names it reads, prefixed."""
    changes: dict[str, object] = {}
    name = getattr(stmt, "name", None)
    if isinstance(name, ast.Word):
        changes["name"] = dataclasses.replace(name, text=f"{frame.prefix}.{name.text}")
    if isinstance(stmt, ast.MergeStmt):
        changes["inputs"] = tuple(frame.reference(word) for word in stmt.inputs)
    options = getattr(stmt, "options", ())
    if any(o.key.text == "from" and isinstance(o.value, ast.Word) for o in options):
        changes["options"] = tuple(
            dataclasses.replace(o, value=frame.reference(o.value))
            if o.key.text == "from" and isinstance(o.value, ast.Word) else o for o in options)
    return dataclasses.replace(stmt, **changes) if changes else stmt


def _fits(slot: str, value: ast.Value) -> bool:
    if slot in _WHOLE:
        return isinstance(value, ast.Number) and isinstance(value.value, int)
    if slot in _SIZES:
        return isinstance(value, ast.Dims)
    if slot == "rate":
        return isinstance(value, ast.Number)
    if slot == "pads":
        return isinstance(value, ast.Dims) or (isinstance(value, ast.Number)
                                               and isinstance(value.value, int))
    return True


def _placeholder(slot: str, span: Span) -> ast.Value:
    """A value irgen accepts silently where a `$p` has none (the error is already said)."""
    if slot in _SIZES:
        return ast.Dims((1, 1), "1x1", span)
    if slot == "rate":
        return ast.Number(0.5, "0.5", span)
    if slot == "pads":
        return ast.Number(0, "0", span)
    return ast.Number(1, "1", span)


def _scope(prefix: ast.Word, block: ast.Word, span: Span) -> list[ast.Statement]:
    return [ast.ScopeStmt(prefix, block, True, span), ast.ScopeStmt(prefix, block, False, span)]


def _reaching(start: str, uses: dict[str, list[ast.UseStmt]]) -> set[str]:
    """Every block that `start`'s lines use, directly or through others, `start` included."""
    seen, todo = {start}, [start]
    while todo:
        for use in uses[todo.pop()]:
            if use.block.text not in seen:
                seen.add(use.block.text)
                todo.append(use.block.text)
    return seen
