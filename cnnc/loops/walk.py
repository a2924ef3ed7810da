"""One generic traversal of the loop IR, so that analyses and rewrites need not list every
node type and its fields.

A node's children are its fields that hold expressions or statements, tuples of them
included, in the order the fields are declared: a `For`'s extent before its body, a
`Store`'s index before its value. The fields are found with `dataclasses.fields`, so a node
type added to the IR is walked without a change here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import get_args

from cnnc.loops.ir import Expr, LoopFunction, Stmt

EXPR_TYPES: tuple[type, ...] = get_args(Expr)
STMT_TYPES: tuple[type, ...] = get_args(Stmt)
_NODE_TYPES = EXPR_TYPES + STMT_TYPES

# A node of the loop IR; a LoopFunction is walked as the root of its body.
Node = Expr | Stmt


def is_node(value: object) -> bool:
    return isinstance(value, _NODE_TYPES)


@functools.cache
def _field_names(kind: type) -> tuple[str, ...]:
    """The fields of a node type, looked up once a type: `fields` is slow beside a walk."""
    return tuple(field.name for field in dataclasses.fields(kind))


def children(node: Node | LoopFunction) -> tuple[Node, ...]:
    """The expressions and statements directly inside `node`, in field order."""
    found: list[Node] = []
    for name in _field_names(type(node)):
        value = getattr(node, name)
        if is_node(value):
            found.append(value)
        elif isinstance(value, tuple):
            found += [item for item in value if is_node(item)]
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
    for name in _field_names(type(node)):
        value = getattr(node, name)
        if is_node(value):
            new = rewrite(value, fn)
            if new is not value:
                changes[name] = new
        elif isinstance(value, tuple) and any(is_node(item) for item in value):
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
