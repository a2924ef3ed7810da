"""The elementwise activations and their gradients, with torch's semantics: relu, relu6,
leaky_relu (`leaky_relu(0.1)` gives the slope), sigmoid, hardsigmoid (`hardsigmoid(0.2, 0.5)`
gives ONNX's alpha and beta), tanh, silu, gelu (the exact one, with erf), hardswish and clip
(`clip(0, 6)`, torch.clamp). Each may end a layer (`-> relu`) and then runs inside that
layer's kernel, applied to each result as it is stored, or follows a pool as a kernel of its
own; the `activation NAME: ACT` statement (registered here) makes any activation a layer of
its own. NaN stays NaN in every one.

The gradient is written with the output y where that is exact (relu, relu6, sigmoid, tanh,
hardsigmoid, clip, leaky_relu of a slope >= 0), and with the input x otherwise (silu, gelu,
hardswish, leaky_relu of a negative slope): the backward op then reads the activation's
input, so in a training pass such an activation is not fused into the layer before it
(passes/fuse.py) and its input is stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cnnc.graph.ir import BATCH, Node
from cnnc.loops.build import add, loop_nest, mul
from cnnc.loops.ir import (
    Binary,
    BinOp,
    Const,
    Expr,
    Load,
    LoopFunction,
    Select,
    Store,
    Unary,
    UnaryOp,
    Var,
)
from cnnc.ops import registry
from cnnc.ops.lowering import buffer, flat
from cnnc.ops.registry import Fusion, LayerDef, OpDef, ShapeContext, Slot, Step


def _float(value: float) -> Const:
    return Const(value, True)


ZERO = _float(0.0)
ONE = _float(1.0)
THREE = _float(3.0)
SIX = _float(6.0)
HALF = _float(0.5)
SQRT_HALF = _float(math.sqrt(0.5))  # torch's M_SQRT1_2, the same double
INV_SQRT_2PI = _float(1 / math.sqrt(2 * math.pi))


# -- attributes -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LeakyReluAttrs:
    """leaky_relu's slope for x <= 0: `leaky_relu` is 0.01 (torch's default), and
    `leaky_relu(0.1)` gives it."""

    slope: float = 0.01

    def text(self) -> str:
        return f" slope={self.slope!r}"


def _leaky_relu_attrs(arg: float | None = None) -> LeakyReluAttrs:
    if arg is None:
        return LeakyReluAttrs()
    slope = float(arg)
    if not math.isfinite(slope):
        raise ValueError(f"the slope must be a finite number, not {arg}")
    return LeakyReluAttrs(slope)


def _slope(attrs: object) -> float:
    """The slope of a leaky_relu node (the default where a hand-built node has no attrs)."""
    return (attrs or LeakyReluAttrs()).slope


@dataclass(frozen=True, slots=True)
class ClipAttrs:
    """clip's bounds, `clip(MIN, MAX)`: either may be infinite, and MIN <= MAX."""

    min: float
    max: float

    def text(self) -> str:
        return f" min={self.min!r} max={self.max!r}"


def _clip_attrs(low: float, high: float) -> ClipAttrs:
    if math.isnan(low) or math.isnan(high):
        raise ValueError("the bounds must be numbers, inf or -inf, not nan")
    if low > high:
        raise ValueError(f"the minimum {low:g} is above the maximum {high:g}; write "
                         "clip(MIN, MAX)")
    return ClipAttrs(low, high)


@dataclass(frozen=True, slots=True)
class HardSigmoidAttrs:
    """`hardsigmoid(ALPHA, BETA)`: clamp(ALPHA · x + BETA, 0, 1), ONNX's HardSigmoid. Plain
    `hardsigmoid` has no attributes and is torch's relu6(x + 3) / 6."""

    alpha: float
    beta: float

    def text(self) -> str:
        return f" alpha={self.alpha!r} beta={self.beta!r}"


