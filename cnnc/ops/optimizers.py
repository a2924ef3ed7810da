"""The optimizers of the `train` line: the state each parameter keeps and one parameter's
update step as loop IR, elementwise over flat views.

sgd: v = μ·v + g; p = p − α·v (PyTorch's momentum form; μ = 0 is plain SGD).
adam: m = β1·m + (1 − β1)·g; v = β2·v + (1 − β2)·g²; p = p − α·(m/c1) / (√(v/c2) + ε),
with the bias corrections c1 = 1 − β1^t and c2 = 1 − β2^t computed by the runtime.
"""

from __future__ import annotations

from cnnc.frontend.options import OptionSpec, fraction, positive_number
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


def _sgd(name: str, param: Buffer, grad: Buffer, states: tuple[Buffer, ...],
         hyper: Buffer) -> LoopFunction:
    i = (Var("i"),)
    g, p = Load(grad.name, i), Load(param.name, i)
    velocity = states[0].name
    body = (Store(velocity, i, add(mul(_scalar(hyper, "momentum"), Load(velocity, i)), g)),
            Store(param.name, i, Binary(BinOp.SUB, p, mul(_scalar(hyper, "lr"),
                                                          Load(velocity, i)))))
    return _update(name, param, grad, states, hyper, body)


def _adam(name: str, param: Buffer, grad: Buffer, states: tuple[Buffer, ...],
          hyper: Buffer) -> LoopFunction:
    def h(field: str) -> Expr:
        return _scalar(hyper, field)

    i = (Var("i"),)
    g, p = Load(grad.name, i), Load(param.name, i)
    one = Const(1.0, True)
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
    return _update(name, param, grad, states, hyper, body)


SGD_OPTIONS = {"lr": OptionSpec(positive_number, 0.01), "momentum": OptionSpec(fraction, 0.0)}
ADAM_OPTIONS = {"lr": OptionSpec(positive_number, 0.001), "beta1": OptionSpec(fraction, 0.9),
                "beta2": OptionSpec(fraction, 0.999), "eps": OptionSpec(positive_number, 1e-8)}

registry.register_optimizer(OptimizerDef("sgd", SGD_OPTIONS, ("velocity",), _sgd))
registry.register_optimizer(OptimizerDef("adam", ADAM_OPTIONS, ("adam_m", "adam_v"), _adam))
