"""One generic traversal of the loop IR, so that analyses and rewrites need not list every
node type and its fields.

A node's children are its fields that hold expressions or statements, tuples of them
included, in the order the fields are declared: a `For`'s extent before its body, a
`Store`'s index before its value. The fields are found with `dataclasses.fields` and their
type hints, so a node type added to the IR, with hints that name the nodes its fields hold, is
walked without a change here.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterator
from typing import get_args

from cnnc.loops.ir import Expr, LoopFunction, Stmt

EXPR_TYPES: tuple[type, ...] = get_args(Expr)
STMT_TYPES: tuple[type, ...] = get_args(Stmt)
_NODE_TYPES = EXPR_TYPES + STMT_TYPES

# A node of the loop IR; a LoopFunction is walked as the root of its body.
Node = Expr | Stmt


_NODE_SET = frozenset(_NODE_TYPES)  # the IR's node types are final: none is subclassed


def is_node(value: object) -> bool:
    return type(value) in _NODE_SET


@functools.cache
def _node_fields(kind: type) -> tuple[str, ...]:
    """The fields of a node type that may hold nodes, by their type hints (an `Expr`, a
    tuple of statements, ...), looked up once a type: the others (names, lane counts,
    operators) are never looked at, and `fields` is slow beside a walk."""
    hints = typing.get_type_hints(kind)
    return tuple(field.name for field in dataclasses.fields(kind)
                 if _mentions_node(hints[field.name]))


def _mentions_node(hint: object) -> bool:
    return hint in _NODE_SET or any(_mentions_node(arg) for arg in get_args(hint))


def children(node: Node | LoopFunction) -> tuple[Node, ...]:
    """The expressions and statements directly inside `node`, in field order."""
    found: list[Node] = []
    for name in _node_fields(type(node)):
        value = getattr(node, name)
        if type(value) is tuple:
            found += [item for item in value if type(item) in _NODE_SET]
        elif type(value) in _NODE_SET:
            found.append(value)
    return tuple(found)


def walk(node: Node | LoopFunction) -> Iterator[Node]:
    """Every node below and including `node` (a function itself is not yielded), parents
    before their children, children in field order: the order the printer writes them."""
    stack: list[Node | LoopFunction] = [node]
    while stack:
        current = stack.pop()
        if not isinstance(current, LoopFunction):
            yield current
        stack.extend(reversed(children(current)))


def walk_all(nodes: tuple[Node, ...]) -> Iterator[Node]:
    """`walk` of each of `nodes` in turn: of a body of statements, say."""
    for node in nodes:
        yield from walk(node)


def rewrite(node: Node, fn: Callable[[Node], Node]) -> Node:
    """`node` rebuilt bottom-up: each child rewritten first, then `fn` given the node with
    its new children. A node none of whose children changed is passed to `fn` unchanged
    (the same object), so an `fn` that changes nothing returns the original tree."""
    changes = {}
    for name in _node_fields(type(node)):
        value = getattr(node, name)
        if is_node(value):
            new = rewrite(value, fn)
            if new is not value:
                changes[name] = new
        elif type(value) is tuple and any(is_node(item) for item in value):
            items = tuple(rewrite(item, fn) if is_node(item) else item for item in value)
            if any(new is not old for new, old in zip(items, value, strict=True)):
                changes[name] = items
    return fn(dataclasses.replace(node, **changes) if changes else node)


def rewrite_function(function: LoopFunction, fn: Callable[[Node], Node]) -> LoopFunction:
    """`function` with every statement of its body rewritten by `rewrite`."""
    body = tuple(rewrite(stmt, fn) for stmt in function.body)
    return dataclasses.replace(function, body=body)


__all__ = ["EXPR_TYPES", "STMT_TYPES", "Node", "children", "is_node", "rewrite",
           "rewrite_function", "walk", "walk_all"]
