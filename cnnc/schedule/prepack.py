"""Weights packed once, not on every call.

A scheduled kernel starts with the loops that copy its weights (and bias) into the
channel-blocked scratch its register blocks read. Those copies depend on the parameters
only, so redoing them on every call is pure overhead: for ResNet-18 at batch 1 it is all
11.7 M weights a call, serial, before any arithmetic. Here each such loop moves out of the
kernel into a function of its own (`K.pack`); its scratch becomes a `packed` buffer the
module keeps between calls, and the module's `pack` entry point runs every packing
function. The runtime calls it only when the parameters have changed since the last time
(set_params, a training step, an update), before the next call that reads them.

A top-level statement of a kernel's body moves when it reads nothing but `constant`
buffers (the parameters), stores to nothing but scratch buffers of its own that no other
statement writes, and uses neither the batch size nor a local.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cnnc.graph.ir import BATCH, Role, Tensor
from cnnc.loops.ir import Assign, Load, LoopFunction, Stmt, Store, Var, VecLoad, VecStore
from cnnc.loops.walk import walk

PACK_SUFFIX = ".pack"


@dataclass(frozen=True, slots=True)
class Split:
    """A kernel without its packing loops, and the function that now runs them."""

    kernel: LoopFunction
    pack: LoopFunction | None
    scratch: tuple[Tensor, ...]  # the kernel's scratch, the packed ones with role PACKED


def split_packing(function: LoopFunction, scratch: tuple[Tensor, ...],
                  constant: frozenset[str]) -> Split:
    """`function` with the loops that only pack `constant` buffers moved to a function of
    their own (None where there are none)."""
    scratch_names = {t.name for t in scratch}
    # one walk a statement: a network's kernels have thousands of nodes each
    summaries = [_summary(stmt) for stmt in function.body]
    writers: dict[str, int] = {}
    for summary in summaries:
        for name in summary.stored:
            writers[name] = writers.get(name, 0) + 1
    chosen = [(stmt, summary) for stmt, summary in zip(function.body, summaries, strict=True)
              if _packs(summary, constant, scratch_names, writers)]
    if not chosen:
        return Split(function, None, scratch)
    moved = [stmt for stmt, _ in chosen]
    packed = {name for _, summary in chosen for name in summary.stored}
    read = {name for _, summary in chosen for name in summary.loaded}
    buffers = tuple(b for b in function.buffers if b.name in packed | read)
    pack = LoopFunction(function.name + PACK_SUFFIX, buffers, (), tuple(moved))
    kept = tuple(stmt for stmt in function.body if not any(stmt is m for m in moved))
    # the kernel reads what it used to write: an input to it now
    kernel_buffers = tuple(dataclasses.replace(b, is_output=False) if b.name in packed else b
                           for b in function.buffers)
    kernel = dataclasses.replace(function, buffers=kernel_buffers, body=kept)
    roles = tuple(dataclasses.replace(t, role=Role.PACKED) if t.name in packed else t
                  for t in scratch)
    return Split(kernel, pack, roles)


@dataclass(frozen=True, slots=True)
class _Summary:
    """What one top-level statement stores to and loads from, and whether it assigns a
    local or uses the batch size."""

    stored: frozenset[str]
    loaded: frozenset[str]
    varies: bool


def _summary(stmt: Stmt) -> _Summary:
    stored, loaded, varies = set(), set(), False
    for node in walk(stmt):
        if isinstance(node, (Store, VecStore)):
            stored.add(node.buffer)
        elif isinstance(node, (Load, VecLoad)):
            loaded.add(node.buffer)
        elif isinstance(node, Assign) or (isinstance(node, Var) and node.name == BATCH):
            varies = True
    return _Summary(frozenset(stored), frozenset(loaded), varies)


def _packs(summary: _Summary, constant: frozenset[str], scratch: set[str],
           writers: dict[str, int]) -> bool:
    stored = summary.stored
    if not stored or any(name not in scratch or writers[name] > 1 for name in stored):
        return False
    return not summary.varies and all(name in constant for name in summary.loaded)
