"""The Python side of a compiled network: `Module`, made by `compile` or `load`.

A module holds its parameters and a native entry point; `forward` checks its argument
(rank, shape, dtype, contiguity, batch size) before native code sees it, allocates every
buffer the kernels write, and makes one native call.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cnnc.artifact import format as artifact
from cnnc.diagnostics import CnncError
from cnnc.runtime.loader import native_entries, validated_manifest, validated_params
from cnnc.runtime.locking import StateLock
from cnnc.support.npzfile import read_npz


class CnncRuntimeError(CnncError):
    """A bad argument to a module's method: wrong shape, dtype, name, or file."""


def _refuse(message: str) -> CnncRuntimeError:
    return CnncRuntimeError.single(message)


class Module:
    """A compiled network. Make one with `cnnc.compile(...)` or `cnnc.load(path)`."""

    def __init__(self, file: artifact.ModuleFile, source: str = "<compiled>",
                 threads: int | None = None) -> None:
        self._file = file
        self._manifest = validated_manifest(file, source)
        params = validated_params(file, self._manifest, source)
        self._entries, self._engine = native_entries(file, self._manifest, source)
        self._dtype = np.dtype(self._manifest["dtype_numpy"])
        self._params = {name: np.ascontiguousarray(value) for name, value in params.items()}
        self._state = {entry["name"]: np.zeros(entry["shape"], self._dtype)
                       for entry in self._manifest["storage"] if entry["role"] == "state"}
        self._step = 0  # optimizer steps taken: Adam's bias corrections need it
        self._threads = thread_count(threads)
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()  # each thread's workspace, see _workspace
        self._lock = StateLock()
        # (index, role, name) of every buffer a call supplies rather than the workspace
        self._supplied = [(i, e["role"], e["name"]) for i, e in enumerate(self._manifest["storage"])
                          if e["role"] in ("input", "target", "hyper", "param", "state")]

    # -- what the module is -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._manifest["network"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape; `forward` takes N of them."""
        return tuple(self._manifest["input"]["shape"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self._manifest["output"]["shape"])

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self._manifest)

    @property
    def target(self) -> str:
        """Where the kernels run: cpu, or cuda (a `CudaModule`)."""
        return "cpu"

    # -- the public calls: each takes the module's lock (locking.StateLock) ---------------------
    def forward(self, x: Any) -> np.ndarray:
        """The network's output for a batch `x` of shape (N, *input_shape).

        With several threads a large batch is cut into one slice a thread; samples are
        independent, so the result is the same, bit for bit, for any thread count.
        """
        with self._lock.reading():
            return self._forward(x)

    def __call__(self, x: Any) -> np.ndarray:
        return self.forward(x)

    def activations(self, x: Any) -> dict[str, np.ndarray]:
        """Every tensor the kernels write for batch `x`, by name (argmax tensors included)."""
        with self._lock.reading():
            return self._activations(x)

    def loss(self, x: Any, y: Any) -> float:
        """The mean loss over the batch; y: class labels (N,) or targets like the output."""
        with self._lock.reading():
            return self._loss(x, y)

    def gradients(self, x: Any, y: Any) -> dict[str, np.ndarray]:
        """d(mean loss)/d(parameter) for every parameter, shaped like `params`."""
        with self._lock.reading():
            return self._gradients(x, y)

    def input_gradient(self, x: Any, y: Any) -> np.ndarray:
        """d(mean loss)/dx, shaped like x."""
        with self._lock.reading():
            return self._input_gradient(x, y)

    def gradients_and_loss(self, x: Any, y: Any) -> tuple[dict[str, np.ndarray], float]:
        """`gradients(x, y)` and `loss(x, y)` from one forward and backward pass."""
        with self._lock.reading():
            return self._gradients_and_loss(x, y)

    def train_step(self, x: Any, y: Any, lr: float | None = None) -> float:
        """One optimizer step (the train line's, or sgd lr=0.01) in compiled code; returns
        the loss before the step. Steps from several threads run one after another."""
        with self._lock.writing():
            return self._train_step(x, y, lr)

    def apply_gradients(self, gradients: Mapping[str, Any], lr: float | None = None) -> None:
        """One optimizer step with the given gradient of every parameter (shaped like
        `params`) instead of a batch's: how data-parallel training applies the gradients
        averaged over several processes. Same update, state and step count as
        `train_step`."""
        with self._lock.writing():
            self._apply_gradients(gradients, lr)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """A copy of every parameter (PyTorch layouts), read-only: an assignment into one
        would change nothing in the module, so it raises; use `set_params`."""
        with self._lock.reading():
            copies = self._params_copy()
        for value in copies.values():
            value.flags.writeable = False
        return copies

    def set_params(self, values: Mapping[str, Any]) -> None:
        """Replace some or all parameters; names, shapes and dtypes are checked first."""
        with self._lock.writing():
            self._set_params(values)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum or Adam moments and the step count: with `params`, all a resume needs."""
        with self._lock.reading():
            return self._optimizer_state()

    def set_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `optimizer_state` returned (all checked before anything changes)."""
        with self._lock.writing():
            self._set_optimizer_state(state)

    # -- training from Python, as `cnnc train` does (fit.py) ----------------------------------
    def fit(self, x: Any, y: Any, **options: Any) -> Any:
        """Train on (x, y) with the loop of `cnnc train`; see `fit.fit` for the options
        (epochs, batch, lr, validation, val_split, checkpoint, callbacks, ...). Returns the
        history (`train.TrainResult`)."""
        from cnnc.training.fit import fit

        return fit(self, x, y, **options)

    def evaluate(self, x: Any, y: Any, batch: int = 500) -> dict[str, float]:
        """{"loss": mean loss, "accuracy": fraction right (cross-entropy networks)}."""
        from cnnc.training.fit import evaluate

        return evaluate(self, x, y, batch)

    def summary(self) -> Any:
        """Per layer: kind, output shape, parameters, FLOPs and memory (a `Summary`; its
        text is the table `cnnc summary` prints)."""
        from cnnc.passes.summary import from_manifest

        return from_manifest(self._manifest)

    # -- running ------------------------------------------------------------------------------
    def _forward(self, x: Any) -> np.ndarray:
        x = self._checked_input(x, "x")
        slices = _slices(len(x), self._threads)
        if len(slices) == 1:
            return self._forward_one(x)
        parts = self._in_threads(lambda part: self._forward_one(x[part]), slices)
        return np.concatenate(parts)

    @property
    def threads(self) -> int:
        return self._threads

    def set_threads(self, threads: int | None) -> None:
        """How many threads `forward` may use (None: CNNC_NUM_THREADS, else every core)."""
        count = thread_count(threads)
        with self._lock.writing():
            self._threads = count
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _forward_one(self, x: np.ndarray) -> np.ndarray:
        arrays = self._run(x)
        index = self._manifest["output_index"]
        # a copy: the buffer is this thread's workspace, overwritten by its next call
        return arrays[index].reshape(arrays[index].shape[0], *self.output_shape).copy()

    def _activations(self, x: Any) -> dict[str, np.ndarray]:
        named = self._named(self._run(x))
        return {name: named[name].copy() for name in self._manifest["activations"]}

    def _run(self, x: Any, entry: str = "forward", target: Any = None,
             hyper: np.ndarray | None = None) -> list[np.ndarray]:
        """Check the arguments, gather every buffer (in the manifest's order), call `entry`.

        The buffers kernels write are the calling thread's workspace, kept for its next call
        with the same batch size (fresh memory would be page-faulted in on every call), so
        calls from several threads do not mix.
        """
        x = self._checked_input(x, "x")
        batch = x.shape[0]
        given = {"input": x}
        if target is not None:
            given["target"] = self._checked_target(target, batch)
        if hyper is not None:
            given["hyper"] = hyper
        buffers, table = self._workspace(batch)
        arrays = list(buffers)
        for index, role, name in self._supplied:
            array = given.get(role) if role in ("input", "target", "hyper") else \
                (self._params if role == "param" else self._state)[name]
            if array is None:  # an entry that does not read it: the placeholder, never a
                array = buffers[index]  # pointer left from an earlier call's array
            arrays[index] = array
            table[index] = array.ctypes.data
        self._entries[entry](batch, table)  # `arrays` keeps every buffer alive meanwhile
        return arrays

    def _workspace(self, batch: int) -> tuple[list[np.ndarray | None], Any]:
        """This thread's buffers for a batch of `batch` and their pointer table (the slots
        of supplied arrays are filled in by each call)."""
        local = self._local
        if getattr(local, "batch", None) == batch:
            return local.buffers, local.table
        local.batch, local.buffers, local.table = None, None, None  # free the old ones first
        buffers = [self._buffer_for(item, batch) for item in self._manifest["storage"]]
        table = (ctypes.c_void_p * len(buffers))(
            *[0 if b is None else b.ctypes.data for b in buffers])
        local.batch, local.buffers, local.table = batch, buffers, table
        return buffers, table

    def _buffer_for(self, entry: dict[str, Any], batch: int) -> np.ndarray | None:
        role, name = entry["role"], entry["name"]
        if role in ("input", "param", "state"):
            return None
        if role in ("target", "hyper"):  # for entry points that do not read them
            return np.zeros(8, dtype=entry["dtype_numpy"])
        if role == "loss":
            return np.zeros(1, dtype=self._dtype)
        shape = tuple(batch if d == "N" else d for d in entry["shape"]) or (1,)
        try:
            return np.empty(shape, dtype=entry["dtype_numpy"])
        except MemoryError:
            raise _refuse(f"forward: a batch of {batch} needs more memory than there is "
                          f"(the buffer {name} alone is {shape})") from None

    def _checked_input(self, value: Any, argument: str) -> np.ndarray:
        expected = (-1, *self.input_shape)
        array = _as_array(value, argument)
        shown = "(N, " + ", ".join(str(d) for d in self.input_shape) + ")"
        if array.ndim != len(expected):
            hint = "; for one sample, add a batch axis: x[None]" \
                if array.shape == self.input_shape else ""
            raise _refuse(f"{argument} must have shape {shown}, got {array.shape}{hint}")
        if array.shape[1:] != self.input_shape:
            raise _refuse(f"{argument} must have shape {shown}, got {array.shape}")
        if array.shape[0] == 0:
            raise _refuse(f"{argument} is an empty batch (N = 0); give at least one sample")
        try:
            return np.ascontiguousarray(self._converted(array, argument))
        except MemoryError:
            raise _refuse(f"{argument}: a batch of {array.shape[0]} does not fit in memory") \
                from None

    def _converted(self, array: np.ndarray, argument: str) -> np.ndarray:
        """float64 into a float32 module is rounded; any other dtype mismatch is an error."""
        if array.dtype == self._dtype:
            return array
        if array.dtype == np.float64 and self._dtype == np.float32:
            return array.astype(np.float32)
        raise _refuse(f"{argument} must have dtype {self._dtype.name}, got {array.dtype}")

    # -- training -----------------------------------------------------------------------------
    def _loss(self, x: Any, y: Any) -> float:
        return float(self._named(self._run(x, "loss", self._trainable(y)))[self._loss_name()][0])

    def _gradients(self, x: Any, y: Any) -> dict[str, np.ndarray]:
        named, _ = self._split_gradients(x, self._trainable(y))
        where = self._manifest["gradients"]
        return {name: named[where[name]].reshape(self._params[name].shape)
                for name in self._params}

    def _split_gradients(self, x: Any, y: Any) -> tuple[dict[str, np.ndarray], float]:
        """Every parameter gradient's storage tensor by name, and the loss, for the batch.

        With several threads each takes a slice of the batch; a slice's gradients are of its
        own mean loss, so the batch's are the slices' weighted by their share of samples.
        Each slice's gradients are copied out of its thread's workspace at once: one pool
        thread may run two slices in turn.
        """
        x = self._checked_input(x, "x")
        y = self._checked_target(_as_array(y, "y"), len(x))
        storages = list(dict.fromkeys(self._manifest["gradients"][p] for p in self._params))

        def gradients_of(part: slice) -> tuple[dict[str, np.ndarray], float]:
            named = self._named(self._run(x[part], "gradients", y[part]))
            return ({name: named[name].copy() for name in storages},
                    float(named[self._loss_name()][0]))

        slices = _slices(len(x), self._threads)
        if len(slices) == 1:
            return gradients_of(slices[0])
        parts = self._in_threads(gradients_of, slices)
        shares = [(s.stop - s.start) / len(x) for s in slices]
        total = parts[0][0]
        with np.errstate(all="ignore"):  # an overflow stays Inf/NaN for the caller to see
            for name in storages:
                total[name] *= shares[0]
                for (gradients, _), share in zip(parts[1:], shares[1:], strict=True):
                    total[name] += gradients[name] * share
        loss = sum(part_loss * w for (_, part_loss), w in zip(parts, shares, strict=True))
        return total, loss

    def _in_threads(self, work: Callable[[slice], Any], slices: list[slice]) -> list[Any]:
        """work(slice) for every slice: the first on this thread, the others in the pool."""
        pool = self._thread_pool()
        try:
            others = [pool.submit(work, part) for part in slices[1:]]
        except RuntimeError:  # set_threads shut this pool down meanwhile: do it all here
            return [work(part) for part in slices]
        first = work(slices[0])
        return [first] + [future.result() for future in others]

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="cnnc")
        return self._pool

    def _input_gradient(self, x: Any, y: Any) -> np.ndarray:
        named = self._named(self._run(x, "input_gradient", self._trainable(y)))
        gradient = named[self._manifest["gradients"][self._manifest["input"]["name"]]]
        return gradient.reshape(gradient.shape[0], *self.input_shape).copy()

    def _train_step(self, x: Any, y: Any, lr: float | None = None) -> float:
        y = self._trainable(y)
        step = self._step + 1
        hyper = self._hyper(lr, step)
        x = self._checked_input(x, "x")
        if len(_slices(len(x), self._threads)) == 1 or "update" not in self._entries:
            arrays = self._run(x, "train_step", y, hyper)
            loss = float(self._named(arrays)[self._loss_name()][0])
        else:  # gradients in threads, then one update with their weighted sum
            gradients, loss = self._split_gradients(x, y)
            self._update(gradients, hyper, len(x))
        self._step = step
        return loss

    def _gradients_and_loss(self, x: Any, y: Any) -> tuple[dict[str, np.ndarray], float]:
        named, loss = self._split_gradients(x, self._trainable(y))
        where = self._manifest["gradients"]
        return ({name: named[where[name]].reshape(self._params[name].shape)
                 for name in self._params}, loss)

    def _apply_gradients(self, gradients: Mapping[str, Any], lr: float | None = None) -> None:
        checked = self._checked_gradients(gradients)
        step = self._step + 1
        hyper = self._hyper(lr, step)
        where = self._manifest["gradients"]
        self._update({where[name]: value.reshape(-1) for name, value in checked.items()},
                     hyper, 1)
        self._step = step

    def _checked_gradients(self, gradients: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every parameter's gradient, contiguous, of its shape and the module's dtype."""
        if "update" not in self._manifest["entry_points"]:
            raise _refuse(f"network {self.name} has no loss line, so no optimizer update")
        if not isinstance(gradients, Mapping) or set(gradients) != set(self._params):
            names = ", ".join(self._params)
            raise _refuse(f"apply_gradients takes a gradient for each parameter ({names})")
        checked = {}
        for name, value in gradients.items():
            array = _as_array(value, f"the gradient of {name}")
            if array.dtype == np.float64 and self._dtype == np.float32:
                array = array.astype(np.float32)
            if array.shape != self._params[name].shape or array.dtype != self._dtype:
                raise _refuse(f"the gradient of {name} must be {self._dtype.name} of shape "
                              f"{self._params[name].shape}, got {array.dtype} "
                              f"{array.shape}")
            checked[name] = np.ascontiguousarray(array)
        return checked

    def _update(self, gradients: dict[str, np.ndarray], hyper: np.ndarray, batch: int) -> None:
        """The update kernels on parameters, state and the given storage-named gradients."""
        unused = np.zeros(1, dtype=self._dtype)  # they read nothing else
        arrays = []
        for item in self._manifest["storage"]:
            role, name = item["role"], item["name"]
            arrays.append(self._params[name] if role == "param" else
                          self._state[name] if role == "state" else
                          hyper if role == "hyper" else gradients.get(name, unused))
        table = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        self._entries["update"](batch, table)

    def _hyper(self, lr: float | None, step: int) -> np.ndarray:
        """The optimizer's scalars for step `step` (HYPER_FIELDS' order, then padding)."""
        settings = self._manifest["optimizer"]
        rate = settings["lr"] if lr is None else _positive_rate(lr)
        beta1, beta2 = settings.get("beta1", 0.9), settings.get("beta2", 0.999)
        return np.array([rate, settings.get("momentum", 0.0), beta1, beta2,
                         settings.get("eps", 1e-8), 1 - beta1 ** step, 1 - beta2 ** step, 0.0],
                        dtype=self._dtype)

    def _optimizer_state(self) -> dict[str, np.ndarray]:
        state = {name: value.copy() for name, value in self._state.items()}
        state["optimizer.step"] = np.array(self._step, dtype=np.int64)
        return state

    def _set_optimizer_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise _refuse("set_optimizer_state takes the dict optimizer_state returned")
        step, arrays = self._step, {}
        for name, value in state.items():
            if name == "optimizer.step":
                step = _step_count(value)
            elif name in self._state:
                array = _as_array(value, name)
                if array.shape != self._state[name].shape or array.dtype.kind != "f":
                    raise _refuse(f"set_optimizer_state: {name} must be a float array of "
                                  f"shape {self._state[name].shape}")
                arrays[name] = np.ascontiguousarray(array, dtype=self._dtype).copy()
            else:
                raise _refuse(f"set_optimizer_state: {name!r} is not state of this optimizer")
        self._step = step
        self._state.update(arrays)

    @property
    def optimizer(self) -> dict[str, Any]:
        """The optimizer's kind and settings, from the train line."""
        return dict(self._manifest.get("optimizer") or {})

    def _trainable(self, y: Any) -> Any:
        if "loss" not in self._manifest:
            raise _refuse(f"network {self.name} has no loss line, so it has no loss, "
                          "gradients or training step")
        if y is None:
            raise _refuse("y is required: class labels (N,) or targets shaped like the output")
        return y

    def _loss_name(self) -> str:
        return self._manifest["loss"]["value"]

    def _named(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {item["name"]: array for item, array in zip(self._manifest["storage"], arrays,
                                                            strict=True)}

    def _checked_target(self, value: Any, batch: int) -> np.ndarray:
        """Class labels in range for cross-entropy; targets of the output's shape for mse."""
        array = _as_array(value, "y")
        if self._manifest["loss"]["kind"] == "cross_entropy":
            classes = self.output_shape[0]
            if array.shape != (batch,):
                raise _refuse(f"y must hold one class label a sample, shape ({batch},), "
                              f"got {array.shape}")
            if array.dtype.kind not in "iu":
                raise _refuse(f"y must hold integer class labels, got dtype {array.dtype}")
            if array.size and (array.min() < 0 or array.max() >= classes):
                bad = array[(array < 0) | (array >= classes)][0]
                raise _refuse(f"y holds the label {bad}, outside the classes 0..{classes - 1}")
            return np.ascontiguousarray(array, dtype=np.int64)
        wanted = (batch, *self.output_shape)
        if array.shape != wanted:
            raise _refuse(f"y must have shape {wanted} like the output, got {array.shape}")
        return np.ascontiguousarray(self._converted(array, "y"))

    # -- parameters ---------------------------------------------------------------------------
    def _params_copy(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self._params.items()}

    def _set_params(self, values: Mapping[str, Any]) -> None:
        if not isinstance(values, Mapping):
            raise _refuse(f"set_params takes a dict of name -> array, got {type(values).__name__}")
        checked = {}
        for name, value in values.items():
            if name not in self._params:
                raise _refuse(f"set_params: unknown parameter {name!r}; the parameters are "
                              + ", ".join(self._params))
            array = _as_array(value, name)
            wanted = self._params[name].shape
            if array.shape != wanted:
                raise _refuse(f"set_params: {name} must have shape {wanted}, got {array.shape}")
            checked[name] = np.ascontiguousarray(self._converted(array, name)).copy()
        self._params.update(checked)

    def save_weights(self, path: str | Path) -> None:
        """A plain .npz of every parameter (no pickle), written atomically."""
        if not isinstance(path, (str, Path)):
            raise _refuse(f"save_weights takes a path, got {type(path).__name__}")
        artifact.write_atomically(Path(path), artifact.params_to_bytes(self.params))

    def load_weights(self, path: str | Path) -> None:
        """Every parameter from an .npz written by save_weights (or numpy.savez)."""
        if not isinstance(path, (str, Path)):
            raise _refuse(f"load_weights takes a path, got {type(path).__name__}")
        values = _read_npz(Path(path))
        missing = [name for name in self._params if name not in values]
        if missing:
            raise _refuse(f"{path} lacks the parameters " + ", ".join(missing))
        unknown = [name for name in values if name not in self._params]
        if unknown:
            raise _refuse(f"{path} holds arrays that are no parameter of network {self.name}: "
                          + ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else ""))
        self.set_params(values)

    def save(self, path: str | Path) -> None:
        """The module file, with the current parameters as its initial ones."""
        sections = dict(self._file.sections, params=artifact.params_to_bytes(self.params))
        artifact.write(artifact.ModuleFile(self._file.manifest, sections), path)

    def __repr__(self) -> str:
        return (f"<cnnc.Module {self.name}: {self.input_shape} -> {self.output_shape} "
                f"{self._dtype.name}>")


