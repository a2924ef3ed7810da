"""The Python side of a compiled network: `Module`, made by `cnnc.compile` or `cnnc.load`.

A module checks every argument (rank, shape, dtype, contiguity, batch size, labels) before
any kernel sees it, keeps the optimizer's step count and the lock that makes it safe to
share between threads, and hands checked arrays to its engine, which runs the kernels and
holds the parameters: the CPU's (runtime.cpu) or, for a `CudaModule`, the GPU's
(runtime.cuda). Everything a module does is written once, here, for both.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cnnc.artifact import format as artifact
from cnnc.artifact.manifest import Optimizer
from cnnc.runtime import arguments, noise
from cnnc.runtime.arguments import CnncRuntimeError, as_array, refuse
from cnnc.runtime.cpu import CpuEngine
from cnnc.runtime.engine import Engine
from cnnc.runtime.loader import validated_manifest, validated_params
from cnnc.runtime.locking import StateLock
from cnnc.runtime.threads import batch_slices, thread_count

__all__ = ["CnncRuntimeError", "Module", "thread_count"]


class Module:
    """A compiled network. Make one with `cnnc.compile(...)` or `cnnc.load(path)`."""

    # what runs the kernels: a subclass names another engine and nothing else
    engine_type: ClassVar[type[Engine]] = CpuEngine

    def __init__(self, file: artifact.ModuleFile, source: str = "<compiled>",
                 threads: int | None = None) -> None:
        """`file` has been verified (`cnnc.load` does that); its fields, code hash and
        parameters are checked here again, as the runtime relies on them."""
        self.engine_type.check_available()
        self._file = file
        self._manifest = validated_manifest(file, source, self.engine_type.kind)
        params = validated_params(file, self._manifest, source)
        self._dtype = self._manifest.numpy_dtype
        trainable = {b.name for b in self._manifest.buffers("param")}
        self._param_shapes = {name: value.shape for name, value in params.items()
                              if name in trainable}
        # batch norm's running statistics: saved with the parameters, updated by train_step
        self._buffer_shapes = {name: value.shape for name, value in params.items()
                               if name not in trainable}
        state = {b.name: np.zeros(b.shape, self._dtype) for b in self._manifest.buffers("state")}
        self._state_shapes = {name: value.shape for name, value in state.items()}
        values = {name: np.ascontiguousarray(value) for name, value in params.items()}
        self._engine: Engine = self.engine_type(file, self._manifest, {**values, **state},
                                                source, threads)
        self._step = 0  # optimizer steps taken: Adam's bias corrections need it
        self._lock = StateLock(exclusive=self._engine.exclusive)
        # train_steps taken: dropout's random numbers are drawn for this step, and batch
        # norm's num_batches_tracked (as torch counts it) is this
        self._noise_step = 0
        self._noise = noise.NoiseSource(self._manifest)

    # -- what the module is -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._manifest.network

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape; `forward` takes N of them."""
        return self._manifest.input.shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self._manifest.output.shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest's JSON as the file holds it (a copy), with the runtime's numpy dtypes
        and the output's index."""
        data = copy.deepcopy(self._file.manifest)
        storage = [dict(entry, dtype_numpy=b.numpy_dtype.name)
                   for entry, b in zip(data["storage"], self._manifest.storage, strict=True)]
        return dict(data, storage=storage, output_index=self._manifest.output_index,
                    dtype_numpy=self._dtype.name)

    @property
    def target(self) -> str:
        """Where the kernels run: cpu, or cuda (a `CudaModule`)."""
        return self._manifest.target.kind

    @property
    def takes_labels(self) -> bool:
        """Whether `y` is one integer class label a sample (the loss's target tensor holds
        integers, as cross-entropy's does) rather than targets shaped like the output; False
        without a loss line."""
        loss = self._manifest.loss
        return loss is not None and self._manifest.buffer(loss.target).dtype in ("i32", "i64")

    @property
    def optimizer(self) -> dict[str, Any]:
        """The optimizer's kind and settings, from the train line."""
        return self._manifest.optimizer.to_json() if self._manifest.optimizer else {}

    @property
    def threads(self) -> int:
        return self._engine.threads

    def set_threads(self, threads: int | None) -> None:
        """How many threads `forward` may use (None: CNNC_NUM_THREADS, else every core).
        A GPU module has no use for them: it runs every launch over the whole batch."""
        if not self._engine.host_threads:
            return
        count = thread_count(threads)
        with self._lock.writing():
            self._engine.set_threads(count)

    # -- the public calls: each takes the module's lock (locking.StateLock) ---------------------
    def forward(self, x: Any, training: bool = False) -> np.ndarray:
        """The network's output for a batch `x` of shape (N, *input_shape).

        Inference by default: batch norm with its running statistics, no dropout. With
        `training=True`, as a training step computes it (the batch's statistics, dropout
        with the mask of the next train_step), changing nothing.

        With several threads a large batch is cut into one slice a thread; samples are
        independent, so the result is the same, bit for bit, for any thread count.
        """
        with self._lock.reading():
            return self._forward(x, _flag(training, "training"))

    def __call__(self, x: Any) -> np.ndarray:
        return self.forward(x)

    def activations(self, x: Any) -> dict[str, np.ndarray]:
        """Every tensor the kernels write for batch `x`, by name (argmax tensors included)."""
        with self._lock.reading():
            return self._activations(x)

    def loss(self, x: Any, y: Any, training: bool = False) -> float:
        """The mean loss over the batch; y: class labels (N,) or targets like the output.
        Inference by default; `training=True` as `forward(x, training=True)`."""
        with self._lock.reading():
            return self._loss(x, y, _flag(training, "training"))

    def gradients(self, x: Any, y: Any) -> dict[str, np.ndarray]:
        """d(mean loss)/d(parameter) for every parameter, shaped like `params`."""
        with self._lock.reading():
            return self._gradients_and_loss(x, y)[0]

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
    def buffers(self) -> dict[str, np.ndarray]:
        """A copy of the state saved with the parameters that no gradient reaches (batch
        norm's running_mean and running_var, and num_batches_tracked as torch keeps it),
        read-only; `set_params` sets them."""
        with self._lock.reading():
            copies = self._engine.values(list(self._buffer_shapes))
            copies.update(self._batches_tracked())
        for value in copies.values():
            value.flags.writeable = False
        return copies

    def _batches_tracked(self) -> dict[str, np.ndarray]:
        return {name: np.array(self._noise_step, dtype=np.int64)
                for name in noise.tracked_names(self._buffer_shapes)}

    @property
    def params(self) -> dict[str, np.ndarray]:
        """A copy of every parameter (PyTorch layouts), read-only: an assignment into one
        would change nothing in the module, so it raises; use `set_params`."""
        with self._lock.reading():
            copies = self._engine.values(list(self._param_shapes))
        for value in copies.values():
            value.flags.writeable = False
        return copies

    def set_params(self, values: Mapping[str, Any]) -> None:
        """Replace some or all parameters and buffers (a torch `state_dict()` too); names,
        shapes and dtypes are checked first."""
        with self._lock.writing():
            checked, tracked = self._checked_params(values)
            self._engine.write(checked)
            if tracked is not None:
                self._noise_step = tracked

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum or Adam moments and the step count: with `params`, all a resume needs."""
        with self._lock.reading():
            state = self._engine.values(list(self._state_shapes))
            state["optimizer.step"] = np.array(self._step, dtype=np.int64)
            if self._noise.needed or self._buffer_shapes:
                state[noise.STEP] = np.array(self._noise_step, dtype=np.int64)
            return state

    def set_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `optimizer_state` returned (all checked before anything changes)."""
        with self._lock.writing():
            step, arrays = self._checked_state(state)
            self._step = step
            if noise.STEP in state:
                self._noise_step = arguments.step_count(state[noise.STEP])
            self._engine.write(arrays)

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
        from cnnc.artifact.summary import from_manifest

        return from_manifest(self._manifest)

    # -- files --------------------------------------------------------------------------------
    def save_weights(self, path: str | Path) -> None:
        """A plain .npz of every parameter (no pickle), written atomically."""
        if not isinstance(path, (str, Path)):
            raise refuse(f"save_weights takes a path, got {type(path).__name__}")
        artifact.write_atomically(Path(path), artifact.params_to_bytes(self._stored()))

    def load_weights(self, path: str | Path) -> None:
        """Every parameter from an .npz written by save_weights (or numpy.savez)."""
        if not isinstance(path, (str, Path)):
            raise refuse(f"load_weights takes a path, got {type(path).__name__}")
        values = arguments.read_weights(Path(path))
        missing = [name for name in [*self._param_shapes, *self._buffer_shapes]
                   if name not in values]
        if missing:
            raise refuse(f"{path} lacks the parameters " + ", ".join(missing))
        known = {*self._param_shapes, *self._buffer_shapes,
                 *noise.tracked_names(self._buffer_shapes)}
        unknown = [name for name in values if name not in known]
        if unknown:
            raise refuse(f"{path} holds arrays that are no parameter of network {self.name}: "
                         + ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else ""))
        self.set_params(values)

    def save(self, path: str | Path) -> None:
        """The module file, with the current parameters as its initial ones."""
        sections = dict(self._file.sections, params=artifact.params_to_bytes(self._stored()))
        artifact.write(artifact.ModuleFile(self._file.manifest, sections), path)

    def _stored(self) -> dict[str, np.ndarray]:
        """What a module file's or weights file's parameters hold: parameters and buffers
        (num_batches_tracked only in a weights file, as torch saves it)."""
        with self._lock.reading():
            return self._engine.values([*self._param_shapes, *self._buffer_shapes])

    def __repr__(self) -> str:
        where = "" if self.target == "cpu" else f" ({self.target})"
        return (f"<cnnc.Module {self.name}{where}: {self.input_shape} -> "
                f"{self.output_shape} {self._dtype.name}>")

    # -- running ------------------------------------------------------------------------------
    def _role(self, role: str, training: bool) -> str:
        """The entry point of `role` (forward, loss) in the mode: a network whose training
        computes otherwise has `forward_train` and `loss_train`."""
        return f"{role}_train" if training and f"{role}_train" in self._manifest.roles else role

    def _slices(self, batch: int, training: bool) -> list[slice]:
        """How a call's batch is cut among threads: batch norm's statistics are the whole
        batch's, so a training call of a network with it runs in one piece."""
        if training and self._buffer_shapes:
            return [slice(0, batch)]
        return batch_slices(batch, self._engine.threads)

    def _forward(self, x: Any, training: bool = False) -> np.ndarray:
        x = self._checked_batch(x)
        drawn = self._noise.draw(x.shape[0], self._noise_step) if training else {}
        role = self._role("forward", training)
        slices = self._slices(x.shape[0], training)
        if len(slices) == 1:
            return self._forward_one(x, role, drawn, whole=True)
        return np.concatenate(self._engine.map(
            lambda part: self._forward_one(x[part], role, noise.sliced(drawn, part)), slices))

    def _forward_one(self, x: Any, role: str = "forward",
                     drawn: dict[str, np.ndarray] | None = None,
                     whole: bool = False) -> np.ndarray:
        """`whole`: x is the whole call's batch, not one thread's slice of it."""
        batch, output = x.shape[0], self._manifest.output.name
        given = {"input": x, "noise": drawn or {}}
        value = self._engine.run(role, batch, given, (output,), whole)[output]
        return value.reshape(batch, *self.output_shape)

    def _activations(self, x: Any) -> dict[str, np.ndarray]:
        x = self._checked_batch(x)
        return self._engine.run("forward", x.shape[0], {"input": x}, self._manifest.activations,
                                whole=True)

    def _loss(self, x: Any, y: Any, training: bool = False) -> float:
        y = self._trainable(y)
        x = self._checked_batch(x)
        given = {"input": x, "target": self._checked_target(y, x.shape[0])}
        if training:
            given["noise"] = self._noise.draw(x.shape[0], self._noise_step)
        loss = self._loss_name()
        role = self._role("loss", training)
        return float(self._engine.run(role, x.shape[0], given, (loss,), whole=True)[loss][0])

    def _gradients_and_loss(self, x: Any, y: Any) -> tuple[dict[str, np.ndarray], float]:
        named, loss = self._split_gradients(x, self._trainable(y))
        return ({name: named[self._manifest.gradient(name)].reshape(shape)
                 for name, shape in self._param_shapes.items()}, loss)

    def _split_gradients(self, x: Any, y: Any) -> tuple[dict[str, np.ndarray], float]:
        """Every parameter gradient's buffer by name, and the loss, for the batch.

        With several threads each takes a slice of the batch; a slice's gradients are of its
        own mean loss, so the batch's are the slices' weighted by their share of samples.
        Dropout's random numbers are drawn for the whole batch first, so the slices see
        the mask one piece would.
        """
        x = self._checked_batch(x)
        batch = x.shape[0]
        y = self._checked_target(as_array(y, "y"), batch)
        storages = list(dict.fromkeys(self._manifest.gradient(p) for p in self._param_shapes))
        loss = self._loss_name()
        drawn = self._noise.draw(batch, self._noise_step)

        def gradients_of(part: slice, whole: bool = False) -> tuple[dict[str, Any], float]:
            given = {"input": x, "target": y, "noise": drawn} if whole else \
                {"input": x[part], "target": y[part], "noise": noise.sliced(drawn, part)}
            got = self._engine.run("gradients", part.stop - part.start, given,
                                   (*storages, loss), whole)
            return {name: got[name] for name in storages}, float(got[loss][0])

        slices = self._slices(batch, True)
        if len(slices) == 1:
            return gradients_of(slices[0], whole=True)
        parts = self._engine.map(gradients_of, slices)
        shares = [(s.stop - s.start) / batch for s in slices]
        total = parts[0][0]
        with np.errstate(all="ignore"):  # an overflow stays Inf/NaN for the caller to see
            for name in storages:
                total[name] *= shares[0]
                for (gradients, _), share in zip(parts[1:], shares[1:], strict=True):
                    total[name] += gradients[name] * share
        mean = sum(part_loss * w for (_, part_loss), w in zip(parts, shares, strict=True))
        return total, mean

    def _input_gradient(self, x: Any, y: Any) -> np.ndarray:
        y = self._trainable(y)
        x = self._checked_batch(x)
        batch, name = x.shape[0], self._manifest.gradient(self._manifest.input.name)
        given = {"input": x, "target": self._checked_target(y, batch),
                 "noise": self._noise.draw(batch, self._noise_step)}
        gradient = self._engine.run("input_gradient", batch, given, (name,), whole=True)[name]
        return gradient.reshape(batch, *self.input_shape)

    # -- training -----------------------------------------------------------------------------
    def _train_step(self, x: Any, y: Any, lr: float | None = None) -> float:
        y = self._trainable(y)
        step = self._step + 1
        hyper = self._hyper(lr, step)
        x = self._checked_batch(x)
        batch = x.shape[0]
        if len(self._slices(batch, True)) == 1 or "update" not in self._manifest.roles:
            given = {"input": x, "target": self._checked_target(y, batch), "hyper": hyper,
                     "noise": self._noise.draw(batch, self._noise_step)}
            name = self._loss_name()
            loss = float(self._engine.run("train_step", batch, given, (name,),
                                          whole=True)[name][0])
        else:  # gradients in threads, then one update with their weighted sum
            gradients, loss = self._split_gradients(x, y)
            self._engine.update(gradients, hyper, batch)
        self._step = step
        self._noise_step += 1
        return loss

    def _apply_gradients(self, gradients: Mapping[str, Any], lr: float | None = None) -> None:
        checked = self._checked_gradients(gradients)
        step = self._step + 1
        hyper = self._hyper(lr, step)
        flat = {self._manifest.gradient(name): value.reshape(-1)
                for name, value in checked.items()}
        self._engine.update(flat, hyper, 1)
        self._step = step

    def _hyper(self, lr: float | None, step: int) -> np.ndarray:
        """The optimizer's scalars for step `step` (HYPER_FIELDS' order, then padding)."""
        settings = self._settings()
        rate = settings.get("lr") if lr is None else arguments.positive_rate(lr)
        beta1, beta2 = settings.get("beta1", 0.9), settings.get("beta2", 0.999)
        return np.array([rate, settings.get("momentum", 0.0), beta1, beta2,
                         settings.get("eps", 1e-8), 1 - beta1 ** step, 1 - beta2 ** step, 0.0],
                        dtype=self._dtype)

    def _settings(self) -> Optimizer:
        settings = self._manifest.optimizer
        assert settings is not None, "only a network with a loss line gets here"
        return settings

    def _trainable(self, y: Any) -> Any:
        if self._manifest.loss is None:
            raise refuse(f"network {self.name} has no loss line, so it has no loss, "
                         "gradients or training step")
        if y is None:
            raise refuse("y is required: class labels (N,) or targets shaped like the output")
        return y

    def _loss_name(self) -> str:
        assert self._manifest.loss is not None
        return self._manifest.loss.value

    # -- argument checks ----------------------------------------------------------------------
    def _checked_batch(self, value: Any) -> Any:
        """The batch `x` of a call: a device array where the engine reads them in place,
        else a host array (`_checked_input`)."""
        device = self._engine.device_array(value)
        if device is not None:
            return arguments.device_batch(device, self.input_shape, self._dtype)
        return self._checked_input(value, "x")

    def _checked_input(self, value: Any, argument: str) -> np.ndarray:
        """Host samples of the input's shape, contiguous, of the module's dtype (float64 is
        rounded into a float32 module); fit checks a whole data set with it."""
        return arguments.host_batch(value, argument, self.input_shape, self._dtype)

    def _checked_target(self, value: Any, batch: int) -> np.ndarray:
        """Labels or targets for a batch of `batch` (fit checks a whole data set with it)."""
        assert self._manifest.loss is not None
        return arguments.labels_or_targets(value, batch, self.takes_labels, self.output_shape,
                                           self._dtype)

    def _checked_gradients(self, gradients: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every parameter's gradient, contiguous, of its shape and the module's dtype."""
        if "update" not in self._manifest.roles:
            raise refuse(f"network {self.name} has no loss line, so no optimizer update")
        if not isinstance(gradients, Mapping) or set(gradients) != set(self._param_shapes):
            names = ", ".join(self._param_shapes)
            raise refuse(f"apply_gradients takes a gradient for each parameter ({names})")
        checked = {}
        for name, value in gradients.items():
            array = as_array(value, f"the gradient of {name}")
            if array.dtype == np.float64 and self._dtype == np.float32:
                array = array.astype(np.float32)
            shape = self._param_shapes[name]
            if array.shape != shape or array.dtype != self._dtype:
                raise refuse(f"the gradient of {name} must be {self._dtype.name} of shape "
                             f"{shape}, got {array.dtype} {array.shape}")
            checked[name] = np.ascontiguousarray(array)
        return checked

    def _checked_params(self, values: Mapping[str, Any]
                        ) -> tuple[dict[str, np.ndarray], int | None]:
        """The parameters and buffers `values` sets, checked, and the num_batches_tracked it
        gives (torch's count of batch norm's training steps), if any."""
        if not isinstance(values, Mapping):
            raise refuse(f"set_params takes a dict of name -> array, got {type(values).__name__}")
        shapes = {**self._param_shapes, **self._buffer_shapes}
        tracked_names = noise.tracked_names(self._buffer_shapes)
        checked, tracked = {}, None
        for name, value in values.items():
            if name in tracked_names:
                tracked = arguments.step_count(as_array(value, name))
                continue
            if name not in shapes:
                raise refuse(f"set_params: unknown parameter {name!r}; the parameters are "
                             + ", ".join(shapes))
            array = as_array(value, name)
            wanted = shapes[name]
            if array.shape != wanted:
                raise refuse(f"set_params: {name} must have shape {wanted}, got {array.shape}")
            checked[name] = np.ascontiguousarray(arguments.converted(array, self._dtype,
                                                                     name)).copy()
        return checked, tracked

    def _checked_state(self, state: Mapping[str, Any]) -> tuple[int, dict[str, np.ndarray]]:
        """The step count and the state arrays `state` sets, all checked."""
        if not isinstance(state, Mapping):
            raise refuse("set_optimizer_state takes the dict optimizer_state returned")
        step, arrays = self._step, {}
        for name, value in state.items():
            if name == "optimizer.step":
                step = arguments.step_count(value)
            elif name == noise.STEP:
                arguments.step_count(value)  # set by set_optimizer_state itself
            elif name in self._state_shapes:
                array = as_array(value, name)
                shape = self._state_shapes[name]
                if array.shape != shape or array.dtype.kind != "f":
                    raise refuse(f"set_optimizer_state: {name} must be a float array of "
                                 f"shape {shape}")
                arrays[name] = np.ascontiguousarray(array, dtype=self._dtype).copy()
            else:
                raise refuse(f"set_optimizer_state: {name!r} is not state of this optimizer")
        return step, arrays


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise refuse(f"{name} must be True or False, got {value!r}")
    return bool(value)
