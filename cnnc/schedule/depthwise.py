"""The depthwise pattern: a convolution with one input channel a group (groups = C, each
filter reading one channel), vectorized over output columns. The correlation pattern's
blocks share a vector across rows of different filters, which a depthwise layer does not
have; here one filter's weight is the broadcast scalar and every accumulator is a vector of
its own, over a block of output rows x column vectors of one output channel, so each tap
is one broadcast, rows·vectors loads and as many independent FMAs.

A depthwise layer does little arithmetic per input element, so memory decides its speed:
instead of a zero-padded copy of the whole batch, each input plane is copied, as it is
needed, into a small padded plane that stays in cache (its border zeroed once a call). For
stride S along the width the plane is kept as S phases, phase p holding the padded columns
p, p + S, ...: the columns one tap reads for consecutive outputs are then consecutive, and
every vector load is a plain one.
"""

from __future__ import annotations

import math

from cnnc.graph.ir import BATCH, DType
from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.build import add, const, loop_nest, mul
from cnnc.loops.ir import (
    Binary,
    BinOp,
    Broadcast,
    Buffer,
    Expr,
    For,
    Load,
    Stmt,
    Store,
    Var,
    VecLoad,
)
from cnnc.ops.lowering import activate
from cnnc.ops.window import extent, resolve
from cnnc.schedule.blocks import (
    ZERO,
    BlockCode,
    Lowered,
    affine,
    conv_function,
    register_block,
    shared_nest,
    smaller,
    tile_store,
)
from cnnc.schedule.cost import (
    FMA_LATENCY,
    FMA_UNITS,
    LOADS_PER_CYCLE,
    Block,
    Machine,
    Schedule,
    shares_sample,
)


def _dilated(tap: Expr, dilation: int) -> Expr:
    return tap if dilation == 1 else mul(tap, const(dilation))


