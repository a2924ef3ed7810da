"""Kernel → loop IR: the plain, unscheduled loop nest of each kernel, one lowering a kernel
kind (the backward ops and optimizer updates are in `loops/lower_backward`)."""

from __future__ import annotations

import math

from cnnc.graph.ir import BATCH, DType, Op, Shape, Window
from cnnc.loops.build import add, const, extent_expr, guarded, loop_nest, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Buffer,
    Const,
    Expr,
    For,
    Load,
    Local,
    LoopFunction,
    Select,
    Store,
    Unary,
    UnaryOp,
    Var,
)
from cnnc.passes.fuse import Kernel, KernelKind, KernelProgram


def activate(op: Op | None, value: Expr, float_zero: Const) -> Expr:
    """The activation applied to a value; relu lets NaN through, as the reference does."""
    if op is None:
        return value
    if op is Op.RELU:
        return Select(Binary(BinOp.LT, value, float_zero), float_zero, value)
    if op is Op.SIGMOID:
        one = const(1.0)
        return Binary(BinOp.DIV, one, add(one, Unary(UnaryOp.EXP, Unary(UnaryOp.NEG, value))))
    if op is Op.TANH:
        return Unary(UnaryOp.TANH, value)
    raise AssertionError(f"{op} is not an elementwise activation")


def lower(program: KernelProgram) -> tuple[LoopFunction, ...]:
    """Every kernel as its plain, unscheduled loop nest."""
    return tuple(lower_kernel(k, program) for k in program.kernels)