def _hardsigmoid_attrs(alpha: float | None = None, beta: float | None = None
                       ) -> HardSigmoidAttrs | None:
    if alpha is None and beta is None:
        return None
    if alpha is None or beta is None or not (math.isfinite(alpha) and math.isfinite(beta)):
        raise ValueError(f"alpha and beta must be finite numbers, not {alpha} and {beta}")
    return HardSigmoidAttrs(float(alpha), float(beta))


# -- forward values, in loop IR (value, attrs) -> value, and in numpy ---------------------

def _relu(v: Expr, attrs: object = None) -> Expr:
    return Select(Binary(BinOp.LT, v, ZERO), ZERO, v)


def _relu6(v: Expr, attrs: object = None) -> Expr:
    """min(max(v, 0), 6), letting NaN through, as torch's hardtanh(v, 0, 6)."""
    return Select(Binary(BinOp.LT, v, ZERO), ZERO, Select(Binary(BinOp.GT, v, SIX), SIX, v))


def _leaky_relu(v: Expr, attrs: object) -> Expr:
    return Select(Binary(BinOp.GT, v, ZERO), v, mul(v, _float(_slope(attrs))))


def _sigmoid(v: Expr, attrs: object = None) -> Expr:
    return Binary(BinOp.DIV, ONE, add(ONE, Unary(UnaryOp.EXP, Unary(UnaryOp.NEG, v))))


def _hardsigmoid(v: Expr, attrs: object = None) -> Expr:
    if attrs is None:
        return Binary(BinOp.DIV, _relu6(add(v, THREE)), SIX)
    return _clamp(add(mul(v, _float(attrs.alpha)), _float(attrs.beta)), 0.0, 1.0)


def _clamp(v: Expr, low: float, high: float) -> Expr:
    """min(max(v, low), high), letting NaN through, as torch.clamp; an infinite bound is no
    test."""
    if high != math.inf:
        v = Select(Binary(BinOp.GT, v, _float(high)), _float(high), v)
    if low != -math.inf:
        v = Select(Binary(BinOp.LT, v, _float(low)), _float(low), v)
    return v


def _clip(v: Expr, attrs: object) -> Expr:
    return _clamp(v, attrs.min, attrs.max)


def _tanh(v: Expr, attrs: object = None) -> Expr:
    return Unary(UnaryOp.TANH, v)


def _silu(v: Expr, attrs: object = None) -> Expr:
    """v / (1 + exp(−v)), as torch writes it: −0 rather than NaN for a very negative v."""
    return Binary(BinOp.DIV, v, add(ONE, Unary(UnaryOp.EXP, Unary(UnaryOp.NEG, v))))


def _gelu(v: Expr, attrs: object = None) -> Expr:
    """v · 0.5 · (1 + erf(v / √2)), torch's exact gelu (approximate='none'), in its order."""
    return mul(mul(v, HALF), add(ONE, Unary(UnaryOp.ERF, mul(v, SQRT_HALF))))


def _hardswish(v: Expr, attrs: object = None) -> Expr:
    return Binary(BinOp.DIV, mul(v, _relu6(add(v, THREE))), SIX)


_erf = np.frompyfunc(math.erf, 1, 1)