def _shape_of_block(machine: Machine, lanes: int, out_h: int, out_w: int) -> tuple[int, int]:
    """(output rows, column vectors) of a block: whole rows of vectors where they fit half
    the registers (the rest hold the loaded inputs), as many rows as then fit."""
    budget = machine.registers // 2
    vectors = min(math.ceil(out_w / lanes), budget)
    return max(1, min(out_h, budget // vectors)), vectors


def _efficiency(accumulators: int, useful_lanes: float) -> float:
    """The cost model's estimate (cost.py): FMAs, loads and the latency of each chain."""
    cycles = max(accumulators / FMA_UNITS, (accumulators + 1) / LOADS_PER_CYCLE, FMA_LATENCY)
    return useful_lanes * (accumulators / FMA_UNITS) / cycles


def estimate(machine: Machine, dtype: DType, out_h: int, out_w: int) -> float:
    """The estimated FMA use of `depthwise_forward` for an output of out_h x out_w."""
    lanes = machine.lanes(dtype)
    rows, vectors = _shape_of_block(machine, lanes, out_h, out_w)
    span = vectors * lanes
    return _efficiency(rows * vectors, out_w / (math.ceil(out_w / span) * span))


def _copy_plane(plane: str, x: Buffer, top: int, left: int, stride: int) -> Stmt:
    """x[n, c] into the plane's interior: padded column u·S + p is column u of phase p;
    per phase, the columns u that hold input columns u·S + p − left."""
    _, _, rows, cols = x.shape
    phases: list[Stmt] = []
    for phase in range(stride):
        first = max(0, -((phase - left) // stride))  # ceil((left − p) / S)
        last = (cols - 1 + left - phase) // stride
        if last < first:
            continue
        u = add(Var("du"), const(first))
        column = add(mul(u, const(stride)) if stride > 1 else u, const(phase - left))
        phases.append(For("du", const(last + 1 - first), (
            Store(plane, (const(phase), add(Var("di"), const(top)), u),
                  Load(x.name, (Var("n"), Var("c"), Var("di"), column))),)))
    return For("di", const(rows), tuple(phases))


def depthwise_forward(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    f, x, weight, out = conv_function(kernel, program)
    filters, _, kh, kw = weight.shape
    multiplier = filters // kernel.node.attrs.groups  # output channels an input channel
    window = resolve(kernel.window, x.shape[2], x.shape[3])
    (sh, sw), (dh, dw) = window.stride, window.dilation
    top, left, bottom, right = window.pad
    oh, ow = out.shape[2], out.shape[3]
    lanes = machine.lanes(out.dtype)
    rows, vectors = _shape_of_block(machine, lanes, oh, ow)
    span = vectors * lanes  # output columns a block covers
    column_blocks = math.ceil(ow / span)
    height = max(x.shape[2] + top + bottom, (oh - 1) * sh + extent(kh, dh))
    width = max(x.shape[3] + left + right, (column_blocks * span - 1) * sw + extent(kw, dw))
    plane = f.add_scratch("plane", (sw, height, math.ceil(width / sw)))
    zero_plane = loop_nest(["zp", "zi", "zu"], [sw, height, math.ceil(width / sw)],
                           (Store(plane, (Var("zp"), Var("zi"), Var("zu")), ZERO),))
    # shared among threads, each chunk has a plane of its own, zeroed for each channel (a
    # tenth of a 3x3 channel's work); serial, the border is zeroed once a call
    parallel = shares_sample(2.0 * filters * kh * kw * oh * ow)
    if not parallel:
        f.body.append(zero_plane)
    tile = f.add_scratch("tile", (1, rows * span))
    filter_ = add(mul(Var("c"), const(multiplier)), Var("m")) if multiplier > 1 else Var("c")
    first_column = mul(Var("ob"), const(span))
    tap_column = _dilated(Var("tw"), dw)  # the padded column a tap adds, in phases:
    phase = const(0) if sw == 1 else Binary(BinOp.MOD, tap_column, const(sw))
    shift = tap_column if sw == 1 else Binary(BinOp.FLOOR_DIV, tap_column, const(sw))

    def code_at(first_row: Expr, block_rows: int) -> BlockCode:
        def vector(v: int) -> Expr:
            row = add(first_row, const(v // vectors))
            column = add(first_column, const((v % vectors) * lanes))
            return VecLoad(plane, (phase, affine(row, sh, _dilated(Var("th"), dh)),
                                   add(column, shift)), lanes)

        def init(r: int, v: int) -> Expr:
            if not kernel.has_bias:
                return ZERO
            return Broadcast(Load(kernel.inputs[2], (filter_,)), lanes)

        return BlockCode(
            reduction=(("th", const(kh)), ("tw", const(kw))),
            broadcast=lambda r: Load(weight.name, (filter_, const(0), Var("th"), Var("tw"))),
            vector=vector, init=init,
            finish=tile_store(tile, Block(1, rows * vectors, lanes), kernel.activation,
                              kernel.activation_attrs),
            epilogue=lambda _: _scatter(tile, out, filter_, first_row, block_rows,
                                        first_column, span, ow, None))

    def block(tag: str, first_row: Expr, block_rows: int) -> tuple[Stmt, ...]:
        return register_block(f, tag, Block(1, block_rows * vectors, lanes), 1,
                              code_at(first_row, block_rows))

    full, tail = divmod(oh, rows)
    blocks: list[Stmt] = []
    if full:
        blocks.append(loop_nest(["q", "ob"], [full, column_blocks],
                                block("dm", mul(Var("q"), const(rows)), rows)))
    if tail:
        blocks.append(loop_nest(["ob"], [column_blocks], block("dt", const(full * rows), tail)))
    per_filter = tuple(blocks) if multiplier == 1 else \
        (For("m", const(multiplier), tuple(blocks)),)
    channel = (*((zero_plane,) if parallel else ()), _copy_plane(plane, x, top, left, sw),
               *per_filter)
    f.body.append(For("n", Var(BATCH), (shared_nest(["c"], [x.shape[1]], channel,
                                                    (plane, tile), parallel),)))
    schedule = Schedule(kernel.name, "depthwise correlation over output width",
                        Block(rows, vectors, lanes), "output row", oh, "output column", ow,
                        ("kh", "kw"), ("each input plane zero-padded in cache"
                                       + (f", as {sw} column phases" if sw > 1 else ""),),
                        efficiency=estimate(machine, out.dtype, oh, ow),
                        reason=f"one filter a block, {rows * vectors} accumulators (half the "
                        "registers) of its own inputs each, one broadcast weight a tap",
                        shared="input channels of each sample" if parallel else "")
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _scatter(tile: str, out: Buffer, filter_: Expr, first_row: Expr, block_rows: int,
             first_column: Expr, span: int, width: int, activation: str | None,
             activation_attrs: object = None) -> tuple[Stmt, ...]:
    """The tile's rows x span columns, activated, to out[n, f, row, column] for the columns
    below `width`."""
    columns = const(span) if width % span == 0 else \
        smaller(Binary(BinOp.SUB, const(width), first_column), const(span))
    value = activate(activation, Load(tile, (const(0), add(mul(Var("er"), const(span)),
                                                           Var("ej")))), activation_attrs)
    store = Store(out.name, (Var("n"), filter_, add(first_row, Var("er")),
                             add(first_column, Var("ej"))), value)
    return (loop_nest(["er", "ej"], [const(block_rows), columns], (store,)),)
