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

from ..ir import BATCH
from ..loops import Binary, Const, Expr, For, Load, LoopFunction, Select, Unary, Var

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

    @property
    def slice_size(self) -> int:
        return math.prod(self.slice_shape)


Access = tuple[str, tuple[Expr, ...], bool]  # buffer, index, is_store


def staged_buffers(function: LoopFunction, parallel: list[For], accesses: list[Access],
                   block_threads: int) -> tuple[Staged, ...]:
    """The buffers worth staging in a launch whose thread loops are `parallel` (outermost
    first) and whose body makes `accesses`."""
    thread_vars = [loop.var for loop in parallel]
    written = {buffer for buffer, _, is_store in accesses if is_store}
    read = sorted({buffer for buffer, _, is_store in accesses if not is_store} - written)
    staged = []
    for buffer in read:
        declared = function.buffer(buffer)
        if BATCH in declared.shape or not declared.dtype.is_float:
            continue
        indices = [index for name, index, _ in accesses if name == buffer]
        found = _slice_axis(indices, thread_vars)
        if found is None:
            continue
        axis, var = found
        position = thread_vars.index(var)
        inner = [loop.extent for loop in parallel[position + 1:]]
        if not inner or not all(isinstance(extent, Const) for extent in inner):
            continue  # innermost, or a stride that depends on the batch
        stride = math.prod(int(extent.value) for extent in inner)
        slots = min(block_threads, (block_threads - 1) // stride + 2)
        slice_shape = tuple(int(d) for i, d in enumerate(declared.shape) if i != axis)
        itemsize = 8 if declared.dtype.value == "f64" else 4
        if slots * math.prod(slice_shape) * itemsize > STAGE_BUDGET_BYTES:
            continue
        own = parallel[position].extent
        if not isinstance(own, Const):
            continue
        staged.append(Staged(buffer, axis, var, stride, int(own.value), slots, slice_shape))
    return tuple(staged)


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


def variables_of(expr: Expr) -> list[Var]:
    """Every variable `expr` reads, loads' indices included."""
    if isinstance(expr, Var):
        return [expr]
    children: list[Expr] = []
    if isinstance(expr, Load):
        children = list(expr.index)
    elif isinstance(expr, Binary):
        children = [expr.left, expr.right]
    elif isinstance(expr, Unary):
        children = [expr.operand]
    elif isinstance(expr, Select):
        children = [expr.cond, expr.then, expr.otherwise]
    return [v for child in children for v in variables_of(child)]


__all__ = ["STAGE_BUDGET_BYTES", "Staged", "staged_buffers", "variables_of"]
