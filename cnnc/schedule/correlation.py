"""The correlation pattern: out[n, f, q·M + A, ...] = act(bias + Σ src[n, c, q·S + tap +
offset] · w), vectorized over output channels f with weights repacked channel-blocked
([fb, c, kh, kw, lanes]) and the source zero-padded once, so the inner loop has no bounds
tests. Forward convolution is one (or, for few output channels, one vectorized over output
columns); the gradient of the input is one per stride phase (a, b): the outputs with
(ih + P) mod S = a see only the taps kh ≡ a (mod S), which makes a dense stride-1
correlation of δ, so no dilated δ is ever materialised."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnc.graph.ir import BATCH
from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.build import add, const, loop_nest, mul
from cnnc.loops.ir import (
    Binary,
    BinOp,
    Broadcast,
    Buffer,
    Expr,
    Load,
    Stmt,
    Var,
    VecLoad,
)
from cnnc.ops.lowering import view
from cnnc.schedule.blocks import (
    ZERO,
    BlockCode,
    Function,
    Lowered,
    affine,
    block_reason,
    larger,
    pack_blocked,
    pad,
    row_tiles,
    smaller,
    tile_buffer,
    tile_scatter,
    tile_store,
)
from cnnc.schedule.cost import Block, Machine, Schedule, choose_block


@dataclass(frozen=True, slots=True)
class _Grid:
    """Output positions q·scale + shift for q in start..start+count, one axis."""

    start: int
    count: int
    scale: int
    shift: int
    taps: int
    source_stride: int
    source_offset: int  # source index = q·source_stride + tap + source_offset


def _correlation(f: Function, tag: str, src: str, src_channels: int, out: Buffer,
                 rows: _Grid, cols: _Grid, packed_weights: str, bias: str | None,
                 activation: str | None, block: Block,
                 live_rows: tuple[int, int] | None = None) -> Stmt:
    """`live_rows`: the source rows [start, stop) that are not zero padding. Where skipping
    the taps that read only padding saves enough, each output row runs only the row taps
    that reach live rows (a loop of varying length, which LLVM no longer unrolls)."""
    out_channels = out.shape[1]
    width = block.width
    tile = tile_buffer(f, block)
    row_taps, tap_row = const(rows.taps), Var("th")
    if live_rows is not None and _dead_tap_share(rows, live_rows) >= 0.15:
        base = affine(add(Var("q"), const(rows.start)), rows.source_stride,
                       const(rows.source_offset))
        first = larger(const(0), Binary(BinOp.SUB, const(live_rows[0]), base))
        to_live_end = Binary(BinOp.SUB, const(live_rows[1]), base)
        row_taps = Binary(BinOp.SUB, smaller(const(rows.taps), to_live_end), first)
        tap_row = add(Var("th"), first)

    def code_at(first_col: Expr) -> BlockCode:
        def source_index(r: int) -> tuple[Expr, ...]:
            col = add(first_col, const(cols.start + r))
            return (Var("n"), Var("c"),
                    affine(add(Var("q"), const(rows.start)), rows.source_stride,
                            add(tap_row, const(rows.source_offset))),
                    affine(col, cols.source_stride, add(Var("tw"), const(cols.source_offset))))

        def init(r: int, v: int) -> Expr:
            if bias is None:
                return ZERO
            return VecLoad(bias, (Var("fb"), const(v * block.lanes)), block.lanes)

        row = affine(add(Var("q"), const(rows.start)), rows.scale, const(rows.shift))

        def out_index(r: Expr, channel: Expr) -> tuple[Expr, ...]:
            col = affine(add(add(first_col, r), const(cols.start)), cols.scale,
                          const(cols.shift))
            return (Var("n"), channel, row, col)

        return BlockCode(
            reduction=(("c", const(src_channels)), ("th", row_taps), ("tw", const(cols.taps))),
            broadcast=lambda r: Load(src, source_index(r)),
            vector=lambda v: VecLoad(packed_weights, (Var("fb"), Var("c"), tap_row, Var("tw"),
                                                      const(v * block.lanes)), block.lanes),
            finish=tile_store(tile, block),
            epilogue=tile_scatter(tile, out.name, out_index, mul(Var("fb"), const(width)),
                                   out_channels, width, activation),
            init=init)

    tiles = row_tiles(f, f"{tag}w", cols.count, block, code_at)
    blocks = math.ceil(out_channels / width)
    return loop_nest(["n", "fb", "q"], [Var(BATCH), blocks, rows.count], tiles)


def _dead_tap_share(rows: _Grid, live_rows: tuple[int, int]) -> float:
    """The share of row taps, over all output rows, that read only padding rows."""
    live = 0
    for q in range(rows.start, rows.start + rows.count):
        base = q * rows.source_stride + rows.source_offset
        live += max(0, min(rows.taps, live_rows[1] - base) - max(0, live_rows[0] - base))
    return 1 - live / max(1, rows.taps * rows.count)


def conv_forward(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    x, weight = (view(program, n) for n in kernel.inputs[:2])
    out = view(program, kernel.outputs[0], is_output=True)
    f = Function(kernel.name, out.dtype, [x, weight], [], [], [])
    if kernel.has_bias:
        f.buffers.append(view(program, kernel.inputs[2]))
    f.buffers.append(out)
    channels_out, channels_in, kh, kw = weight.shape
    (sh, sw), (ph, pw) = kernel.window.stride, kernel.window.pad
    oh, ow = out.shape[2], out.shape[3]
    block, score = choose_block(machine, out.dtype, ow, channels_out)
    if sw == 1:
        # few channels fill few lanes: a block over output columns may waste fewer
        by_width, width_score = choose_block(machine, out.dtype, channels_out, ow)
        if width_score > score * 1.05:
            return _conv_forward_by_width(kernel, f, x, weight, out, by_width, width_score)
    width = block.width
    src = pad(f, x, ph, pw, max(x.shape[2] + 2 * ph, (oh - 1) * sh + kh),
               max(x.shape[3] + 2 * pw, (ow - 1) * sw + kw))
    packed = pack_blocked(f, "w", [("pc", channels_in), ("ph", kh), ("pw", kw)],
                           channels_out, width,
                           lambda ch, o: Load(weight.name, (ch, *o)))
    bias = None
    if kernel.has_bias:
        bias = pack_blocked(f, "b", [], channels_out, width,
                             lambda ch, o: Load(kernel.inputs[2], (ch,)))
    rows = _Grid(0, oh, 1, 0, kh, sh, 0)
    cols = _Grid(0, ow, 1, 0, kw, sw, 0)
    f.body.append(_correlation(f, "o", src, channels_in, out, rows, cols, packed, bias,
                               kernel.activation, block))
    schedule = Schedule(kernel.name, "correlation", block, "output column", ow,
                        "output channel", channels_out, ("input channel", "kh", "kw"),
                        ("weights [fb, c, kh, kw, lanes]", "bias", "input zero-padded"),
                        efficiency=score, reason=block_reason(block, ow, channels_out))
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _conv_forward_by_width(kernel: Kernel, f: Function, x: Buffer, weight: Buffer,
                           out: Buffer, block: Block, score: float) -> Lowered:
    """Stride-1 forward convolution vectorized over output columns, for layers with few
    output channels: rows are output channels, each weight is a broadcast scalar, and the
    vectors are consecutive columns of the zero-padded input (padded on the right to whole
    vectors, so the last block reads zeros, not past the buffer)."""
    channels_out, channels_in, kh, kw = weight.shape
    (sh, _), (ph, pw) = kernel.window.stride, kernel.window.pad
    oh, ow = out.shape[2], out.shape[3]
    width = block.width
    column_blocks = math.ceil(ow / width)
    src = pad(f, x, ph, pw, max(x.shape[2] + 2 * ph, (oh - 1) * sh + kh),
               max(x.shape[3] + 2 * pw, column_blocks * width + kw - 1))
    tile = tile_buffer(f, block)
    first_column = mul(Var("ob"), const(width))

    def code_at(first_channel: Expr) -> BlockCode:
        def init(r: int, v: int) -> Expr:
            if not kernel.has_bias:
                return ZERO
            return Broadcast(Load(kernel.inputs[2], (add(first_channel, const(r)),)),
                             block.lanes)

        def out_index(r: Expr, column: Expr) -> tuple[Expr, ...]:
            return (Var("n"), add(first_channel, r), Var("q"), column)

        return BlockCode(
            reduction=(("c", const(channels_in)), ("th", const(kh)), ("tw", const(kw))),
            broadcast=lambda r: Load(weight.name, (add(first_channel, const(r)), Var("c"),
                                                   Var("th"), Var("tw"))),
            vector=lambda v: VecLoad(src, (Var("n"), Var("c"), affine(Var("q"), sh, Var("th")),
                                           add(add(first_column, const(v * block.lanes)),
                                               Var("tw"))), block.lanes),
            init=init, finish=tile_store(tile, block),
            epilogue=tile_scatter(tile, out.name, out_index, first_column, ow, width,
                                   kernel.activation))

    tiles = row_tiles(f, "ch", channels_out, block, code_at)
    f.body.append(loop_nest(["n", "q", "ob"], [Var(BATCH), oh, column_blocks], tiles))
    schedule = Schedule(kernel.name, "correlation over output width", block, "output channel",
                        channels_out, "output column", ow, ("input channel", "kh", "kw"),
                        ("input zero-padded (right edge to whole vectors)",),
                        efficiency=score,
                        reason=block_reason(block, channels_out, ow) + "; better than a "
                        "block over output channels, which fills fewer lanes")
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _stride_phases(kernel_size: int, stride: int, pad: int, size: int) -> list[tuple]:
    """Per phase a of one axis: (a, taps, first q, count of q), for outputs ih = q·S + a − P
    inside 0..size, which see the taps a, a + S, ... of the kernel."""
    phases = []
    for a in range(stride):
        taps = len(range(a, kernel_size, stride))
        first = -((a - pad) // stride)  # ceil((P − a) / S)
        last = (size - 1 + pad - a) // stride
        if last >= first:
            phases.append((a, taps, first, last - first + 1))
    return phases


def conv_grad_input(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    dy, weight = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dx = view(program, kernel.outputs[0], is_output=True)
    f = Function(kernel.name, dx.dtype, [dy, weight, dx], [], [], [])
    filters, channels, kh, kw = weight.shape
    window = kernel.node.attrs.window
    (sh, sw), (ph, pw) = window.stride, window.pad
    phases_h = _stride_phases(kh, sh, ph, dx.shape[2])
    phases_w = _stride_phases(kw, sw, pw, dx.shape[3])
    # δ row q − t (t = 0..taps−1) must exist in the padded copy for every q of every phase
    top = max([0] + [taps - 1 - first for _, taps, first, _ in phases_h])
    left = max([0] + [taps - 1 - first for _, taps, first, _ in phases_w])
    height = top + max([dy.shape[2]] + [first + count for _, _, first, count in phases_h])
    width_ = left + max([dy.shape[3]] + [first + count for _, _, first, count in phases_w])
    widest = max(count for *_, count in phases_w)
    block, score = choose_block(machine, dx.dtype, widest, channels)
    src = pad(f, dy, top, left, height, width_)
    covered: set[tuple[int, int]] = set()
    for a, taps_h, first_h, count_h in phases_h:
        for b, taps_w, first_w, count_w in phases_w:
            covered.add((a, b))
            packed = pack_blocked(
                f, f"w{a}_{b}", [("pf", filters), ("ph", max(taps_h, 1)), ("pw", max(taps_w, 1))],
                channels, block.width,
                lambda ch, o, a=a, b=b, th=taps_h, tw=taps_w: ZERO if not (th and tw) else Load(
                    weight.name, (o[0], ch, _flipped_tap(o[1], a, sh, th),
                                  _flipped_tap(o[2], b, sw, tw))))
            rows = _Grid(first_h, count_h, sh, a - ph, taps_h, 1, top - (taps_h - 1))
            cols = _Grid(first_w, count_w, sw, b - pw, taps_w, 1, left - (taps_w - 1))
            f.body.append(_correlation(f, f"p{a}_{b}", src, filters, dx, rows, cols, packed,
                                       None, None, block, (top, top + dy.shape[2])))
    schedule = Schedule(kernel.name, f"correlation of δ, {len(covered)} stride phase(s)",
                        block, "input column", widest, "input channel", channels,
                        ("output channel", "kh", "kw"),
                        ("weights flipped per phase [cb, f, kh, kw, lanes]", "δ zero-padded"),
                        efficiency=score, reason=block_reason(block, widest, channels))
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _flipped_tap(index: Expr, phase: int, stride: int, taps: int) -> Expr:
    """Tap t' of a phase reads kernel position phase + S·(taps − 1 − t')."""
    return add(const(phase), mul(const(stride), Binary(BinOp.SUB, const(taps - 1), index)))
