"""Kernels that are the same code: loop functions equal but for their own names and their
buffers'. A network repeats its blocks (ResNet-20's nine basic blocks are three shapes, each
three times), so most of its kernels are copies of a few; each is compiled once, and the
entry points call that one code with each copy's pointers."""

from __future__ import annotations

import dataclasses

from cnnc.loops.ir import For, Load, LoopFunction, Store, VecLoad, VecStore
from cnnc.loops.walk import Node, rewrite_function

_NAMING_BUFFERS = (Load, VecLoad, Store, VecStore)  # the nodes with a `buffer` field


def code_key(function: LoopFunction) -> str:
    """The function with its name left out and its buffers named by position: equal keys
    are equal functions given other pointers. (The dataclasses' repr shows every field, so
    nothing that codegen reads is left out of the comparison.)"""
    names = {b.name: f"#{i}" for i, b in enumerate(function.buffers)}

    def rename(node: Node) -> Node:
        if isinstance(node, _NAMING_BUFFERS):
            return dataclasses.replace(node, buffer=names.get(node.buffer, node.buffer))
        if isinstance(node, For) and node.private:
            return dataclasses.replace(node, private=tuple(names.get(p, p)
                                                           for p in node.private))
        return node

    renamed = rewrite_function(function, rename)
    buffers = tuple(dataclasses.replace(b, name=names[b.name]) for b in function.buffers)
    return repr(dataclasses.replace(renamed, name="", buffers=buffers))


def shared_code(functions: tuple[LoopFunction, ...]) -> dict[str, str]:
    """Each function's name → the first of `functions` with its code (its own name where
    it is the first)."""
    first: dict[str, str] = {}
    shared = {}
    for function in functions:
        shared[function.name] = first.setdefault(code_key(function), function.name)
    return shared
