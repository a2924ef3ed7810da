"""The Python side of a compiled network: `Module`, made by `compile` or `load`.

A module holds its parameters and a native entry point; `forward` checks its argument
(rank, shape, dtype, contiguity, batch size) before native code sees it, allocates every
buffer the kernels write, and makes one native call.
"""

from __future__ import annotations

import ctypes
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import module as artifact
from .diagnostics import CnncError
from .loader import native_entry, validated_manifest, validated_params


class CnncRuntimeError(CnncError):
    """A bad argument to a module's method: wrong shape, dtype, name, or file."""


def _refuse(message: str) -> CnncRuntimeError:
    return CnncRuntimeError.single(message)


class Module:
    """A compiled network. Make one with `cnnc.compile(...)` or `cnnc.load(path)`."""

    def __init__(self, file: artifact.ModuleFile, source: str = "<compiled>") -> None:
        self._file = file
        self._manifest = validated_manifest(file, source)
        params = validated_params(file, self._manifest, source)
        self._entry, self._engine = native_entry(file, self._manifest, source)
        self._dtype = np.dtype(self._manifest["dtype_numpy"])
        self._params = {name: np.ascontiguousarray(value) for name, value in params.items()}

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

    # -- running ------------------------------------------------------------------------------
    def forward(self, x: Any) -> np.ndarray:
        """The network's output for a batch `x` of shape (N, *input_shape)."""
        arrays = self._run(x)
        index = self._manifest["output_index"]
        output = arrays[index].reshape(arrays[index].shape[0], *self.output_shape)
        # a network that only flattens writes nothing: its output is its input, reshaped
        return output.copy() if self._manifest["storage"][index]["role"] != "value" else output

    __call__ = forward

    def activations(self, x: Any) -> dict[str, np.ndarray]:
        """Every tensor the kernels write for batch `x`, by name (argmax tensors included)."""
        arrays = self._run(x)
        return {entry["name"]: array for entry, array in zip(self._manifest["storage"], arrays,
                                                               strict=True)
                if entry["role"] == "value"}

    def _run(self, x: Any) -> list[np.ndarray]:
        x = self._checked_input(x, "x")
        batch = x.shape[0]
        arrays = [self._buffer_for(entry, x, batch) for entry in self._manifest["storage"]]
        table = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        self._entry(batch, table)  # `arrays` keeps every buffer alive during the call
        return arrays

    def _buffer_for(self, entry: dict[str, Any], x: np.ndarray, batch: int) -> np.ndarray:
        role, name = entry["role"], entry["name"]
        if role == "input":
            return x
        if role == "param":
            return self._params[name]
        shape = (batch, *entry["shape"][1:])
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

    # -- parameters ---------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        """A copy of every parameter (PyTorch layouts)."""
        return {name: value.copy() for name, value in self._params.items()}

    def set_params(self, values: Mapping[str, Any]) -> None:
        """Replace some or all parameters; names, shapes and dtypes are checked first."""
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
        """A plain .npz of every parameter (no pickle)."""
        artifact.write_atomically(Path(path), artifact.params_to_bytes(self._params))

    def load_weights(self, path: str | Path) -> None:
        """Every parameter from an .npz written by save_weights (or numpy.savez)."""
        values = _read_npz(Path(path))
        missing = [name for name in self._params if name not in values]
        if missing:
            raise _refuse(f"{path} lacks the parameters " + ", ".join(missing))
        self.set_params(values)

    def save(self, path: str | Path) -> None:
        """The module file, with the current parameters as its initial ones."""
        sections = dict(self._file.sections, params=artifact.params_to_bytes(self._params))
        artifact.write(artifact.ModuleFile(self._file.manifest, sections), path)

    def __repr__(self) -> str:
        return (f"<cnnc.Module {self.name}: {self.input_shape} -> {self.output_shape} "
                f"{self._dtype.name}>")


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
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _refuse(f"cannot read weights from {path}: {error}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise _refuse(f"{path} holds a single array, not an .npz of named parameters")
    try:
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _refuse(f"cannot read weights from {path}: {error}") from None


def load(path: str | Path) -> Module:
    """A module from its .cnnm file: no parsing, no LLVM optimisation."""
    return Module(artifact.read(path), str(path))
