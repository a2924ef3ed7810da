"""What every schedule pattern is built from: a loop function under construction with its
scratch buffers, the register block (rows x vectors accumulators kept in registers through
the reduction loops), row tiling with a tail block, the tile an accumulator block is stored
to and scattered from (bias and activation applied on the way), channel-blocked repacking
and zero padding. Each kernel packs what it needs into scratch buffers of its own at the
start of the call; what only reads parameters (its weights and bias) then moves to the
module's pack entry point (`schedule.prepack`), which runs once per change of them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from cnnc.graph.ir import BATCH, DType, Role, Tensor
from cnnc.loops.build import add, const, loop_nest, mul
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
    Local,
    LoopFunction,
    LoopKind,
    Select,
    Stmt,
    Store,
    Var,
    VecStore,
)
from cnnc.ops.lowering import activate, view
from cnnc.schedule.cost import Block, Schedule

ZERO = Const(0.0, True)


@dataclass
class Function:
    """A loop function under construction: its buffers, locals and scratch tensors."""

    name: str
    dtype: DType
    buffers: list[Buffer]
    scratch: list[Tensor]
    locals: list[Local]
    body: list[Stmt]

    def add_scratch(self, suffix: str, shape: tuple) -> str:
        """A scratch buffer of this function; asking again for one returns the same."""
        name = f"{self.name}.{suffix}"
        for tensor in self.scratch:
            if tensor.name == name:
                assert tensor.shape == shape, f"scratch {name} asked for with two shapes"
                return name
        self.scratch.append(Tensor(name, Role.SCRATCH, self.dtype, shape))
        self.buffers.append(Buffer(name, shape, self.dtype, is_output=True))
        return name

    def finished(self) -> LoopFunction:
        return LoopFunction(self.name, tuple(self.buffers), tuple(self.locals),
                            tuple(self.body))


@dataclass(frozen=True, slots=True)
class Lowered:
    function: LoopFunction
    scratch: tuple[Tensor, ...]
    schedule: Schedule


@dataclass(frozen=True, slots=True)
class BlockCode:
    """What a register block computes; each callable gets the row r (and vector v)."""

    reduction: tuple[tuple[str, Expr], ...]  # (loop variable, extent), outermost first
    broadcast: Callable[[int], Expr]  # the scalar operand of row r
    vector: Callable[[int], Expr]  # the vector operand v (a VecLoad)
    init: Callable[[int, int], Expr]  # the starting value of accumulator (r, v)
    finish: Callable[[int, int, Expr], tuple[Stmt, ...]]  # consumes accumulator (r, v)
    epilogue: Callable[[int], tuple[Stmt, ...]] = lambda rows: ()  # after all, given rows
    # further reduction nests into the same accumulators, after the first: (reduction,
    # broadcast, vector) each (a strided convolution's other stride phases)
    more: tuple[tuple[tuple[tuple[str, Expr], ...], Callable[[int], Expr],
                      Callable[[int], Expr]], ...] = ()


def conv_function(kernel, program) -> tuple[Function, Buffer, Buffer, Buffer]:
    """A forward convolution's function under construction, with its buffers x, weight,
    the bias where it has one, and out; and x, weight and out."""
    x, weight = (view(program, n) for n in kernel.inputs[:2])
    out = view(program, kernel.outputs[0], is_output=True)
    f = Function(kernel.name, out.dtype, [x, weight], [], [], [])
    if kernel.has_bias:
        f.buffers.append(view(program, kernel.inputs[2]))
    f.buffers.append(out)
    return f, x, weight, out


def register_block(f: Function, tag: str, block: Block, rows: int,
                    code: BlockCode) -> tuple[Stmt, ...]:
    """rows x vectors accumulators that live in registers through the reduction loops."""
    lanes, vectors = block.lanes, block.vectors
    acc = [[f"{tag}_acc{r}_{v}" for v in range(vectors)] for r in range(rows)]
    weights = [f"{tag}_vec{v}" for v in range(vectors)]
    scalar = f"{tag}_scalar"
    f.locals += [Local(n, f.dtype, lanes) for row in acc for n in row]
    f.locals += [Local(n, f.dtype, lanes) for n in weights] + [Local(scalar, f.dtype)]
    start = [Assign(acc[r][v], code.init(r, v)) for r in range(rows) for v in range(vectors)]
    nests = []
    for reduction, broadcast, vector in ((code.reduction, code.broadcast, code.vector),
                                         *code.more):
        step: list[Stmt] = [Assign(weights[v], vector(v)) for v in range(vectors)]
        for r in range(rows):
            step.append(Assign(scalar, broadcast(r)))
            spread = Broadcast(Var(scalar), lanes)
            step += [Assign(acc[r][v], add(Var(acc[r][v]), mul(spread, Var(weights[v]))))
                     for v in range(vectors)]
        names = [name for name, _ in reduction]
        nests.append(loop_nest(names, [extent for _, extent in reduction], tuple(step)))
    end = [s for r in range(rows) for v in range(vectors)
           for s in code.finish(r, v, Var(acc[r][v]))]
    return (*start, *nests, *end, *code.epilogue(rows))


def row_tiles(f: Function, var: str, extent: int | None, block: Block,
               code_at: Callable[[Expr], BlockCode]) -> tuple[Stmt, ...]:
    """Rows 0..extent in blocks of block.rows and a smaller tail block; `code_at` gets the
    first row of a block. An extent of None is the batch, known only at run time."""
    size = block.rows
    if extent is None:
        full = Binary(BinOp.FLOOR_DIV, Var(BATCH), const(size))
        main = For(var, full, register_block(f, f"{var}m", block, size,
                                              code_at(mul(Var(var), const(size)))))
        last = add(mul(full, const(size)), Var(f"{var}t"))
        tail = For(f"{var}t", Binary(BinOp.MOD, Var(BATCH), const(size)),
                   register_block(f, f"{var}t", Block(1, block.vectors, block.lanes), 1,
                                   code_at(last)))
        return (main, tail) if size > 1 else (main,)
    full, rest = divmod(extent, size)
    stmts: list[Stmt] = []
    if full:
        stmts.append(For(var, const(full), register_block(
            f, f"{var}m", block, size, code_at(mul(Var(var), const(size))))))
    if rest:
        stmts += register_block(f, f"{var}t", block, rest, code_at(const(full * size)))
    return tuple(stmts)


def tile_store(tile: str, block: Block, activation: str | None = None,
               activation_attrs: object = None) -> Callable[[int, int, Expr], tuple[Stmt, ...]]:
    """Accumulator (r, v) as one vector store into the block's tile, through `activation`
    while it is in a register. In the scatter that follows, the activation was scalar, and
    a clip (relu6) made LLVM store with masked vector scatters: MobileNetV2's stem ran 6x
    slower, its depthwise convolutions 3-6x."""
    return lambda r, v, acc: (VecStore(tile, (const(r), const(v * block.lanes)),
                                       activate(activation, acc, activation_attrs)),)


def tile_scatter(tile: str, out: str, index_of: Callable[[Expr, Expr], tuple[Expr, ...]],
                  first: Expr, limit: int, width: int,
                  activation: str | None, activation_attrs: object = None,
                  rows_adjacent: bool = False) -> Callable[[int], tuple[Stmt, ...]]:
    """The tile's rows x channels, activated (`ops.lowering.activate`), to out[index_of(row,
    first + j)], as a loop (compact code) over the channels below `limit`.

    `rows_adjacent`: the tile's rows are neighbouring elements of the output (its columns,
    where the vectors are channels), so the loop over rows runs innermost and each channel's
    stores fill one cache line in turn. Channels outermost-last would store a channel plane
    apart each time, and planes of 4 KiB (32 x 32 floats) all map to one L1 set: ResNet-20's
    stem (3 to 16 channels, 27 multiply-adds an output) took 4.2 ms that way and 1.6 ms this
    way at batch 64 on one thread."""
    remaining = Binary(BinOp.SUB, const(limit), first)
    channels = const(width) if limit % width == 0 else \
        smaller(remaining, const(width))

    def epilogue(rows: int) -> tuple[Stmt, ...]:
        value = activate(activation, Load(tile, (Var("er"), Var("ej"))), activation_attrs)
        store = Store(out, index_of(Var("er"), add(first, Var("ej"))), value)
        if rows_adjacent:
            return (loop_nest(["ej", "er"], [channels, const(rows)], (store,)),)
        return (loop_nest(["er", "ej"], [const(rows), channels], (store,)),)

    return epilogue


def shared_nest(names: list[str], extents: list[Expr | int], body: tuple[Stmt, ...],
                private: tuple[str, ...], parallel: bool) -> Stmt:
    """`loop_nest`, or with `parallel` every loop of it parallel, collapsed into one range
    that a call's thread team shares; each chunk gets its own copy of the `private` scratch
    (the tile its blocks store to). The iterations must write disjoint outputs."""
    if not parallel:
        return loop_nest(names, extents, body)
    for position, (name, extent) in enumerate(reversed(list(zip(names, extents, strict=True)))):
        outermost = position == len(names) - 1
        body = (For(name, extent if not isinstance(extent, int) else const(extent), body,
                    LoopKind.PARALLEL, private if outermost else ()),)
    return body[0]


def plus_lanes(total: Expr, vector: Expr, lanes: int) -> Expr:
    """total + each lane of `vector`, lane 0 first: a vector of partial sums added up once."""
    for j in range(lanes):
        total = add(total, Lane(vector, j))
    return total


def tile_buffer(f: Function, block: Block) -> str:
    """Where a block's accumulators go before they are scattered to the output."""
    return f.add_scratch("tile", (block.rows, block.width))


