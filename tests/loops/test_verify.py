"""The loop IR verifier: every function the compiler makes passes it, and each broken
invariant fails it with a message naming the function and the invariant."""

from __future__ import annotations

import math

import pytest

from cnnc.diagnostics import Source
from cnnc.driver.modules import plan_module
from cnnc.driver.pipeline import Options, Stage, front_end, run
from cnnc.graph.ir import DType
from cnnc.loops.build import add, const, mul
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Broadcast,
    Buffer,
    Const,
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
from cnnc.loops.verify import verify_function
from conftest import EXAMPLES

# programs beside the examples, for what they leave out: f64, strides, padded and average
# pooling, rectangular windows, kernels without bias, mse, adam, sigmoid and tanh
PROGRAMS = {
    "strided": "network a\ninput: 2x9x9 dtype=f64\nconv c: 4 3x3 stride=2 pad=1 -> sigmoid\n"
               "avgpool 2x2 stride=1 pad=1\nconv d: 3 3x1 stride=2x1 pad=1x0 bias=false -> tanh\n"
               "maxpool 2x2 pad=1\ndense e: 5 -> sigmoid\nloss mse\ntrain adam lr=0.01\n",
    "same": "network b\ninput: 3x12x12\nconv c: 8 5x5 pad=same -> relu\navgpool 3x3\nrelu\n"
            "dense d: 7 bias=false\nsoftmax\nloss cross_entropy\ntrain sgd lr=0.1\n",
    "wide": "network c\ninput: 1x6x6\nconv c: 16 3x3 -> relu\nmaxpool 2x2\n"
            "conv d: 16 2x2 stride=2 -> relu\nflatten\ndense e: 33\nsigmoid\ndense f: 1\n"
            "loss mse\n",
}


def _sources() -> list[tuple[str, str]]:
    """(name, text) of each example and program, with its loss and train lines and without."""
    texts = [(p.stem, p.read_text()) for p in sorted(EXAMPLES.glob("*.cnn"))]
    texts += list(PROGRAMS.items())
    forward = [(f"{name}-forward", "\n".join(line for line in text.splitlines()
                                             if not line.startswith(("loss", "train"))))
               for name, text in texts]
    return texts + forward


@pytest.mark.parametrize("name, text", _sources(), ids=[name for name, _ in _sources()])
def test_every_function_of_every_program_passes(name, text):
    """Scheduled and plain CPU loops, and the CUDA backend's, forward and training."""
    source = Source(text, f"{name}.cnn")
    graph = front_end(source)
    functions = [f for scheduled in (True, False)
                 for f in plan_module(graph, source, scheduled=scheduled).functions]
    functions += run(source, Options(backend="cuda"), Stage.LOWER).lowered.functions
    assert functions
    for function in functions:
        verify_function(function)


# -- broken functions, built by hand --------------------------------------------------------

X = Buffer("x", ("N", 4), DType.F32)
Y = Buffer("y", ("N", 4), DType.F32, is_output=True)
LABELS = Buffer("labels", ("N",), DType.I64)
ARGMAX = Buffer("argmax", ("N", 4), DType.I64, is_output=True)
ACC = Local("acc", DType.F32)
VECTOR = Local("vec", DType.F32, lanes=4)
INDEX = Local("index", DType.I64)
N, I_, K = Var("N"), Var("i"), Var("k")
X_NI = Load("x", (N, I_))
FLOAT_ZERO = Const(0.0, True)


def _function(*body: Stmt, buffers: tuple[Buffer, ...] = (X, Y, LABELS, ARGMAX),
              locals_: tuple[Local, ...] = (ACC, VECTOR, INDEX)) -> LoopFunction:
    """`body` inside for n in 0..N: for i in 0..4."""
    nest = For("n", N, (For("i", const(4), body),))
    return LoopFunction("broken", buffers, locals_, (nest,))


def _at(value) -> Store:
    return Store("y", (Var("n"), I_), value)


def test_a_function_of_every_construct_passes():
    lanes = Ramp(mul(I_, const(4)), 1, 4)
    verify_function(_function(
        Assign("acc", FLOAT_ZERO),
        For("k", const(4), (If(Binary(BinOp.AND, Binary(BinOp.GE, K, const(0)),
                                      Binary(BinOp.LT, K, const(4))),
                               (Assign("acc", add(Var("acc"), Load("x", (Var("n"), K)))),)),)),
        Assign("vec", VecLoad("x", (Var("n"), const(0)), 4)),
        Assign("vec", add(Var("vec"), mul(Broadcast(Var("acc"), 4), Var("vec")))),
        Assign("index", Select(Unary(UnaryOp.ISNAN, Var("acc")), Lane(lanes, 3), Var("index"))),
        VecStore("y", (Var("n"), const(0)), Var("vec")),
        Store("argmax", (Var("n"), I_), Binary(BinOp.MOD, Var("index"), const(4))),
        _at(Binary(BinOp.MAX, Unary(UnaryOp.FLOAT, Load("labels", (Var("n"),))),
                   Unary(UnaryOp.EXP, Binary(BinOp.DIV, Var("acc"), Const(math.inf, True)))))))


