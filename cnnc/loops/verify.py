"""The loop IR's invariants, checked on one function: what every backend assumes of the loops
it is given, so that a lowering or a schedule that breaks one fails here, naming the function
and the invariant, and not as wrong code or an LLVM error far away.

- Buffers and locals have unique names; every access names a declared buffer, with one index
  an axis; only buffers marked as outputs are stored to.
- Every variable read is `N`, the variable of an enclosing loop or a declared local; only
  declared locals are assigned; no loop rebinds a variable that is in scope.
- Every value is an integer, a float or a truth value, and each operator gets the kinds it
  takes: indices and extents are integers, conditions truth values, a stored value has the
  kind of its buffer or local.
- Vectors agree: the operands of one operator have one lane count (a scalar beside a vector
  is broadcast), indices, extents and conditions are scalars, a `Lane` exists in its vector,
  a `VecStore` stores a vector and a `Store` a scalar.
- Parallel loops do not nest (one holding only another is collapsed with it, and the
  collapsed extents must not read the outer variables); their private buffers are outputs
  of a fixed shape.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NoReturn

from cnnc.graph.ir import BATCH, DType
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Broadcast,
    Buffer,
    Const,
    Expr,
    For,
    If,
    Lane,
    Load,
    LoopFunction,
    LoopKind,
    Ramp,
    Select,
    Stmt,
    Store,
    Unary,
    UnaryOp,
    Var,
    VecLoad,
    VecStore,
)
from cnnc.loops.printer import format_expr
from cnnc.loops.walk import walk


def verify_function(function: LoopFunction) -> None:
    """Raises AssertionError, naming `function` and the broken invariant, unless the loop
    IR invariants (module docstring) hold."""
    checker = _Checker(function)
    checker.declarations()
    checker.statements(function.body, ())


class Kind(enum.Enum):
    """What a value is, whatever its width: the IR's own types."""

    INT = "an integer"
    FLOAT = "a float"
    BOOL = "a truth value"


@dataclass(frozen=True, slots=True)
class Value:
    """The kind of an expression's value and its lanes (1: a scalar)."""

    kind: Kind
    lanes: int = 1


# one Value a scalar kind, made once: the checker asks for them at every node
_SCALAR = {kind: Value(kind) for kind in Kind}


def kind_of(dtype: DType) -> Kind:
    return Kind.FLOAT if dtype.is_float else Kind.INT


# the kinds of the operands of each operator, and of its result
_ARITHMETIC = (BinOp.ADD, BinOp.SUB, BinOp.MUL)  # of two integers or two floats, either
_BINARY = {BinOp.DIV: (Kind.FLOAT, Kind.FLOAT), BinOp.FLOOR_DIV: (Kind.INT, Kind.INT),
           BinOp.MOD: (Kind.INT, Kind.INT), BinOp.MAX: (Kind.FLOAT, Kind.FLOAT),
           BinOp.AND: (Kind.BOOL, Kind.BOOL), BinOp.OR: (Kind.BOOL, Kind.BOOL)}
_UNARY = {UnaryOp.NEG: (Kind.FLOAT, Kind.FLOAT), UnaryOp.EXP: (Kind.FLOAT, Kind.FLOAT),
          UnaryOp.LOG: (Kind.FLOAT, Kind.FLOAT), UnaryOp.SQRT: (Kind.FLOAT, Kind.FLOAT),
          UnaryOp.TANH: (Kind.FLOAT, Kind.FLOAT), UnaryOp.ISNAN: (Kind.FLOAT, Kind.BOOL),
          UnaryOp.ERF: (Kind.FLOAT, Kind.FLOAT),
          UnaryOp.FLOAT: (Kind.INT, Kind.FLOAT)}


