"""Winograd F(2x2, 3x3): a stride-1 3x3 convolution as 16 matrix products.

Each 2x2 block of outputs (a tile) of filter f is Aᵀ [Σ_c U_c ⊙ V_c] A, where V_c = Bᵀ d_c B
is the tile's 4x4 input patch of channel c transformed and U_c = G g_c Gᵀ the filter's 3x3
taps of channel c transformed (Lavin and Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016). Position ξ of the 4x4 transform is one product over the input channels:
M[ξ, tile, f] = Σ_c V[ξ, c, tile] · U[ξ, f, c]. That is 16 multiply-adds a tile and channel
pair where the direct correlation does 36 (2.25x fewer), plus the transforms, which are
additions only (the coefficients are 0, ±1 and ±1/2).

The transformed filters depend on the weights only and are packed once (`schedule.prepack`).
The input is zero-padded once, as the direct correlation's; then each sample's tiles go in
chunks of a few tile rows: the chunk's patches are transformed into V ([16, c, tiles]), the
16 products run as register blocks (tiles x output-channel vectors, the channels the
reduction), and the output transform writes the chunk's outputs with the bias and
activation. V and M of one chunk stay in L2, and the chunks of a sample are what a call's
thread team shares.

Rounding: the transforms add a few terms of each product in a different order than the
direct sum, with halves in the filter transform; the error stays within a few units in the
last place of the largest partial sums (tests/schedule/test_winograd.py bounds it against
the float64 reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from cnnc.graph.ir import BATCH, DType
from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.build import add, const, loop_nest, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Buffer,
    Expr,
    If,
    Load,
    Local,
    Stmt,
    Store,
    Var,
    VecLoad,
    VecStore,
)
from cnnc.ops.lowering import activate, view
from cnnc.ops.window import resolve
from cnnc.schedule.blocks import (
    ZERO,
    BlockCode,
    Function,
    Lowered,
    block_reason,
    conv_function,
    pad,
    row_tiles,
    shared_nest,
)
from cnnc.schedule.cost import (
    FMA_UNITS,
    Block,
    Machine,
    Schedule,
    choose_block,
    itemsize,
    shares_sample,
)

NAME = "winograd F(2x2, 3x3)"

# Bᵀ (input), G (filter) and Aᵀ (output) of F(2x2, 3x3)
BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
AT = ((1, 1, 1, 0), (0, 1, -1, -1))

# Tiles a chunk should hold at least: the products' register blocks run over a chunk's
# tiles, and a chunk of one short tile row (ResNet's 8x8 planes: 4 tiles) leaves them
# rows too few to fill the FMA units.
CHUNK_TILES = 16


# The estimated gain must be at least this: the rounding differs from the direct sum's,
# which is worth it only for a clear gain
MARGIN = 1.15


def chosen(machine: Machine, dtype: DType, window, groups: int, kernel_size: tuple[int, int],
           pad_: tuple[int, int, int, int], channels: int, filters: int, out_h: int,
           out_w: int, direct_score: float) -> float | None:
    """The estimated gain (`speedup`) where this schedule computes the layer and is chosen:
    allowed (not --no-winograd), 3x3, stride 1, undilated, ungrouped, the correlation's own
    padding `pad_` not negative (a gradient's is 2 − P), and at least MARGIN faster than the
    direct correlation at `direct_score`; else None."""
    if not machine.winograd or groups != 1 or kernel_size != (3, 3) or \
            window.stride != (1, 1) or window.dilation != (1, 1) or min(pad_) < 0:
        return None
    gain = speedup(machine, dtype, channels, filters, out_h, out_w, direct_score)
    return gain if gain >= MARGIN else None


def tiles(out_h: int, out_w: int) -> tuple[int, int]:
    """Tile rows and tiles a row of an out_h x out_w output."""
    return math.ceil(out_h / 2), math.ceil(out_w / 2)


def chunk_rows(tile_rows: int, tile_cols: int) -> int:
    """Tile rows a chunk: the fewest that hold CHUNK_TILES tiles, rounded up to a divisor of
    the tile rows (so no chunk is partial)."""
    for rows in range(1, tile_rows + 1):
        if tile_rows % rows == 0 and rows * tile_cols >= CHUNK_TILES:
            return rows
    return tile_rows


# Parallel iterations a sample should offer a call's thread team at least: a layer whose
# sample is a single chunk (ResNet-18's 14x14 and 7x7 planes) would otherwise run on one
# thread at batch 1. Where the chunks are fewer, the filter blocks are split into groups
# too, and each group's iteration transforms its chunk's input again. Those copies cost
# every call, also where the runtime splits the batch instead, so they may add at most
# COPY_LIMIT of the products' time: 3 cycles a tile and channel each against about F for
# the products, e.g. four groups at ResNet-18's 256 filters (3.5%), two at 64.
SHARED_ITEMS = 4
COPY_LIMIT = 0.05


def filter_groups(chunks: int, blocks: int, copy_cost: float) -> int:
    """Groups the `blocks` filter blocks are split into (a divisor of them): the fewest
    that give chunks · groups ≥ SHARED_ITEMS, else the most, among those whose input
    transforms again, `copy_cost` of the products' time each, stay within COPY_LIMIT."""
    affordable = [count for count in range(1, blocks + 1)
                  if blocks % count == 0 and (count - 1) * copy_cost <= COPY_LIMIT]
    enough = [count for count in affordable if chunks * count >= SHARED_ITEMS]
    return min(enough) if enough else max(affordable)


@dataclass(frozen=True, slots=True)
class _Group:
    """The filter blocks one parallel iteration computes: `count` groups of `blocks`
    blocks of `width` filters (the last group's may run past the filters); iteration
    variable wg where count > 1."""

    count: int
    blocks: int
    width: int

    @property
    def channels(self) -> int:
        return self.blocks * self.width

    def first(self, local: Expr, size: int) -> Expr:
        """The index of `local` among all groups', in groups of `size`."""
        return local if self.count == 1 else add(mul(Var("wg"), const(size)), local)


@dataclass(frozen=True, slots=True)
class _Plan:
    """How a layer's tiles are cut: `rows` tile rows a chunk of `chunk` tiles, the
    products' register block and its score, whether a sample's chunks (x groups) are
    shared by the thread team, and the filter groups."""

    rows: int
    chunk: int
    block: Block
    score: float
    parallel: bool
    group: _Group


def _plan(machine: Machine, dtype: DType, channels: int, filters: int, out_h: int,
          out_w: int) -> _Plan:
    th, tw = tiles(out_h, out_w)
    rows = chunk_rows(th, tw)
    chunk = rows * tw
    block, score = choose_block(machine, dtype, chunk, filters, fresh_operands=True)
    parallel = shares_sample(2.0 * 16 * filters * channels * th * tw)
    blocks = math.ceil(filters / block.width)
    # the input transform of a tile and channel against its products with every filter
    copy_cost = INPUT_CYCLES * machine.lanes(dtype) * FMA_UNITS * score / (16 * filters)
    count = filter_groups(th // rows, blocks, copy_cost) if parallel else 1
    return _Plan(rows, chunk, block, score, parallel,
                 _Group(count, blocks // count, block.width))


# Cycles per element of the transforms, measured with benchmarks/kernels.py on W3 (64
# channels, 56x56) on one AVX2 core: the input transform per (tile, input channel), the
# output transform per (tile, output channel).
INPUT_CYCLES = 3.0
OUTPUT_CYCLES = 4.0


def speedup(machine: Machine, dtype: DType, channels: int, filters: int, out_h: int,
            out_w: int, direct_score: float) -> float:
    """The estimated time of the direct correlation over this schedule's, from the FMA
    counts of both at their blocks' estimated use and the transforms' measured cost per
    element (the input's once per filter group)."""
    lanes = machine.lanes(dtype)
    th, tw = tiles(out_h, out_w)
    plan = _plan(machine, dtype, channels, filters, out_h, out_w)
    direct = filters * channels * 9 * out_h * out_w / (lanes * FMA_UNITS * direct_score)
    products = 16 * filters * channels * th * tw / (lanes * FMA_UNITS * plan.score)
    transforms = th * tw * (channels * INPUT_CYCLES * plan.group.count
                            + filters * OUTPUT_CYCLES)
    return direct / (products + transforms)


@dataclass(frozen=True, slots=True)
class _Conv:
    """A stride-1 3x3 correlation: out[n, o, i, j] = act(bias[o] + Σ_c Σ_ab src[n, c, i + a
    − top, j + b − left] · tap(o, c, a, b)), zero outside the source."""

    source: Buffer  # [N, channels, H, W]
    out: Buffer  # [N, filters, H', W']
    filters: int
    channels: int
    tap: Callable[[Expr, Expr, int, int], Expr]  # filter, channel, a, b -> weight
    pad: tuple[int, int, int, int]
    bias: str | None = None
    activation: str | None = None
    activation_attrs: object = None


def _filter_transform(f: Function, conv: _Conv, width: int) -> str:
    """U[fb, ξ, c, lane] = (G g Gᵀ)[ξ] of filter fb·width + lane and channel c, zero in the
    lanes past the last filter: one statement that reads the weights only, so it moves to
    the pack entry point."""
    filters, channels = conv.filters, conv.channels
    blocks = math.ceil(filters / width)
    name = f.add_scratch("wino_u", (blocks, 16, channels, width))
    filter_ = add(mul(Var("pb"), const(width)), Var("pl"))

    def tap(a: int, b: int) -> Expr:
        return conv.tap(filter_, Var("pc"), a, b)

    zeros, values = [], []
    for i in range(4):
        for j in range(4):
            where = (Var("pb"), const(4 * i + j), Var("pc"), Var("pl"))
            zeros.append(Store(name, where, ZERO))
            values.append(Store(name, where, _combination(
                [(G[i][a] * G[j][b], tap(a, b)) for a in range(3) for b in range(3)])))
    inside = Binary(BinOp.LT, filter_, const(filters))
    f.body.append(loop_nest(["pb", "pc", "pl"], [blocks, channels, width],
                            (*zeros, If(inside, tuple(values)))))
    return name


def _combination(terms: list[tuple[float, Expr]]) -> Expr:
    """Σ coefficient · value over the terms whose coefficient is not 0; ±1 as an addition or
    subtraction."""
    total: Expr | None = None
    for coefficient, value in terms:
        if coefficient == 0:
            continue
        negative = coefficient < 0
        magnitude = abs(coefficient)
        term = value if magnitude == 1 else mul(const(float(magnitude)), value)
        if total is None:
            total = mul(const(-1.0), term) if negative else term
        else:
            total = Binary(BinOp.SUB if negative else BinOp.ADD, total, term)
    assert total is not None
    return total


def _input_transform(f: Function, src: str, v: str, channels: int, rows: int,
                     tile_cols: int) -> Stmt:
    """V[ξ, c, r·TW + tw] = (Bᵀ d B)[ξ] for the 4x4 patch d of channel c at padded row
    2·(wk·rows + r), column 2·tw (chunk wk): dB first (16 sums in locals), then Bᵀ(dB)."""
    names = [[f"wi{a}_{j}" for j in range(4)] for a in range(4)]
    f.locals.extend(Local(n, f.dtype) for row in names for n in row)
    top = mul(add(mul(Var("wk"), const(rows)), Var("wr")), const(2))
    left = mul(Var("wc"), const(2))

    def d(a: int, b: int) -> Expr:
        return Load(src, (Var("n"), Var("c"), add(top, const(a)), add(left, const(b))))

    body: list[Stmt] = [Assign(names[a][j], _combination(
        [(BT[j][b], d(a, b)) for b in range(4)])) for a in range(4) for j in range(4)]
    tile = add(mul(Var("wr"), const(tile_cols)), Var("wc"))
    body += [Store(v, (const(4 * i + j), Var("c"), tile), _combination(
        [(BT[i][a], Var(names[a][j])) for a in range(4)])) for i in range(4) for j in range(4)]
    return loop_nest(["c", "wr", "wc"], [channels, rows, tile_cols], tuple(body))


def _products(f: Function, v: str, u: str, m: str, channels: int, chunk: int,
              group: _Group, block) -> Stmt:
    """M[ξ, t, f] = Σ_c V[ξ, c, t] · U[fb, ξ, c, lanes]: 16 products of register blocks over
    tiles x output-channel vectors, for the filter blocks of this iteration's group (M holds
    the group's channels only)."""
    width, lanes = block.width, block.lanes
    filter_block = group.first(Var("fb"), group.blocks)

    def code_at(first: Expr) -> BlockCode:
        return BlockCode(
            reduction=(("c", const(channels)),),
            broadcast=lambda r: Load(v, (Var("xi"), Var("c"), add(first, const(r)))),
            vector=lambda k: VecLoad(u, (filter_block, Var("xi"), Var("c"),
                                         const(k * lanes)), lanes),
            init=lambda r, k: ZERO,
            finish=lambda r, k, acc: (VecStore(m, (Var("xi"), add(first, const(r)), add(
                mul(Var("fb"), const(width)), const(k * lanes))), acc),))

    return loop_nest(["xi", "fb"], [16, group.blocks],
                     row_tiles(f, "wt_", chunk, block, code_at))


def _output_transform(f: Function, conv: _Conv, m: str, o: str | None, rows: int,
                      tile_cols: int, group: _Group) -> Stmt:
    """act(bias + (Aᵀ M A)[a, b]) of the chunk's tiles (tile row r, column tw) and the
    filters of this iteration's group, as vectors over the filters: to O[ch, 2·r + a, 2·tw
    + b] (`o`; see `staged`), else to out[n, f, 2·(wk·rows + r) + a, 2·tw + b] for the
    outputs inside the plane (a last tile row or column may stick out by one)."""
    names = [[f"wo{a}_{j}" for j in range(4)] for a in range(2)]
    f.locals.extend(Local(n, f.dtype) for row in names for n in row)
    tile = add(mul(Var("wr"), const(tile_cols)), Var("wc"))

    def at(i: int, j: int) -> Expr:
        return Load(m, (const(4 * i + j), tile, Var("ch")))

    body: list[Stmt] = [Assign(names[a][j], _combination(
        [(AT[a][i], at(i, j)) for i in range(4)])) for a in range(2) for j in range(4)]
    channel = group.first(Var("ch"), group.channels)
    for a in range(2):
        for b in range(2):
            value = _combination([(AT[b][j], Var(names[a][j])) for j in range(4)])
            if conv.bias is not None:
                value = add(value, Load(conv.bias, (channel,)))
            value = activate(conv.activation, value, conv.activation_attrs)
            col = add(mul(Var("wc"), const(2)), const(b))
            if o is not None:
                body.append(Store(o, (Var("ch"), add(mul(Var("wr"), const(2)), const(a)), col),
                                  value))
                continue
            row = add(mul(add(mul(Var("wk"), const(rows)), Var("wr")), const(2)), const(a))
            body.append(_store_out(conv, channel, row, col, a == 1, b == 1, value))
    return loop_nest(["wr", "wc", "ch"], [rows, tile_cols, _group_channels(conv, group)],
                     _in_group(conv, group, channel, body))


def _store_out(conv: _Conv, channel: Expr, row: Expr, col: Expr, low: bool, right: bool,
               value: Expr) -> Stmt:
    """out[n, channel, row, col] = value, where it is inside the plane (`low`, `right`: the
    row or column may be one past it where the plane's size is odd)."""
    out = conv.out
    _, _, out_h, out_w = out.shape
    store: Stmt = Store(out.name, (Var("n"), channel, row, col), value)
    for index, extent, odd in ((row, out_h, low and out_h % 2),
                               (col, out_w, right and out_w % 2)):
        if odd:
            store = If(Binary(BinOp.LT, index, const(extent)), (store,))
    return store


def staged(machine: Machine, dtype: DType, plane: int) -> bool:
    """Whether the output transform stores to O (then `_copy_out`) rather than to the
    output: where the channel planes (`plane` elements each) that one filter vector's
    stores go to share so few L1 sets that more than 4 lanes fall in one. Most L1 caches
    have 64 sets of 64-byte lines and 8 or more ways; the tile row's other output row and
    the operands need ways too."""
    lanes = machine.lanes(dtype)
    sets = {(lane * plane * itemsize(dtype) // 64) % 64 for lane in range(lanes)}
    return lanes / len(sets) > 4


def _copy_out(conv: _Conv, o: str, rows: int, group: _Group) -> Stmt:
    """out[n, f, 2·(wk·rows) + r, col] = O[ch, r, col] for the outputs inside the plane (a
    last tile row or column may stick out by one): a channel's rows one after another, so
    its stores fill cache lines in turn. Stored straight from the filter vectors, each
    store would go a channel plane apart, and planes of 4 KiB (32 x 32) all map to one L1
    set: ResNet-20's 16-channel 32 x 32 layers took 3.6 ms that way at batch 64 on one
    AVX-512 thread, against 1.4 ms for the direct correlation."""
    out_w = conv.out.shape[3]
    channel = group.first(Var("ch"), group.channels)
    row = add(mul(mul(Var("wk"), const(rows)), const(2)), Var("wy"))
    store = _store_out(conv, channel, row, Var("wx"), True, False,
                       Load(o, (Var("ch"), Var("wy"), Var("wx"))))
    return loop_nest(["ch", "wy", "wx"], [_group_channels(conv, group), 2 * rows, out_w],
                     _in_group(conv, group, channel, [store]))


def staging_shape(rows: int, tile_cols: int, channels: int, dtype: DType
                  ) -> tuple[int, int, int]:
    """O's shape: a chunk's 2·rows output rows of each channel, each row 2·tile_cols
    columns and as many more (below a cache line) as put the channels an odd number of
    cache lines apart, so that the filter vectors' stores spread over the L1 sets (where
    the rows are a multiple of 16 no width does: then one more column)."""
    line = 64 // itemsize(dtype)  # elements a 64-byte line
    widths = range(2 * tile_cols, 2 * tile_cols + line)
    odd = [width for width in widths if (2 * rows * width) % (2 * line) == line]
    return channels, 2 * rows, odd[0] if odd else 2 * tile_cols + 1


def _group_channels(conv: _Conv, group: _Group) -> int:
    return conv.filters if group.count == 1 else group.channels


def _in_group(conv: _Conv, group: _Group, channel: Expr, body: list[Stmt]) -> tuple[Stmt, ...]:
    """`body`, within the filters where the last group's channels run past them."""
    if group.count > 1 and group.count * group.channels > conv.filters:
        return (If(Binary(BinOp.LT, channel, const(conv.filters)), tuple(body)),)
    return tuple(body)


def conv_forward(kernel: Kernel, program: KernelProgram, machine: Machine,
                 gain: float) -> Lowered:
    """The convolution as Winograd F(2x2, 3x3) (see the module's docstring); `gain` is
    `chosen`'s estimate, for --explain-schedule."""
    f, x, weight, out = conv_function(kernel, program)
    window = resolve(kernel.window, x.shape[2], x.shape[3])
    filters, channels = weight.shape[:2]
    conv = _Conv(x, out, filters, channels,
                 lambda o, c, a, b: Load(weight.name, (o, c, const(a), const(b))), window.pad,
                 kernel.inputs[2] if kernel.has_bias else None, kernel.activation,
                 kernel.activation_attrs)
    return _lowered(f, kernel.name, conv, machine, gain, of_delta=False)


def grad_input(kernel: Kernel, program: KernelProgram, machine: Machine,
               gain: float) -> Lowered:
    """The gradient of a stride-1 3x3 convolution's input, a full correlation of δ with the
    flipped filters (filters and channels swapped, padding 2 − P), as Winograd F(2x2, 3x3)."""
    dy, weight = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dx = view(program, kernel.outputs[0], is_output=True)
    f = Function(kernel.name, dx.dtype, [dy, weight, dx], [], [], [])
    window = resolve(kernel.node.attrs.window, dx.shape[2], dx.shape[3])
    filters, channels = weight.shape[:2]
    conv = _Conv(dy, dx, channels, filters,
                 lambda o, c, a, b: Load(weight.name, (c, o, const(2 - a), const(2 - b))),
                 flipped_pad(window.pad))
    return _lowered(f, kernel.name, conv, machine, gain, of_delta=True)


def _shared(group: _Group, of_delta: bool) -> str:
    """What a call's thread team shares, for --explain-schedule."""
    if group.count == 1:
        return "samples x chunks of tile rows"
    outputs = "input" if of_delta else "output"
    return (f"samples x chunks of tile rows x {group.count} groups of {group.channels} "
            f"{outputs} channels (each group transforms its chunk's input)")


def flipped_pad(pad_: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The padding of the gradient's full correlation: 2 − P on each side."""
    return tuple(2 - p for p in pad_)  # type: ignore[return-value]


def _lowered(f: Function, name: str, conv: _Conv, machine: Machine, gain: float,
             of_delta: bool) -> Lowered:
    """`conv` lowered; `of_delta`: it is a convolution's input gradient (for the words of
    --explain-schedule)."""
    top, left, bottom, right = conv.pad
    source = conv.source
    out_h, out_w = conv.out.shape[2:]
    th, tw = tiles(out_h, out_w)
    plan = _plan(machine, f.dtype, conv.channels, conv.filters, out_h, out_w)
    rows, chunk, block, group = plan.rows, plan.chunk, plan.block, plan.group
    src = pad(f, source, top, left, max(source.shape[2] + top + bottom, 2 * th + 2),
              max(source.shape[3] + left + right, 2 * tw + 2), plan.parallel)
    u = _filter_transform(f, conv, block.width)
    v = f.add_scratch("wino_v", (16, conv.channels, chunk))
    m = f.add_scratch("wino_m", (16, chunk, group.channels))
    o = f.add_scratch("wino_o", staging_shape(rows, tw, group.channels, f.dtype)) \
        if staged(machine, f.dtype, out_h * out_w) else None
    body = (_input_transform(f, src, v, conv.channels, rows, tw),
            _products(f, v, u, m, conv.channels, chunk, group, block),
            _output_transform(f, conv, m, o, rows, tw, group),
            *(() if o is None else (_copy_out(conv, o, rows, group),)))
    private = (v, m) if o is None else (v, m, o)
    # the samples too: a call run in one piece (training with batch norm) shares all of
    # its samples' chunks, not one sample's at a time
    loops, extents = ["n", "wk"], [Var(BATCH), th // rows]
    if group.count > 1:
        loops, extents = [*loops, "wg"], [*extents, group.count]
    f.body.append(shared_nest(loops, extents, body, private, plan.parallel))
    # the gradient's "filters" are the convolution's input channels, and the reverse
    outputs, inputs = ("input", "output") if of_delta else ("output", "input")
    schedule = Schedule(
        name, NAME + (" of δ" if of_delta else ""), block, "tile", chunk,
        f"{outputs} channel", conv.filters, (f"{inputs} channel",),
        (f"{'flipped ' if of_delta else ''}filters transformed [fb, 16, c, lanes]",
         "δ zero-padded" if of_delta else "input zero-padded",
         f"each chunk of {rows} tile row(s) x {tw} tiles transformed to [16, c, tiles]"),
        efficiency=plan.score,
        reason=f"{block_reason(block, chunk, conv.filters)}; estimated {gain:.2f}x faster "
               f"than the direct correlation (16 instead of 36 multiply-adds a 2x2 tile and "
               f"channel, the transforms counted); --no-winograd keeps the direct one",
        shared=_shared(group, of_delta) if plan.parallel else "")
    return Lowered(f.finished(), tuple(f.scratch), schedule)
