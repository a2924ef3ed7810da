"""The runtime of a cuda module: the same `Module` API, with parameters, optimizer state and
every buffer the kernels write kept on the GPU between calls.

The module file holds the kernels as Numba CUDA source; they are compiled here, at load
(Numba compiles each kernel at its first launch). Arguments are checked on the host before
any kernel sees them. `forward` takes numpy arrays, or device arrays (anything with
`__cuda_array_interface__`, e.g. a Numba device array or a CuPy or PyTorch CUDA tensor),
which it reads in place, without a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cnnc.artifact import format as artifact
from cnnc.backends.cuda.launch import BLOCK_THREADS, grid, launch_from_json
from cnnc.runtime.loader import validated_manifest, validated_params
from cnnc.runtime.locking import StateLock
from cnnc.runtime.module import CnncRuntimeError, Module

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


def _simulated(cuda: Any) -> bool:
    """Whether numba.cuda is Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


class CudaModule(Module):
    """A compiled network on the GPU. Make one with `cnnc.compile(..., target="cuda")` or
    `cnnc.load(path)` of a cuda module file."""

    def __init__(self, file: artifact.ModuleFile, source: str = "<compiled>",
                 threads: int | None = None) -> None:
        self._cuda = _cuda()
        self._file = file
        self._manifest = validated_manifest(file, source, kind="cuda")
        self._dtype = np.dtype(self._manifest["dtype_numpy"])
        params = validated_params(file, self._manifest, source)
        self._kernels = _compiled_kernels(file.sections["cuda"], source)
        self._launches = {role: tuple(launch_from_json(item) for item in launches)
                          for role, launches in self._manifest["entry_points"].items()}
        # the host copies only answer shapes and validate; the device arrays are the values
        self._params = {name: np.ascontiguousarray(value) for name, value in params.items()}
        self._state = {entry["name"]: np.zeros(entry["shape"], self._dtype)
                       for entry in self._manifest["storage"] if entry["role"] == "state"}
        self._device = {name: self._cuda.to_device(value.reshape(-1))
                        for name, value in {**self._params, **self._state}.items()}
        self._step = 0
        self._threads = 1
        self._lock = StateLock(exclusive=True)  # one workspace on the device for every call
        # threads a block of a sum: the simulator runs each as a Python thread, where fewer
        # (still a tree of several levels) keep the tests fast
        self._sum_threads = SIMULATOR_SUM_THREADS if _simulated(self._cuda) else BLOCK_THREADS
        self._pool = None
        self._workspace_batch: int | None = None
        self._workspace_buffers: dict[str, Any] = {}

    @property
    def target(self) -> str:
        return "cuda"

    def set_threads(self, threads: int | None) -> None:
        """Host threads do not apply: the GPU runs every launch over the whole batch."""

    # -- running ------------------------------------------------------------------------------
    def _forward(self, x: Any) -> np.ndarray:
        """The network's output for a batch `x` (numpy or device array) of (N, *input_shape)."""
        buffers, batch = self._run_device(x, "forward")
        output = buffers[self._manifest["output"]["name"]].copy_to_host()
        return output.reshape(batch, *self.output_shape)

    def _activations(self, x: Any) -> dict[str, np.ndarray]:
        buffers, batch = self._run_device(x, "forward")
        shapes = {e["name"]: e["shape"] for e in self._manifest["storage"]}
        return {name: buffers[name].copy_to_host().reshape(
            [batch if d == "N" else d for d in shapes[name]])
            for name in self._manifest["activations"]}

    def _loss(self, x: Any, y: Any) -> float:
        buffers, _ = self._run_device(x, "loss", self._trainable(y))
        return float(buffers[self._loss_name()].copy_to_host()[0])

    def _gradients(self, x: Any, y: Any) -> dict[str, np.ndarray]:
        buffers, _ = self._run_device(x, "gradients", self._trainable(y))
        where = self._manifest["gradients"]
        return {name: buffers[where[name]].copy_to_host().reshape(self._params[name].shape)
                for name in self._params}

    def _input_gradient(self, x: Any, y: Any) -> np.ndarray:
        buffers, batch = self._run_device(x, "input_gradient", self._trainable(y))
        name = self._manifest["gradients"][self._manifest["input"]["name"]]
        return buffers[name].copy_to_host().reshape(batch, *self.input_shape)

    def _train_step(self, x: Any, y: Any, lr: float | None = None) -> float:
        """One optimizer step on the GPU; returns the loss before the step."""
        y = self._trainable(y)
        step = self._step + 1
        buffers, _ = self._run_device(x, "train_step", y, self._hyper(lr, step))
        self._step = step
        return float(buffers[self._loss_name()].copy_to_host()[0])

    def _gradients_and_loss(self, x: Any, y: Any) -> tuple[dict[str, np.ndarray], float]:
        buffers, _ = self._run_device(x, "gradients", self._trainable(y))
        where = self._manifest["gradients"]
        return ({name: buffers[where[name]].copy_to_host().reshape(self._params[name].shape)
                 for name in self._params},
                float(buffers[self._loss_name()].copy_to_host()[0]))

    def _apply_gradients(self, gradients: Mapping[str, Any], lr: float | None = None) -> None:
        checked = self._checked_gradients(gradients)
        step = self._step + 1
        buffers = dict(self._workspace_for(self._workspace_batch or 1))
        where = self._manifest["gradients"]
        for name, value in checked.items():
            buffers[where[name]].copy_to_device(value.reshape(-1))
        buffers["optimizer.hyper"] = self._cuda.to_device(self._hyper(lr, step))
        buffers.update(self._device)
        self._launch("update", buffers, 1)
        self._step = step

    def _launch(self, role: str, buffers: dict[str, Any], batch: int) -> None:
        for launch in self._launches[role]:
            blocks, per_block = grid(launch, batch, self._sum_threads)
            arguments = [buffers[name] for name in launch.buffers]
            self._kernels[launch.kernel][blocks, per_block](batch, *arguments)
        self._cuda.synchronize()

    def _run_device(self, x: Any, role: str, target: Any = None,
                    hyper: np.ndarray | None = None) -> tuple[dict[str, Any], int]:
        """Check the arguments, then launch the role's kernels in order on the device."""
        x_device = self._device_input(x)
        batch = x_device.shape[0]
        buffers = dict(self._workspace_for(batch))
        buffers[self._manifest["input"]["name"]] = x_device.reshape(x_device.size)
        if target is not None:
            checked = self._checked_target(target, batch)
            buffers[self._manifest["loss"]["target"]] = self._cuda.to_device(checked.reshape(-1))
        if hyper is not None:
            buffers["optimizer.hyper"] = self._cuda.to_device(hyper)
        buffers.update(self._device)
        self._launch(role, buffers, batch)
        return buffers, batch

    def _device_input(self, x: Any) -> Any:
        """A device array is used in place, after the checks a numpy array gets."""
        if _simulated(self._cuda) and isinstance(x, self._cuda.devicearray.FakeCUDAArray):
            array = x  # the simulator's device arrays have no __cuda_array_interface__
        elif hasattr(x, "__cuda_array_interface__"):
            array = self._cuda.as_cuda_array(x)
        else:
            return self._cuda.to_device(self._checked_input(x, "x"))
        shown = "(N, " + ", ".join(str(d) for d in self.input_shape) + ")"
        if array.ndim != len(self.input_shape) + 1 or tuple(array.shape[1:]) != \
                self.input_shape:
            raise CnncRuntimeError.single(f"x must have shape {shown}, got {array.shape}")
        if array.shape[0] == 0:
            raise CnncRuntimeError.single("x is an empty batch (N = 0); give at least one "
                                          "sample")
        if np.dtype(array.dtype) != self._dtype:
            raise CnncRuntimeError.single(f"x must have dtype {self._dtype.name}, got "
                                          f"{np.dtype(array.dtype).name} (a device array is "
                                          "not converted)")
        if not array.is_c_contiguous():
            raise CnncRuntimeError.single("x must be C-contiguous on the device")
        return array

    def _workspace_for(self, batch: int) -> dict[str, Any]:
        """The device buffers the kernels write, kept for the next call of the same batch."""
        if self._workspace_batch != batch:
            self._workspace_buffers = {}
            for entry in self._manifest["storage"]:
                if entry["role"] in ("value", "loss", "target", "hyper"):
                    size = int(np.prod([batch if d == "N" else d for d in entry["shape"]]))
                    self._workspace_buffers[entry["name"]] = self._cuda.device_array(
                        max(size, 1), dtype=entry["dtype_numpy"])
            self._workspace_batch = batch
        return self._workspace_buffers

    # -- parameters and state: the device holds them --------------------------------------------
    def _params_copy(self) -> dict[str, np.ndarray]:
        return {name: self._device[name].copy_to_host().reshape(value.shape)
                for name, value in self._params.items()}

    def _set_params(self, values: Mapping[str, Any]) -> None:
        super()._set_params(values)  # checks every name, shape and dtype first
        for name in values:
            self._device[name].copy_to_device(self._params[name].reshape(-1))

    def _optimizer_state(self) -> dict[str, np.ndarray]:
        state = {name: self._device[name].copy_to_host().reshape(value.shape)
                 for name, value in self._state.items()}
        state["optimizer.step"] = np.array(self._step, dtype=np.int64)
        return state

    def _set_optimizer_state(self, state: Mapping[str, Any]) -> None:
        super()._set_optimizer_state(state)
        for name in state:
            if name in self._state:
                self._device[name].copy_to_device(self._state[name].reshape(-1))

    def __repr__(self) -> str:
        return (f"<cnnc.Module {self.name} (cuda): {self.input_shape} -> "
                f"{self.output_shape} {self._dtype.name}>")


def _compiled_kernels(source: bytes, origin: str) -> dict[str, Any]:
    """The kernels the module's CUDA source defines (its hash was checked before)."""
    namespace: dict[str, Any] = {}
    try:
        exec(compile(source.decode("utf-8"), f"<cuda kernels of {origin}>", "exec"), namespace)
    except (SyntaxError, UnicodeDecodeError, ImportError) as error:
        raise artifact.CnncModuleError.single(f"cannot load {origin}: its CUDA source does "
                                              f"not load ({error})") from None
    return namespace