def pack_blocked(f: Function, suffix: str, outer: list[tuple[str, int]], extent: int,
                  width: int, value: Callable[[Expr, list[Expr]], Expr], groups: int = 1) -> str:
    """scratch[b, *outer, lane] = value(b·width + lane, outer) for channels below `extent`,
    and 0 in the lanes past it: a channel-blocked copy whose vectors need no tail test.

    With groups, `extent` is the channels of one group and the blocks of group g follow
    those of group g − 1: block b is block b mod B of group b // B (B = ceil(extent /
    width)), and `value` gets the channel within its group and [g, *outer]."""
    per_group = math.ceil(extent / width)
    shape = (per_group * groups, *(e for _, e in outer), width)
    name = f.add_scratch(suffix, shape)
    names = ["pb", *(n for n, _ in outer), "pl"]
    where = tuple(Var(n) for n in names)
    outer_vars = [Var(n) for n, _ in outer]
    if groups == 1:
        channel = add(mul(Var("pb"), const(width)), Var("pl"))
    else:
        block = Binary(BinOp.MOD, Var("pb"), const(per_group))
        channel = add(mul(block, const(width)), Var("pl"))
        outer_vars = [Binary(BinOp.FLOOR_DIV, Var("pb"), const(per_group)), *outer_vars]
    inside = Binary(BinOp.LT, channel, const(extent))
    body = (Store(name, where, ZERO), If(inside, (Store(name, where, value(channel, outer_vars)),)))
    f.body.append(loop_nest(names, list(shape), body))
    return name


