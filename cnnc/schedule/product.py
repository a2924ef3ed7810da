"""The matrix-product pattern: out[m, j] = act(bias + Σ_k A[m, k] · B[k, j]) for dense
layers and their gradients, vectorized over j with B repacked and zero-padded to whole
vectors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from cnnc.graph.ir import BATCH
from cnnc.graph.kernels import Kernel, KernelProgram
from cnnc.loops.build import add, const, extent_expr, loop_nest, mul
from cnnc.loops.ir import (
    Binary,
    BinOp,
    Expr,
    For,
    If,
    Load,
    Store,
    Var,
    VecLoad,
)
from cnnc.ops.lowering import flat, view
from cnnc.schedule.blocks import (
    ZERO,
    BlockCode,
    Function,
    Lowered,
    block_reason,
    pack_blocked,
    row_tiles,
    tile_buffer,
    tile_scatter,
    tile_store,
)
from cnnc.schedule.cost import Block, Machine, Schedule, choose_block


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
    activation: str | None = None
    activation_attrs: object = None
    b_runs_along_k: bool = False  # b's source is contiguous along k (else along j)


def _matrix_product(f: Function, p: _Product, block: Block) -> None:
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
        bias = pack_blocked(f, "bias", [], p.columns, width,
                             lambda ch, o: Load(p.bias, (ch,)))

    tile = tile_buffer(f, block)

    def code_at(first_row: Expr) -> BlockCode:
        def init(r: int, v: int) -> Expr:
            if bias is None:
                return ZERO
            return VecLoad(bias, (Var("jb"), const(v * block.lanes)), block.lanes)

        return BlockCode(
            reduction=(("k", depth),),
            broadcast=lambda r: p.a(add(first_row, const(r)), Var("k")),
            vector=lambda v: VecLoad(packed, b_at(Var("k"), Var("jb"), const(v * block.lanes)),
                                     block.lanes),
            finish=tile_store(tile, block, p.activation, p.activation_attrs),
            epilogue=tile_scatter(tile, p.out, lambda r, j: (add(first_row, r), j),
                                   mul(Var("jb"), const(width)), p.columns, width, None),
            init=init)

    f.body.append(For("jb", const(blocks), row_tiles(f, "m", p.rows, block, code_at)))


def _lowered_product(kernel: Kernel, f: Function, p: _Product, machine: Machine,
                     axes: tuple[str, str, str]) -> Lowered:
    """Block choice, lowering and schedule of a product; `axes` names its rows, columns and
    reduction for --explain-schedule."""
    rows, columns, depth = axes
    block, score = choose_block(machine, f.dtype, p.rows, p.columns, fresh_operands=True)
    _matrix_product(f, p, block)
    schedule = Schedule(kernel.name, "matrix product", block, rows, p.rows, columns, p.columns,
                        (depth,), (f"B as [{columns} blocks, {depth}, {block.width} lanes]",),
                        efficiency=score, reason=block_reason(block, p.rows, p.columns))
    return Lowered(f.finished(), tuple(f.scratch), schedule)


def dense_forward(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    x = flat(program, kernel.inputs[0])
    weight = view(program, kernel.inputs[1])
    out = view(program, kernel.outputs[0], is_output=True)
    f = Function(kernel.name, out.dtype, [x, weight], [], [], [])
    if kernel.has_bias:
        f.buffers.append(view(program, kernel.inputs[2]))
    f.buffers.append(out)
    units, features = weight.shape
    p = _Product(None, units, features, lambda m, k: Load(x.name, (m, k)),
                 lambda k, j: Load(weight.name, (j, k)), out.name,
                 kernel.inputs[2] if kernel.has_bias else None, kernel.activation,
                 kernel.activation_attrs, b_runs_along_k=True)
    return _lowered_product(kernel, f, p, machine, ("sample", "unit", "input feature"))


def dense_grad_input(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    dy, weight = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dx = flat(program, kernel.outputs[0], is_output=True)
    f = Function(kernel.name, dx.dtype, [dy, weight, dx], [], [], [])
    units, features = weight.shape
    p = _Product(None, features, units, lambda m, k: Load(dy.name, (m, k)),
                 lambda k, j: Load(weight.name, (k, j)), dx.name)
    return _lowered_product(kernel, f, p, machine, ("sample", "input feature", "unit"))


def dense_grad_weight(kernel: Kernel, program: KernelProgram, machine: Machine) -> Lowered:
    x, dy = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dw = view(program, kernel.outputs[0], is_output=True)
    f = Function(kernel.name, dw.dtype, [x, dy, dw], [], [], [])
    units, features = dw.shape
    p = _Product(units, features, None, lambda m, k: Load(dy.name, (k, m)),
                 lambda k, j: Load(x.name, (k, j)), dw.name)
    return _lowered_product(kernel, f, p, machine, ("unit", "input feature", "sample"))
