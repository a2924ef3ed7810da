"""A compiled network's kernels as one object file for a C library: the optimised modules
linked into one, the entry points renamed into the network's namespace and hidden (the
library's C API calls them), everything else internal, so that two networks' libraries
link into one program. Position-independent, for a shared library.

The code is the optimised LLVM IR the module file's object code was generated from, so the
arithmetic is the same instructions: on the same CPU the outputs are bit-identical."""

from __future__ import annotations

import llvmlite.binding as llvm
import llvmlite.ir as ir

from cnnc.backends.llvm.codegen import MODULE_SEPARATOR, NativeCode
from cnnc.backends.llvm.host import LLVM_LOCK, create_machine
from cnnc.backends.target import CpuTarget


def library_object(code: NativeCode, exported: dict[str, str], opt_level: int = 3) -> bytes:
    """`code`'s modules as one object file: each entry point `old` named `exported[old]`."""
    target = code.target
    with LLVM_LOCK:
        machine = create_machine(target.triple, target.cpu, target.features, opt_level,
                                 library=True)
        context = llvm.create_context()
        modules = [llvm.parse_assembly(text, context=context)
                   for text in code.llvm_ir.split(MODULE_SEPARATOR)]
        linked = modules[0]
        for other in modules[1:]:
            linked.link_in(other)
        for function in linked.functions:
            if function.is_declaration:
                continue  # the C library's functions (expf, ...) and LLVM's intrinsics
            if function.name in exported:
                function.name = exported[function.name]
                function.visibility = "hidden"
            else:
                function.linkage = "internal"
        for variable in linked.global_variables:
            if not variable.is_declaration:
                variable.linkage = "internal"
        linked.verify()
        return machine.emit_object(linked)


def data_object(target: CpuTarget, symbol: str, data: bytes) -> bytes:
    """An object file holding `data` as the constant array `symbol` (64-byte aligned,
    hidden): a library's embedded weights."""
    module = ir.Module(name=symbol)
    kind = ir.ArrayType(ir.IntType(8), len(data))
    variable = ir.GlobalVariable(module, kind, symbol)
    variable.global_constant = True
    variable.initializer = ir.Constant(kind, bytearray(data))
    variable.align = 64
    variable.visibility = "hidden"
    with LLVM_LOCK:
        machine = create_machine(target.triple, target.cpu, target.features, 0, library=True)
        parsed = llvm.parse_assembly(str(module), context=llvm.create_context())
        parsed.triple = target.triple
        parsed.data_layout = str(machine.target_data)
        return machine.emit_object(parsed)
