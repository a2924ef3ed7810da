"""The filter-gradient pattern: dw[f, c, kh, kw] = Σ_{n,oh,ow} δ[n, f, oh, ow] ·
x[n, c, oh·S + kh, ...], vectorized over f with δ transposed to [n, oh, ow, f] and the taps
as register rows, over δ rows in tiles that fit half of L2."""

from __future__ import annotations

import math

from cnnc.graph.ir import BATCH, DType
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
from cnnc.schedule.blocks import (
    ZERO,
    BlockCode,
    Function,
    Lowered,
    affine,
    block_reason,
    pad,
    row_tiles,
    smaller,
)
from cnnc.schedule.cost import Machine, Schedule, choose_block, filter_tile_rows


def conv_grad_weight(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    x, dy = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dw = view(program, kernel.outputs[0], is_output=True)
    f = Function(kernel.name, dw.dtype, [x, dy, dw], [], [], [])
    filters, channels, kh, kw = dw.shape
    window = kernel.node.attrs.window
    (sh, sw), (ph, pw) = window.stride, window.pad
    oh, ow = dy.shape[2], dy.shape[3]
    taps = kh * kw
    block, score = choose_block(machine, dw.dtype, taps, filters)
    width = block.width
    blocks = math.ceil(filters / width)
    itemsize = 8 if dw.dtype is DType.F64 else 4
    src_w = max(x.shape[3] + 2 * pw, (ow - 1) * sw + kw)
    tile = filter_tile_rows(machine, itemsize, ow, width, channels, src_w, sh, kh)
    src = pad(f, x, ph, pw, max(x.shape[2] + 2 * ph, (oh - 1) * sh + kh), src_w)
    delta = _transpose_delta(f, dy, blocks * width)
    acc = f.add_scratch("acc", (blocks, channels, taps, width))
    f.body.append(loop_nest(["zb", "zc", "zt", "zl"], [blocks, channels, taps, width],
                            (Store(acc, (Var("zb"), Var("zc"), Var("zt"), Var("zl")), ZERO),)))
    tiles = math.ceil(oh / tile)
    remaining = Binary(BinOp.SUB, const(oh), mul(Var("ot"), const(tile)))
    rows_here = const(tile) if oh % tile == 0 else \
        smaller(remaining, const(tile))
    out_row = add(mul(Var("ot"), const(tile)), Var("i"))

    def code_at(first_tap: Expr) -> BlockCode:
        def tap(r: int) -> tuple[Expr, Expr]:
            t = add(first_tap, const(r))
            return Binary(BinOp.FLOOR_DIV, t, const(kw)), Binary(BinOp.MOD, t, const(kw))

        def broadcast(r: int) -> Expr:
            tap_h, tap_w = tap(r)
            return Load(src, (Var("n"), Var("c"), affine(out_row, sh, tap_h),
                              affine(Var("j"), sw, tap_w)))

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
    f.body.append(loop_nest(["n", "ot", "fb", "c"], [Var(BATCH), tiles, blocks, channels], body))
    unpack = Load(acc, (Binary(BinOp.FLOOR_DIV, Var("uf"), const(width)), Var("uc"),
                        add(mul(Var("uh"), const(kw)), Var("uw")),
                        Binary(BinOp.MOD, Var("uf"), const(width))))
    f.body.append(loop_nest(["uf", "uc", "uh", "uw"], [filters, channels, kh, kw],
                            (Store(dw.name, (Var("uf"), Var("uc"), Var("uh"), Var("uw")),
                                   unpack),)))
    schedule = Schedule(kernel.name, "filter gradient", block, "kernel tap", taps,
                        "output channel", filters, ("output row in tile", "output column"),
                        ("δ as [n, oh, ow, f]", "input zero-padded",
                         "accumulators [fb, c, tap, lanes]"),
                        tile_rows=tile, efficiency=score,
                        reason=block_reason(block, taps, filters))
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _transpose_delta(f: Function, dy: Buffer, padded_channels: int) -> str:
    """δ[n, f, oh, ow] as [n, oh, ow, f], f padded with zeros to whole vectors."""
    _, filters, oh, ow = dy.shape
    name = f.add_scratch("delta", (BATCH, oh, ow, padded_channels))
    copy = Store(name, (Var("tn"), Var("th"), Var("tw"), Var("tf")),
                 Load(dy.name, (Var("tn"), Var("tf"), Var("th"), Var("tw"))))
    f.body.append(loop_nest(["tn", "tf", "th", "tw"], [Var(BATCH), filters, oh, ow], (copy,)))
    if padded_channels > filters:
        zero = Store(name, (Var("tn"), Var("th"), Var("tw"), add(Var("tz"), const(filters))),
                     ZERO)
        f.body.append(loop_nest(["tn", "th", "tw", "tz"],
                                [Var(BATCH), oh, ow, padded_channels - filters], (zero,)))
    return name
