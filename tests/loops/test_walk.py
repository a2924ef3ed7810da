"""The generic loop IR walker: children in field order, pre-order walks, bottom-up rewrites,
and the CUDA analyses built on them giving what the loops say."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from cnnc.backends.cuda.shared import accesses_of, names_bound, variables_of
from cnnc.diagnostics import Source
from cnnc.driver.modules import plan_module
from cnnc.driver.pipeline import front_end
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
    Store,
    Unary,
    UnaryOp,
    Var,
    VecLoad,
    VecStore,
)
from cnnc.loops.printer import format_function
from cnnc.loops.walk import (
    EXPR_TYPES,
    STMT_TYPES,
    children,
    rewrite,
    rewrite_function,
    walk,
    walk_all,
)
from conftest import EXAMPLES

VAR_I, VAR_J = Var("i"), Var("j")
X_AT_I = Load("x", (VAR_I,))
# y[i] = x[i] + 2·j, for i, j under a test on i
SUM = add(X_AT_I, mul(const(2), VAR_J))
STORE = Store("y", (VAR_I,), SUM)
NEST = For("i", const(4), (For("j", Var("N"), (If(Binary(BinOp.LT, VAR_I, VAR_J), (STORE,)),)),))


def test_children_are_the_node_fields_in_declaration_order():
    assert children(STORE) == (VAR_I, SUM)
    assert children(SUM) == (X_AT_I, SUM.right)
    assert children(X_AT_I) == (VAR_I,)
    assert children(NEST) == (const(4), NEST.body[0])
    assert children(Select(VAR_I, VAR_J, const(0))) == (VAR_I, VAR_J, const(0))
    assert children(Unary(UnaryOp.NEG, VAR_I)) == (VAR_I,)
    spread = Broadcast(VAR_I, 4)
    assert children(VecStore("y", (VAR_I, VAR_J), spread)) == (VAR_I, VAR_J, spread)
    assert children(Lane(Ramp(VAR_I, 2, 4), 1)) == (Ramp(VAR_I, 2, 4),)
    assert children(Ramp(VAR_I, 2, 4)) == (VAR_I,)
    assert children(VecLoad("x", (VAR_I,), 4, 2)) == (VAR_I,)
    assert children(VAR_I) == () and children(const(1.0)) == ()


@pytest.mark.parametrize("kind", EXPR_TYPES + STMT_TYPES, ids=lambda kind: kind.__name__)
def test_every_node_type_is_a_frozen_dataclass_the_walker_can_rebuild(kind):
    assert dataclasses.is_dataclass(kind)
    assert kind.__dataclass_params__.frozen


def test_walk_is_pre_order_in_field_order():
    names = [type(node).__name__ for node in walk(NEST)]
    assert names == ["For", "Const", "For", "Var", "If", "Binary", "Var", "Var", "Store",
                     "Var", "Binary", "Load", "Var", "Binary", "Const", "Var"]
    assert next(iter(walk(NEST))) is NEST


def test_walk_of_a_function_is_its_body_without_the_function():
    function = LoopFunction("f", (Buffer("x", (4,), DType.F32),
                                  Buffer("y", (4,), DType.F32, True)), (), (NEST, NEST))
    assert list(walk(function)) == list(walk_all((NEST, NEST))) == [*walk(NEST), *walk(NEST)]


def test_rewrite_rebuilds_bottom_up():
    """Folding constants bottom-up folds a whole tree of them in one rewrite."""
    def fold(node):
        if isinstance(node, Binary) and isinstance(node.left, Const) and \
                isinstance(node.right, Const):
            return const(node.left.value + node.right.value if node.op is BinOp.ADD
                         else node.left.value * node.right.value)
        return node

    tree = Binary(BinOp.ADD, Binary(BinOp.MUL, const(2), const(3)),
                  Binary(BinOp.ADD, const(1), const(4)))
    assert rewrite(Store("y", (tree,), VAR_I), fold) == Store("y", (const(11),), VAR_I)


def test_rewrite_keeps_untouched_subtrees_and_the_same_object_when_nothing_changes():
    assert rewrite(NEST, lambda node: node) is NEST
    renamed = rewrite(NEST, lambda node: Var("k") if node == VAR_J else node)
    assert renamed.extent is NEST.extent
    inner = renamed.body[0].body[0]
    assert inner.cond == Binary(BinOp.LT, VAR_I, Var("k"))
    assert inner.body[0].value.left is X_AT_I  # no j below it: the very same object
    assert "j" not in {node.name for node in walk(renamed) if isinstance(node, Var)}


def test_rewrite_function_rewrites_every_statement():
    function = LoopFunction("f", (Buffer("y", (4,), DType.F32, True),), (Local("a", DType.F32),),
                            (Assign("a", const(1.0)), For("i", const(4), (
                                Store("y", (VAR_I,), Var("a")),))))
    doubled = rewrite_function(function, lambda node: const(2.0) if node == const(1.0) else node)
    assert doubled.body[0] == Assign("a", const(2.0))
    assert doubled.body[1] is function.body[1]
    assert doubled.buffers == function.buffers and doubled.locals == function.locals


@functools.cache  # planning every example twice over took most of both tests' time
def _example_functions() -> tuple[LoopFunction, ...]:
    functions = []
    for path in sorted(EXAMPLES.glob("*.cnn")):
        source = Source(path.read_text(), path.name)
        for scheduled in (True, False):
            functions += plan_module(front_end(source), source, scheduled=scheduled).functions
    return tuple(functions)


def test_identity_rewrite_of_every_example_function_prints_the_same():
    for function in _example_functions():
        rebuilt = rewrite_function(function, lambda node: dataclasses.replace(node))
        assert rebuilt == function
        assert format_function(rebuilt) == format_function(function)


def test_walk_finds_every_load_and_variable_the_printer_writes():
    """Each load prints as `buffer[`, each variable as its name: counted on the text."""
    for function in _example_functions():
        text = format_function(function)
        nodes = list(walk(function))
        for buffer in function.buffers:
            loads = sum(1 for n in nodes if isinstance(n, Load | VecLoad | Store | VecStore)
                        and n.buffer == buffer.name)
            assert text.count(f" {buffer.name}[") + text.count(f"({buffer.name}[") \
                + text.count(f"[{buffer.name}[") == loads, (function.name, buffer.name)


def test_cuda_analyses_on_a_small_nest():
    assert accesses_of(NEST) == [("y", (VAR_I,), True), ("x", (VAR_I,), False)]
    assert names_bound((NEST, Assign("a", VAR_I))) == {"i", "j", "a"}
    assert variables_of(SUM) == [VAR_I, VAR_J]
    with pytest.raises(ValueError, match="plain loop nests, not VecStore"):
        accesses_of(For("i", const(4), (VecStore("y", (VAR_I,), Broadcast(VAR_I, 4)),)))
