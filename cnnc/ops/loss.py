"""The losses — cross-entropy of class scores against integer labels, and the mean squared
error — with the `loss` statement's options and their gradients.

Cross-entropy reads probabilities where the network ends in `-> softmax` (op cross_entropy),
and logits otherwise (op softmax_cross_entropy, which applies log-softmax itself as
z − max − log Σ exp(z − max), so no logit overflows and no probability is divided by).
Either is differentiated with respect to the scores before the softmax, in one step:
δ = (softmax − target) / N, with target the one-hot label, or with `label_smoothing=ε` the
label weighted 1 − ε + ε/K and every class ε/K (torch's CrossEntropyLoss: (1 − ε)·NLL plus
ε times the mean over the K classes of −log p).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnc.frontend.options import OptionSpec, fraction, positive_int, shape
from cnnc.graph.ir import BATCH, DType, Node, format_shape
from cnnc.loops.build import add, const, loop_nest, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Const,
    Expr,
    For,
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
from cnnc.ops import registry
from cnnc.ops.lowering import batch_float, flat, view
from cnnc.ops.registry import Fusion, LossDef, OpDef, ShapeContext, ShapeProblem
from cnnc.ops.softmax import row_max
from cnnc.ops.window import sample


@dataclass(frozen=True, slots=True)
class LossAttrs:
    """A target shape the program declared (`loss mse targets=10`), checked against the output."""

    declared: tuple[int, ...] | None = None

    def text(self) -> str:
        return "" if self.declared is None else f" declared={format_shape(self.declared, 'x')}"


@dataclass(frozen=True, slots=True)
class CrossEntropyAttrs:
    """A cross-entropy node (and its gradient's): the class count the program declared, if
    any, and the label smoothing ε (0: none, and then nothing is printed)."""

    declared: tuple[int, ...] | None = None
    label_smoothing: float = 0.0

    def text(self) -> str:
        shown = "" if self.declared is None else f" declared={format_shape(self.declared, 'x')}"
        return shown + (f" label_smoothing={self.label_smoothing!r}"
                        if self.label_smoothing else "")


def _check_declared(ctx: ShapeContext, loss: str, key: str) -> None:
    declared = ctx.node.attrs.declared
    if declared is not None and tuple(ctx.x[1:]) != declared:
        raise ShapeProblem(f"loss {loss} declares {key}={format_shape(declared, 'x')}, "
                           f"but the network output {ctx.sources[0]} gives {sample(ctx.x)}")


# -- cross-entropy, shared by both forms ----------------------------------------------------------

def _targets(labels: np.ndarray, classes: int, eps: float, dtype) -> np.ndarray:
    """The smoothed one-hot rows: ε/K everywhere, plus 1 − ε at the label."""
    target = np.full((labels.shape[0], classes), eps / classes, dtype=dtype)
    target[np.arange(labels.shape[0]), labels] += 1 - eps
    return target


def _target_weight(k: Expr, label: Expr, classes: int, eps: float) -> Expr:
    """Class k's weight in the smoothed one-hot row of `label` (exactly 1 or 0 without ε)."""
    hit, miss = (1.0, 0.0) if eps == 0 else (1 - eps + eps / classes, eps / classes)
    return Select(Binary(BinOp.EQ, k, label), Const(hit, True), Const(miss, True))


def _smoothing_of(node: Node) -> CrossEntropyAttrs:
    """The attributes a cross-entropy node hands its gradient: its smoothing alone."""
    return CrossEntropyAttrs(label_smoothing=node.attrs.label_smoothing)


# -- cross_entropy: (probabilities, labels) -> mean of −Σ target · log p -----------------------

def _cross_entropy_shape(ctx: ShapeContext) -> dict:
    if len(ctx.x) != 2:
        raise ShapeProblem(f"loss cross_entropy needs class probabilities, but "
                           f"{ctx.sources[0]} gives {sample(ctx.x)}")
    _check_declared(ctx, "cross_entropy", "classes")
    return {ctx.node.output: (), ctx.node.inputs[1]: (BATCH,)}


def _cross_entropy(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x, labels = args
    eps = node.attrs.label_smoothing
    if eps == 0:
        picked = x[np.arange(x.shape[0]), labels]
        return np.asarray(-np.mean(np.log(picked)), dtype=x.dtype)
    target = _targets(labels, x.shape[1], eps, x.dtype)
    return np.asarray(-np.mean(np.sum(target * np.log(x), axis=1)), dtype=x.dtype)


def _cross_entropy_gradient(node: Node, dy: str | None, b) -> list[tuple[str, str]]:
    probabilities, labels = node.inputs
    softmax = b.graph.producer(probabilities)
    assert softmax is not None and softmax.op == "softmax", "irgen guarantees a softmax"
    logits = softmax.inputs[0]
    return [(logits, b.op("softmax_cross_entropy_grad", (probabilities, labels), logits,
                          node, _smoothing_of(node)))]


def _lower_cross_entropy(kernel, program) -> LoopFunction:
    """loss = −Σ log p[n, label[n]] / N (labels were checked to be in range); with smoothing
    −Σ_n Σ_k target[n, k] · log p[n, k] / N, one sum over (n, k) as well."""
    p, labels = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    loss = view(program, kernel.outputs[0], is_output=True)
    eps = kernel.node.attrs.label_smoothing
    label = Load(labels.name, (Var("n"),))
    if eps == 0:
        picked = Load(p.name, (Var("n"), label))
        term = Assign("acc", add(Var("acc"), Unary(UnaryOp.LOG, picked)))
        total: Stmt = For("n", Var(BATCH), (term,))
    else:
        log_p = Unary(UnaryOp.LOG, Load(p.name, (Var("n"), Var("k"))))
        weight = _target_weight(Var("k"), label, p.shape[1], eps)
        total = loop_nest(["n", "k"], [Var(BATCH), p.shape[1]],
                          (Assign("acc", add(Var("acc"), mul(weight, log_p))),))
    body = (Assign("acc", Const(0.0, True)), total,
            Store(loss.name, (const(0),), Binary(BinOp.DIV, Unary(UnaryOp.NEG, Var("acc")),
                                                 batch_float())))
    return LoopFunction(kernel.name, (p, labels, loss), (Local("acc", loss.dtype),), body)


def _softmax_cross_entropy_grad(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    p, labels = args
    target = _targets(labels, p.shape[1], node.attrs.label_smoothing, p.dtype)
    return (p - target) / p.shape[0]


def _lower_softmax_cross_entropy_grad(kernel, program) -> LoopFunction:
    """δ = (p − target(label)) / N."""
    p, labels = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dz = flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("k"))
    target = _target_weight(Var("k"), Load(labels.name, (Var("n"),)), p.shape[1],
                            kernel.node.attrs.label_smoothing)
    value = Binary(BinOp.DIV, Binary(BinOp.SUB, Load(p.name, where), target), batch_float())
    nest = loop_nest(["n", "k"], [Var(BATCH), p.shape[1]], (Store(dz.name, where, value),))
    return LoopFunction(kernel.name, (p, labels, dz), (), (nest,))


# -- softmax_cross_entropy: (logits, labels) -> mean of −Σ target · log softmax(z) --------------

def _logits_shape(ctx: ShapeContext) -> dict:
    if len(ctx.x) != 2:
        raise ShapeProblem(f"loss cross_entropy needs a vector of class scores, but "
                           f"{ctx.sources[0]} gives {sample(ctx.x)}; add a dense layer before it")
    _check_declared(ctx, "cross_entropy", "classes")
    return {ctx.node.output: (), ctx.node.inputs[1]: (BATCH,)}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _softmax_cross_entropy(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    z, labels = args
    target = _targets(labels, z.shape[1], node.attrs.label_smoothing, z.dtype)
    return np.asarray(-np.mean(np.sum(target * _log_softmax(z), axis=1)), dtype=z.dtype)


def _softmax_cross_entropy_gradient(node: Node, dy: str | None, b) -> list[tuple[str, str]]:
    logits, labels = node.inputs
    return [(logits, b.op("softmax_cross_entropy_logits_grad", (logits, labels), logits, node,
                          _smoothing_of(node)))]


def _exp_sum(z: str, classes: Expr) -> tuple[Stmt, ...]:
    """total = Σ_k exp(z[n, k] − top): the softmax's denominator, scaled by exp(−top)."""
    exponent = Unary(UnaryOp.EXP, Binary(BinOp.SUB, Load(z, (Var("n"), Var("k"))), Var("top")))
    return (Assign("total", Const(0.0, True)),
            For("k", classes, (Assign("total", add(Var("total"), exponent)),)))


def _sample_loss(z: str, label: Expr, classes: int, eps: float) -> tuple[tuple[Stmt, ...], Expr]:
    """Statements and the value of sample n's −Σ_k target[k] · log softmax(z)[k], which is
    log(total) + Σ_k target[k] · (top − z[k]) since the targets sum to 1."""
    if eps == 0:
        return (), add(Binary(BinOp.SUB, Var("top"), Load(z, (Var("n"), label))),
                       Unary(UnaryOp.LOG, Var("total")))
    gap = Binary(BinOp.SUB, Var("top"), Load(z, (Var("n"), Var("k"))))
    weighted = mul(_target_weight(Var("k"), label, classes, eps), gap)
    cross = (Assign("cross", Const(0.0, True)),
             For("k", const(classes), (Assign("cross", add(Var("cross"), weighted)),)))
    return cross, add(Var("cross"), Unary(UnaryOp.LOG, Var("total")))


def _lower_softmax_cross_entropy(kernel, program) -> LoopFunction:
    """loss = Σ_n (log Σ_k exp(z − top) + Σ_k target · (top − z)) / N, top the row's maximum:
    exp never overflows, and a very wrong logit gives a large finite loss, not inf."""
    z, labels = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    loss = view(program, kernel.outputs[0], is_output=True)
    classes = z.shape[1]
    eps = kernel.node.attrs.label_smoothing
    cross, value = _sample_loss(z.name, Load(labels.name, (Var("n"),)), classes, eps)
    sample_body = (*row_max(z.name, const(classes)), *_exp_sum(z.name, const(classes)), *cross,
                   Assign("acc", add(Var("acc"), value)))
    body = (Assign("acc", Const(0.0, True)), For("n", Var(BATCH), sample_body),
            Store(loss.name, (const(0),), Binary(BinOp.DIV, Var("acc"), batch_float())))
    scalars = ("acc", "top", "total") + (("cross",) if cross else ())
    return LoopFunction(kernel.name, (z, labels, loss),
                        tuple(Local(name, loss.dtype) for name in scalars), body)


def _softmax_cross_entropy_logits_grad(node: Node, args: list[np.ndarray], shape,
                                       mode) -> np.ndarray:
    z, labels = args
    target = _targets(labels, z.shape[1], node.attrs.label_smoothing, z.dtype)
    return (np.exp(_log_softmax(z)) - target) / z.shape[0]


def _lower_softmax_cross_entropy_logits_grad(kernel, program) -> LoopFunction:
    """δ = (exp(z − top) / total − target(label)) / N, a row at a time."""
    z, labels = flat(program, kernel.inputs[0]), view(program, kernel.inputs[1])
    dz = flat(program, kernel.outputs[0], is_output=True)
    classes, where = z.shape[1], (Var("n"), Var("k"))
    p = Binary(BinOp.DIV, Unary(UnaryOp.EXP, Binary(BinOp.SUB, Load(z.name, where), Var("top"))),
               Var("total"))
    weight = _target_weight(Var("k"), Load(labels.name, (Var("n"),)), classes,
                            kernel.node.attrs.label_smoothing)
    value = Binary(BinOp.DIV, Binary(BinOp.SUB, p, weight), batch_float())
    body = (*row_max(z.name, const(classes)), *_exp_sum(z.name, const(classes)),
            For("k", const(classes), (Store(dz.name, where, value),)))
    return LoopFunction(kernel.name, (z, labels, dz),
                        (Local("top", dz.dtype), Local("total", dz.dtype)),
                        (For("n", Var(BATCH), body),))


# -- mse: (y, targets) -> mean of (y − t)² ------------------------------------------------------

def _mse_shape(ctx: ShapeContext) -> dict:
    _check_declared(ctx, "mse", "targets")
    return {ctx.node.output: (), ctx.node.inputs[1]: ctx.x}


def _mse(node: Node, args: list[np.ndarray], shape, mode) -> np.ndarray:
    x, targets = args
    return np.asarray(np.mean((x - targets) ** 2), dtype=x.dtype)


def _mse_gradient(node: Node, dy: str | None, b) -> list[tuple[str, str]]:
    y, targets = node.inputs
    return [(y, b.op("mse_grad", (y, targets), y, node))]


def _mse_size(y) -> object:
    return mul(batch_float(), Const(float(y.shape[1]), True))


def _lower_mse(kernel, program) -> LoopFunction:
    y, t = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    loss = view(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("i"))
    difference = Binary(BinOp.SUB, Load(y.name, where), Load(t.name, where))
    total = loop_nest(["n", "i"], [Var(BATCH), y.shape[1]],
                      (Assign("acc", add(Var("acc"), mul(difference, difference))),))
    body = (Assign("acc", Const(0.0, True)), total,
            Store(loss.name, (const(0),), Binary(BinOp.DIV, Var("acc"), _mse_size(y))))
    return LoopFunction(kernel.name, (y, t, loss), (Local("acc", loss.dtype),), body)


def _lower_mse_grad(kernel, program) -> LoopFunction:
    y, t = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
    dy = flat(program, kernel.outputs[0], is_output=True)
    where = (Var("n"), Var("i"))
    value = Binary(BinOp.DIV, mul(Const(2.0, True), Binary(BinOp.SUB, Load(y.name, where),
                                                           Load(t.name, where))), _mse_size(y))
    nest = loop_nest(["n", "i"], [Var(BATCH), y.shape[1]], (Store(dy.name, where, value),))
    return LoopFunction(kernel.name, (y, t, dy), (), (nest,))


registry.register_loss(LossDef(
    "cross_entropy", {"classes": OptionSpec(positive_int, None),
                      "label_smoothing": OptionSpec(fraction, 0.0)}, "loss.labels", DType.I64,
    lambda values: CrossEntropyAttrs(
        None if values["classes"] is None else (values["classes"],),
        float(values["label_smoothing"])),
    needs_output="softmax", logits_op="softmax_cross_entropy"))
registry.register_loss(LossDef(
    "mse", {"targets": OptionSpec(shape, None)}, "loss.targets", None,
    lambda values: LossAttrs(values["targets"])))
registry.register(OpDef(
    "cross_entropy", "mean over the batch of −Σ target · log p, of probabilities p",
    inputs=("p", "labels"),
    shape=_cross_entropy_shape, reference=_cross_entropy, gradient=_cross_entropy_gradient,
    fusion=Fusion.ALONE, lower=_lower_cross_entropy,
    example="input: 6\ndense d: 4 -> softmax\nloss cross_entropy"))
registry.register(OpDef(
    "softmax_cross_entropy_grad", "(p, labels) -> (p − target) / N", inputs=("p", "labels"),
    shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_softmax_cross_entropy_grad, lower=_lower_softmax_cross_entropy_grad))
registry.register(OpDef(
    "softmax_cross_entropy", "mean over the batch of −Σ target · log softmax(z), of logits z",
    inputs=("z", "labels"), shape=_logits_shape, reference=_softmax_cross_entropy,
    gradient=_softmax_cross_entropy_gradient, fusion=Fusion.ALONE,
    lower=_lower_softmax_cross_entropy,
    example="input: 6\ndense d: 4\nloss cross_entropy label_smoothing=0.1"))
registry.register(OpDef(
    "softmax_cross_entropy_logits_grad", "(z, labels) -> (softmax(z) − target) / N",
    inputs=("z", "labels"), shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_softmax_cross_entropy_logits_grad,
    lower=_lower_softmax_cross_entropy_logits_grad))
registry.register(OpDef(
    "mse", "mean over all elements of (y − t)²", inputs=("y", "targets"), shape=_mse_shape,
    reference=_mse, gradient=_mse_gradient, fusion=Fusion.ALONE, lower=_lower_mse,
    example="input: 2x2x2\nconv c: 3 1x1\nloss mse"))
registry.register(OpDef(
    "mse_grad", "(y, t) -> 2 (y − t) / size", inputs=("y", "t"), shape=lambda ctx: {},
    differentiable=False, fusion=Fusion.ALONE,
    reference=lambda node, args, shape, mode: 2 * (args[0] - args[1]) / args[0].size,
    lower=_lower_mse_grad))
