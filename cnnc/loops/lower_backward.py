"""Loop IR of the loss, of each backward op, and of the optimizer updates.

Backward convolution is written as a gather: each input position sums the δ values whose
windows covered it, found with the divisibility test (ih + P − kh) mod S = 0, so no dilated
δ is ever materialised. Max pooling's backward scatters δ to the recorded argmax.
"""

from __future__ import annotations

import math

from cnnc.graph.ir import BATCH, Op
from cnnc.loops.build import add, const, extent_expr, guarded, loop_nest, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Buffer,
    Const,
    Expr,
    For,
    If,
    Load,
    Local,
    LoopFunction,
    Select,
    Stmt,
    Store,
    Unary,
    UnaryOp,
    Var,
)
from cnnc.loops.lower import window_position
from cnnc.passes.fuse import Kernel, KernelProgram


def view(program: KernelProgram, name: str, shape: tuple | None = None,
         is_output: bool = False) -> Buffer:
    """Graph tensor `name` as a buffer: its storage, seen with `shape` (default: its own)."""
    tensor = program.graph.tensor(name)
    return Buffer(program.storage_of(name), tuple(shape or tensor.shape) or (1,), tensor.dtype,
                  is_output)


def flat(program: KernelProgram, name: str, is_output: bool = False) -> Buffer:
    shape = program.graph.tensor(name).shape
    return view(program, name, (shape[0], math.prod(shape[1:])), is_output)


def _batch_float() -> Expr:
    return Unary(UnaryOp.FLOAT, Var(BATCH))


def _zero_fill(buffer: Buffer) -> Stmt:
    names = [f"z{axis}" for axis in range(len(buffer.shape))]
    return loop_nest(names, [extent_expr(d) for d in buffer.shape],
                     (Store(buffer.name, tuple(Var(n) for n in names), Const(0.0, True)),))


