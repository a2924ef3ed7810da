"""What a `Module` asks of the machinery that runs its kernels: the CPU's (native entry points
and a thread pool, runtime.cpu) or the GPU's (device buffers and kernel launches,
runtime.cuda). The module checks every argument and keeps the step count and the lock; an
engine only runs checked arrays and holds the parameters and optimizer state where its
kernels read them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from cnnc.artifact.format import ModuleFile
from cnnc.artifact.manifest import Manifest


class Engine(Protocol):
    # the target of the module files it runs (the manifest's target.kind)
    kind: ClassVar[str]
    # whether every call shares one workspace, so the module runs calls one at a time
    exclusive: ClassVar[bool]
    # whether host threads apply (set_threads); the GPU runs a launch over the whole batch
    host_threads: ClassVar[bool]

    @staticmethod
    def check_available() -> None:
        """Refuse (CnncRuntimeError) where this engine cannot run at all; made before the
        module file is looked at."""

    def __init__(self, file: ModuleFile, manifest: Manifest, values: dict[str, np.ndarray],
                 source: str, threads: int | None) -> None:
        """`values`: the parameters and optimizer state by name, checked and contiguous."""

    @property
    def threads(self) -> int:
        """How many slices a call may cut its batch into."""

    def set_threads(self, count: int) -> None: ...

    def map(self, work: Callable[[slice], Any], slices: list[slice]) -> list[Any]:
        """work(part) for every slice, in the engine's threads."""

    def device_array(self, value: Any) -> Any | None:
        """`value` as a device array the engine reads in place, or None for host data."""

    def run(self, role: str, batch: int, given: Mapping[str, Any],
            read: Sequence[str], whole: bool = False) -> dict[str, np.ndarray]:
        """Run entry point `role` on a batch of `batch`; `given` holds the checked input,
        target and hyper arrays by role (the entry point may read fewer). Returns fresh host
        copies of the buffers named `read`, shaped as the buffer table says (N: `batch`, a
        scalar as (1,)). `whole`: this call is the whole of the module's call (not one of
        the slices `map` runs), so its parallel loops may take the engine's threads."""

    def update(self, gradients: Mapping[str, np.ndarray], hyper: np.ndarray,
               batch: int) -> None:
        """The optimizer's update with the given flat gradients, by gradient buffer name."""

    def values(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Host copies of parameters or optimizer state, in their shapes."""

    def write(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace parameters or optimizer state with checked, contiguous arrays."""
