"""The GPU engine of a cuda module: parameters, optimizer state and every buffer the kernels
write kept on the device between calls; `CudaModule` is a `Module` that runs on it.

The module file holds the kernels as Numba CUDA source; they are compiled here, at load
(Numba compiles each kernel at its first launch). Arguments are checked on the host before
any kernel sees them. `forward` takes numpy arrays, or device arrays (anything with
`__cuda_array_interface__`, e.g. a Numba device array or a CuPy or PyTorch CUDA tensor),
which it reads in place, without a copy.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from cnnc.artifact import format as artifact
from cnnc.artifact.manifest import Manifest
from cnnc.backends.cuda.launch import BLOCK_THREADS, grid
from cnnc.runtime.arguments import CnncRuntimeError
from cnnc.runtime.module import Module

NO_CUDA = ("this module runs on an NVIDIA GPU through Numba, and {reason}. On a machine "
           "without a GPU, NUMBA_ENABLE_CUDASIM=1 runs it in Numba's CUDA simulator (slow)")


def _cuda():
    """numba.cuda, or a clear error where it cannot run kernels."""
    try:
        from numba import cuda
    except ImportError as error:
        raise CnncRuntimeError.single(NO_CUDA.format(reason=f"numba is missing ({error})")) \
            from None
    if not cuda.is_available():
        raise CnncRuntimeError.single(NO_CUDA.format(reason="no CUDA GPU is available"))
    return cuda


def select_gpu(local_rank: int) -> int:
    """Make GPU `local_rank` modulo the GPU count this process's device (the processes of a
    data-parallel job on one machine take one GPU each, while there are enough); returns
    its index."""
    cuda = _cuda()
    index = local_rank % len(cuda.gpus)
    cuda.select_device(index)
    return index


SIMULATOR_SUM_THREADS = 4

# The simulator runs a block's threads as Python threads while the launching thread polls
# them in a loop, and each time that loop holds the GIL it keeps it for the interpreter's
# switch interval (5 ms): most of a launch was that wait. Switching every 0.2 ms while
# simulated launches run made the CUDA tests 6-8x faster.
SIMULATOR_SWITCH_INTERVAL = 0.0002
_switching = threading.Lock()
_simulating = 0  # simulated launches running now, in any thread
_saved_interval = 0.0


@contextlib.contextmanager
def _quick_thread_switches() -> Iterator[None]:
    """The interpreter's switch interval at SIMULATOR_SWITCH_INTERVAL while any simulated
    launch runs, and as it was once none does."""
    global _simulating, _saved_interval
    with _switching:
        if _simulating == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_interval, SIMULATOR_SWITCH_INTERVAL))
        _simulating += 1
    try:
        yield
    finally:
        with _switching:
            _simulating -= 1
            if _simulating == 0:
                sys.setswitchinterval(_saved_interval)


def _simulated(cuda: Any) -> bool:
    """Whether numba.cuda is Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