BROKEN = {
    "buffer x is declared twice": _function(buffers=(X, X, Y)),
    "local acc is declared twice": _function(locals_=(ACC, ACC)),
    "local N has the name of the batch size": _function(locals_=(Local("N", DType.I64),)),
    "loads from z, which is not a declared buffer": _function(_at(Load("z", (N, I_)))),
    "stores to z, which is not a declared buffer": _function(Store("z", (N, I_), FLOAT_ZERO)),
    "loads from x with 1 indices, but it has rank 2": _function(_at(Load("x", (I_,)))),
    "stores to y with 3 indices, but it has rank 2": _function(
        Store("y", (N, I_, I_), FLOAT_ZERO)),
    "stores to x, which is not an output buffer": _function(Store("x", (N, I_), FLOAT_ZERO)),
    "reads j, which is neither N, an enclosing loop's variable nor a declared local":
        _function(_at(Load("x", (N, Var("j"))))),
    "reads k, which is neither": _function(For("k", const(4), ()), _at(Load("x", (N, K)))),
    "assigns to total, which is not a declared local": _function(Assign("total", X_NI)),
    "assigns to i, which is not a declared local": _function(Assign("i", const(0))),
    "loop i rebinds the variable of an enclosing loop": _function(For("i", const(2), ())),
    "loop acc rebinds the batch size or a local": _function(For("acc", const(2), ())),
    "the extent of loop k is a float, where it must be an integer": _function(
        For("k", Const(2.0, True), ())),
    "an if's condition is an integer, where it must be a truth value": _function(
        If(I_, (_at(FLOAT_ZERO),))),
    "an index of x is a float, where it must be an integer": _function(
        _at(Load("x", (N, FLOAT_ZERO)))),
    "an index of x is a vector of 4 integers, where it must be an integer": _function(
        _at(Load("x", (N, Ramp(I_, 1, 4))))),
    "stores an integer to y, a buffer of floats": _function(_at(I_)),
    "stores a vector of 4 floats to y with a scalar store": _function(_at(Var("vec"))),
    "stores a float to y with a vector store": _function(
        VecStore("y", (N, const(0)), Var("acc"))),
    "assigns a vector of 4 floats to local acc, a float": _function(
        Assign("acc", VecLoad("x", (N, const(0)), 4))),
    "assigns a float to local index, an integer": _function(Assign("index", X_NI)),
    "operands of [4, 8] lanes in one operation": _function(
        Assign("vec", add(Var("vec"), VecLoad("x", (N, const(0)), 8)))),
    "lane 4 of a vector of 4 floats": _function(_at(Lane(Var("vec"), 4))),
    "lane 0 of a float": _function(_at(Lane(Var("acc"), 0))),
    "a vector of 4 lanes made from a vector of 4 floats": _function(
        Assign("vec", Broadcast(Var("vec"), 4))),
    "a ramp starts at a float": _function(_at(Lane(Ramp(FLOAT_ZERO, 1, 4), 0))),
    "a vector load of 1 lanes, stride 1": _function(
        Assign("vec", VecLoad("x", (N, const(0)), 1))),
    "/ of an integer and an integer": _function(
        Store("argmax", (N, I_), Binary(BinOp.DIV, I_, const(2)))),
    "+ of a float and an integer": _function(_at(add(X_NI, I_))),
    "< of a truth value and a truth value": _function(If(Binary(
        BinOp.LT, Unary(UnaryOp.ISNAN, X_NI), Unary(UnaryOp.ISNAN, X_NI)), ())),
    "exp of an integer": _function(_at(Unary(UnaryOp.EXP, I_))),
    "float of a float": _function(_at(Unary(UnaryOp.FLOAT, X_NI))),
    "select of a float or a float on an integer": _function(
        _at(Select(I_, X_NI, FLOAT_ZERO))),
    "select of a float or an integer on a truth value": _function(
        _at(Select(Binary(BinOp.LT, I_, const(2)), X_NI, I_))),
}


@pytest.mark.parametrize("message", list(BROKEN))
def test_a_broken_invariant_fails_naming_the_function_and_the_invariant(message):
    with pytest.raises(AssertionError) as caught:
        verify_function(BROKEN[message])
    assert str(caught.value).startswith("loop function broken: ")
    assert message in str(caught.value)
