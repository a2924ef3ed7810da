"""Which read-only buffers a CUDA launch stages in shared memory, decided on the loop IR.

A convolution's threads run one output element each: (n, f, oh, ow) on consecutive threads
with ow fastest. The consecutive threads of one block therefore share one or two filters
`w[f, ...]`, and each of them reads every tap of its filter. Reading those taps from global
memory once a thread is what shared memory saves: the block copies the filter slices its
threads use into shared memory once, with all its threads, then every thread reads them
from there.

The rule is not about convolutions. A buffer is staged in a launch when

- the launch does not write it, its shape does not depend on the batch, and it is a float
  buffer (the shared array has the module's float type);
- every load of it indexes one axis with the same thread variable `v` alone, and its other
  axes with no thread variable at all: the thread's slice of it depends on `v` only; and
  some load walks the slice with a loop variable (a bias, read once, is not worth a copy);
- `v` is not the innermost thread loop: threads in a row share a slice;
- the slices a block can touch fit the budget.

A block of B consecutive threads, where `v` advances every `stride` threads (the product of
the extents of the thread loops inside it), touches at most (B - 1) // stride + 2 values of
`v`: those are its slots. The filter gradient of the input (`grad_input`, indexed by the
input channel) and the forward convolution qualify; dense layers do not (their unit is the
innermost thread loop), nor does anything in a block reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnc.graph.ir import BATCH
from cnnc.loops.ir import (
    Assign,
    Broadcast,
    Const,
    Expr,
    For,
    Lane,
    Load,
    LoopFunction,
    Ramp,
    Stmt,
    Store,
    Var,
    VecLoad,
    VecStore,
)
from cnnc.loops.walk import walk, walk_all

# Shared memory a launch may fill with staged slices: a quarter of the 48 KiB a block may
# have statically, so that several blocks still fit on one multiprocessor.
STAGE_BUDGET_BYTES = 12 * 1024


@dataclass(frozen=True, slots=True)
class Staged:
    """A buffer whose slices along `axis` are copied to shared memory, one slot a value of
    the thread variable `var` that the block's threads take."""

    buffer: str
    axis: int
    var: str
    stride: int  # threads between two values of `var`
    extent: int  # the values `var` takes
    slots: int  # slices the shared array holds
    slice_shape: tuple[int, ...]  # the buffer's shape without `axis`
    whole: bool = False  # every slice staged (slot = the variable), not the block's span
    dtype_bytes: int = 4

    @property
    def slice_size(self) -> int:
        return math.prod(self.slice_shape)


Access = tuple[str, tuple[Expr, ...], bool]  # buffer, index, is_store


def staged_buffers(function: LoopFunction, parallel: list[For], body: tuple[Stmt, ...],
                   block_threads: int) -> tuple[Staged, ...]:
    """The buffers worth staging in a launch whose thread loops are `parallel` (outermost
    first) around `body`, together within the budget."""
    thread_vars = [loop.var for loop in parallel]
    if names_bound(body) & set(thread_vars):
        return ()  # a slot is computed from the thread index, not from a rebound variable
    accesses = [access for stmt in body for access in accesses_of(stmt)]
    written = {buffer for buffer, _, is_store in accesses if is_store}
    read = sorted({buffer for buffer, _, is_store in accesses if not is_store} - written)
    staged: list[Staged] = []
    budget = STAGE_BUDGET_BYTES
    for buffer in read:
        item = _staging(function, parallel, buffer, accesses, block_threads)
        if item is None:
            continue
        size = item.slots * item.slice_size * item.dtype_bytes
        if size <= budget:
            staged.append(item)
            budget -= size
    return tuple(staged)


def _staging(function: LoopFunction, parallel: list[For], buffer: str,
             accesses: list[Access], block_threads: int) -> Staged | None:
    """How `buffer` would be staged, or None where the rule (module docstring) says no."""
    thread_vars = [loop.var for loop in parallel]
    declared = function.buffer(buffer)
    if BATCH in declared.shape or not declared.dtype.is_float:
        return None
    found = _slice_axis([index for name, index, _ in accesses if name == buffer], thread_vars)
    if found is None:
        return None
    axis, var = found
    position = thread_vars.index(var)
    inner = [loop.extent for loop in parallel[position + 1:]]
    own = parallel[position].extent
    if not inner or not all(isinstance(e, Const) for e in (*inner, own)):
        return None  # innermost, or a stride or count that depends on the batch
    stride = math.prod(int(extent.value) for extent in inner)
    extent = int(own.value)
    if declared.shape[axis] != extent:
        return None  # the copy takes every value of the loop: each must index the buffer
    spanned = min(block_threads, (block_threads - 1) // stride + 2)
    whole = extent <= spanned  # every slice fits: copy each once, the slot is `var` itself
    if stride == 1 and not whole:
        return None  # a slice a thread: nothing is shared
    slice_shape = tuple(int(d) for i, d in enumerate(declared.shape) if i != axis)
    return Staged(buffer, axis, var, stride, extent, extent if whole else spanned,
                  slice_shape, whole, 8 if declared.dtype.value == "f64" else 4)


def _slice_axis(indices: list[tuple[Expr, ...]], thread_vars: list[str]
                ) -> tuple[int, str] | None:
    """(axis, thread variable) when every index picks its slice with that variable alone on
    that axis and uses no thread variable elsewhere; else None."""
    found: tuple[int, str] | None = None
    for index in indices:
        here = None
        for axis, item in enumerate(index):
            used = [v.name for v in variables_of(item) if v.name in thread_vars]
            if isinstance(item, Var) and item.name in thread_vars and here is None:
                here = (axis, item.name)
            elif used:
                return None
        if here is None or (found is not None and here != found):
            return None
        found = here
    if found is None or not any(variables_of(item) for index in indices
                                for axis, item in enumerate(index) if axis != found[0]):
        return None  # a thread reads one element of its slice: nothing to share
    return found


# what only the schedules of the CPU make: a CUDA thread computes one element
_VECTOR_NODES = (VecLoad, VecStore, Broadcast, Ramp, Lane)


def accesses_of(stmt: Stmt) -> list[Access]:
    """(buffer, index, is_store) of every load and store in `stmt`, in the order they are
    written: a store before the loads of its index and value."""
    found: list[Access] = []
    for node in walk(stmt):
        if isinstance(node, _VECTOR_NODES):
            raise ValueError(f"the CUDA backend takes plain loop nests, not {type(node).__name__}")
        if isinstance(node, Load | Store):
            found.append((node.buffer, node.index, isinstance(node, Store)))
    return found


def names_bound(stmts: tuple[Stmt, ...]) -> set[str]:
    """Every variable the statements assign or use as a loop counter."""
    return {node.var for node in walk_all(stmts) if isinstance(node, Assign | For)}


def variables_of(expr: Expr) -> list[Var]:
    """Every variable `expr` reads, loads' indices included, in the order they are written."""
    return [node for node in walk(expr) if isinstance(node, Var)]


__all__ = ["STAGE_BUDGET_BYTES", "Staged", "accesses_of", "names_bound", "staged_buffers",
           "variables_of"]