def _positive_rate(value: Any) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise _refuse(f"lr must be a number, got {value!r}") from None
    if not np.isfinite(rate) or rate <= 0:
        raise _refuse(f"lr must be a finite number above 0, got {value!r}")
    return rate


def _step_count(value: Any) -> int:
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "iu" or int(array) < 0:
        raise _refuse(f"set_optimizer_state: optimizer.step must be a count, got {value!r}")
    return int(array)


def _as_array(value: Any, argument: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise _refuse(f"{argument} is not an array: {error}") from None
    if array.dtype.kind not in "fiub" or array.dtype.byteorder == ">":
        raise _refuse(f"{argument} must be a numeric array in native byte order, "
                      f"got dtype {array.dtype}")
    return array


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Weights from an .npz: a regular file only, every array's size checked before it is
    read (npzfile), never pickle."""
    return read_npz(path, "weights from", CnncRuntimeError)


def load(path: str | Path, threads: int | None = None, trust: str = "code") -> Module:
    """A module from its .cnnm file. A cuda module gets the GPU runtime (`CudaModule`).

    Loading a module file runs its code. trust="code" (the default, for files you built)
    maps the stored object code, without running LLVM, once every manifest field is what
    the file's stored program implies. trust="rebuild" (for files from
    anyone else) ignores the stored code and compiles the stored program again, validated
    like a new program, keeping only the file's parameters (checked): such a file can do no
    more than a .cnn program can. See `verify`."""
    from cnnc.driver.trust import check_trust, trusted_file

    if not isinstance(path, (str, Path)):
        raise artifact.CnncModuleError.single(
            f"load takes the path of a .cnnm file, got {type(path).__name__}")
    check_trust(trust)
    file = trusted_file(artifact.read(path), str(path), trust)
    kind = artifact.target_kind(file.manifest)
    if kind == "cuda":
        from cnnc.runtime.cuda import CudaModule

        return CudaModule(file, str(path))
    return Module(file, str(path), threads)


# Below this many samples a thread, the hand-off to a thread costs more than it saves.
MIN_SAMPLES_PER_THREAD = 4


def thread_count(requested: int | None) -> int:
    """The argument, else the CNNC_NUM_THREADS environment variable, else every core."""
    if requested is None:
        text = os.environ.get("CNNC_NUM_THREADS", "")
        if not text:
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else os.cpu_count() or 1)
        try:
            requested = int(text)
        except ValueError:
            raise _refuse(f"CNNC_NUM_THREADS must be a whole number, got {text!r}") from None
    if type(requested) is not int or requested < 1:
        raise _refuse(f"the thread count must be a whole number of at least 1, got "
                      f"{requested!r}")
    return requested


def _slices(batch: int, threads: int) -> list[slice]:
    """Near-equal consecutive slices, one a thread, none smaller than the hand-off is worth."""
    count = max(1, min(threads, batch // MIN_SAMPLES_PER_THREAD))
    bounds = [batch * i // count for i in range(count + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]