class CudaEngine:
    kind = "cuda"
    exclusive = True  # one workspace on the device for every call
    host_threads = False

    @staticmethod
    def check_available() -> None:
        _cuda()

    def __init__(self, file: artifact.ModuleFile, manifest: Manifest,
                 values: dict[str, np.ndarray], source: str, threads: int | None) -> None:
        self._cuda = _cuda()
        self._kernels = _compiled_kernels(file.sections["cuda"], source)
        self._launches = {entry.role: entry.launches for entry in manifest.entry_points}
        self._storage = manifest.storage
        self._shapes = {name: value.shape for name, value in values.items()}
        self._device = {name: self._cuda.to_device(value.reshape(-1))
                        for name, value in values.items()}
        # the buffer that takes each given array: the input, the labels, the optimizer's
        # scalars
        self._given = {b.role: b.name for b in manifest.storage
                       if b.role in ("input", "target", "hyper")}
        # threads a block of a sum: the simulator runs each as a Python thread, where fewer
        # (still a tree of several levels) keep the tests fast
        self._simulated = _simulated(self._cuda)  # asked once: every launch wants it
        self._sum_threads = SIMULATOR_SUM_THREADS if self._simulated else BLOCK_THREADS
        self._workspace_batch: int | None = None
        self._workspace_buffers: dict[str, Any] = {}

    # -- threads: the GPU runs every launch over the whole batch ------------------------------
    @property
    def threads(self) -> int:
        return 1

    def set_threads(self, count: int) -> None:
        """Host threads do not apply."""

    def map(self, work: Callable[[slice], Any], slices: list[slice]) -> list[Any]:
        return [work(part) for part in slices]

    # -- running ------------------------------------------------------------------------------
    def device_array(self, value: Any) -> Any | None:
        """A device array, read in place (the module checks it like a numpy array)."""
        if self._simulated and isinstance(value, self._cuda.devicearray.FakeCUDAArray):
            return value  # the simulator's device arrays have no __cuda_array_interface__
        if hasattr(value, "__cuda_array_interface__"):
            return self._cuda.as_cuda_array(value)
        return None

    def run(self, role: str, batch: int, given: Mapping[str, Any],
            read: Sequence[str], whole: bool = False) -> dict[str, np.ndarray]:
        """Launch the role's kernels in order on the device, then copy `read` to the host."""
        buffers = dict(self._workspace_for(batch))
        named = {self._given[what]: value for what, value in given.items() if what != "noise"}
        named.update(given.get("noise", {}))  # a training call's random numbers, by buffer
        for name, value in named.items():  # checked: numpy arrays, or the input on the device
            on_device = self._cuda.to_device(value) if isinstance(value, np.ndarray) else value
            buffers[name] = on_device.reshape(on_device.size)
        buffers.update(self._device)
        self._launch(role, buffers, batch)
        shapes = {b.name: b.sized(batch) or (1,) for b in self._storage}
        return {name: buffers[name].copy_to_host().reshape(shapes[name]) for name in read}

    def update(self, gradients: Mapping[str, np.ndarray], hyper: np.ndarray,
               batch: int) -> None:
        buffers = dict(self._workspace_for(self._workspace_batch or 1))
        for name, value in gradients.items():
            buffers[name].copy_to_device(value.reshape(-1))
        buffers[self._given["hyper"]] = self._cuda.to_device(hyper)
        buffers.update(self._device)
        self._launch("update", buffers, batch)

    def _launch(self, role: str, buffers: dict[str, Any], batch: int) -> None:
        with _quick_thread_switches() if self._simulated else contextlib.nullcontext():
            self._launch_all(role, buffers, batch)

    def _launch_all(self, role: str, buffers: dict[str, Any], batch: int) -> None:
        for launch in self._launches[role]:
            blocks, per_block = grid(launch, batch, self._sum_threads)
            arguments = [buffers[name] for name in launch.buffers]
            self._kernels[launch.kernel][blocks, per_block](batch, *arguments)
        self._cuda.synchronize()

    def _workspace_for(self, batch: int) -> dict[str, Any]:
        """The device buffers the kernels write, kept for the next call of the same batch."""
        if self._workspace_batch != batch:
            self._workspace_buffers = {}
            for b in self._storage:
                if b.role in ("value", "loss", "target", "hyper", "noise"):
                    size = int(np.prod(b.sized(batch)))
                    self._workspace_buffers[b.name] = self._cuda.device_array(
                        max(size, 1), dtype=b.numpy_dtype)
            self._workspace_batch = batch
        return self._workspace_buffers

    # -- parameters and state: the device holds them ------------------------------------------
    def values(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: self._device[name].copy_to_host().reshape(self._shapes[name])
                for name in names}

    def write(self, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            self._device[name].copy_to_device(value.reshape(-1))


class CudaModule(Module):
    """A compiled network on the GPU. Make one with `cnnc.compile(..., target="cuda")` or
    `cnnc.load(path)` of a cuda module file. `forward` also takes device arrays (anything
    with `__cuda_array_interface__`), read in place."""

    engine_type = CudaEngine


def _compiled_kernels(source: bytes, origin: str) -> dict[str, Any]:
    """The kernels the module's CUDA source defines (its hash was checked before)."""
    namespace: dict[str, Any] = {}
    try:
        exec(compile(source.decode("utf-8"), f"<cuda kernels of {origin}>", "exec"), namespace)
    except (SyntaxError, UnicodeDecodeError, ImportError) as error:
        raise artifact.CnncModuleError.single(f"cannot load {origin}: its CUDA source does "
                                              f"not load ({error})") from None
    return namespace