def pad(f: Function, source: Buffer, top: int, left: int, height: int,
        width: int, parallel: bool = False) -> str:
    """scratch[n, c, top + i, left + j] = source[n, c, i, j], zero around it; or the source
    itself where nothing needs padding. `parallel`: the copy's planes are shared by a call's
    thread team (the kernel's own loops are), so that a call run in one piece does not copy
    on one thread while the others wait."""
    _, channels, rows, cols = source.shape
    if (top, left, height, width) == (0, 0, rows, cols):
        return source.name
    name = f.add_scratch("pad", (BATCH, channels, height, width))
    right, below = width - left - cols, height - top - rows

    def zeros(row: Expr, start: int, count: int) -> For:
        return For("pj", const(count), (Store(name, (Var("pn"), Var("pc"), row,
                                                     add(Var("pj"), const(start))), ZERO),))

    copy = For("pj", const(cols), (Store(name, (Var("pn"), Var("pc"), add(Var("pi"), const(top)),
                                                add(Var("pj"), const(left))),
                                         Load(source.name, (Var("pn"), Var("pc"), Var("pi"),
                                                            Var("pj")))),))
    inside_row = add(Var("pi"), const(top))
    row_loops = [
        For("pt", const(top), (zeros(Var("pt"), 0, width),)) if top else None,
        For("pi", const(rows), tuple(s for s in (
            zeros(inside_row, 0, left) if left else None, copy,
            zeros(inside_row, left + cols, right) if right else None) if s is not None)),
        For("pz", const(below), (zeros(add(Var("pz"), const(top + rows)), 0, width),))
        if below else None]
    f.body.append(shared_nest(["pn", "pc"], [Var(BATCH), channels],
                              tuple(s for s in row_loops if s is not None), (), parallel))
    return name


