"""Kernel + schedule → register-blocked loop IR, for the kernels that do the arithmetic.

Three patterns cover every convolution and dense kernel, forward and backward:

- correlation: out[n, f, q·M + A, ...] = act(bias + Σ src[n, c, q·S + tap + offset] · w),
  vectorized over output channels f with weights repacked channel-blocked ([fb, c, kh, kw,
  lanes]) and the source zero-padded once, so the inner loop has no bounds tests. Forward
  convolution is one; the gradient of the input is one per stride phase (a, b): the outputs
  with (ih + P) mod S = a see only the taps kh ≡ a (mod S), which makes a dense stride-1
  correlation of δ, so no dilated δ is ever materialised.
- filter gradient: dw[f, c, kh, kw] = Σ_{n,oh,ow} δ[n, f, oh, ow] · x[n, c, oh·S + kh, ...],
  vectorized over f with δ transposed to [n, oh, ow, f] and the taps as register rows.
- matrix product: out[m, j] = act(bias + Σ_k A[m, k] · B[k, j]) for dense layers and their
  gradients, vectorized over j with B repacked and zero-padded to whole vectors.

Each kernel packs what it needs into scratch buffers of its own at the start of the call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from cnnc.graph.ir import BATCH, DType, Op, Role, Tensor
from cnnc.loops.build import add, const, extent_expr, loop_nest, mul
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
from cnnc.loops.lower import activate, fuse_batch_loops, lower_kernel
from cnnc.loops.lower_backward import flat, view
from cnnc.passes.fuse import Kernel, KernelKind, KernelProgram
from cnnc.schedule.cost import Block, Machine, Schedule, choose_block, filter_tile_rows

ZERO = Const(0.0, True)


@dataclass
class _Function:
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


def lower_blocked(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered | None:
    """The scheduled loop function of `kernel`, or None for kernels without a schedule."""
    op = kernel.node.op if kernel.node is not None else None
    if kernel.pool is not None:
        return _with_pool(kernel, program, machine)
    if kernel.kind is KernelKind.CONV:
        return _conv_forward(kernel, program, machine)
    if kernel.kind is KernelKind.DENSE:
        return _dense_forward(kernel, program, machine)
    if op is Op.CONV2D_GRAD_INPUT:
        return _conv_grad_input(kernel, program, machine)
    if op is Op.CONV2D_GRAD_WEIGHT:
        return _conv_grad_weight(kernel, program, machine)
    if op is Op.DENSE_GRAD_INPUT:
        return _dense_grad_input(kernel, program, machine)
    if op is Op.DENSE_GRAD_WEIGHT:
        return _dense_grad_weight(kernel, program, machine)
    if op is Op.BIAS_GRAD:
        return _bias_grad(kernel, program, machine)
    return None


# -- the register block ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _BlockCode:
    """What a register block computes; each callable gets the row r (and vector v)."""

    reduction: tuple[tuple[str, Expr], ...]  # (loop variable, extent), outermost first
    broadcast: Callable[[int], Expr]  # the scalar operand of row r
    vector: Callable[[int], Expr]  # the vector operand v (a VecLoad)
    init: Callable[[int, int], Expr]  # the starting value of accumulator (r, v)
    finish: Callable[[int, int, Expr], tuple[Stmt, ...]]  # consumes accumulator (r, v)
    epilogue: Callable[[int], tuple[Stmt, ...]] = lambda rows: ()  # after all, given rows


def _register_block(f: _Function, tag: str, block: Block, rows: int,
                    code: _BlockCode) -> tuple[Stmt, ...]:
    """rows x vectors accumulators that live in registers through the reduction loops."""
    lanes, vectors = block.lanes, block.vectors
    acc = [[f"{tag}_acc{r}_{v}" for v in range(vectors)] for r in range(rows)]
    weights = [f"{tag}_vec{v}" for v in range(vectors)]
    scalar = f"{tag}_scalar"
    f.locals += [Local(n, f.dtype, lanes) for row in acc for n in row]
    f.locals += [Local(n, f.dtype, lanes) for n in weights] + [Local(scalar, f.dtype)]
    start = [Assign(acc[r][v], code.init(r, v)) for r in range(rows) for v in range(vectors)]
    step: list[Stmt] = [Assign(weights[v], code.vector(v)) for v in range(vectors)]
    for r in range(rows):
        step.append(Assign(scalar, code.broadcast(r)))
        spread = Broadcast(Var(scalar), lanes)
        step += [Assign(acc[r][v], add(Var(acc[r][v]), mul(spread, Var(weights[v]))))
                 for v in range(vectors)]
    names = [name for name, _ in code.reduction]
    nest = loop_nest(names, [extent for _, extent in code.reduction], tuple(step))
    end = [s for r in range(rows) for v in range(vectors)
           for s in code.finish(r, v, Var(acc[r][v]))]
    return (*start, nest, *end, *code.epilogue(rows))


def _row_tiles(f: _Function, var: str, extent: int | None, block: Block,
               code_at: Callable[[Expr], _BlockCode]) -> tuple[Stmt, ...]:
    """Rows 0..extent in blocks of block.rows and a smaller tail block; `code_at` gets the
    first row of a block. An extent of None is the batch, known only at run time."""
    size = block.rows
    if extent is None:
        full = Binary(BinOp.FLOOR_DIV, Var(BATCH), const(size))
        main = For(var, full, _register_block(f, f"{var}m", block, size,
                                              code_at(mul(Var(var), const(size)))))
        last = add(mul(full, const(size)), Var(f"{var}t"))
        tail = For(f"{var}t", Binary(BinOp.MOD, Var(BATCH), const(size)),
                   _register_block(f, f"{var}t", Block(1, block.vectors, block.lanes), 1,
                                   code_at(last)))
        return (main, tail) if size > 1 else (main,)
    full, rest = divmod(extent, size)
    stmts: list[Stmt] = []
    if full:
        stmts.append(For(var, const(full), _register_block(
            f, f"{var}m", block, size, code_at(mul(Var(var), const(size))))))
    if rest:
        stmts += _register_block(f, f"{var}t", block, rest, code_at(const(full * size)))
    return tuple(stmts)


def _tile_store(tile: str, block: Block) -> Callable[[int, int, Expr], tuple[Stmt, ...]]:
    """Accumulator (r, v) as one vector store into the block's tile."""
    return lambda r, v, acc: (VecStore(tile, (const(r), const(v * block.lanes)), acc),)


