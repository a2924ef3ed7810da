"""The optimizers of the `train` line: the state each parameter keeps and one parameter's
update step as loop IR, elementwise over flat views, with torch.optim's semantics.

sgd: g' = g + λ·p; v = μ·v + g'; p = p − α·v, or with nesterov p = p − α·(g' + μ·v)
(PyTorch's momentum form; μ = 0 is plain SGD).
adam: g' = g + λ·p; m = β1·m + (1 − β1)·g'; v = β2·v + (1 − β2)·g'²;
p = p − α·(m/c1) / (√(v/c2) + ε), with the bias corrections c1 = 1 − β1^t and
c2 = 1 − β2^t computed by the runtime.
adamw: adam with decoupled weight decay: p = p − α·λ·p − α·(m/c1) / (√(v/c2) + ε), where the
moments are of g itself.

The weight decay λ and nesterov are constants of the code, each emitted only where it is
used: an update without them is the code it was before they existed.
"""

from __future__ import annotations

from typing import Any

from cnnc.frontend.options import (
    OptionSpec,
    boolean,
    fraction,
    non_negative_number,
    positive_number,
)
from cnnc.loops.build import add, const, mul
from cnnc.loops.ir import (
    Binary,
    BinOp,
    Buffer,
    Const,
    Expr,
    For,
    Load,
    LoopFunction,
    Stmt,
    Store,
    Unary,
    UnaryOp,
    Var,
)
from cnnc.ops import registry
from cnnc.ops.registry import HYPER_FIELDS, OptimizerDef


def _scalar(hyper: Buffer, field: str) -> Expr:
    return Load(hyper.name, (const(HYPER_FIELDS.index(field)),))


def _update(name: str, param: Buffer, grad: Buffer, states: tuple[Buffer, ...], hyper: Buffer,
            body: tuple[Stmt, ...]) -> LoopFunction:
    nest = For("i", const(param.shape[0]), body)
    return LoopFunction(name, (param, grad, *states, hyper), (), (nest,))


def _decayed(g: Expr, p: Expr, decay: float) -> Expr:
    """The L2 penalty's gradient added to the loss's, g + λ·p, as torch.optim's
    weight_decay; just g where λ is 0."""
    return g if decay == 0 else add(g, mul(Const(float(decay), True), p))


def _sgd(name: str, param: Buffer, grad: Buffer, states: tuple[Buffer, ...],
         hyper: Buffer, settings: dict[str, Any]) -> LoopFunction:
    i = (Var("i"),)
    p = Load(param.name, i)
    g = _decayed(Load(grad.name, i), p, settings.get("weight_decay", 0.0))
    velocity = states[0].name
    momentum = _scalar(hyper, "momentum")
    step: Expr = Load(velocity, i)  # the stored, new velocity
    if settings.get("nesterov", False):  # look ahead along the velocity: g' + μ·v
        step = add(g, mul(momentum, step))
    body = (Store(velocity, i, add(mul(momentum, Load(velocity, i)), g)),
            Store(param.name, i, Binary(BinOp.SUB, p, mul(_scalar(hyper, "lr"), step))))
    return _update(name, param, grad, states, hyper, body)


def _adam_body(param: Buffer, g: Expr, p: Expr, states: tuple[Buffer, ...],
               hyper: Buffer) -> tuple[Stmt, ...]:
    """The moments of `g`, then p = `p` − α·m̂ / (√v̂ + ε)."""
    def h(field: str) -> Expr:
        return _scalar(hyper, field)

    i = (Var("i"),)
    one = Const(1.0, True)
    first, second = states[0].name, states[1].name
    m_hat = Binary(BinOp.DIV, Load(first, i), h("correction1"))
    v_hat = Binary(BinOp.DIV, Load(second, i), h("correction2"))
    return (
        Store(first, i, add(mul(h("beta1"), Load(first, i)),
                            mul(Binary(BinOp.SUB, one, h("beta1")), g))),
        Store(second, i, add(mul(h("beta2"), Load(second, i)),
                             mul(Binary(BinOp.SUB, one, h("beta2")), mul(g, g)))),
        Store(param.name, i, Binary(BinOp.SUB, p, Binary(
            BinOp.DIV, mul(h("lr"), m_hat), add(Unary(UnaryOp.SQRT, v_hat), h("eps"))))))


def _adam(name: str, param: Buffer, grad: Buffer, states: tuple[Buffer, ...],
          hyper: Buffer, settings: dict[str, Any]) -> LoopFunction:
    i = (Var("i"),)
    p = Load(param.name, i)
    g = _decayed(Load(grad.name, i), p, settings.get("weight_decay", 0.0))
    return _update(name, param, grad, states, hyper, _adam_body(param, g, p, states, hyper))


def _adamw(name: str, param: Buffer, grad: Buffer, states: tuple[Buffer, ...],
           hyper: Buffer, settings: dict[str, Any]) -> LoopFunction:
    i = (Var("i"),)
    p: Expr = Load(param.name, i)
    decay = settings.get("weight_decay", ADAMW_DECAY)
    if decay != 0:  # p − α·λ·p first, as torch.optim.AdamW, whatever the moments say
        p = Binary(BinOp.SUB, p, mul(mul(_scalar(hyper, "lr"), Const(float(decay), True)), p))
    body = _adam_body(param, Load(grad.name, i), p, states, hyper)
    return _update(name, param, grad, states, hyper, body)


def _sgd_problem(values: dict[str, Any]) -> str | None:
    if values.get("nesterov") and values.get("momentum", 0.0) == 0:
        return ("train sgd: nesterov=true needs a momentum above 0 (Nesterov momentum "
                "looks ahead along the velocity); add e.g. momentum=0.9, or leave nesterov out")
    return None


WEIGHT_DECAY = OptionSpec(non_negative_number, 0.0)
ADAMW_DECAY = 0.01  # torch.optim.AdamW's default
SGD_OPTIONS = {"lr": OptionSpec(positive_number, 0.01), "momentum": OptionSpec(fraction, 0.0),
               "weight_decay": WEIGHT_DECAY, "nesterov": OptionSpec(boolean, False)}
ADAM_OPTIONS = {"lr": OptionSpec(positive_number, 0.001), "beta1": OptionSpec(fraction, 0.9),
                "beta2": OptionSpec(fraction, 0.999), "eps": OptionSpec(positive_number, 1e-8),
                "weight_decay": WEIGHT_DECAY}
ADAMW_OPTIONS = {**ADAM_OPTIONS, "weight_decay": OptionSpec(non_negative_number, ADAMW_DECAY)}

registry.register_optimizer(OptimizerDef("sgd", SGD_OPTIONS, ("velocity",), _sgd,
                                         _sgd_problem))
registry.register_optimizer(OptimizerDef("adam", ADAM_OPTIONS, ("adam_m", "adam_v"), _adam))
registry.register_optimizer(OptimizerDef("adamw", ADAMW_OPTIONS, ("adam_m", "adam_v"),
                                         _adamw))
