"""The correlation pattern: out[n, f, q·M + A, ...] = act(bias + Σ src[n, c, q·S + tap +
offset] · w), vectorized over output channels f with weights repacked channel-blocked
([fb, c, kh, kw, lanes]) and the source zero-padded once, so the inner loop has no bounds
tests. Forward convolution is one (or, for few output channels, one vectorized over output
columns); the gradient of the input is one per stride phase (a, b): the outputs with
(ih + P) mod S = a see only the taps kh ≡ a (mod S), which makes a dense stride-1
correlation of δ, so no dilated δ is ever materialised.

A grouped convolution runs its groups one after another in the loop over channel blocks,
each block within one group (its vectors never mix two groups' filters); a dilated one reads
its taps D apart. The input gradient of a layer both dilated and strided along one axis has
no dense phases and keeps its plain loops."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnc.graph.ir import BATCH
from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.build import add, const, mul
from cnnc.loops.ir import (
    Binary,
    BinOp,
    Broadcast,
    Buffer,
    Expr,
    For,
    Load,
    Stmt,
    Var,
    VecLoad,
)
from cnnc.ops.lowering import view
from cnnc.ops.window import extent, resolve
from cnnc.schedule import depthwise, winograd
from cnnc.schedule.blocks import (
    ZERO,
    BlockCode,
    Function,
    Lowered,
    affine,
    block_reason,
    conv_function,
    larger,
    pack_blocked,
    pad,
    phase_plane,
    row_tiles,
    shared_nest,
    smaller,
    tile_buffer,
    tile_scatter,
    tile_store,
)
from cnnc.schedule.cost import (
    Block,
    Machine,
    Schedule,
    choose_block,
    shares_sample,
    splits_stride_phases,
    with_output_cost,
)

SHARED = "channel blocks x output rows of each sample"


@dataclass(frozen=True, slots=True)
class _Grid:
    """Output positions q·scale + shift for q in start..start+count, one axis."""

    start: int
    count: int
    scale: int
    shift: int
    taps: int
    source_stride: int
    source_offset: int  # source index = q·source_stride + tap·tap_stride + source_offset
    tap_stride: int = 1  # the dilation


@dataclass(frozen=True, slots=True)
class _Groups:
    """How the loop over channel blocks `fb` splits into groups: `count` groups of
    `blocks` blocks each, reading `source` channels and writing `out` channels a group."""

    count: int
    blocks: int
    source: int
    out: int

    def source_channel(self, c: Expr) -> Expr:
        """Reduction channel c of block fb's group."""
        if self.count == 1:
            return c
        group = Binary(BinOp.FLOOR_DIV, Var("fb"), const(self.blocks))
        return add(mul(group, const(self.source)), c)

    def first_out(self, width: int) -> tuple[Expr, Expr | None]:
        """(block fb's first channel within its group, its group's first channel or None)."""
        if self.count == 1:
            return mul(Var("fb"), const(width)), None
        within = Binary(BinOp.MOD, Var("fb"), const(self.blocks))
        group = Binary(BinOp.FLOOR_DIV, Var("fb"), const(self.blocks))
        return mul(within, const(width)), mul(group, const(self.out))


def _taps(tap: Expr, dilation: int) -> Expr:
    return tap if dilation == 1 else mul(tap, const(dilation))


