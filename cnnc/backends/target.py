"""The CPU a module is compiled for, as one value that the driver makes once and passes down:
LLVM's name for it (triple, CPU, features) and what the schedules' cost model knows of it
(vector width, registers, caches). No stage asks the host; `host_cpu()` is the default the
driver and the CLI start from."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from cnnc.backends.llvm.host import host_target
from cnnc.schedule.cost import Machine


@dataclass(frozen=True, slots=True)
class CpuTarget:
    triple: str
    cpu: str
    features: str  # LLVM's "+avx2,-avx512f,..." string
    machine: Machine

    @property
    def has_fma(self) -> bool:
        """Whether the CPU computes a·b + c rounded once in hardware. Elsewhere `llvm.fma`
        would be a call of the C library's (slow, software) `fma`, so cnnc multiplies and
        adds instead."""
        if self.triple.startswith(("x86_64", "i386", "i686")):
            return "+fma" in self.features.split(",")
        # FMA is part of the base instruction set of these
        return self.triple.startswith(("aarch64", "arm64", "powerpc64", "ppc64", "s390x"))

    def with_machine(self, machine: Machine) -> CpuTarget:
        """This CPU, scheduled for `machine` (a module file's recorded cost model)."""
        return dataclasses.replace(self, machine=machine)

    def with_winograd(self, allowed: bool) -> CpuTarget:
        """This CPU, with Winograd convolutions allowed where the cost model picks them, or
        not (--no-winograd)."""
        return self.with_machine(dataclasses.replace(self.machine, winograd=allowed))


@functools.cache
def host_cpu() -> CpuTarget:
    host = host_target()
    features = set(host.features.split(","))
    if "+avx512f" in features:
        bits, registers = 512, 32
    elif "+avx" in features or "+avx2" in features:
        bits, registers = 256, 16
    else:
        bits, registers = 128, 16
    machine = Machine(bits, registers, _cache_bytes(1, 32 * 1024), _cache_bytes(2, 512 * 1024))
    return CpuTarget(host.triple, host.cpu, host.features, machine)


# The triples `--triple` takes, by the short names a user types, and the CPUs each knows:
# LLVM's CPU name, its features (spelt out: the cost model and `has_fma` read them) and
# what the schedules know of its vectors. Caches are typical ones: no host is asked.
TRIPLES = {"x86_64": "x86_64-unknown-linux-gnu", "x86_64-linux-gnu": "x86_64-unknown-linux-gnu",
           "aarch64": "aarch64-unknown-linux-gnu", "aarch64-linux-gnu": "aarch64-unknown-linux-gnu",
           "arm": "armv7-unknown-linux-gnueabihf", "arm-linux-gnueabihf":
           "armv7-unknown-linux-gnueabihf", "riscv64": "riscv64-unknown-linux-gnu",
           "riscv64-linux-gnu": "riscv64-unknown-linux-gnu", "wasm32": "wasm32-unknown-unknown"}
_X86_V2 = "+cx16,+popcnt,+sahf,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3"
_X86_V3 = _X86_V2 + ",+avx,+avx2,+bmi,+bmi2,+f16c,+fma,+lzcnt,+movbe,+xsave"
_X86_V4 = _X86_V3 + ",+avx512f,+avx512bw,+avx512cd,+avx512dq,+avx512vl"
# name -> (LLVM CPU, features, vector bits, vector registers)
CPUS = {
    "x86_64": {"generic": ("x86-64", "+sse2", 128, 16),
               "x86-64-v2": ("x86-64-v2", _X86_V2, 128, 16),
               "x86-64-v3": ("x86-64-v3", _X86_V3, 256, 16),
               "x86-64-v4": ("x86-64-v4", _X86_V4, 512, 32)},
    "aarch64": {"generic": ("generic", "+neon,+fp-armv8", 128, 32),
                "cortex-a53": ("cortex-a53", "+neon,+fp-armv8", 128, 32),
                "cortex-a72": ("cortex-a72", "+neon,+fp-armv8", 128, 32),
                "cortex-a76": ("cortex-a76", "+neon,+fp-armv8", 128, 32),
                "neoverse-n1": ("neoverse-n1", "+neon,+fp-armv8", 128, 32)},
    "armv7": {"generic": ("cortex-a7", "+neon,+vfp4", 128, 16)},
    "riscv64": {"generic": ("generic-rv64", "+m,+a,+f,+d,+c", 128, 32)},
    "wasm32": {"generic": ("generic", "+simd128,+bulk-memory", 128, 16)},
}
TYPICAL_L1, TYPICAL_L2 = 32 * 1024, 512 * 1024


def named_target(triple: str | None = None, cpu: str | None = None) -> CpuTarget:
    """The CPU `--triple` and `--cpu` name: the host's own (`native`, the default on the
    host's architecture), or a named one (`generic`, the default on another), for which
    nothing is read off this machine. ValueError, with what is known, for a name that is
    not."""
    host = host_cpu()
    full = TRIPLES.get(triple, triple) if triple else host.triple
    arch = full.split("-")[0]
    native = arch == host.triple.split("-")[0]
    if arch not in CPUS and not native:
        raise ValueError(f"no known target {triple!r}; --triple takes "
                         f"{', '.join(sorted(TRIPLES))}")
    cpu = cpu or ("native" if native else "generic")
    if cpu == "native":
        if arch != host.triple.split("-")[0]:
            raise ValueError(f"--cpu native is this machine's CPU, an {host.triple.split('-')[0]} "
                             f"one; for {full} name one of: {', '.join(_cpus(arch))}")
        return host
    if cpu not in CPUS.get(arch, {}):
        raise ValueError(f"no known CPU {cpu!r} for {full}; --cpu takes "
                         f"{', '.join(_cpus(arch))}")
    name, features, bits, registers = CPUS[arch][cpu]
    return CpuTarget(full, name, features, Machine(bits, registers, TYPICAL_L1, TYPICAL_L2))


def _cpus(arch: str) -> list[str]:
    native = ["native"] if arch == host_cpu().triple.split("-")[0] else []
    return native + list(CPUS.get(arch, {}))


def _cache_bytes(level: int, fallback: int) -> int:
    """The data cache of `level` of cpu0 from sysfs; `fallback` where that is not readable."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            kind = (index / "type").read_text().strip()
            if int((index / "level").read_text()) == level and kind in ("Data", "Unified"):
                text = (index / "size").read_text().strip().upper()
                scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
                return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return fallback