def _np_clamp(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """As _clamp: NaN stays NaN (np.clip would too, but says so with its own rules)."""
    t = x.dtype.type
    return np.where(x < low, t(low), np.where(x > high, t(high), x))


def _np_hardsigmoid(x: np.ndarray, attrs: object) -> np.ndarray:
    if attrs is None:
        return _np_relu6(x + 3) / 6
    t = x.dtype.type
    return _np_clamp(x * t(attrs.alpha) + t(attrs.beta), 0.0, 1.0)


def _np_relu6(x: np.ndarray) -> np.ndarray:
    return np.where(x < 0, np.zeros_like(x), np.where(x > 6, np.full_like(x, 6), x))


def _np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _np_erf(x: np.ndarray) -> np.ndarray:
    return _erf(x).astype(x.dtype)


def _np_gelu(x: np.ndarray) -> np.ndarray:
    return x * x.dtype.type(0.5) * (1 + _np_erf(x * x.dtype.type(math.sqrt(0.5))))


# -- gradients ------------------------------------------------------------------------------

def _gradient_through_output(grad_op: str):
    """The gradient of y = f(x) written with y: (dy, y) -> dx."""
    def rule(node: Node, dy: str, b) -> list[tuple[str, str]]:
        x = node.inputs[0]
        return [(x, b.op(grad_op, (dy, node.output), x, node))]

    return rule


def _gradient_through_input(grad_op: str):
    """The gradient of y = f(x) written with x: (dy, x) -> dx."""
    def rule(node: Node, dy: str, b) -> list[tuple[str, str]]:
        x = node.inputs[0]
        return [(x, b.op(grad_op, (dy, x), x, node))]

    return rule


def _leaky_relu_gradient(node: Node, dy: str, b) -> list[tuple[str, str]]:
    """dy where x > 0, else slope · dy. For a slope >= 0, y > 0 exactly where x > 0, so the
    backward op reads y (and the activation stays fused); for a negative one it reads x."""
    x = node.inputs[0]
    sign_of = node.output if _slope(node.attrs) >= 0 else x
    return [(x, b.op("leaky_relu_grad", (dy, sign_of), x, node, node.attrs))]


def _silu_grad(dy: Expr, x: Expr) -> Expr:
    """dy · s · (1 + x · (1 − s)), s = sigmoid(x): torch's silu_backward."""
    s = _sigmoid(x)
    return mul(mul(dy, s), add(ONE, mul(x, Binary(BinOp.SUB, ONE, s))))


def _np_silu_grad(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    s = _np_sigmoid(x)
    return dy * s * (1 + x * (1 - s))


def _gelu_grad(dy: Expr, x: Expr) -> Expr:
    """dy · (Φ(x) + x · φ(x)): torch's gelu_backward, Φ = 0.5 · (1 + erf(x / √2)) and
    φ = exp(−x² / 2) / √(2π)."""
    cdf = mul(HALF, add(ONE, Unary(UnaryOp.ERF, mul(x, SQRT_HALF))))
    pdf = mul(INV_SQRT_2PI, Unary(UnaryOp.EXP, mul(mul(x, x), _float(-0.5))))
    return mul(dy, add(cdf, mul(x, pdf)))


def _np_gelu_grad(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    t = x.dtype.type
    cdf = t(0.5) * (1 + _np_erf(x * t(math.sqrt(0.5))))
    pdf = t(INV_SQRT_2PI.value) * np.exp(x * x * t(-0.5))
    return dy * (cdf + x * pdf)


def _hardswish_grad(dy: Expr, x: Expr) -> Expr:
    """0 up to −3, dy · (x / 3 + 0.5) below 3, dy from 3 on; NaN for NaN: torch's
    hardswish_backward (its vectorized form, which its CPU kernels run)."""
    ramp = mul(dy, add(Binary(BinOp.DIV, x, THREE), HALF))
    return Select(Binary(BinOp.LE, x, _float(-3.0)), ZERO,
                  Select(Binary(BinOp.GE, x, THREE), dy, ramp))


def _np_hardswish_grad(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    ramp = dy * (x / 3 + x.dtype.type(0.5))
    return np.where(x <= -3, np.zeros_like(dy), np.where(x >= 3, dy, ramp))


def _relu6_grad(dy: Expr, y: Expr) -> Expr:
    """dy where 0 < y < 6, that is 0 < x < 6; 0 elsewhere and for NaN, as relu's gradient
    and torch's vectorized hardtanh_backward."""
    inside = Binary(BinOp.AND, Binary(BinOp.GT, y, ZERO), Binary(BinOp.LT, y, SIX))
    return Select(inside, dy, ZERO)


def _hardsigmoid_grad(dy: Expr, y: Expr, attrs: object = None) -> Expr:
    """dy / 6 where 0 < y < 1, that is −3 < x < 3 (up to x + 3 rounding to 6 within an ulp
    below 3); 0 elsewhere and for NaN, as torch. With ALPHA and BETA: dy · ALPHA there."""
    inside = Binary(BinOp.AND, Binary(BinOp.GT, y, ZERO), Binary(BinOp.LT, y, ONE))
    slope = 1 / 6 if attrs is None else attrs.alpha
    return Select(inside, mul(dy, _float(slope)), ZERO)


def _np_hardsigmoid_grad(node: Node, args: list, shape, mode) -> np.ndarray:
    dy, y = args
    slope = 1 / 6 if node.attrs is None else node.attrs.alpha
    return np.where((y > 0) & (y < 1), dy * dy.dtype.type(slope), np.zeros_like(dy))


def _clip_grad(dy: Expr, y: Expr, attrs: object) -> Expr:
    """dy where MIN < y < MAX, that is MIN < x < MAX (y is x there, and a bound outside):
    torch.clamp's gradient, 0 at either bound, outside and for NaN."""
    tests = [Binary(BinOp.GT, y, _float(attrs.min)), Binary(BinOp.LT, y, _float(attrs.max))]
    return Select(Binary(BinOp.AND, *tests), dy, ZERO)


def _np_clip_grad(node: Node, args: list, shape, mode) -> np.ndarray:
    dy, y = args
    inside = (y > node.attrs.min) & (y < node.attrs.max)
    return np.where(inside, dy, np.zeros_like(dy))


def _gradient_with_attrs(grad_op: str):
    """The gradient of y = f(x) written with y and the activation's attributes."""
    def rule(node: Node, dy: str, b) -> list[tuple[str, str]]:
        x = node.inputs[0]
        return [(x, b.op(grad_op, (dy, node.output), x, node, node.attrs))]

    return rule


def _lower_with_attrs(formula: Callable[[Expr, Expr, object], Expr]):
    """lower_binary of a formula that reads the backward node's attributes too."""
    def lower(kernel, program) -> LoopFunction:
        attrs = kernel.node.attrs
        return lower_binary(lambda dy, v: formula(dy, v, attrs))(kernel, program)

    return lower


# -- registration ---------------------------------------------------------------------------

def _same_shape(ctx: ShapeContext) -> dict:
    return {ctx.node.output: ctx.x}


def _lower_alone(kernel, program) -> LoopFunction:
    """An activation that follows no anchor (a pool, say): a kernel of its own."""
    x = buffer(program, kernel.inputs[0], flat=True)
    out = buffer(program, kernel.outputs[0], is_output=True, flat=True)
    where = (Var("n"), Var("i"))
    value = registry.get(kernel.op).elementwise(Load(x.name, where), kernel.node.attrs)
    nest = loop_nest(["n", "i"], [Var(BATCH), x.shape[1]], (Store(out.name, where, value),))
    return LoopFunction(kernel.name, (x, out), (), (nest,))


def lower_binary(formula: Callable[[Expr, Expr], Expr]):
    """The lowering of an elementwise op of two tensors shaped alike, over flat views."""
    def lower(kernel, program) -> LoopFunction:
        first, second = flat(program, kernel.inputs[0]), flat(program, kernel.inputs[1])
        dx = flat(program, kernel.outputs[0], is_output=True)
        where = (Var("n"), Var("i"))
        value = formula(Load(first.name, where), Load(second.name, where))
        nest = loop_nest(["n", "i"], [Var(BATCH), dx.shape[1]], (Store(dx.name, where, value),))
        return LoopFunction(kernel.name, (first, second, dx), (), (nest,))

    return lower


def _activation(name: str, doc: str, value: Callable[[Expr, object], Expr],
                reference: Callable[[np.ndarray, object], np.ndarray], gradient,
                written: str = "", **more) -> None:
    """`written` is how the example program writes it (`clip(-0.5, 0.5)`), if not `name`."""
    written = written or name
    registry.register(OpDef(
        name, doc, inputs=("x",), shape=_same_shape,
        reference=lambda node, args, shape, mode: reference(args[0], node.attrs),
        gradient=gradient, fusion=Fusion.EPILOGUE, slot=Slot.ACTIVATION, elementwise=value,
        activation=True, kernel_tag=name, lower=_lower_alone,
        # once in a convolution's kernel, once after a pool (a kernel of its own)
        example=f"input: 2x4x4\nconv c: 3 3x3 -> {written}\nmaxpool 1x1\n{written}\nflatten\n"
                "dense e: 3\nloss mse", **more))


def _activation_grad(name: str, doc: str, formula: Callable[[Expr, Expr], Expr],
                     reference: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     inputs: tuple[str, str] = ("dy", "y")) -> None:
    registry.register(OpDef(
        name, doc, inputs=inputs, shape=lambda ctx: {}, differentiable=False,
        fusion=Fusion.ALONE, reference=lambda node, args, shape, mode: reference(*args),
        lower=lower_binary(formula)))


def _leaky_relu_grad_lower(kernel, program) -> LoopFunction:
    slope = _float(_slope(kernel.node.attrs))
    return lower_binary(lambda dy, v: Select(Binary(BinOp.GT, v, ZERO), dy, mul(dy, slope)))(
        kernel, program)


def _leaky_relu_grad_reference(node: Node, args: list, shape, mode) -> np.ndarray:
    dy, v = args
    return np.where(v > 0, dy, dy * dy.dtype.type(_slope(node.attrs)))


def _he(factor: float):
    return lambda attrs: factor


_activation("relu", "max(x, 0); NaN stays NaN", _relu,
            lambda x, attrs: np.where(x < 0, np.zeros_like(x), x),
            _gradient_through_output("relu_grad"), he_factor=_he(2.0))
_activation("sigmoid", "1 / (1 + exp(−x))", _sigmoid, lambda x, attrs: _np_sigmoid(x),
            _gradient_through_output("sigmoid_grad"))
_activation("tanh", "tanh(x)", _tanh, lambda x, attrs: np.tanh(x),
            _gradient_through_output("tanh_grad"))
_activation("relu6", "min(max(x, 0), 6)", _relu6, lambda x, attrs: _np_relu6(x),
            _gradient_through_output("relu6_grad"), he_factor=_he(2.0))
_activation("leaky_relu", "x if x > 0, else slope · x (slope 0.01, or leaky_relu(SLOPE))",
            _leaky_relu,
            lambda x, attrs: np.where(x > 0, x, x * x.dtype.type(_slope(attrs))),
            _leaky_relu_gradient, activation_attrs=_leaky_relu_attrs,
            activation_usage="the slope: leaky_relu(0.1)",
            he_factor=lambda attrs: 2.0 / (1.0 + _slope(attrs) ** 2))
_activation("silu", "x · sigmoid(x)", _silu, lambda x, attrs: x / (1 + np.exp(-x)),
            _gradient_through_input("silu_grad"))
_activation("gelu", "0.5 · x · (1 + erf(x / √2)), the exact gelu", _gelu,
            lambda x, attrs: _np_gelu(x), _gradient_through_input("gelu_grad"))
_activation("hardswish", "x · relu6(x + 3) / 6", _hardswish,
            lambda x, attrs: x * _np_relu6(x + 3) / 6, _gradient_through_input("hardswish_grad"))
_activation("hardsigmoid", "relu6(x + 3) / 6, or clamp(alpha · x + beta, 0, 1)", _hardsigmoid,
            _np_hardsigmoid, _gradient_with_attrs("hardsigmoid_grad"),
            activation_attrs=_hardsigmoid_attrs, activation_arity=(0, 2),
            activation_usage="alpha and beta: hardsigmoid(0.2, 0.5)")
_activation("clip", "min(max(x, MIN), MAX)", _clip,
            lambda x, attrs: _np_clamp(x, attrs.min, attrs.max), _gradient_with_attrs("clip_grad"),
            written="clip(-0.5, 0.5)", activation_attrs=_clip_attrs, activation_arity=(2,),
            activation_usage="min and max: clip(0, 6)")

_activation_grad("relu_grad", "(dy, y) -> dy where y > 0",
                 lambda dy, y: Select(Binary(BinOp.GT, y, ZERO), dy, ZERO),
                 lambda dy, y: np.where(y > 0, dy, np.zeros_like(dy)))
_activation_grad("sigmoid_grad", "(dy, y) -> dy · y · (1 − y)",
                 lambda dy, y: mul(mul(dy, y), Binary(BinOp.SUB, ONE, y)),
                 lambda dy, y: dy * y * (1 - y))
_activation_grad("tanh_grad", "(dy, y) -> dy · (1 − y²)",
                 lambda dy, y: mul(dy, Binary(BinOp.SUB, ONE, mul(y, y))),
                 lambda dy, y: dy * (1 - y * y))
_activation_grad("relu6_grad", "(dy, y) -> dy where 0 < y < 6", _relu6_grad,
                 lambda dy, y: np.where((y > 0) & (y < 6), dy, np.zeros_like(dy)))
registry.register(OpDef(
    "hardsigmoid_grad", "(dy, y) -> dy / 6 (or dy · alpha) where 0 < y < 1", inputs=("dy", "y"),
    shape=lambda ctx: {}, differentiable=False, fusion=Fusion.ALONE,
    reference=_np_hardsigmoid_grad, lower=_lower_with_attrs(_hardsigmoid_grad)))
registry.register(OpDef(
    "clip_grad", "(dy, y) -> dy where MIN < y < MAX", inputs=("dy", "y"), shape=lambda ctx: {},
    differentiable=False, fusion=Fusion.ALONE, reference=_np_clip_grad,
    lower=_lower_with_attrs(_clip_grad)))
_activation_grad("silu_grad", "(dy, x) -> dy · s · (1 + x · (1 − s)), s = sigmoid(x)",
                 _silu_grad, _np_silu_grad, inputs=("dy", "x"))
_activation_grad("gelu_grad", "(dy, x) -> dy · (Φ(x) + x · φ(x))", _gelu_grad, _np_gelu_grad,
                 inputs=("dy", "x"))
_activation_grad("hardswish_grad", "(dy, x) -> 0 to −3, dy · (x / 3 + 0.5) below 3, else dy",
                 _hardswish_grad, _np_hardswish_grad, inputs=("dy", "x"))
registry.register(OpDef(
    "leaky_relu_grad", "(dy, v) -> dy where v > 0, else slope · dy; v is y for a slope >= 0, "
    "x for a negative one", inputs=("dy", "v"), shape=lambda ctx: {}, differentiable=False,
    fusion=Fusion.ALONE, reference=_leaky_relu_grad_reference, lower=_leaky_relu_grad_lower))


# -- the statement `activation NAME: ACT [from=X]` ----------------------------------------------

def _layer_steps(stmt, ctx) -> list[Step]:
    """No op of its own: irgen appends the activation's, as for `-> ACT` (the line's
    activation is the statement's)."""
    ctx.options(stmt.options, {})
    if stmt.activation.text == "none":
        ctx.error(f"{ctx.owner}: an activation layer needs an activation, not none; write e.g. "
                  "'activation NAME: relu'", stmt.activation.span)
    return []


registry.register_layer(LayerDef("activation", _layer_steps,
                                 (("NAME", "an activation like relu"),)))
