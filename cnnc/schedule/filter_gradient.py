"""The filter-gradient pattern: dw[f, c, kh, kw] = Σ_{n,oh,ow} δ[n, f, oh, ow] ·
x[n, c, oh·S + kh·D, ...], vectorized over f with δ transposed to [n, oh, ow, f] and the
taps as register rows, over δ rows in tiles that fit half of L1. A grouped convolution's
filter blocks each stay within one group (δ's filters padded to whole vectors per group),
and read the input channels of that group."""

from __future__ import annotations

import math

from cnnc.graph.ir import BATCH
from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.build import add, const, loop_nest, mul
from cnnc.loops.ir import (
    Binary,
    BinOp,
    Buffer,
    Expr,
    Load,
    Store,
    Var,
    VecLoad,
    VecStore,
)
from cnnc.ops.lowering import view
from cnnc.ops.window import extent, resolve
from cnnc.schedule.blocks import (
    ZERO,
    BlockCode,
    Function,
    Lowered,
    affine,
    block_reason,
    pad,
    row_tiles,
    shared_nest,
    smaller,
)
from cnnc.schedule.cost import (
    Machine,
    Schedule,
    choose_block,
    filter_tile_rows,
    itemsize,
    shares_sample,
)


def conv_grad_weight(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    x, dy = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dw = view(program, kernel.outputs[0], is_output=True)
    f = Function(kernel.name, dw.dtype, [x, dy, dw], [], [], [])
    groups = kernel.node.attrs.groups
    filters, channels, kh, kw = dw.shape
    per_group = filters // groups
    window = resolve(kernel.node.attrs.window, x.shape[2], x.shape[3])
    (sh, sw), (dh, dil_w) = window.stride, window.dilation
    top, left, bottom, right = window.pad
    span_h, span_w = extent(kh, dh), extent(kw, dil_w)
    oh, ow = dy.shape[2], dy.shape[3]
    taps = kh * kw
    block, score = choose_block(machine, dw.dtype, taps, per_group, fresh_operands=True)
    width = block.width
    blocks = math.ceil(per_group / width)
    src_w = max(x.shape[3] + left + right, (ow - 1) * sw + span_w)
    tile = min(oh, filter_tile_rows(machine, itemsize(dw.dtype), ow, groups * blocks * width,
                                    src_w, sh, span_h))
    # each (fb, c) adds into accumulators of its own, in the same order on any thread
    parallel = shares_sample(2.0 * math.prod(dw.shape) * tile * ow)
    src = pad(f, x, top, left, max(x.shape[2] + top + bottom, (oh - 1) * sh + span_h), src_w,
              parallel)
    delta = _transpose_delta(f, dy, blocks * width, groups, parallel)
    acc = f.add_scratch("acc", (groups * blocks, channels, taps, width))
    f.body.append(loop_nest(["zb", "zc", "zt", "zl"], [groups * blocks, channels, taps, width],
                            (Store(acc, (Var("zb"), Var("zc"), Var("zt"), Var("zl")), ZERO),)))
    tiles = math.ceil(oh / tile)
    remaining = Binary(BinOp.SUB, const(oh), mul(Var("ot"), const(tile)))
    rows_here = const(tile) if oh % tile == 0 else \
        smaller(remaining, const(tile))
    out_row = add(mul(Var("ot"), const(tile)), Var("i"))
    channel = Var("c") if groups == 1 else \
        add(mul(Binary(BinOp.FLOOR_DIV, Var("fb"), const(blocks)), const(channels)), Var("c"))

    def code_at(first_tap: Expr) -> BlockCode:
        def tap(r: int) -> tuple[Expr, Expr]:
            t = add(first_tap, const(r))
            return Binary(BinOp.FLOOR_DIV, t, const(kw)), Binary(BinOp.MOD, t, const(kw))

        def broadcast(r: int) -> Expr:
            tap_h, tap_w = tap(r)
            return Load(src, (Var("n"), channel, affine(out_row, sh, _dilated(tap_h, dh)),
                              affine(Var("j"), sw, _dilated(tap_w, dil_w))))

        def where(r: int, v: int) -> tuple[Expr, ...]:
            return (Var("fb"), Var("c"), add(first_tap, const(r)), const(v * block.lanes))

        return BlockCode(
            reduction=(("i", rows_here), ("j", const(ow))),
            broadcast=broadcast,
            vector=lambda v: VecLoad(delta, (Var("n"), out_row, Var("j"), add(
                mul(Var("fb"), const(width)), const(v * block.lanes))), block.lanes),
            init=lambda r, v: VecLoad(acc, where(r, v), block.lanes),
            finish=lambda r, v, value: (VecStore(acc, where(r, v), value),))

    body = row_tiles(f, "t", taps, block, code_at)
    f.body.append(loop_nest(["n", "ot"], [Var(BATCH), tiles], (shared_nest(
        ["fb", "c"], [groups * blocks, channels], body, (), parallel),)))
    unpack = Load(acc, _block_and_lane(Var("uf"), per_group, blocks, width, groups, Var("uc"),
                                        add(mul(Var("uh"), const(kw)), Var("uw"))))
    f.body.append(loop_nest(["uf", "uc", "uh", "uw"], [filters, channels, kh, kw],
                            (Store(dw.name, (Var("uf"), Var("uc"), Var("uh"), Var("uw")),
                                   unpack),)))
    schedule = Schedule(kernel.name, "filter gradient" + (f", {groups} groups" if groups > 1
                                                          else ""),
                        block, "kernel tap", taps,
                        "output channel", per_group, ("output row in tile", "output column"),
                        ("δ as [n, oh, ow, f]", "input zero-padded",
                         "accumulators [fb, c, tap, lanes]"),
                        tile_rows=tile, efficiency=score,
                        reason=block_reason(block, taps, per_group),
                        shared="channel blocks x input channels of each cache tile"
                        if parallel else "")
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _dilated(tap: Expr, dilation: int) -> Expr:
    return tap if dilation == 1 else mul(tap, const(dilation))


def _block_and_lane(filter_: Expr, per_group: int, blocks: int, width: int, groups: int,
                    channel: Expr, tap: Expr) -> tuple[Expr, ...]:
    """Where filter `filter_`'s accumulator is: [block, channel, tap, lane]."""
    if groups == 1:
        return (Binary(BinOp.FLOOR_DIV, filter_, const(width)), channel, tap,
                Binary(BinOp.MOD, filter_, const(width)))
    group = Binary(BinOp.FLOOR_DIV, filter_, const(per_group))
    local = Binary(BinOp.MOD, filter_, const(per_group))
    block = add(mul(group, const(blocks)), Binary(BinOp.FLOOR_DIV, local, const(width)))
    return (block, channel, tap, Binary(BinOp.MOD, local, const(width)))


def _transpose_delta(f: Function, dy: Buffer, padded_channels: int, groups: int = 1,
                     parallel: bool = False) -> str:
    """δ[n, f, oh, ow] as [n, oh, ow, f], f padded with zeros to whole vectors (each
    group's filters to `padded_channels`, one group after the other); `parallel`: shared by
    a call's thread team, a sample at a time (blocks.pad)."""
    _, filters, oh, ow = dy.shape
    if groups > 1:
        return _transpose_grouped_delta(f, dy, padded_channels, groups)
    name = f.add_scratch("delta", (BATCH, oh, ow, padded_channels))
    copy = Store(name, (Var("tn"), Var("th"), Var("tw"), Var("tf")),
                 Load(dy.name, (Var("tn"), Var("tf"), Var("th"), Var("tw"))))
    body = [loop_nest(["tf", "th", "tw"], [filters, oh, ow], (copy,))]
    if padded_channels > filters:
        zero = Store(name, (Var("tn"), Var("th"), Var("tw"), add(Var("tz"), const(filters))),
                     ZERO)
        body.append(loop_nest(["th", "tw", "tz"], [oh, ow, padded_channels - filters], (zero,)))
    f.body.append(shared_nest(["tn"], [Var(BATCH)], tuple(body), (), parallel))
    return name


def _transpose_grouped_delta(f: Function, dy: Buffer, padded: int, groups: int) -> str:
    _, filters, oh, ow = dy.shape
    per_group = filters // groups
    name = f.add_scratch("delta", (BATCH, oh, ow, groups * padded))
    if padded > per_group:
        # all of it zeroed first, one contiguous run: LLVM's -O3 takes minutes over a nest
        # that zeroes only the lanes past each group's filters
        zero = Store(name, (Var("tn"), Var("th"), Var("tw"), Var("tz")), ZERO)
        f.body.append(loop_nest(["tn", "th", "tw", "tz"],
                                [Var(BATCH), oh, ow, groups * padded], (zero,)))
    lane = add(mul(Var("tg"), const(padded)), Var("tf"))
    copy = Store(name, (Var("tn"), Var("th"), Var("tw"), lane),
                 Load(dy.name, (Var("tn"), add(mul(Var("tg"), const(per_group)), Var("tf")),
                                Var("th"), Var("tw"))))
    f.body.append(loop_nest(["tn", "tg", "tf", "th", "tw"],
                            [Var(BATCH), groups, per_group, oh, ow], (copy,)))
    return name