def lower_kernel(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    from cnnc.loops.lower_backward import lower_grad

    if kernel.pool is not None:
        conv, pool = kernel.unfused()
        return fuse_batch_loops(lower_kernel(conv, program), lower_kernel(pool, program))

    lowerings = {KernelKind.CONV: _lower_conv, KernelKind.MAXPOOL: _lower_maxpool,
                 KernelKind.AVGPOOL: _lower_avgpool, KernelKind.DENSE: _lower_dense,
                 KernelKind.SOFTMAX: _lower_softmax, KernelKind.ACTIVATION: _lower_activation,
                 KernelKind.LOSS: lower_grad, KernelKind.GRAD: lower_grad}
    return lowerings[kernel.kind](kernel, program)


def _buffer(program: KernelProgram, name: str, is_output: bool = False,
            flat: bool = False) -> Buffer:
    """The storage tensor as this kernel sees it; `flat` views N x C x H x W as N x (C·H·W)."""
    tensor = program.tensor(name)
    shape = tensor.shape
    if flat:
        shape = (shape[0], math.prod(shape[1:]))
    return Buffer(name, shape, tensor.dtype, is_output)


def _source_index(out_var: str, kernel_var: str, stride: int, pad: int) -> Expr:
    """ih = oh·S + kh − P, written without the terms that are 0 or ×1."""
    position: Expr = Var(out_var) if stride == 1 else mul(Var(out_var), const(stride))
    position = add(position, Var(kernel_var))
    return Binary(BinOp.SUB, position, const(pad)) if pad else position


def _inside(window: Window, ih: Expr, iw: Expr, height: int, width: int) -> Expr | None:
    """The bounds test of a padded window position; None where no padding can be read."""
    tests = []
    for index, size, pad in ((ih, height, window.pad[0]), (iw, width, window.pad[1])):
        if pad:
            tests.append(Binary(BinOp.AND, Binary(BinOp.GE, index, const(0)),
                                Binary(BinOp.LT, index, const(size))))
    if not tests:
        return None
    return tests[0] if len(tests) == 1 else Binary(BinOp.AND, tests[0], tests[1])


def window_position(window: Window, height: int, width: int) -> tuple[Expr, Expr, Expr | None]:
    """(ih, iw, in-bounds test or None) of window position (kh, kw) of output (oh, ow), for
    an input of `height` x `width`: the same geometry forward and backward."""
    (sh, sw), (ph, pw) = window.stride, window.pad
    ih = _source_index("oh", "kh", sh, ph)
    iw = _source_index("ow", "kw", sw, pw)
    return ih, iw, _inside(window, ih, iw, height, width)


def _window_indices(kernel: Kernel, x_shape: Shape) -> tuple[Expr, Expr, Expr | None]:
    return window_position(kernel.window, x_shape[2], x_shape[3])


def _lower_conv(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    x, weight = (_buffer(program, n) for n in kernel.inputs[:2])
    out = _buffer(program, kernel.outputs[0], is_output=True)
    dtype = out.dtype
    zero = Const(0.0, True)
    ih, iw, inside = _window_indices(kernel, x.shape)
    product = mul(Load(x.name, (Var("n"), Var("c"), ih, iw)),
                  Load(weight.name, (Var("f"), Var("c"), Var("kh"), Var("kw"))))
    reduce = loop_nest(["c", "kh", "kw"], list(weight.shape[1:]),
                       guarded(inside, (Assign("acc", add(Var("acc"), product)),)))
    start = Load(kernel.inputs[2], (Var("f"),)) if kernel.has_bias else zero
    body = (Assign("acc", start), reduce,
            Store(out.name, (Var("n"), Var("f"), Var("oh"), Var("ow")),
                  activate(kernel.activation, Var("acc"), zero)))
    nest = loop_nest(["n", "f", "oh", "ow"], [extent_expr(d) for d in out.shape], body)
    buffers = (x, weight) + ((_buffer(program, kernel.inputs[2]),) if kernel.has_bias else ())
    return LoopFunction(kernel.name, (*buffers, out), (Local("acc", dtype),), (nest,))


def _lower_maxpool(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    """The first in-bounds position is always taken, later ones when larger or NaN; the
    value is the NaN-propagating maximum, which is the value at that position."""
    x = _buffer(program, kernel.inputs[0])
    out = _buffer(program, kernel.outputs[0], is_output=True)
    argmax = _buffer(program, kernel.outputs[1], is_output=True)
    ih, iw, inside = _window_indices(kernel, x.shape)
    value = Var("value")
    take = Binary(BinOp.OR, Binary(BinOp.OR, Binary(BinOp.LT, Var("index"), const(0)),
                               Binary(BinOp.GT, value, Var("best"))), Unary(UnaryOp.ISNAN, value))
    # selects, not a branch: which element wins is data, and mispredicted branches cost
    # more than the comparison
    visit = (Assign("value", Load(x.name, (Var("n"), Var("c"), ih, iw))),
             Assign("index", Select(take, add(mul(ih, const(x.shape[3])), iw), Var("index"))),
             Assign("best", Binary(BinOp.MAX, Var("best"), value)))
    window = loop_nest(["kh", "kw"], list(kernel.window.kernel), guarded(inside, visit))
    where = (Var("n"), Var("c"), Var("oh"), Var("ow"))
    body = (Assign("best", Const(-math.inf, True)), Assign("index", const(-1)), window,
            Store(out.name, where, Var("best")), Store(argmax.name, where, Var("index")))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in out.shape], body)
    locals_ = (Local("best", out.dtype), Local("value", out.dtype), Local("index", DType.I64))
    return LoopFunction(kernel.name, (x, out, argmax), locals_, (nest,))


def _lower_avgpool(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    x = _buffer(program, kernel.inputs[0])
    out = _buffer(program, kernel.outputs[0], is_output=True)
    ih, iw, inside = _window_indices(kernel, x.shape)
    accumulate = Assign("acc", add(Var("acc"), Load(x.name, (Var("n"), Var("c"), ih, iw))))
    window = loop_nest(["kh", "kw"], list(kernel.window.kernel), guarded(inside, (accumulate,)))
    area = Const(float(kernel.window.kernel[0] * kernel.window.kernel[1]), True)
    body = (Assign("acc", Const(0.0, True)), window,
            Store(out.name, (Var("n"), Var("c"), Var("oh"), Var("ow")),
                  Binary(BinOp.DIV, Var("acc"), area)))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in out.shape], body)
    return LoopFunction(kernel.name, (x, out), (Local("acc", out.dtype),), (nest,))