def phase_plane(f: Function, source: Buffer, phase: tuple[int, int], stride: tuple[int, int],
                pad_before: tuple[int, int], height: int, width: int) -> tuple[str, Stmt]:
    """scratch[i, c, j] = padded[n, c, S·i + a, S·j + b] for stride phase (a, b) of sample
    n, where `padded` is the source with `pad_before` zero rows and columns above and to its
    left (and zeros past its end): one contiguous plane of every S-th row and column, so
    that a strided correlation reads it with unit stride, rows outermost so that a row's
    channels lie together. Returns the plane and the loops that fill it for sample `n`:
    run in the batch loop, each sample's planes are still in cache when it is read. The
    border is stored as zeros, the inside copied, so no load tests a bound."""
    _, channels, rows, cols = source.shape
    name = f.add_scratch(f"phase{phase[0]}_{phase[1]}", (height, channels, width))
    (first_i, count_i), (first_j, count_j) = (
        _inside(p, s, before, size, extent) for p, s, before, size, extent in
        zip(phase, stride, pad_before, (rows, cols), (height, width), strict=True))

    def source_at(var: str, first: int, axis: int) -> Expr:
        # padded index S·(first + var) + phase − pad_before, a source index ≥ 0
        return affine(Var(var), stride[axis],
                      const(stride[axis] * first + phase[axis] - pad_before[axis]))

    def zeros(row: Expr, start: int, count: int) -> For:
        return For("pj", const(count), (Store(name, (row, Var("pc"),
                                                     add(Var("pj"), const(start))), ZERO),))

    inside_row = add(Var("pi"), const(first_i))
    copy = For("pj", const(count_j), (Store(
        name, (inside_row, Var("pc"), add(Var("pj"), const(first_j))),
        Load(source.name, (Var("n"), Var("pc"), source_at("pi", first_i, 0),
                           source_at("pj", first_j, 1)))),))
    right, below = width - first_j - count_j, height - first_i - count_i
    row_loops = [
        For("pt", const(first_i), (zeros(Var("pt"), 0, width),)) if first_i else None,
        For("pi", const(count_i), tuple(s for s in (
            zeros(inside_row, 0, first_j) if first_j else None, copy,
            zeros(inside_row, first_j + count_j, right) if right else None) if s is not None))
        if count_i else None,
        For("pz", const(below), (zeros(add(Var("pz"), const(first_i + count_i)), 0, width),))
        if below else None]
    return name, For("pc", const(channels), tuple(s for s in row_loops if s is not None))


def _inside(phase: int, stride: int, before: int, size: int, extent: int) -> tuple[int, int]:
    """(first, count) of the plane indices i < extent whose padded index S·i + phase − before
    falls inside the source (0..size)."""
    first = min(extent, max(0, -((phase - before) // stride)))  # ceil((before − phase) / S)
    last = min(extent - 1, (size - 1 + before - phase) // stride)
    return first, max(0, last - first + 1)


def affine(q: Expr, scale: int, shift: Expr) -> Expr:
    scaled = q if scale == 1 else mul(q, const(scale))
    if isinstance(shift, Const) and shift.value == 0:
        return scaled
    return add(scaled, shift)


def larger(a: Expr, b: Expr) -> Expr:
    return Select(Binary(BinOp.LT, a, b), b, a)


def smaller(a: Expr, b: Expr) -> Expr:
    return Select(Binary(BinOp.LT, a, b), a, b)


def block_reason(block: Block, rows: int | None, vector_extent: int) -> str:
    return (f"{block.rows * block.vectors} accumulators + {block.vectors} vector loads + 1 "
            f"broadcast fit the registers; best estimate over every block for "
            f"{'N' if rows is None else rows} rows x {vector_extent} channels")