def _tile_scatter(tile: str, out: str, index_of: Callable[[Expr, Expr], tuple[Expr, ...]],
                  first: Expr, limit: int, width: int,
                  activation: Op | None) -> Callable[[int], tuple[Stmt, ...]]:
    """The tile's rows x channels, activated, to out[index_of(row, first + j)], as a loop
    (compact code) over the channels below `limit`."""
    remaining = Binary(BinOp.SUB, const(limit), first)
    channels = const(width) if limit % width == 0 else \
        _smaller(remaining, const(width))

    def epilogue(rows: int) -> tuple[Stmt, ...]:
        value = activate(activation, Load(tile, (Var("er"), Var("ej"))), ZERO)
        store = Store(out, index_of(Var("er"), add(first, Var("ej"))), value)
        return (loop_nest(["er", "ej"], [const(rows), channels], (store,)),)

    return epilogue


def _tile(f: _Function, block: Block) -> str:
    """Where a block's accumulators go before they are scattered to the output."""
    return f.add_scratch("tile", (block.rows, block.width))


# -- packing --------------------------------------------------------------------------------

def _pack_blocked(f: _Function, suffix: str, outer: list[tuple[str, int]], extent: int,
                  width: int, value: Callable[[Expr, list[Expr]], Expr]) -> str:
    """scratch[b, *outer, lane] = value(b·width + lane, outer) for channels below `extent`,
    and 0 in the lanes past it: a channel-blocked copy whose vectors need no tail test."""
    blocks = math.ceil(extent / width)
    shape = (blocks, *(e for _, e in outer), width)
    name = f.add_scratch(suffix, shape)
    names = ["pb", *(n for n, _ in outer), "pl"]
    where = tuple(Var(n) for n in names)
    channel = add(mul(Var("pb"), const(width)), Var("pl"))
    outer_vars = [Var(n) for n, _ in outer]
    inside = Binary(BinOp.LT, channel, const(extent))
    body = (Store(name, where, ZERO), If(inside, (Store(name, where, value(channel, outer_vars)),)))
    f.body.append(loop_nest(names, [blocks, *(e for _, e in outer), width], body))
    return name


