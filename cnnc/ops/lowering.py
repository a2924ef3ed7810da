"""Helpers the op files' loop lowerings share: how a kernel sees a tensor as a buffer, and
an activation applied to a value. Registers no op."""

from __future__ import annotations

import math

from cnnc.graph.ir import BATCH
from cnnc.loops.build import extent_expr, loop_nest
from cnnc.loops.ir import Buffer, Const, Expr, Stmt, Store, Unary, UnaryOp, Var
from cnnc.ops import registry


def buffer(program, name: str, is_output: bool = False, flat: bool = False) -> Buffer:
    """Storage tensor `name` as a forward kernel sees it; `flat` views N x C x H x W as
    N x (C·H·W)."""
    tensor = program.tensor(name)
    shape = tensor.shape
    if flat:
        shape = (shape[0], math.prod(shape[1:]))
    return Buffer(name, shape, tensor.dtype, is_output)


def view(program, name: str, shape: tuple | None = None, is_output: bool = False) -> Buffer:
    """Graph tensor `name` as a buffer: its storage, seen with `shape` (default: its own)."""
    tensor = program.graph.tensor(name)
    return Buffer(program.storage_of(name), tuple(shape or tensor.shape) or (1,), tensor.dtype,
                  is_output)


def flat(program, name: str, is_output: bool = False) -> Buffer:
    shape = program.graph.tensor(name).shape
    return view(program, name, (shape[0], math.prod(shape[1:])), is_output)


def batch_float() -> Expr:
    return Unary(UnaryOp.FLOAT, Var(BATCH))


def zero_fill(buffer: Buffer) -> Stmt:
    names = [f"z{axis}" for axis in range(len(buffer.shape))]
    return loop_nest(names, [extent_expr(d) for d in buffer.shape],
                     (Store(buffer.name, tuple(Var(n) for n in names), Const(0.0, True)),))


def activate(activation: str | None, value: Expr, attrs: object = None) -> Expr:
    """`value` through the activation op named `activation` (its elementwise rule, given the
    activation node's attributes: `Kernel.activation_attrs`), or unchanged for none."""
    if activation is None:
        return value
    rule = registry.get(activation).elementwise
    assert rule is not None, f"{activation} cannot be applied inside another op's kernel"
    return rule(value, attrs)