def _correlation(f: Function, tag: str, src: str, src_channels: int, out: Buffer,
                 rows: _Grid, cols: _Grid, packed_weights: str, bias: str | None,
                 activation: str | None, block: Block,
                 live_rows: tuple[int, int] | None = None, groups: int = 1,
                 activation_attrs: object = None, parallel: bool = False) -> Stmt:
    """`live_rows`: the source rows [start, stop) that are not zero padding. Where skipping
    the taps that read only padding saves enough, each output row runs only the row taps
    that reach live rows (a loop of varying length, which LLVM no longer unrolls).
    `src_channels` and the output channels are those of one of the `groups`."""
    out_channels = out.shape[1] // groups
    width = block.width
    split = _Groups(groups, math.ceil(out_channels / width), src_channels, out_channels)
    tile = tile_buffer(f, block)
    row_taps, tap_row = const(rows.taps), Var("th")
    if live_rows is not None and rows.tap_stride == 1 and \
            _dead_tap_share(rows, live_rows) >= 0.15:
        base = affine(add(Var("q"), const(rows.start)), rows.source_stride,
                       const(rows.source_offset))
        first = larger(const(0), Binary(BinOp.SUB, const(live_rows[0]), base))
        to_live_end = Binary(BinOp.SUB, const(live_rows[1]), base)
        row_taps = Binary(BinOp.SUB, smaller(const(rows.taps), to_live_end), first)
        tap_row = add(Var("th"), first)
    first_out, group_out = split.first_out(width)

    def code_at(first_col: Expr) -> BlockCode:
        def source_index(r: int) -> tuple[Expr, ...]:
            col = add(first_col, const(cols.start + r))
            return (Var("n"), split.source_channel(Var("c")),
                    affine(add(Var("q"), const(rows.start)), rows.source_stride,
                            add(_taps(tap_row, rows.tap_stride), const(rows.source_offset))),
                    affine(col, cols.source_stride,
                            add(_taps(Var("tw"), cols.tap_stride), const(cols.source_offset))))

        def init(r: int, v: int) -> Expr:
            if bias is None:
                return ZERO
            return VecLoad(bias, (Var("fb"), const(v * block.lanes)), block.lanes)

        row = affine(add(Var("q"), const(rows.start)), rows.scale, const(rows.shift))

        def out_index(r: Expr, channel: Expr) -> tuple[Expr, ...]:
            col = affine(add(add(first_col, r), const(cols.start)), cols.scale,
                          const(cols.shift))
            return (Var("n"), channel if group_out is None else add(group_out, channel),
                    row, col)

        return BlockCode(
            reduction=(("c", const(src_channels)), ("th", row_taps), ("tw", const(cols.taps))),
            broadcast=lambda r: Load(src, source_index(r)),
            vector=lambda v: VecLoad(packed_weights, (Var("fb"), Var("c"), tap_row, Var("tw"),
                                                      const(v * block.lanes)), block.lanes),
            finish=tile_store(tile, block, activation, activation_attrs),
            epilogue=tile_scatter(tile, out.name, out_index, first_out, out_channels, width,
                                   None, rows_adjacent=True),
            init=init)

    tiles = row_tiles(f, f"{tag}w", cols.count, block, code_at)
    # a sample at a time: a pool fused into the kernel runs in the same batch loop
    return For("n", Var(BATCH), (shared_nest(["fb", "q"], [split.blocks * groups, rows.count],
                                             tiles, (tile,), parallel),))


def _dead_tap_share(rows: _Grid, live_rows: tuple[int, int]) -> float:
    """The share of row taps, over all output rows, that read only padding rows."""
    live = 0
    for q in range(rows.start, rows.start + rows.count):
        base = q * rows.source_stride + rows.source_offset
        live += max(0, min(rows.taps, live_rows[1] - base) - max(0, live_rows[0] - base))
    return 1 - live / max(1, rows.taps * rows.count)


def _padded_source(f: Function, x: Buffer, window, out_h: int, out_w: int,
                   parallel: bool) -> str:
    """The input zero-padded once: every row and column any window reads exists."""
    (kh, kw), (sh, sw), (dh, dw) = window.kernel, window.stride, window.dilation
    top, left, bottom, right = window.pad
    return pad(f, x, top, left, max(x.shape[2] + top + bottom, (out_h - 1) * sh + extent(kh, dh)),
               max(x.shape[3] + left + right, (out_w - 1) * sw + extent(kw, dw)), parallel)


def _flops(weight: Buffer, oh: int, ow: int) -> float:
    """Multiply-adds (two FLOPs each) of one sample's convolution with `weight` [F, C/G, kh,
    kw] over an oh x ow output."""
    return 2.0 * math.prod(weight.shape) * oh * ow