class _Checker:
    def __init__(self, function: LoopFunction) -> None:
        self.function = function
        self.buffers = {b.name: b for b in function.buffers}
        self.locals = {local.name: local for local in function.locals}
        self.parallel_depth = 0  # inside a parallel loop's body: no other may start

    def fail(self, message: str) -> NoReturn:
        raise AssertionError(f"loop function {self.function.name}: {message}")

    def declarations(self) -> None:
        for kind, names in (("buffer", [b.name for b in self.function.buffers]),
                            ("local", [lo.name for lo in self.function.locals])):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                self.fail(f"{kind} {repeated[0]} is declared twice")
        for local in self.function.locals:
            if local.name == BATCH:
                self.fail(f"local {local.name} has the name of the batch size")
            if local.lanes < 1:
                self.fail(f"local {local.name} has {local.lanes} lanes")

    # -- statements -----------------------------------------------------------------------
    def statements(self, body: tuple[Stmt, ...], scope: tuple[str, ...]) -> None:
        """`body` with the variables of the loops around it, outermost first, in `scope`."""
        for stmt in body:
            self.statement(stmt, scope)

    def statement(self, stmt: Stmt, scope: tuple[str, ...]) -> None:
        if isinstance(stmt, For):
            self.loop(stmt, scope)
        elif isinstance(stmt, If):
            self.expect(stmt.cond, scope, Kind.BOOL, "an if's condition")
            self.statements(stmt.body, scope)
        elif isinstance(stmt, Assign):
            self.assign(stmt, scope)
        else:
            self.store(stmt, scope)

    def loop(self, stmt: For, scope: tuple[str, ...]) -> None:
        self.loop_header(stmt, scope)
        if stmt.private and stmt.kind is not LoopKind.PARALLEL:
            self.fail(f"loop {stmt.var} has private buffers and is not parallel")
        if stmt.kind is not LoopKind.PARALLEL:
            self.statements(stmt.body, (*scope, stmt.var))
            return
        if self.parallel_depth:
            self.fail(f"parallel loop {stmt.var} is nested in another")
        nest = parallel_nest(stmt)
        for depth, loop in enumerate(nest):
            if depth:  # the collapsed loops' own checks (their extents are read up front)
                self.loop_header(loop, (*scope, *(lo.var for lo in nest[:depth])))
                used = _variables(loop.extent) & {lo.var for lo in nest[:depth]}
                if used:
                    self.fail(f"parallel loop {loop.var}'s extent depends on {min(used)}")
            for name in loop.private:
                buffer = self.buffers.get(name)
                if buffer is None or not buffer.is_output or BATCH in buffer.shape:
                    self.fail(f"parallel loop {loop.var}'s private buffer {name} is not a "
                              "declared output of a fixed shape")
        self.parallel_depth += 1
        self.statements(nest[-1].body, (*scope, *(lo.var for lo in nest)))
        self.parallel_depth -= 1

    def loop_header(self, stmt: For, scope: tuple[str, ...]) -> None:
        # buffers are named apart from variables, but a loop's counter and the locals
        # share one namespace in every backend
        if stmt.var in scope:
            self.fail(f"loop {stmt.var} rebinds the variable of an enclosing loop")
        if stmt.var == BATCH or stmt.var in self.locals:
            self.fail(f"loop {stmt.var} rebinds the batch size or a local")
        self.expect(stmt.extent, scope, Kind.INT, f"the extent of loop {stmt.var}")

    def assign(self, stmt: Assign, scope: tuple[str, ...]) -> None:
        local = self.locals.get(stmt.var)
        if local is None:
            self.fail(f"assigns to {stmt.var}, which is not a declared local")
        value = self.value(stmt.value, scope)
        if value.kind is not kind_of(local.dtype) or value.lanes not in (1, local.lanes):
            self.fail(f"assigns {_describe(value)} to local {stmt.var}, "
                      f"{_describe(Value(kind_of(local.dtype), local.lanes))}")

    def store(self, stmt: Store | VecStore, scope: tuple[str, ...]) -> None:
        buffer = self.access(stmt.buffer, stmt.index, "stores to", scope)
        if not buffer.is_output:
            self.fail(f"stores to {stmt.buffer}, which is not an output buffer")
        value = self.value(stmt.value, scope)
        kind = kind_of(buffer.dtype)
        if value.kind is not kind:
            self.fail(f"stores {_describe(value)} to {stmt.buffer}, a buffer of {_PLURAL[kind]}")
        vector = isinstance(stmt, VecStore)
        if (value.lanes > 1) != vector:
            self.fail(f"stores {_describe(value)} to {stmt.buffer} with a "
                      f"{'vector' if vector else 'scalar'} store")

    # -- expressions ----------------------------------------------------------------------
    def expect(self, expr: Expr, scope: tuple[str, ...], kind: Kind, what: str) -> None:
        value = self.typed(expr, scope)
        if value != _SCALAR[kind]:
            self.fail(f"{what} is {_describe(value)}, where it must be {kind.value}: "
                      f"{format_expr(expr)}")

    def value(self, expr: Expr, scope: tuple[str, ...]) -> Value:
        """The kind and lanes of `expr`, its names and accesses checked on the way."""
        return self.typed(expr, scope)

    def variable(self, name: str, scope: tuple[str, ...]) -> None:
        if name != BATCH and name not in scope and name not in self.locals:
            self.fail(f"reads {name}, which is neither N, an enclosing loop's variable "
                      f"nor a declared local")

    def access(self, name: str, index: tuple[Expr, ...], verb: str,
               scope: tuple[str, ...]) -> Buffer:
        buffer = self.declared(name, verb)
        if len(index) != len(buffer.shape):
            self.fail(f"{verb} {name} with {len(index)} indices, but it has rank "
                      f"{len(buffer.shape)}")
        for item in index:
            self.expect(item, scope, Kind.INT, f"an index of {name}")
        return buffer

    def declared(self, name: str, verb: str) -> Buffer:
        buffer = self.buffers.get(name)
        if buffer is None:
            self.fail(f"{verb} {name}, which is not a declared buffer")
        return buffer

    def typed(self, expr: Expr, scope: tuple[str, ...]) -> Value:
        """The kind and lanes of `expr`, checking that each operator gets what it takes,
        every variable it reads is in scope and every buffer it loads from is declared: one
        pass over the expression."""
        if isinstance(expr, Var):
            self.variable(expr.name, scope)
            local = self.locals.get(expr.name)
            if local is None:  # N or a loop's variable
                return _SCALAR[Kind.INT]
            return Value(kind_of(local.dtype), local.lanes)
        if isinstance(expr, Const):
            return _SCALAR[Kind.FLOAT if expr.is_float else Kind.INT]
        if isinstance(expr, Load):
            return _SCALAR[kind_of(self.access(expr.buffer, expr.index, "loads from", scope).dtype)]
        if isinstance(expr, VecLoad):
            if expr.lanes < 2 or expr.stride < 1:
                self.fail(f"a vector load of {expr.lanes} lanes, stride {expr.stride}")
            buffer = self.access(expr.buffer, expr.index, "loads from", scope)
            return Value(kind_of(buffer.dtype), expr.lanes)
        if isinstance(expr, Broadcast | Ramp):
            return self.vector(expr, scope)
        if isinstance(expr, Lane):
            vector = self.typed(expr.vector, scope)
            if not 0 <= expr.lane < vector.lanes or vector.lanes < 2:
                self.fail(f"lane {expr.lane} of {_describe(vector)}: {format_expr(expr)}")
            return Value(vector.kind)
        if isinstance(expr, Select):
            return self.select(expr, scope)
        if isinstance(expr, Unary):
            return self.unary(expr, scope)
        return self.binary(expr, scope)

    def vector(self, expr: Broadcast | Ramp, scope: tuple[str, ...]) -> Value:
        scalar = self.typed(expr.value if isinstance(expr, Broadcast) else expr.base, scope)
        if scalar.lanes != 1 or expr.lanes < 2:
            self.fail(f"a vector of {expr.lanes} lanes made from {_describe(scalar)}: "
                      f"{format_expr(expr)}")
        if isinstance(expr, Ramp) and scalar.kind is not Kind.INT:
            self.fail(f"a ramp starts at {_describe(scalar)}: {format_expr(expr)}")
        return Value(scalar.kind, expr.lanes)

    def select(self, expr: Select, scope: tuple[str, ...]) -> Value:
        cond, then, otherwise = (self.typed(e, scope)
                                 for e in (expr.cond, expr.then, expr.otherwise))
        if cond.kind is not Kind.BOOL or then.kind is not otherwise.kind:
            self.fail(f"select of {_describe(then)} or {_describe(otherwise)} on "
                      f"{_describe(cond)}: {format_expr(expr)}")
        return Value(then.kind, self.lanes(expr, cond, then, otherwise))

    def unary(self, expr: Unary, scope: tuple[str, ...]) -> Value:
        operand = self.typed(expr.operand, scope)
        takes, gives = _UNARY[expr.op]
        if operand.kind is not takes:
            self.fail(f"{expr.op.value} of {_describe(operand)}: {format_expr(expr)}")
        return Value(gives, operand.lanes)

    def binary(self, expr: Binary, scope: tuple[str, ...]) -> Value:
        left, right = self.typed(expr.left, scope), self.typed(expr.right, scope)
        lanes = self.lanes(expr, left, right)
        if expr.op in _ARITHMETIC or expr.op.is_comparison:
            fits = left.kind is right.kind and left.kind is not Kind.BOOL
            gives = Kind.BOOL if expr.op.is_comparison else left.kind
        else:
            takes = _BINARY[expr.op][0]
            fits = left.kind is takes and right.kind is takes
            gives = _BINARY[expr.op][1]
        if not fits:
            self.fail(f"{expr.op.value} of {_describe(left)} and {_describe(right)}: "
                      f"{format_expr(expr)}")
        return Value(gives, lanes)

    def lanes(self, expr: Expr, *operands: Value) -> int:
        """The lanes of an operator's result: the operands' own, scalars broadcast."""
        widths = {value.lanes for value in operands} - {1}
        if len(widths) > 1:
            self.fail(f"operands of {sorted(widths)} lanes in one operation: "
                      f"{format_expr(expr)}")
        return widths.pop() if widths else 1


_PLURAL = {Kind.INT: "integers", Kind.FLOAT: "floats", Kind.BOOL: "truth values"}


def _describe(value: Value) -> str:
    if value.lanes == 1:
        return value.kind.value
    return f"a vector of {value.lanes} {_PLURAL[value.kind]}"


__all__ = ["Kind", "Value", "verify_function"]



def _variables(expr: Expr) -> set[str]:
    """The variables an index expression reads."""
    return {node.name for node in walk(expr) if isinstance(node, Var)}

def parallel_nest(stmt: For) -> list[For]:
    """A parallel loop and the parallel loops collapsed into it: each the only statement of
    the one before."""
    nest = [stmt]
    while len(nest[-1].body) == 1 and isinstance(nest[-1].body[0], For) and \
            nest[-1].body[0].kind is LoopKind.PARALLEL:
        nest.append(nest[-1].body[0])
    return nest
