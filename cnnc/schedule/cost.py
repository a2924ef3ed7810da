"""Schedules: how each heavy kernel's loops are blocked, vectorized and ordered, chosen by a
small cost model from the target's vector width, register count and cache sizes (no
tuning).

A schedule is data. `choose_block` picks its register block, `explain` prints it with the
numbers that decided it (`cnnc compile --explain-schedule`), and the patterns of this folder
(`correlation.py`, `product.py`, ...) apply it when they lower a kernel to loop IR. Kernels
without a schedule keep their plain loop nests.

The shape every schedule shares is a register block: `rows` x `vectors` accumulators of
`lanes` floats each stay in registers through the whole reduction, fed each step by `vectors`
vector loads of a packed (channel-blocked) operand and `rows` broadcast scalars. LLVM does no
register tiling of its own, so the block size is the decision that matters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from cnnc.graph.ir import DType

# Zen 3 and most x86 cores since Haswell: 2 FMA units, 4-cycle FMA latency. A block needs
# latency x units independent accumulators to keep both units busy.
FMA_UNITS = 2
FMA_LATENCY = 4
LOADS_PER_CYCLE = 2


@dataclass(frozen=True, slots=True)
class Machine:
    """What the cost model knows of the CPU code is generated for."""

    vector_bits: int  # 512 with AVX-512, 256 with AVX/AVX2, else 128
    registers: int  # vector registers
    l1_bytes: int
    l2_bytes: int
    # whether a stride-1 3x3 convolution may run as Winograd F(2x2, 3x3) where the cost
    # model expects it faster (schedule/winograd.py); False: --no-winograd, every
    # convolution direct (exact sums in the direct order)
    winograd: bool = True

    def record(self) -> dict[str, int | bool]:
        """The fields a module file records (artifact.manifest.Machine); winograd only when
        off, so that the default build's record keeps the form it had before the option."""
        data: dict[str, int | bool] = dataclasses.asdict(self)
        if self.winograd:
            del data["winograd"]
        return data

    def lanes(self, dtype: DType) -> int:
        return self.vector_bits // (8 * itemsize(dtype))


def itemsize(dtype: DType) -> int:
    """Bytes of one element of a floating-point buffer."""
    return 8 if dtype is DType.F64 else 4


@dataclass(frozen=True, slots=True)
class Block:
    """A register block: `rows` x `vectors` accumulators of `lanes` each."""

    rows: int
    vectors: int
    lanes: int

    @property
    def width(self) -> int:
        """Elements of the vector axis one block covers."""
        return self.vectors * self.lanes


@dataclass(frozen=True, slots=True)
class Schedule:
    """How one kernel runs: its register block over (row axis x vector axis), the reduction
    loops kept as loops, which operands are repacked, and a tile for cache reuse."""

    kernel: str
    pattern: str  # "correlation", "filter gradient" or "matrix product"
    block: Block
    row_axis: str  # e.g. "output column"
    row_extent: int | None  # None: the batch, known at run time
    vector_axis: str  # e.g. "output channel"
    vector_extent: int
    reduction: tuple[str, ...]
    packed: tuple[str, ...]
    tile_rows: int = 0  # filter gradient: output rows per cache tile
    efficiency: float = 0.0  # the cost model's estimate, of the FMA peak
    reason: str = ""
    fused: str = ""  # what else runs in the kernel, e.g. a max pool per sample
    shared: str = ""  # the loops a call's thread team shares (blocks.shared_nest), if any