def _pad(f: _Function, source: Buffer, top: int, left: int, height: int,
         width: int) -> str:
    """scratch[n, c, top + i, left + j] = source[n, c, i, j], zero around it; or the source
    itself where nothing needs padding."""
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
    f.body.append(loop_nest(["pn", "pc"], [Var(BATCH), channels],
                            tuple(s for s in row_loops if s is not None)))
    return name


# -- correlation: forward convolution and the gradient of its input ---------------------------

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


def _correlation(f: _Function, tag: str, src: str, src_channels: int, out: Buffer,
                 rows: _Grid, cols: _Grid, packed_weights: str, bias: str | None,
                 activation: Op | None, block: Block,
                 live_rows: tuple[int, int] | None = None) -> Stmt:
    """`live_rows`: the source rows [start, stop) that are not zero padding. Where skipping
    the taps that read only padding saves enough, each output row runs only the row taps
    that reach live rows (a loop of varying length, which LLVM no longer unrolls)."""
    out_channels = out.shape[1]
    width = block.width
    tile = _tile(f, block)
    row_taps, tap_row = const(rows.taps), Var("th")
    if live_rows is not None and _dead_tap_share(rows, live_rows) >= 0.15:
        base = _affine(add(Var("q"), const(rows.start)), rows.source_stride,
                       const(rows.source_offset))
        first = _larger(const(0), Binary(BinOp.SUB, const(live_rows[0]), base))
        to_live_end = Binary(BinOp.SUB, const(live_rows[1]), base)
        row_taps = Binary(BinOp.SUB, _smaller(const(rows.taps), to_live_end), first)
        tap_row = add(Var("th"), first)

    def code_at(first_col: Expr) -> _BlockCode:
        def source_index(r: int) -> tuple[Expr, ...]:
            col = add(first_col, const(cols.start + r))
            return (Var("n"), Var("c"),
                    _affine(add(Var("q"), const(rows.start)), rows.source_stride,
                            add(tap_row, const(rows.source_offset))),
                    _affine(col, cols.source_stride, add(Var("tw"), const(cols.source_offset))))

        def init(r: int, v: int) -> Expr:
            if bias is None:
                return ZERO
            return VecLoad(bias, (Var("fb"), const(v * block.lanes)), block.lanes)

        row = _affine(add(Var("q"), const(rows.start)), rows.scale, const(rows.shift))

        def out_index(r: Expr, channel: Expr) -> tuple[Expr, ...]:
            col = _affine(add(add(first_col, r), const(cols.start)), cols.scale,
                          const(cols.shift))
            return (Var("n"), channel, row, col)

        return _BlockCode(
            reduction=(("c", const(src_channels)), ("th", row_taps), ("tw", const(cols.taps))),
            broadcast=lambda r: Load(src, source_index(r)),
            vector=lambda v: VecLoad(packed_weights, (Var("fb"), Var("c"), tap_row, Var("tw"),
                                                      const(v * block.lanes)), block.lanes),
            finish=_tile_store(tile, block),
            epilogue=_tile_scatter(tile, out.name, out_index, mul(Var("fb"), const(width)),
                                   out_channels, width, activation),
            init=init)

    tiles = _row_tiles(f, f"{tag}w", cols.count, block, code_at)
    blocks = math.ceil(out_channels / width)
    return loop_nest(["n", "fb", "q"], [Var(BATCH), blocks, rows.count], tiles)


