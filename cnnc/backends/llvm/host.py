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
def host_target() -> HostTarget:
    with LLVM_LOCK:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        return HostTarget(llvm.get_process_triple(), llvm.get_host_cpu_name(),
                          llvm.get_host_cpu_features().flatten())


@functools.cache
def host_has_fma() -> bool:
    """Whether the host computes a·b + c rounded once in hardware. Elsewhere `llvm.fma` would
    be a call of the C library's (slow, software) `fma`, so cnnc multiplies and adds instead."""
    host = host_target()
    if host.triple.startswith(("x86_64", "i386", "i686")):
        return "+fma" in host.features.split(",")
    # FMA is part of the base instruction set of these
    return host.triple.startswith(("aarch64", "arm64", "powerpc64", "ppc64", "s390x"))


def target_machine(opt_level: int = 3) -> llvm.TargetMachine:
    """A new machine for the host each time: an MCJIT engine takes ownership of its machine."""
    host = host_target()
    target = llvm.Target.from_triple(host.triple)
    return target.create_target_machine(cpu=host.cpu, features=host.features, opt=opt_level,
                                        codemodel="jitdefault")