def _grouped_words(groups: int) -> str:
    return f", {groups} groups" if groups > 1 else ""


def conv_forward(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    f, x, weight, out = conv_function(kernel, program)
    groups = kernel.node.attrs.groups
    channels_out, channels_in, kh, kw = weight.shape
    per_group = channels_out // groups
    window = resolve(kernel.window, x.shape[2], x.shape[3])
    (sh, sw), (dh, dw) = window.stride, window.dilation
    oh, ow = out.shape[2], out.shape[3]
    block, score = choose_block(machine, out.dtype, ow, per_group)
    by_width, width_score = choose_block(machine, out.dtype, per_group, ow,
                                         fresh_operands=(kh, kw) == (1, 1))
    if groups > 1 and channels_in == 1 and \
            depthwise.estimate(machine, out.dtype, oh, ow) >= max(score, width_score):
        return depthwise.depthwise_forward(kernel, program, machine)
    # against the better direct block: few filters fill more lanes over output columns
    gain = winograd.chosen(machine, out.dtype, window, groups, (kh, kw), window.pad,
                           channels_in, channels_out, oh, ow, max(score, width_score))
    if gain is not None:
        return winograd.conv_forward(kernel, program, machine, gain)
    # few channels fill few lanes, and a short reduction leaves the scalar scatter of the
    # channel-vector tile much of the time: a block over output columns may waste less
    # (strided loads, for stride > 1, only where a group's few filters leave little else)
    reduction = channels_in * kh * kw
    if (sw == 1 or groups > 1) and \
            with_output_cost(width_score, reduction, block.lanes, False) > \
            with_output_cost(score, reduction, block.lanes, True) * 1.05:
        return _conv_forward_by_width(kernel, f, x, weight, out, by_width, width_score)
    if splits_stride_phases(window.stride, window.dilation, groups, (kh, kw)):
        return _conv_forward_phases(kernel, f, x, weight, out, window, block, score)
    width = block.width
    parallel = shares_sample(_flops(weight, oh, ow))
    src = _padded_source(f, x, window, oh, ow, parallel)
    if groups == 1:
        def weight_at(ch: Expr, o: list[Expr]) -> Expr:
            return Load(weight.name, (ch, *o))
    else:
        def weight_at(ch: Expr, o: list[Expr]) -> Expr:
            return Load(weight.name, (add(mul(o[0], const(per_group)), ch), *o[1:]))
    packed = pack_blocked(f, "w", [("pc", channels_in), ("ph", kh), ("pw", kw)],
                           per_group, width, weight_at, groups)
    bias = None
    if kernel.has_bias:
        bias = pack_blocked(f, "b", [], per_group, width,
                             lambda ch, o: Load(kernel.inputs[2], (
                                 ch if groups == 1 else add(mul(o[0], const(per_group)), ch),)),
                             groups)
    rows = _Grid(0, oh, 1, 0, kh, sh, 0, dh)
    cols = _Grid(0, ow, 1, 0, kw, sw, 0, dw)
    f.body.append(_correlation(f, "o", src, channels_in, out, rows, cols, packed, bias,
                               kernel.activation, block, groups=groups,
                               activation_attrs=kernel.activation_attrs, parallel=parallel))
    schedule = Schedule(kernel.name, "correlation" + _grouped_words(groups), block,
                        "output column", ow, "output channel", per_group,
                        ("input channel", "kh", "kw"),
                        ("weights [fb, c, kh, kw, lanes]", "bias", "input zero-padded"),
                        efficiency=score, reason=block_reason(block, ow, per_group),
                        shared=SHARED if parallel else "")
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _conv_forward_phases(kernel: Kernel, f: Function, x: Buffer, weight: Buffer, out: Buffer,
                         window, block: Block, score: float) -> Lowered:
    """Forward convolution of stride S (dilation 1) as a sum of stride-1 correlations, one per
    stride phase (a, b): tap (a + S·u, b + S·v) reads padded row S·(q + u) + a, column
    S·(p + v) + b, which is row q + u, column p + v of phase plane (a, b), the padded input's
    every S-th row and column from (a, b). Each sample's input is copied into the planes in
    the batch loop (each plane dense, rows outermost, small enough to stay in L2 until its
    blocks read it), and each phase's register block reads its plane with unit stride and
    its own sub-kernel's taps; all phases add into the same accumulators. Phases without
    taps (a kernel smaller than its stride) get no plane."""
    channels_out, channels_in, kh, kw = weight.shape
    (sh, sw), (top, left) = window.stride, window.pad[:2]
    oh, ow = out.shape[2], out.shape[3]
    width = block.width
    parts, copies = [], []
    for a in range(sh):
        for b in range(sw):
            taps_h, taps_w = len(range(a, kh, sh)), len(range(b, kw, sw))
            if not (taps_h and taps_w):
                continue
            plane, copy = phase_plane(f, x, (a, b), (sh, sw), (top, left), oh + taps_h - 1,
                                      ow + taps_w - 1)
            copies.append(copy)
            packed = pack_blocked(
                f, f"w{a}_{b}", [("pc", channels_in), ("ph", taps_h), ("pw", taps_w)],
                channels_out, width,
                lambda ch, o, a=a, b=b: Load(weight.name, (ch, o[0], affine(o[1], sh, const(a)),
                                                           affine(o[2], sw, const(b)))))
            parts.append((plane, packed, taps_h, taps_w))
    bias = None
    if kernel.has_bias:
        bias = pack_blocked(f, "b", [], channels_out, width,
                            lambda ch, o: Load(kernel.inputs[2], (ch,)))
    tile = tile_buffer(f, block)
    first_out = mul(Var("fb"), const(width))

    def code_at(first_col: Expr) -> BlockCode:
        def part(plane: str, packed: str, taps_h: int, taps_w: int) -> tuple:
            def broadcast(r: int) -> Expr:
                return Load(plane, (add(Var("q"), Var("th")), Var("c"),
                                    add(add(first_col, const(r)), Var("tw"))))

            def vector(v: int) -> Expr:
                return VecLoad(packed, (Var("fb"), Var("c"), Var("th"), Var("tw"),
                                        const(v * block.lanes)), block.lanes)
            loops = (("c", const(channels_in)), ("th", const(taps_h)), ("tw", const(taps_w)))
            return loops, broadcast, vector

        def init(r: int, v: int) -> Expr:
            if bias is None:
                return ZERO
            return VecLoad(bias, (Var("fb"), const(v * block.lanes)), block.lanes)

        def out_index(r: Expr, channel: Expr) -> tuple[Expr, ...]:
            return (Var("n"), channel, Var("q"), add(first_col, r))

        (loops, broadcast, vector), *more = (part(*p) for p in parts)
        return BlockCode(
            reduction=loops, broadcast=broadcast, vector=vector, init=init,
            finish=tile_store(tile, block, kernel.activation, kernel.activation_attrs),
            epilogue=tile_scatter(tile, out.name, out_index, first_out, channels_out, width,
                                  None, rows_adjacent=True),
            more=tuple(more))

    tiles = row_tiles(f, "ow", ow, block, code_at)
    parallel = shares_sample(_flops(weight, oh, ow))
    blocks = shared_nest(["fb", "q"], [math.ceil(channels_out / width), oh], tiles, (tile,),
                         parallel)
    f.body.append(For("n", Var(BATCH), (*copies, blocks)))
    schedule = Schedule(kernel.name, f"correlation over {len(parts)} stride phase(s)", block,
                        "output column", ow, "output channel", channels_out,
                        ("stride phase", "input channel", "kh / S", "kw / S"),
                        ("input split into stride phases (each zero-padded, contiguous)",
                         "weights per phase [fb, c, kh, kw, lanes]",
                         *(("bias",) if kernel.has_bias else ())),
                        efficiency=score,
                        reason=block_reason(block, ow, channels_out) + "; the phases make "
                        "each tap's row loads unit-stride",
                        shared=SHARED if parallel else "")
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _conv_forward_by_width(kernel: Kernel, f: Function, x: Buffer, weight: Buffer,
                           out: Buffer, block: Block, score: float) -> Lowered:
    """Forward convolution vectorized over output columns, for layers with few output
    channels (a group's, in a grouped or depthwise convolution): rows are output channels,
    each weight is a broadcast scalar, and the vectors are consecutive columns of the
    zero-padded input (S apart for stride S; padded on the right to whole vectors, so the
    last block reads zeros, not past the buffer)."""
    groups = kernel.node.attrs.groups
    channels_out, channels_in, kh, kw = weight.shape
    per_group = channels_out // groups
    window = resolve(kernel.window, x.shape[2], x.shape[3])
    (sh, sw), (dh, dw) = window.stride, window.dilation
    oh, ow = out.shape[2], out.shape[3]
    width = block.width
    column_blocks = math.ceil(ow / width)
    parallel = shares_sample(_flops(weight, oh, ow))
    src = _padded_source(f, x, window, oh, column_blocks * width, parallel)
    tile = tile_buffer(f, block)
    first_column = mul(Var("ob"), const(width))
    group_first = None if groups == 1 else mul(Var("g"), const(per_group))
    source_channel = Var("c") if groups == 1 else add(mul(Var("g"), const(channels_in)), Var("c"))

    def code_at(first_in_group: Expr) -> BlockCode:
        first_channel = first_in_group if group_first is None else \
            add(group_first, first_in_group)

        def init(r: int, v: int) -> Expr:
            if not kernel.has_bias:
                return ZERO
            return Broadcast(Load(kernel.inputs[2], (add(first_channel, const(r)),)),
                             block.lanes)

        def out_index(r: Expr, column: Expr) -> tuple[Expr, ...]:
            return (Var("n"), add(first_channel, r), Var("q"), column)

        def vector(v: int) -> Expr:
            column = add(first_column, const(v * block.lanes))
            column = affine(column, sw, _taps(Var("tw"), dw)) if sw > 1 else \
                add(column, _taps(Var("tw"), dw))
            return VecLoad(src, (Var("n"), source_channel,
                                 affine(Var("q"), sh, _taps(Var("th"), dh)), column),
                           block.lanes, sw)

        return BlockCode(
            reduction=(("c", const(channels_in)), ("th", const(kh)), ("tw", const(kw))),
            broadcast=lambda r: Load(weight.name, (add(first_channel, const(r)), Var("c"),
                                                   Var("th"), Var("tw"))),
            vector=vector, init=init,
            finish=tile_store(tile, block, kernel.activation, kernel.activation_attrs),
            epilogue=tile_scatter(tile, out.name, out_index, first_column, ow, width, None))

    tiles = row_tiles(f, "ch", per_group, block, code_at)
    names, extents = ["n", "q", "ob"], [Var(BATCH), oh, column_blocks]
    if groups > 1:
        names, extents = ["n", "g", "q", "ob"], [Var(BATCH), groups, oh, column_blocks]
    f.body.append(For("n", Var(BATCH), (shared_nest(names[1:], extents[1:], tiles, (tile,),
                                                    parallel),)))
    schedule = Schedule(kernel.name, "correlation over output width" + _grouped_words(groups),
                        block, "output channel", per_group, "output column", ow,
                        ("input channel", "kh", "kw"),
                        ("input zero-padded (right edge to whole vectors)",),
                        efficiency=score,
                        reason=block_reason(block, per_group, ow) + "; better than a "
                        "block over output channels, which fills fewer lanes or, with a "
                        "short reduction, spends its time storing outputs one at a time",
                        shared=" x ".join((*(("groups",) if groups > 1 else ()), "output rows",
                                           "column blocks")) + " of each sample"
                        if parallel else "")
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


def conv_grad_input(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered | None:
    """None (the plain loops) where an axis is both strided and dilated: its taps do not
    fall into dense stride phases."""
    dy, weight = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dx = view(program, kernel.outputs[0], is_output=True)
    groups = kernel.node.attrs.groups
    window = resolve(kernel.node.attrs.window, dx.shape[2], dx.shape[3])
    (sh, sw), (dh, dw) = window.stride, window.dilation
    if (sh > 1 and dh > 1) or (sw > 1 and dw > 1):
        return None
    filters, channels, kh, kw = weight.shape
    per_group = filters // groups
    _, direct = choose_block(machine, dx.dtype, dx.shape[3], channels)
    gain = winograd.chosen(machine, dx.dtype, window, groups, (kh, kw),
                           winograd.flipped_pad(window.pad), filters, channels, *dx.shape[2:],
                           direct)
    if gain is not None:
        return winograd.grad_input(kernel, program, machine, gain)
    f = Function(kernel.name, dx.dtype, [dy, weight, dx], [], [], [])
    ph, pw = window.pad[:2]
    phases_h = _stride_phases(kh, sh, ph, dx.shape[2])
    phases_w = _stride_phases(kw, sw, pw, dx.shape[3])
    # δ row q − t (t = 0..taps−1) must exist in the padded copy for every q of every phase
    top = max([0] + [(taps - 1) * dh - first for _, taps, first, _ in phases_h])
    left = max([0] + [(taps - 1) * dw - first for _, taps, first, _ in phases_w])
    height = top + max([dy.shape[2]] + [first + count for _, _, first, count in phases_h])
    width_ = left + max([dy.shape[3]] + [first + count for _, _, first, count in phases_w])
    widest = max(count for *_, count in phases_w)
    block, score = choose_block(machine, dx.dtype, widest, channels)
    # each phase's nest is a parallel region of its own, about its share of the work
    parallel = shares_sample(_flops(weight, dy.shape[2], dy.shape[3])
                             / (len(phases_h) * len(phases_w)))
    src = pad(f, dy, top, left, height, width_, parallel)
    covered: set[tuple[int, int]] = set()
    for a, taps_h, first_h, count_h in phases_h:
        for b, taps_w, first_w, count_w in phases_w:
            covered.add((a, b))
            packed = pack_blocked(
                f, f"w{a}_{b}", [("pf", per_group), ("ph", max(taps_h, 1)),
                                 ("pw", max(taps_w, 1))],
                channels, block.width,
                lambda ch, o, a=a, b=b, th=taps_h, tw=taps_w: ZERO if not (th and tw) else Load(
                    weight.name, (_filter(o, groups, per_group), ch,
                                  _flipped_tap(o[-2], a, sh, th),
                                  _flipped_tap(o[-1], b, sw, tw))),
                groups)
            rows = _Grid(first_h, count_h, sh, a - ph, taps_h, 1, top - (taps_h - 1) * dh, dh)
            cols = _Grid(first_w, count_w, sw, b - pw, taps_w, 1, left - (taps_w - 1) * dw, dw)
            f.body.append(_correlation(f, f"p{a}_{b}", src, per_group, dx, rows, cols, packed,
                                       None, None, block, (top, top + dy.shape[2]), groups,
                                       parallel=parallel))
    schedule = Schedule(kernel.name, f"correlation of δ, {len(covered)} stride phase(s)"
                        + _grouped_words(groups),
                        block, "input column", widest, "input channel", channels,
                        ("output channel", "kh", "kw"),
                        ("weights flipped per phase [cb, f, kh, kw, lanes]", "δ zero-padded"),
                        efficiency=score, reason=block_reason(block, widest, channels),
                        shared=SHARED + " of each stride phase" if parallel else "")
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _filter(outer: list[Expr], groups: int, per_group: int) -> Expr:
    """The filter of a packed grad-input weight: pf, or g·(F/G) + pf with groups."""
    if groups == 1:
        return outer[0]
    return add(mul(outer[0], const(per_group)), outer[1])


def _flipped_tap(index: Expr, phase: int, stride: int, taps: int) -> Expr:
    """Tap t' of a phase reads kernel position phase + S·(taps − 1 − t')."""
    return add(const(phase), mul(const(stride), Binary(BinOp.SUB, const(taps - 1), index)))