def _dead_tap_share(rows: _Grid, live_rows: tuple[int, int]) -> float:
    """The share of row taps, over all output rows, that read only padding rows."""
    live = 0
    for q in range(rows.start, rows.start + rows.count):
        base = q * rows.source_stride + rows.source_offset
        live += max(0, min(rows.taps, live_rows[1] - base) - max(0, live_rows[0] - base))
    return 1 - live / max(1, rows.taps * rows.count)


def _affine(q: Expr, scale: int, shift: Expr) -> Expr:
    scaled = q if scale == 1 else mul(q, const(scale))
    if isinstance(shift, Const) and shift.value == 0:
        return scaled
    return add(scaled, shift)


def _conv_forward(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    x, weight = (view(program, n) for n in kernel.inputs[:2])
    out = view(program, kernel.outputs[0], is_output=True)
    f = _Function(kernel.name, out.dtype, [x, weight], [], [], [])
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
    src = _pad(f, x, ph, pw, max(x.shape[2] + 2 * ph, (oh - 1) * sh + kh),
               max(x.shape[3] + 2 * pw, (ow - 1) * sw + kw))
    packed = _pack_blocked(f, "w", [("pc", channels_in), ("ph", kh), ("pw", kw)],
                           channels_out, width,
                           lambda ch, o: Load(weight.name, (ch, *o)))
    bias = None
    if kernel.has_bias:
        bias = _pack_blocked(f, "b", [], channels_out, width,
                             lambda ch, o: Load(kernel.inputs[2], (ch,)))
    rows = _Grid(0, oh, 1, 0, kh, sh, 0)
    cols = _Grid(0, ow, 1, 0, kw, sw, 0)
    f.body.append(_correlation(f, "o", src, channels_in, out, rows, cols, packed, bias,
                               kernel.activation, block))
    schedule = Schedule(kernel.name, "correlation", block, "output column", ow,
                        "output channel", channels_out, ("input channel", "kh", "kw"),
                        ("weights [fb, c, kh, kw, lanes]", "bias", "input zero-padded"),
                        efficiency=score, reason=_block_reason(block, ow, channels_out))
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _with_pool(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    """The scheduled convolution, with the max pool of each sample in its batch loop."""
    conv, pool = kernel.unfused()
    lowered = lower_blocked(conv, program, machine)
    assert lowered is not None
    window = pool.window
    fused = (f"max pool {window.kernel[0]}x{window.kernel[1]} stride "
             f"{window.stride[0]}x{window.stride[1]} of each sample, inside the batch loop")
    pooled = _maxpool_by_columns(pool, program, machine)
    if pooled is None:
        pooled = lower_kernel(pool, program)
        fused += " (scalar: it is padded or its output has a single column)"
    else:
        fused += f", {pooled.locals[0].lanes} output columns a vector"
    return Lowered(fuse_batch_loops(lowered.function, pooled), lowered.scratch,
                   dataclasses.replace(lowered.schedule, fused=fused))


def _maxpool_by_columns(kernel: Kernel, program: KernelProgram,
                        machine: Machine) -> LoopFunction | None:
    """Max pooling vectorized over output columns, with strided vector loads; None where the
    window is padded (lanes would need bounds tests) or the output has one column.

    The first tap is always taken, a later one where it is larger or NaN, as in the plain
    loops. A last block that would run past the row starts earlier instead and recomputes a
    few columns: every column gets the same value either way, and no scalar tail is needed.
    """
    window = kernel.window
    x = view(program, kernel.inputs[0])
    out, argmax = (view(program, name, is_output=True) for name in kernel.outputs)
    _, channels, rows, columns = out.shape
    lanes = min(machine.lanes(out.dtype), 1 << (columns.bit_length() - 1))
    if any(window.pad) or lanes < 2:
        return None
    (kh, kw), (sh, sw) = window.kernel, window.stride
    best, value, index = "pool_best", "pool_value", "pool_index"

    def block(start: Expr) -> tuple[Stmt, ...]:
        def tap(i: int, j: int) -> tuple[Expr, Expr]:
            row, column = _affine(Var("oh"), sh, const(i)), _affine(start, sw, const(j))
            position = add(mul(row, const(x.shape[3])), column)
            return (VecLoad(x.name, (Var("n"), Var("c"), row, column), lanes, sw),
                    Ramp(position, sw, lanes))

        first, first_position = tap(0, 0)
        stmts: list[Stmt] = [Assign(best, first), Assign(index, first_position)]
        for i, j in ((i, j) for i in range(kh) for j in range(kw) if (i, j) != (0, 0)):
            load, position = tap(i, j)
            take = Binary(BinOp.OR, Binary(BinOp.GT, Var(value), Var(best)),
                          Unary(UnaryOp.ISNAN, Var(value)))
            stmts += [Assign(value, load), Assign(index, Select(take, position, Var(index))),
                      Assign(best, Binary(BinOp.MAX, Var(best), Var(value)))]
        where = (Var("n"), Var("c"), Var("oh"), start)
        return (*stmts, VecStore(out.name, where, Var(best)),
                VecStore(argmax.name, where, Var(index)))

    full, rest = divmod(columns, lanes)
    body = (For("ob", const(full), block(mul(Var("ob"), const(lanes)))),
            *(block(const(columns - lanes)) if rest else ()))
    nest = loop_nest(["n", "c", "oh"], [Var(BATCH), channels, rows], body)
    locals_ = (Local(best, out.dtype, lanes), Local(value, out.dtype, lanes),
               Local(index, DType.I64, lanes))
    return LoopFunction(kernel.name, (x, out, argmax), locals_, (nest,))


def _conv_forward_by_width(kernel: Kernel, f: _Function, x: Buffer, weight: Buffer,
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
    src = _pad(f, x, ph, pw, max(x.shape[2] + 2 * ph, (oh - 1) * sh + kh),
               max(x.shape[3] + 2 * pw, column_blocks * width + kw - 1))
    tile = _tile(f, block)
    first_column = mul(Var("ob"), const(width))

    def code_at(first_channel: Expr) -> _BlockCode:
        def init(r: int, v: int) -> Expr:
            if not kernel.has_bias:
                return ZERO
            return Broadcast(Load(kernel.inputs[2], (add(first_channel, const(r)),)),
                             block.lanes)

        def out_index(r: Expr, column: Expr) -> tuple[Expr, ...]:
            return (Var("n"), add(first_channel, r), Var("q"), column)

        return _BlockCode(
            reduction=(("c", const(channels_in)), ("th", const(kh)), ("tw", const(kw))),
            broadcast=lambda r: Load(weight.name, (add(first_channel, const(r)), Var("c"),
                                                   Var("th"), Var("tw"))),
            vector=lambda v: VecLoad(src, (Var("n"), Var("c"), _affine(Var("q"), sh, Var("th")),
                                           add(add(first_column, const(v * block.lanes)),
                                               Var("tw"))), block.lanes),
            init=init, finish=_tile_store(tile, block),
            epilogue=_tile_scatter(tile, out.name, out_index, first_column, ow, width,
                                   kernel.activation))

    tiles = _row_tiles(f, "ch", channels_out, block, code_at)
    f.body.append(loop_nest(["n", "q", "ob"], [Var(BATCH), oh, column_blocks], tiles))
    schedule = Schedule(kernel.name, "correlation over output width", block, "output channel",
                        channels_out, "output column", ow, ("input channel", "kh", "kw"),
                        ("input zero-padded (right edge to whole vectors)",),
                        efficiency=score,
                        reason=_block_reason(block, channels_out, ow) + "; better than a "
                        "block over output channels, which fills fewer lanes")
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _block_reason(block: Block, rows: int | None, vector_extent: int) -> str:
    return (f"{block.rows * block.vectors} accumulators + {block.vectors} vector loads + 1 "
            f"broadcast fit the registers; best estimate over every block for "
            f"{'N' if rows is None else rows} rows x {vector_extent} channels")


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


def _conv_grad_input(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    dy, weight = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dx = view(program, kernel.outputs[0], is_output=True)
    f = _Function(kernel.name, dx.dtype, [dy, weight, dx], [], [], [])
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
    src = _pad(f, dy, top, left, height, width_)
    covered: set[tuple[int, int]] = set()
    for a, taps_h, first_h, count_h in phases_h:
        for b, taps_w, first_w, count_w in phases_w:
            covered.add((a, b))
            packed = _pack_blocked(
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
                        efficiency=score, reason=_block_reason(block, widest, channels))
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _flipped_tap(index: Expr, phase: int, stride: int, taps: int) -> Expr:
    """Tap t' of a phase reads kernel position phase + S·(taps − 1 − t')."""
    return add(const(phase), mul(const(stride), Binary(BinOp.SUB, const(taps - 1), index)))


# -- filter gradient --------------------------------------------------------------------------

def _conv_grad_weight(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    x, dy = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dw = view(program, kernel.outputs[0], is_output=True)
    f = _Function(kernel.name, dw.dtype, [x, dy, dw], [], [], [])
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
    src = _pad(f, x, ph, pw, max(x.shape[2] + 2 * ph, (oh - 1) * sh + kh), src_w)
    delta = _transpose_delta(f, dy, blocks * width)
    acc = f.add_scratch("acc", (blocks, channels, taps, width))
    f.body.append(loop_nest(["zb", "zc", "zt", "zl"], [blocks, channels, taps, width],
                            (Store(acc, (Var("zb"), Var("zc"), Var("zt"), Var("zl")), ZERO),)))
    tiles = math.ceil(oh / tile)
    remaining = Binary(BinOp.SUB, const(oh), mul(Var("ot"), const(tile)))
    rows_here = const(tile) if oh % tile == 0 else \
        _smaller(remaining, const(tile))
    out_row = add(mul(Var("ot"), const(tile)), Var("i"))

    def code_at(first_tap: Expr) -> _BlockCode:
        def tap(r: int) -> tuple[Expr, Expr]:
            t = add(first_tap, const(r))
            return Binary(BinOp.FLOOR_DIV, t, const(kw)), Binary(BinOp.MOD, t, const(kw))

        def broadcast(r: int) -> Expr:
            tap_h, tap_w = tap(r)
            return Load(src, (Var("n"), Var("c"), _affine(out_row, sh, tap_h),
                              _affine(Var("j"), sw, tap_w)))

        def where(r: int, v: int) -> tuple[Expr, ...]:
            return (Var("fb"), Var("c"), add(first_tap, const(r)), const(v * block.lanes))

        return _BlockCode(
            reduction=(("i", rows_here), ("j", const(ow))),
            broadcast=broadcast,
            vector=lambda v: VecLoad(delta, (Var("n"), out_row, Var("j"), add(
                mul(Var("fb"), const(width)), const(v * block.lanes))), block.lanes),
            init=lambda r, v: VecLoad(acc, where(r, v), block.lanes),
            finish=lambda r, v, value: (VecStore(acc, where(r, v), value),))

    body = _row_tiles(f, "t", taps, block, code_at)
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
                        reason=_block_reason(block, taps, filters))
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _larger(a: Expr, b: Expr) -> Expr:
    return Select(Binary(BinOp.LT, a, b), b, a)


def _smaller(a: Expr, b: Expr) -> Expr:
    return Select(Binary(BinOp.LT, a, b), a, b)


def _transpose_delta(f: _Function, dy: Buffer, padded_channels: int) -> str:
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


# -- matrix products: dense layers and their gradients ------------------------------------------

@dataclass(frozen=True, slots=True)
class _Product:
    """out[m, j] = act(bias[j] + Σ_k a(m, k) · b(k, j)); None as an extent is the batch."""

    rows: int | None
    columns: int
    depth: int | None
    a: Callable[[Expr, Expr], Expr]
    b: Callable[[Expr, Expr], Expr]
    out: str
    bias: str | None = None
    activation: Op | None = None
    b_runs_along_k: bool = False  # b's source is contiguous along k (else along j)


def _matrix_product(f: _Function, p: _Product, block: Block) -> None:
    width = block.width
    blocks = math.ceil(p.columns / width)
    depth = extent_expr(BATCH if p.depth is None else p.depth)
    # [block, k, lanes]: one block's operand is one contiguous run, page after page
    packed = f.add_scratch("b", (blocks, BATCH if p.depth is None else p.depth, width))

    def b_at(k: Expr, block_index: Expr, lane: Expr) -> tuple[Expr, ...]:
        return (block_index, k, lane)

    column = add(mul(Var("pb"), const(width)), Var("pl"))
    copy = (Store(packed, b_at(Var("pk"), Var("pb"), Var("pl")), ZERO),
            If(Binary(BinOp.LT, column, const(p.columns)),
               (Store(packed, b_at(Var("pk"), Var("pb"), Var("pl")), p.b(Var("pk"), column)),)))
    # read the source in its own order: strided reads of a large weight miss every time
    order = (["pb", "pl", "pk"], [blocks, width, depth]) if p.b_runs_along_k else \
        (["pk", "pb", "pl"], [depth, blocks, width])
    f.body.append(loop_nest(order[0], order[1], copy))
    bias = None
    if p.bias is not None:
        bias = _pack_blocked(f, "bias", [], p.columns, width,
                             lambda ch, o: Load(p.bias, (ch,)))

    tile = _tile(f, block)

    def code_at(first_row: Expr) -> _BlockCode:
        def init(r: int, v: int) -> Expr:
            if bias is None:
                return ZERO
            return VecLoad(bias, (Var("jb"), const(v * block.lanes)), block.lanes)

        return _BlockCode(
            reduction=(("k", depth),),
            broadcast=lambda r: p.a(add(first_row, const(r)), Var("k")),
            vector=lambda v: VecLoad(packed, b_at(Var("k"), Var("jb"), const(v * block.lanes)),
                                     block.lanes),
            finish=_tile_store(tile, block),
            epilogue=_tile_scatter(tile, p.out, lambda r, j: (add(first_row, r), j),
                                   mul(Var("jb"), const(width)), p.columns, width,
                                   p.activation),
            init=init)

    f.body.append(For("jb", const(blocks), _row_tiles(f, "m", p.rows, block, code_at)))


def _lowered_product(kernel: Kernel, f: _Function, p: _Product, machine: Machine,
                     axes: tuple[str, str, str]) -> Lowered:
    """Block choice, lowering and schedule of a product; `axes` names its rows, columns and
    reduction for --explain-schedule."""
    rows, columns, depth = axes
    block, score = choose_block(machine, f.dtype, p.rows, p.columns)
    _matrix_product(f, p, block)
    schedule = Schedule(kernel.name, "matrix product", block, rows, p.rows, columns, p.columns,
                        (depth,), (f"B as [{columns} blocks, {depth}, {block.width} lanes]",),
                        efficiency=score, reason=_block_reason(block, p.rows, p.columns))
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def _dense_forward(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    x = flat(program, kernel.inputs[0])
    weight = view(program, kernel.inputs[1])
    out = view(program, kernel.outputs[0], is_output=True)
    f = _Function(kernel.name, out.dtype, [x, weight], [], [], [])
    if kernel.has_bias:
        f.buffers.append(view(program, kernel.inputs[2]))
    f.buffers.append(out)
    units, features = weight.shape
    p = _Product(None, units, features, lambda m, k: Load(x.name, (m, k)),
                 lambda k, j: Load(weight.name, (j, k)), out.name,
                 kernel.inputs[2] if kernel.has_bias else None, kernel.activation,
                 b_runs_along_k=True)
    return _lowered_product(kernel, f, p, machine, ("sample", "unit", "input feature"))


def _dense_grad_input(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    dy, weight = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dx = flat(program, kernel.outputs[0], is_output=True)
    f = _Function(kernel.name, dx.dtype, [dy, weight, dx], [], [], [])
    units, features = weight.shape
    p = _Product(None, features, units, lambda m, k: Load(dy.name, (m, k)),
                 lambda k, j: Load(weight.name, (k, j)), dx.name)
    return _lowered_product(kernel, f, p, machine, ("sample", "input feature", "unit"))


def _dense_grad_weight(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    x, dy = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dw = view(program, kernel.outputs[0], is_output=True)
    f = _Function(kernel.name, dw.dtype, [x, dy, dw], [], [], [])
    units, features = dw.shape
    p = _Product(units, features, None, lambda m, k: Load(dy.name, (k, m)),
                 lambda k, j: Load(x.name, (k, j)), dw.name)
    return _lowered_product(kernel, f, p, machine, ("unit", "input feature", "sample"))


# -- bias gradient: a sum over contiguous positions ----------------------------------------------

BIAS_ACCUMULATORS = 4  # independent partial sums, so the adds do not wait on each other


def _bias_grad(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered | None:
    """db[f] = Σ_{n, position} dy[n, f, position], with vector partial sums over the
    contiguous positions; None (plain loops) where a channel has too few positions."""
    shape = program.graph.tensor(kernel.inputs[0]).shape
    positions = math.prod(shape[2:])
    dy = view(program, kernel.inputs[0], (shape[0], shape[1], positions))
    db = view(program, kernel.outputs[0], is_output=True)
    lanes = machine.lanes(db.dtype)
    step = BIAS_ACCUMULATORS * lanes
    if positions < step:
        return None
    f = _Function(kernel.name, db.dtype, [dy, db], [], [], [])
    sums = [f"sum{k}" for k in range(BIAS_ACCUMULATORS)]
    f.locals += [Local(name, db.dtype, lanes) for name in sums] + [Local("rest", db.dtype)]
    where = (Var("n"), Var("f"))
    vectors = For("i", const(positions // step), tuple(
        Assign(name, add(Var(name), VecLoad(dy.name, (*where, add(mul(Var("i"), const(step)),
                                                                  const(k * lanes))), lanes)))
        for k, name in enumerate(sums)))
    tail_start = positions // step * step
    tail = For("t", const(positions - tail_start), (Assign("rest", add(Var("rest"), Load(
        dy.name, (*where, add(Var("t"), const(tail_start)))))),))
    total: Expr = Var("rest")
    combined: Expr = Var(sums[0])
    for name in sums[1:]:
        combined = add(combined, Var(name))
    for j in range(lanes):
        total = add(total, Lane(combined, j))
    body = (*(Assign(name, ZERO) for name in sums), Assign("rest", ZERO),
            For("n", Var(BATCH), (vectors, tail)) if tail_start < positions else
            For("n", Var(BATCH), (vectors,)),
            Store(db.name, (Var("f"),), total))
    f.body.append(For("f", const(shape[1]), body))
    block = Block(1, BIAS_ACCUMULATORS, lanes)
    schedule = Schedule(kernel.name, "sum over positions", block, "channel", shape[1],
                        "position", positions, ("sample", "position block"), (),
                        efficiency=1.0, reason=f"{BIAS_ACCUMULATORS} partial sums of {lanes} "
                        "lanes hide the add latency; the lanes are added once per channel")
    return Lowered(f.finished(), (), schedule)
