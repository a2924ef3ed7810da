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