def _lower_dense(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    x = _buffer(program, kernel.inputs[0], flat=True)
    weight = _buffer(program, kernel.inputs[1])
    out = _buffer(program, kernel.outputs[0], is_output=True)
    zero = Const(0.0, True)
    product = mul(Load(x.name, (Var("n"), Var("k"))), Load(weight.name, (Var("u"), Var("k"))))
    reduce = For("k", const(x.shape[1]), (Assign("acc", add(Var("acc"), product)),))
    start = Load(kernel.inputs[2], (Var("u"),)) if kernel.has_bias else zero
    body = (Assign("acc", start), reduce,
            Store(out.name, (Var("n"), Var("u")), activate(kernel.activation, Var("acc"), zero)))
    nest = loop_nest(["n", "u"], [extent_expr(d) for d in out.shape], body)
    buffers = (x, weight) + ((_buffer(program, kernel.inputs[2]),) if kernel.has_bias else ())
    return LoopFunction(kernel.name, (*buffers, out), (Local("acc", out.dtype),), (nest,))


def _lower_softmax(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    """Subtract the row maximum before exp, so logits of ±1e4 cannot overflow."""
    x = _buffer(program, kernel.inputs[0], flat=True)  # a flatten's input may be N x C x H x W
    out = _buffer(program, kernel.outputs[0], is_output=True, flat=True)
    classes = const(x.shape[1])
    item = Load(x.name, (Var("n"), Var("k")))
    larger = Binary(BinOp.OR, Binary(BinOp.GT, item, Var("top")), Unary(UnaryOp.ISNAN, item))
    find_max = For("k", classes, (Assign("top", Select(larger, item, Var("top"))),))
    exponent = Unary(UnaryOp.EXP, Binary(BinOp.SUB, item, Var("top")))
    exponentiate = For("k", classes, (Store(out.name, (Var("n"), Var("k")), exponent),
                                      Assign("total", add(Var("total"),
                                                          Load(out.name, (Var("n"), Var("k")))))))
    normalise = For("k", classes, (Store(out.name, (Var("n"), Var("k")),
                                         Binary(BinOp.DIV, Load(out.name, (Var("n"), Var("k"))),
                                                Var("total"))),))
    body = (Assign("top", Const(-math.inf, True)), find_max, Assign("total", Const(0.0, True)),
            exponentiate, normalise)
    nest = For("n", Var(BATCH), body)
    return LoopFunction(kernel.name, (x, out),
                        (Local("top", out.dtype), Local("total", out.dtype)), (nest,))


def _lower_activation(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    x = _buffer(program, kernel.inputs[0], flat=True)
    out = _buffer(program, kernel.outputs[0], is_output=True, flat=True)
    where = (Var("n"), Var("i"))
    value = activate(kernel.activation, Load(x.name, where), Const(0.0, True))
    nest = loop_nest(["n", "i"], [Var(BATCH), x.shape[1]], (Store(out.name, where, value),))
    return LoopFunction(kernel.name, (x, out), (), (nest,))


def fuse_batch_loops(first: LoopFunction, second: LoopFunction) -> LoopFunction:
    """One function that runs `second` on each sample right after `first` made it.

    Both functions must end in their loop over the batch; whatever comes before it (packing,
    padding) runs first, once. Sample n of `first`'s output is still in cache when `second`
    reads it. Loop variables may repeat: the two loop nests run one after the other.
    """
    first_loop, second_loop = first.body[-1], second.body[-1]
    for loop in (first_loop, second_loop):
        assert isinstance(loop, For) and loop.var == "n" and loop.extent == Var(BATCH), \
            f"{first.name}: only functions that end in their batch loop can be fused"
    names = {b.name for b in first.buffers}
    known = {local.name: local for local in first.locals}
    for local in second.locals:
        assert known.get(local.name, local) == local, f"local {local.name} has two types"
    batch = For("n", Var(BATCH), first_loop.body + second_loop.body, first_loop.kind)
    return LoopFunction(
        first.name, first.buffers + tuple(b for b in second.buffers if b.name not in names),
        first.locals + tuple(lo for lo in second.locals if lo.name not in known),
        first.body[:-1] + second.body[:-1] + (batch,))
