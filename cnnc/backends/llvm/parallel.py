"""A parallel loop (loops.ir.For, PARALLEL) as a call of `cnnc_parallel_for` on the thread
team (backends.llvm.team).

The loop's body is outlined twice: a body function `KERNEL.partK.body(first, end, N,
buffers..., values...)` that runs iterations first..end-1, with the buffers as noalias
arguments like a kernel's (so LLVM optimises it as it would the loop in place), and a
wrapper `KERNEL.partK(context, first, end)` that unpacks the context, a struct on the
kernel's stack holding N, the buffer pointers, the value of every local and loop variable
at the loop (each thread starts from these; what it assigns is its own) and the extents.
Private buffers are arrays on each body call's stack, so every thread writes its own.
Collapsed loops (a parallel loop holding only one) share one range of the product of their
extents; each iteration's variables are recovered by division.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import llvmlite.ir as ir

from cnnc.backends.llvm.team import PART_TYPE, declare_parallel_for
from cnnc.loops.ir import For
from cnnc.loops.verify import parallel_nest

if TYPE_CHECKING:
    from cnnc.backends.llvm.codegen import _Emitter

I32 = ir.IntType(32)
I64 = ir.IntType(64)
I8P = ir.IntType(8).as_pointer()
# private arrays are aligned for the widest vectors a target has
PRIVATE_ALIGN = 64


def emit_parallel(emitter: _Emitter, stmt: For) -> None:
    """`stmt` (and the loops collapsed into it) as one `cnnc_parallel_for` call."""
    nest = parallel_nest(stmt)
    builder = emitter.builder
    extents = [emitter.expr(loop.extent) for loop in nest]
    total = extents[0]
    for extent in extents[1:]:
        total = builder.mul(total, extent, flags=["nsw"])
    buffers = list(emitter.pointers.items())
    captured = list(emitter.slots.items())
    values = [emitter.batch, *(p for _, p in buffers),
              *(builder.load(slot) for _, slot in captured), *extents]
    context_type = ir.LiteralStructType([v.type for v in values])
    with builder.goto_entry_block():
        context = builder.alloca(context_type, name="parallel.context")
    for index, value in enumerate(values):
        builder.store(value, _field(builder, context, index))
    name = f"{emitter.function.name}.part{emitter.parts}"
    emitter.parts += 1
    body = _emit_body(emitter, f"{name}.body", nest, buffers, captured)
    wrapper = _emit_wrapper(emitter.module, name, context_type, body)
    builder.call(declare_parallel_for(emitter.module),
                 [emitter.team, wrapper, builder.bitcast(context, I8P), total])


def _field(builder: ir.IRBuilder, struct: ir.Value, index: int) -> ir.Value:
    return builder.gep(struct, [ir.Constant(I32, 0), ir.Constant(I32, index)], inbounds=True)


def _emit_wrapper(module: ir.Module, name: str, context_type: ir.Type,
                  body: ir.Function) -> ir.Function:
    """`void NAME(i8* context, i64 first, i64 end)`: the body with the context unpacked."""
    wrapper = ir.Function(module, PART_TYPE, name)
    wrapper.linkage = "internal"
    raw, first, end = wrapper.args
    builder = ir.IRBuilder(wrapper.append_basic_block("entry"))
    context = builder.bitcast(raw, context_type.as_pointer())
    fields = [builder.load(_field(builder, context, i))
              for i in range(len(context_type.elements))]
    builder.call(body, [first, end, *fields])
    builder.ret_void()
    return wrapper


def _emit_body(emitter: _Emitter, name: str, nest: list[For],
               buffers: list[tuple[str, ir.Value]],
               captured: list[tuple[str, ir.AllocaInstr]]) -> ir.Function:
    """`void NAME(first, end, N, buffers..., values..., extents...)`: iterations
    first..end-1 of the collapsed nest."""
    types = [I64, I64, I64, *(p.type for _, p in buffers),
             *(slot.allocated_type for _, slot in captured), *(I64 for _ in nest)]
    body = ir.Function(emitter.module, ir.FunctionType(ir.VoidType(), types), name)
    body.linkage = "internal"
    args = list(body.args)
    first, end, batch = args[:3]
    pointer_args = args[3:3 + len(buffers)]
    for arg in pointer_args:
        arg.add_attribute("noalias")
    value_args = args[3 + len(buffers):3 + len(buffers) + len(captured)]
    extents = args[3 + len(buffers) + len(captured):]
    inner = emitter.fork(body, batch, {n: a for (n, _), a in zip(buffers, pointer_args,
                                                                  strict=True)})
    builder = inner.builder
    for (slot_name, slot), value in zip(captured, value_args, strict=True):
        inner.slots[slot_name] = builder.alloca(slot.allocated_type, name=slot_name)
        builder.store(value, inner.slots[slot_name])
    for private in (n for loop in nest for n in loop.private):
        inner.pointers[private] = _private_array(builder, emitter, private)
    _emit_range(inner, nest, first, end, extents)
    builder.ret_void()
    return body


def _private_array(builder: ir.IRBuilder, emitter: _Emitter, name: str) -> ir.Value:
    """This call's own copy of the scratch buffer `name`, on the stack."""
    pointer_type = emitter.pointers[name].type
    count = 1
    for dim in emitter.function.buffer(name).shape:
        count *= dim
    array = builder.alloca(ir.ArrayType(pointer_type.pointee, count), name=f"{name}.private")
    array.align = PRIVATE_ALIGN
    return builder.bitcast(array, pointer_type)


def _emit_range(inner: _Emitter, nest: list[For], first: ir.Value, end: ir.Value,
                extents: list[ir.Value]) -> None:
    """for i in first..end-1: the nest's variables from i (the last varies fastest), then
    the innermost loop's body."""
    builder = inner.builder
    function = builder.function
    counter = builder.alloca(I64, name="parallel.i")
    builder.store(first, counter)
    test = function.append_basic_block("parallel.test")
    run = function.append_basic_block("parallel.body")
    done = function.append_basic_block("parallel.done")
    builder.branch(test)
    builder.position_at_end(test)
    current = builder.load(counter)
    builder.cbranch(builder.icmp_signed("<", current, end), run, done)
    builder.position_at_end(run)
    rest = current
    for loop, extent in reversed(list(zip(nest, extents, strict=True))):
        slot = inner._index_slot(loop.var)
        if loop is nest[0]:
            builder.store(rest, slot)
        else:
            builder.store(builder.srem(rest, extent), slot)
            rest = builder.sdiv(rest, extent)
    for stmt in nest[-1].body:
        inner.statement(stmt)
    builder.store(builder.add(builder.load(counter), ir.Constant(I64, 1), flags=["nsw"]),
                  counter)
    builder.branch(test)
    builder.position_at_end(done)