def choose_block(machine: Machine, dtype: DType, row_extent: int | None,
                 vector_extent: int, fresh_operands: bool = False) -> tuple[Block, float]:
    """The block with the best estimated FMA-unit use, and that estimate.

    Per reduction step a block issues rows·vectors FMAs and rows + vectors loads. Its cycles
    are bounded by the FMA units, the load ports and the FMA latency of each accumulator's
    chain; lanes beyond the vector extent and the smaller tail block cost their share.
    Between blocks of the same estimate the one with more accumulators wins: they hide a
    longer FMA latency than the model's (5 cycles on Zen 2) at no cost while they fit.

    `fresh_operands`: each reduction step loads all its operands anew (no tap loop inside
    the step's loop lets LLVM keep input values for neighbouring taps), so nothing else
    stays live and a block of several rows may take every register but its vector loads,
    one broadcast and one spare, with no more rows than half the registers: each row
    broadcasts from a row of its own (a sample, a tile), and taller blocks of one vector
    measured slower (LeNet-5's 84-unit dense layer at batch 64, one thread: 13 x 1
    0.035 ms, 4 x 2 0.020 ms). `_fits` has the rule.
    """
    lanes = machine.lanes(dtype)
    budget = machine.registers - 2 if fresh_operands else machine.registers // 2
    best: tuple[float, int, Block] | None = None
    for vectors in range(1, budget + 1):
        if (vectors - 1) * lanes >= vector_extent:
            break
        for rows in range(1, budget // vectors + 1):
            if row_extent is not None and rows > row_extent:
                break  # no more rows than there are: the block would be its tail
            if not _fits(machine, rows, vectors, fresh_operands):
                continue
            block = Block(rows, vectors, lanes)
            score = _efficiency(block, row_extent, vector_extent)
            key = (round(score, 3), rows * vectors)
            if best is None or key > best[:2]:
                best = (key[0], key[1], block)
    assert best is not None
    return best[2], _efficiency(best[2], row_extent, vector_extent)


def _fits(machine: Machine, rows: int, vectors: int, fresh_operands: bool) -> bool:
    """Whether a block's accumulators leave the registers its steps need. Half the
    registers hold accumulators where LLVM unrolls short tap loops inside the step's loop
    and keeps the overlapping input values of neighbouring taps live in the other half
    (measured on W3 with 16 registers: 8 accumulators 62 GFLOP/s a core, 12 accumulators
    45, spills), and in a block of one row, which streams its vectors (ResNet-20's 1x1
    filter gradient of 64 channels at batch 64 on one thread: 0.44 ms with 7 vectors,
    0.28 ms with 8)."""
    if not fresh_operands or rows == 1:
        return rows * vectors <= machine.registers // 2
    return rows * vectors + vectors + 2 <= machine.registers and \
        rows <= machine.registers // 2


def _efficiency(block: Block, row_extent: int | None, vector_extent: int) -> float:
    rows_total = row_extent if row_extent is not None else 64 * block.rows  # batch: assume many
    full, tail = divmod(rows_total, block.rows)
    cycles = full * _step_cycles(block.rows, block.vectors) + \
        (_step_cycles(tail, block.vectors) if tail else 0)
    useful_lanes = vector_extent / (math.ceil(vector_extent / block.width) * block.width)
    ideal = rows_total * block.vectors / FMA_UNITS
    return useful_lanes * ideal / cycles


def _step_cycles(rows: int, vectors: int) -> float:
    return max(rows * vectors / FMA_UNITS, (rows + vectors) / LOADS_PER_CYCLE, FMA_LATENCY)


# Writing a block's results out, per output element, in cycles, where a correlation over
# output channels holds each output column's channels in one vector: its tile goes to the
# NCHW output an element at a time, where a block over output columns stores whole vectors
# of a row. First measured on a 2-core AVX-512 machine as 0.04 (MobileNetV2's 1x1
# expansions of 16 and 24 channels 2-4x faster over output columns, VGG's 3x3 convolutions
# of 3 channels slower), before the tile was stored a channel at a time. Measured again
# with the forward kernels one by one on a 2-core Zen 2 (AVX2), at 0.04, 0.2, 0.5 and 1.0:
# from 0.2 up the same kernels go over output columns, and each is faster there (MobileNetV2
# at b16: b2.expand 1.99 -> 1.18 ms, b4.expand 2.49 -> 1.61 ms; ResNet-20's stem at b64
# 1.25 -> 0.80 ms; vgg_small's first layer 2.09 -> 1.53 ms), none slower.
SCATTER_CYCLES = 0.25


def with_output_cost(score: float, reduction: int, lanes: int, scalar: bool) -> float:
    """`score` (the block's FMA-unit use) with the time of writing its outputs counted,
    `scalar`: an element at a time. It decides between the two correlations where the
    reduction is short: 24 FMAs an output element are 0.75 cycles of two 16-lane units."""
    if not scalar:  # whole vectors: stored as the accumulators are, counted in `score`
        return score
    fma_cycles = reduction / (lanes * FMA_UNITS) / max(score, 1e-9)
    return score * fma_cycles / (fma_cycles + SCATTER_CYCLES)


def splits_stride_phases(stride: tuple[int, int], dilation: tuple[int, int], groups: int,
                         kernel: tuple[int, int]) -> bool:
    """Whether a strided forward correlation runs over the input's stride phases instead of
    reading the padded input S apart. The phases cost no more arithmetic and no more loads
    per step (a block of R columns reads R + K − 1 values a row of K taps either way); what
    changes is where the loads go. Each phase plane is dense and rows outermost (a row's
    channels lie together, so the channel loop walks forward through a few KiB instead of a
    whole plane apart), and one sample's planes, the size of its input, are filled in the
    batch loop and still in L2 when the blocks read them. That pays for the copy only where
    a strided axis has more taps than its stride, so that neighbouring outputs share input
    rows or columns: a 1x1 kernel of stride 2 reads each input once, straight from the
    unpadded input (ResNet-20's projections: 0.19 ms unsplit, 0.21 split). A dilated axis
    has no dense phases; grouped layers keep their per-group blocks."""
    return groups == 1 and dilation == (1, 1) and \
        any(s > 1 and k > s for k, s in zip(kernel, stride, strict=True))


# A filter-gradient pass loads and stores its accumulators once; with this many steps of
# the reduction (output positions) or more, that costs a few percent.
PASS_MIN_STEPS = 32


def filter_tile_rows(machine: Machine, itemsize: int, out_width: int, delta_channels: int,
                     in_width: int, stride: int, kernel_height: int) -> int:
    """Output rows a filter-gradient tile covers. Every input channel and every block of
    taps reads the tile's δ rows again, so they should stay in L1, not L2: read from L2 at
    each pass, W3's filter gradient (64 channels, 56 x 56) was bound by L2's bandwidth
    (10 rows a tile: 40.9 ms at batch 8 on one thread, 1 row: 27.0 ms). A pass reads one
    channel block of each position's δ, a line a whole δ row of channels apart, so those
    lines fall in a fraction of L1's sets as small as the block's share of the channels:
    the tile's δ rows of all `delta_channels`, and the rows one input channel reads,
    should fit half of L1. A tile has at least PASS_MIN_STEPS positions all the same: the
    late layers of MobileNetV2 have 4 x 4 planes of up to 960 channels, whose δ rows never
    fit, and a pass of 4 positions would spend more on its accumulators than on its FMAs."""
    best = 1
    for rows in range(1, 65):
        delta = rows * out_width * delta_channels * itemsize
        source = ((rows - 1) * stride + kernel_height) * in_width * itemsize
        if delta + source > machine.l1_bytes // 2:
            break
        best = rows
    return max(best, math.ceil(PASS_MIN_STEPS / out_width))


def explain(schedules: list[Schedule], machine: Machine) -> str:
    """`--explain-schedule`: per kernel, the schedule and the numbers behind it."""
    lines = [f"machine: {machine.vector_bits}-bit vectors, {machine.registers} vector "
             f"registers, L1d {machine.l1_bytes // 1024} KiB, L2 {machine.l2_bytes // 1024} "
             f"KiB; cost model: {FMA_UNITS} FMA units, latency {FMA_LATENCY}"
             + ("" if machine.winograd else "; Winograd off (--no-winograd)")]
    for s in schedules:
        b = s.block
        rows = "N (the batch)" if s.row_extent is None else str(s.row_extent)
        lines.append(f"{s.kernel}: {s.pattern}")
        lines.append(f"  register block {b.rows} x {b.vectors} vectors of {b.lanes} "
                     f"({b.rows * b.vectors} accumulators): {b.rows} {s.row_axis}s x "
                     f"{b.width} {s.vector_axis}s")
        tail = (s.row_extent or 0) % b.rows
        lines.append(f"  {s.row_axis}s {rows} in blocks of {b.rows}"
                     + (f" and one of {tail}" if tail else "")
                     + f"; {s.vector_axis}s {s.vector_extent} in blocks of {b.width}"
                     + (f" ({math.ceil(s.vector_extent / b.width) * b.width - s.vector_extent}"
                        " zero lanes)" if s.vector_extent % b.width else ""))
        lines.append(f"  reduction loops (kept as loops): {', '.join(s.reduction)}")
        if s.packed:
            lines.append(f"  repacked: {', '.join(s.packed)}")
        if s.tile_rows:
            lines.append(f"  cache tile: {s.tile_rows} output rows per pass "
                         "(their δ fits half of L1)")
        # a kernel of adds and loads (batch norm's) has no FMA estimate, only its reason
        lines.append(f"  estimated FMA use {s.efficiency:.0%}; {s.reason}" if s.efficiency
                     else f"  {s.reason}")
        if s.fused:
            lines.append(f"  fused: {s.fused}")
        lines.append("  parallel: the batch is split across threads by the runtime" + (
            f"; a call run in one piece (a batch too small to split, a training call with "
            f"batch norm) shares its {s.shared} among the threads" if s.shared else ""))
    return "\n".join(lines) + "\n"


# Below this many FLOPs in one parallel region (about 20 microseconds on one core), a
# thread team's hand-off (publishing the loop, an atomic counter per chunk, the wait for
# the helpers to finish: a few microseconds) costs about what a second core saves.
# Measured on this 2-core machine, thresholds of 16 M, 4 M, 1 M and 0.25 M FLOPs, medians
# of 25 calls, two to three runs each: MobileNetV2 at batch 1 5.8-7.4 ms at 16 M against
# 4.6-8.0 at 1 M, a ResNet-20 training step (batch norm: one piece) 319-342 ms against
# 276-324, ResNet-20 at batch 1 1.0-1.25 ms against 0.84-1.40 (within the noise).
PARALLEL_MIN_FLOPS = 1_000_000


def shares_sample(flops: float) -> bool:
    """Whether a kernel's loops over one sample's output blocks are parallel (run by the
    call's thread team, where it has one), given the FLOPs of one parallel region."""
    return flops >= PARALLEL_MIN_FLOPS
