"""The loop IR: a tiny loop-nest language (buffers, `For`, loads, stores, arithmetic, `max`,
`select`) that every backend generates code from.

The loops say what is computed, in which order, and nothing about speed: schedules (tiling,
vectorizing, parallel loops) rewrite this IR later, and `For.kind` is where they mark a loop
parallel or vectorized. Building helpers are in `loops/build`, the plain lowering of kernels
in `loops/lower`, the printer (`--emit loops`) in `loops/printer`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cnnc.graph.ir import DType, Shape

# -- operators ------------------------------------------------------------------------------


class BinOp(enum.Enum):
    """A binary operator; the value is how the printer writes it."""

    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    FLOOR_DIV = "//"  # of integers
    MOD = "%"  # of integers
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="
    NE = "!="
    AND = "and"
    OR = "or"
    MAX = "max"  # of floats; NaN if either is NaN

    @property
    def is_comparison(self) -> bool:
        return self in _COMPARISONS


_COMPARISONS = frozenset({BinOp.LT, BinOp.LE, BinOp.GT, BinOp.GE, BinOp.EQ, BinOp.NE})


class UnaryOp(enum.Enum):
    """A unary operator; the value is how the printer writes it."""

    NEG = "neg"
    EXP = "exp"
    LOG = "log"
    SQRT = "sqrt"
    TANH = "tanh"
    ERF = "erf"  # the error function, 2/√π ∫₀ˣ exp(−t²) dt
    ISNAN = "isnan"
    FLOAT = "float"  # an integer as a float


# -- expressions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Var:
    """A loop index, the batch size `N`, or a scalar local of the function."""

    name: str


@dataclass(frozen=True, slots=True)
class Const:
    value: int | float
    is_float: bool


@dataclass(frozen=True, slots=True)
class Load:
    buffer: str
    index: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Binary:
    op: BinOp
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class Unary:
    op: UnaryOp
    operand: Expr


@dataclass(frozen=True, slots=True)
class Select:
    cond: Expr
    then: Expr
    otherwise: Expr


@dataclass(frozen=True, slots=True)
class VecLoad:
    """`lanes` elements `stride` apart along the last axis; `index` names the first."""

    buffer: str
    index: tuple[Expr, ...]
    lanes: int
    stride: int = 1


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A scalar copied into every lane of a vector."""

    value: Expr
    lanes: int


@dataclass(frozen=True, slots=True)
class Ramp:
    """The integer vector base, base + step, ..., base + (lanes − 1)·step."""

    base: Expr
    step: int
    lanes: int


@dataclass(frozen=True, slots=True)
class Lane:
    """One element of a vector."""

    vector: Expr
    lane: int


# Arithmetic, comparisons and `select` apply lane by lane when an operand is a vector; a
# scalar operand beside a vector is broadcast.
Expr = Var | Const | Load | Binary | Unary | Select | VecLoad | Broadcast | Ramp | Lane

# -- statements -----------------------------------------------------------------------------


class LoopKind(enum.Enum):
    SERIAL = "for"
    PARALLEL = "parallel for"
    VECTORIZED = "vector for"
    UNROLLED = "unrolled for"


@dataclass(frozen=True, slots=True)
class For:
    """`for var in 0..extent`. A PARALLEL loop's iterations may run on several threads at
    once, in any order: none reads what another writes, and a local it assigns is its own.
    `private` names scratch buffers each thread gets a copy of (static shapes), for what an
    iteration writes and reads back itself. A PARALLEL loop whose body is one PARALLEL loop
    is one parallel range over both (the inner extent must not depend on the outer
    variable)."""

    var: str
    extent: Expr
    body: tuple[Stmt, ...]
    kind: LoopKind = LoopKind.SERIAL
    private: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class If:
    cond: Expr
    body: tuple[Stmt, ...]


@dataclass(frozen=True, slots=True)
class Assign:
    var: str
    value: Expr


@dataclass(frozen=True, slots=True)
class Store:
    buffer: str
    index: tuple[Expr, ...]
    value: Expr


@dataclass(frozen=True, slots=True)
class VecStore:
    """Stores the lanes of a vector value to consecutive elements from `index`."""

    buffer: str
    index: tuple[Expr, ...]
    value: Expr


Stmt = For | If | Assign | Store | VecStore


@dataclass(frozen=True, slots=True)
class Buffer:
    """A pointer argument; `shape` is how this function indexes it (row-major)."""

    name: str
    shape: Shape
    dtype: DType
    is_output: bool = False


@dataclass(frozen=True, slots=True)
class Local:
    name: str
    dtype: DType
    lanes: int = 1  # above 1: a vector, kept in a register across the loops that update it


@dataclass(frozen=True, slots=True)
class LoopFunction:
    name: str
    buffers: tuple[Buffer, ...]
    locals: tuple[Local, ...]
    body: tuple[Stmt, ...]

    def buffer(self, name: str) -> Buffer:
        return next(b for b in self.buffers if b.name == name)