def lower_grad(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    node = kernel.node
    lowerings = {
        Op.CONV2D_GRAD_INPUT: _conv_grad_input, Op.CONV2D_GRAD_WEIGHT: _conv_grad_weight,
        Op.BIAS_GRAD: _bias_grad, Op.DENSE_GRAD_INPUT: _dense_grad_input,
        Op.DENSE_GRAD_WEIGHT: _dense_grad_weight, Op.MAXPOOL2D_GRAD: _maxpool_grad,
        Op.AVGPOOL2D_GRAD: _avgpool_grad, Op.RELU_GRAD: _elementwise_grad,
        Op.SIGMOID_GRAD: _elementwise_grad, Op.TANH_GRAD: _elementwise_grad,
        Op.ADD: _elementwise_grad, Op.SOFTMAX_GRAD: _softmax_grad,
        Op.SOFTMAX_CROSS_ENTROPY_GRAD: _softmax_cross_entropy_grad, Op.MSE_GRAD: _mse_grad,
        Op.CROSS_ENTROPY: _cross_entropy_loss, Op.MSE: _mse_loss,
    }
    return lowerings[node.op](kernel, program)


def _conv_grad_input(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    dy_name, w_name = kernel.inputs
    dy, weight = view(program, dy_name), view(program, w_name)
    dx = view(program, kernel.outputs[0], is_output=True)
    window = kernel.node.attrs.window
    (sh, sw), (ph, pw) = window.stride, window.pad
    th = Binary(BinOp.SUB, add(Var("ih"), const(ph)), Var("kh"))
    tw = Binary(BinOp.SUB, add(Var("iw"), const(pw)), Var("kw"))
    oh, ow = Binary(BinOp.FLOOR_DIV, th, const(sh)), Binary(BinOp.FLOOR_DIV, tw, const(sw))
    conditions = [Binary(BinOp.GE, th, const(0)), Binary(BinOp.GE, tw, const(0)),
                  Binary(BinOp.LT, oh, const(dy.shape[2])),
                  Binary(BinOp.LT, ow, const(dy.shape[3]))]
    if sh > 1:
        conditions.append(Binary(BinOp.EQ, Binary(BinOp.MOD, th, const(sh)), const(0)))
    if sw > 1:
        conditions.append(Binary(BinOp.EQ, Binary(BinOp.MOD, tw, const(sw)), const(0)))
    covered = conditions[0]
    for condition in conditions[1:]:
        covered = Binary(BinOp.AND, covered, condition)
    term = mul(Load(dy.name, (Var("n"), Var("f"), oh, ow)),
               Load(weight.name, (Var("f"), Var("c"), Var("kh"), Var("kw"))))
    gather = loop_nest(["f", "kh", "kw"], list(weight.shape[:1]) + list(window.kernel),
                       (If(covered, (Assign("acc", add(Var("acc"), term)),)),))
    body = (Assign("acc", Const(0.0, True)), gather,
            Store(dx.name, (Var("n"), Var("c"), Var("ih"), Var("iw")), Var("acc")))
    nest = loop_nest(["n", "c", "ih", "iw"], [extent_expr(d) for d in dx.shape], body)
    return LoopFunction(kernel.name, (dy, weight, dx), (Local("acc", dx.dtype),), (nest,))


def _conv_grad_weight(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    x_name, dy_name = kernel.inputs
    x, dy = view(program, x_name), view(program, dy_name)
    dw = view(program, kernel.outputs[0], is_output=True)
    ih, iw, inside = window_position(kernel.node.attrs.window, x.shape[2], x.shape[3])
    term = mul(Load(dy.name, (Var("n"), Var("f"), Var("oh"), Var("ow"))),
               Load(x.name, (Var("n"), Var("c"), ih, iw)))
    reduce = loop_nest(["n", "oh", "ow"], [Var(BATCH), dy.shape[2], dy.shape[3]],
                       guarded(inside, (Assign("acc", add(Var("acc"), term)),)))
    body = (Assign("acc", Const(0.0, True)), reduce,
            Store(dw.name, (Var("f"), Var("c"), Var("kh"), Var("kw")), Var("acc")))
    nest = loop_nest(["f", "c", "kh", "kw"], list(dw.shape), body)
    return LoopFunction(kernel.name, (x, dy, dw), (Local("acc", dw.dtype),), (nest,))


def _bias_grad(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    """db[f] = Σ over the batch and every position of dy[n, f, ...]."""
    shape = program.graph.tensor(kernel.inputs[0]).shape
    dy = view(program, kernel.inputs[0], (shape[0], shape[1], math.prod(shape[2:])))
    db = view(program, kernel.outputs[0], is_output=True)
    reduce = loop_nest(["n", "s"], [Var(BATCH), dy.shape[2]],
                       (Assign("acc", add(Var("acc"),
                                          Load(dy.name, (Var("n"), Var("f"), Var("s"))))),))
    body = (Assign("acc", Const(0.0, True)), reduce, Store(db.name, (Var("f"),), Var("acc")))
    return LoopFunction(kernel.name, (dy, db), (Local("acc", db.dtype),),
                        (For("f", const(shape[1]), body),))


def _dense_grad_input(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    dy, weight = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dx = flat(program, kernel.outputs[0], is_output=True)
    term = mul(Load(dy.name, (Var("n"), Var("u"))), Load(weight.name, (Var("u"), Var("k"))))
    body = (Assign("acc", Const(0.0, True)),
            For("u", const(weight.shape[0]), (Assign("acc", add(Var("acc"), term)),)),
            Store(dx.name, (Var("n"), Var("k")), Var("acc")))
    nest = loop_nest(["n", "k"], [Var(BATCH), dx.shape[1]], body)
    return LoopFunction(kernel.name, (dy, weight, dx), (Local("acc", dx.dtype),), (nest,))


def _dense_grad_weight(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    x, dy = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dw = view(program, kernel.outputs[0], is_output=True)
    term = mul(Load(dy.name, (Var("n"), Var("u"))), Load(x.name, (Var("n"), Var("k"))))
    body = (Assign("acc", Const(0.0, True)),
            For("n", Var(BATCH), (Assign("acc", add(Var("acc"), term)),)),
            Store(dw.name, (Var("u"), Var("k")), Var("acc")))
    nest = loop_nest(["u", "k"], list(dw.shape), body)
    return LoopFunction(kernel.name, (x, dy, dw), (Local("acc", dw.dtype),), (nest,))


def _maxpool_grad(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    """dx = 0, then each δ added at its window's argmax (overlapping windows accumulate)."""
    dy, argmax = view(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    out_shape = program.graph.tensor(kernel.outputs[0]).shape
    dx = view(program, kernel.outputs[0], (out_shape[0], out_shape[1],
                                           out_shape[2] * out_shape[3]), is_output=True)
    where = (Var("n"), Var("c"), Var("oh"), Var("ow"))
    target = (Var("n"), Var("c"), Load(argmax.name, where))
    scatter = Store(dx.name, target, add(Load(dx.name, target), Load(dy.name, where)))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in dy.shape], (scatter,))
    return LoopFunction(kernel.name, (dy, argmax, dx), (), (_zero_fill(dx), nest))


def _avgpool_grad(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    dy = view(program, kernel.inputs[0])
    dx = view(program, kernel.outputs[0], is_output=True)
    window = kernel.node.attrs.window
    ih, iw, inside = window_position(window, dx.shape[2], dx.shape[3])
    area = Const(float(window.kernel[0] * window.kernel[1]), True)
    target = (Var("n"), Var("c"), ih, iw)
    share = Binary(BinOp.DIV, Load(dy.name, (Var("n"), Var("c"), Var("oh"), Var("ow"))), area)
    accumulate = Store(dx.name, target, add(Load(dx.name, target), share))
    spread = loop_nest(["kh", "kw"], list(window.kernel), guarded(inside, (accumulate,)))
    nest = loop_nest(["n", "c", "oh", "ow"], [extent_expr(d) for d in dy.shape], (spread,))
    return LoopFunction(kernel.name, (dy, dx), (), (_zero_fill(dx), nest))


def _elementwise_grad(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    first, second = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    dx = flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("i"))
    dy, y = Load(first.name, where), Load(second.name, where)
    one = Const(1.0, True)
    value = {
        Op.RELU_GRAD: Select(Binary(BinOp.GT, y, Const(0.0, True)), dy, Const(0.0, True)),
        Op.SIGMOID_GRAD: mul(mul(dy, y), Binary(BinOp.SUB, one, y)),
        Op.TANH_GRAD: mul(dy, Binary(BinOp.SUB, one, mul(y, y))),
        Op.ADD: add(dy, y),
    }[kernel.node.op]
    nest = loop_nest(["n", "i"], [Var(BATCH), dx.shape[1]], (Store(dx.name, where, value),))
    return LoopFunction(kernel.name, (first, second, dx), (), (nest,))


def _softmax_grad(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    dy, y = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    dx = flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("k"))
    classes = const(dy.shape[1])
    dot = For("k", classes, (Assign("dot", add(Var("dot"), mul(Load(dy.name, where),
                                                               Load(y.name, where)))),))
    scale = For("k", classes, (Store(dx.name, where, mul(Load(y.name, where), Binary(
        BinOp.SUB, Load(dy.name, where), Var("dot")))),))
    body = (Assign("dot", Const(0.0, True)), dot, scale)
    return LoopFunction(kernel.name, (dy, y, dx), (Local("dot", dx.dtype),),
                        (For("n", Var(BATCH), body),))


def _softmax_cross_entropy_grad(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    """δ = (p − onehot(label)) / N."""
    p, labels = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dz = flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("k"))
    hit = Select(Binary(BinOp.EQ, Var("k"), Load(labels.name, (Var("n"),))), Const(1.0, True),
                 Const(0.0, True))
    value = Binary(BinOp.DIV, Binary(BinOp.SUB, Load(p.name, where), hit), _batch_float())
    nest = loop_nest(["n", "k"], [Var(BATCH), p.shape[1]], (Store(dz.name, where, value),))
    return LoopFunction(kernel.name, (p, labels, dz), (), (nest,))


def _mse_grad(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    y, t = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    dy = flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("i"))
    size = mul(_batch_float(), Const(float(y.shape[1]), True))
    value = Binary(BinOp.DIV, mul(Const(2.0, True), Binary(BinOp.SUB, Load(y.name, where),
                                                     Load(t.name, where))), size)
    nest = loop_nest(["n", "i"], [Var(BATCH), y.shape[1]], (Store(dy.name, where, value),))
    return LoopFunction(kernel.name, (y, t, dy), (), (nest,))


def _cross_entropy_loss(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    """loss = −Σ log p[n, label[n]] / N (labels were checked to be in range)."""
    p, labels = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    loss = view(program, kernel.outputs[0], is_output=True)
    picked = Load(p.name, (Var("n"), Load(labels.name, (Var("n"),))))
    total = For("n", Var(BATCH), (Assign("acc", add(Var("acc"), Unary(UnaryOp.LOG, picked))),))
    body = (Assign("acc", Const(0.0, True)), total,
            Store(loss.name, (const(0),), Binary(BinOp.DIV, Unary(UnaryOp.NEG, Var("acc")),
                                                   _batch_float())))
    return LoopFunction(kernel.name, (p, labels, loss), (Local("acc", loss.dtype),), body)


def _mse_loss(kernel: Kernel, program: KernelProgram) -> LoopFunction:
    y, t = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    loss = view(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("i"))
    difference = Binary(BinOp.SUB, Load(y.name, where), Load(t.name, where))
    total = loop_nest(["n", "i"], [Var(BATCH), y.shape[1]],
                      (Assign("acc", add(Var("acc"), mul(difference, difference))),))
    size = mul(_batch_float(), Const(float(y.shape[1]), True))
    body = (Assign("acc", Const(0.0, True)), total,
            Store(loss.name, (const(0),), Binary(BinOp.DIV, Var("acc"), size)))
    return LoopFunction(kernel.name, (y, t, loss), (Local("acc", loss.dtype),), body)


# The optimizer's scalars, in this order, in a small buffer passed at every step.
HYPER_FIELDS = ("lr", "momentum", "beta1", "beta2", "eps", "correction1", "correction2")


def lower_update(name: str, optimizer: str, param: Buffer, grad: Buffer,
                 states: tuple[Buffer, ...], hyper: Buffer) -> LoopFunction:
    """One parameter's step, elementwise over flat views.

    sgd: v = μ·v + g; p = p − α·v (PyTorch's momentum form; μ = 0 is plain SGD).
    adam: m = β1·m + (1 − β1)·g; v = β2·v + (1 − β2)·g²; p = p − α·(m/c1) / (√(v/c2) + ε),
    with the bias corrections c1 = 1 − β1^t and c2 = 1 − β2^t computed by the caller.
    """
    def h(field: str) -> Expr:
        return Load(hyper.name, (const(HYPER_FIELDS.index(field)),))

    i = (Var("i"),)
    g, p = Load(grad.name, i), Load(param.name, i)
    one = Const(1.0, True)
    if optimizer == "sgd":
        velocity = states[0].name
        body: tuple[Stmt, ...] = (
            Store(velocity, i, add(mul(h("momentum"), Load(velocity, i)), g)),
            Store(param.name, i, Binary(BinOp.SUB, p, mul(h("lr"), Load(velocity, i)))))
    else:
        first, second = states[0].name, states[1].name
        m_hat = Binary(BinOp.DIV, Load(first, i), h("correction1"))
        v_hat = Binary(BinOp.DIV, Load(second, i), h("correction2"))
        body = (
            Store(first, i, add(mul(h("beta1"), Load(first, i)),
                                mul(Binary(BinOp.SUB, one, h("beta1")), g))),
            Store(second, i, add(mul(h("beta2"), Load(second, i)),
                                 mul(Binary(BinOp.SUB, one, h("beta2")), mul(g, g)))),
            Store(param.name, i, Binary(BinOp.SUB, p, Binary(
                BinOp.DIV, mul(h("lr"), m_hat), add(Unary(UnaryOp.SQRT, v_hat), h("eps"))))))
    nest = For("i", const(param.shape[0]), body)
    return LoopFunction(name, (param, grad, *states, hyper), (), (nest,))
