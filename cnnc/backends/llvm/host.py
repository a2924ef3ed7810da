"""The host CPU as LLVM sees it, and the lock every use of llvmlite in cnnc holds: what both
the compiler (code generation) and the runtime (loading object code) need of LLVM."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import llvmlite.binding as llvm


@dataclass(frozen=True, slots=True)
class HostTarget:
    triple: str
    cpu: str
    features: str  # LLVM's "+avx2,-avx512f,..." string


# Held by every call cnnc makes into LLVM in this process. Compiling forks worker
# processes while holding it, so that no other thread of cnnc is inside llvmlite at that
# moment: a child would inherit llvmlite's own lock locked, and wait on it forever.
LLVM_LOCK = threading.RLock()


@functools.cache
def initialise() -> None:
    """LLVM's code generators, once a process (a forked compile worker inherits them): the
    host's, and every other architecture's, for `--triple` (under a millisecond)."""
    with LLVM_LOCK:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        llvm.initialize_all_targets()
        llvm.initialize_all_asmprinters()


@functools.cache
def host_target() -> HostTarget:
    initialise()
    with LLVM_LOCK:
        return HostTarget(llvm.get_process_triple(), llvm.get_host_cpu_name(),
                          llvm.get_host_cpu_features().flatten())


def create_machine(triple: str, cpu: str, features: str, opt_level: int,
                   library: bool = False) -> llvm.TargetMachine:
    """A new machine each time (an MCJIT engine takes ownership of its machine), with the
    code model the runtime's JIT expects of the object code it loads; for a `library`
    (`--emit lib`), position-independent code that a shared library can hold (WebAssembly:
    static, which its linker wants of a module that is not loaded dynamically)."""
    initialise()
    target = llvm.Target.from_triple(triple)
    if library:
        reloc = "static" if triple.startswith("wasm") else "pic"
        return target.create_target_machine(cpu=cpu, features=features, opt=opt_level,
                                            reloc=reloc, codemodel="default")
    return target.create_target_machine(cpu=cpu, features=features, opt=opt_level,
                                        codemodel="jitdefault")


def target_machine(opt_level: int = 3) -> llvm.TargetMachine:
    """A machine for the host, on which the runtime runs object code."""
    host = host_target()
    return create_machine(host.triple, host.cpu, host.features, opt_level)
