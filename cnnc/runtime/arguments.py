"""The checks of what a caller hands a module: arrays, labels, learning rates, step counts.
Each refusal is a CnncRuntimeError that says what was expected; nothing here knows where the
kernels run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cnnc.diagnostics import CnncError
from cnnc.support.npzfile import read_npz


class CnncRuntimeError(CnncError):
    """A bad argument to a module's method: wrong shape, dtype, name, or file."""


def refuse(message: str) -> CnncRuntimeError:
    return CnncRuntimeError.single(message)


def as_array(value: Any, argument: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise refuse(f"{argument} is not an array: {error}") from None
    if array.dtype.kind not in "fiub" or array.dtype.byteorder == ">":
        raise refuse(f"{argument} must be a numeric array in native byte order, "
                     f"got dtype {array.dtype}")
    return array


def converted(array: np.ndarray, dtype: np.dtype, argument: str) -> np.ndarray:
    """float64 into a float32 module is rounded; any other dtype mismatch is an error."""
    if array.dtype == dtype:
        return array
    if array.dtype == np.float64 and dtype == np.float32:
        return array.astype(np.float32)
    raise refuse(f"{argument} must have dtype {dtype.name}, got {array.dtype}")


def _shown(sample: tuple[int, ...]) -> str:
    return "(N, " + ", ".join(str(d) for d in sample) + ")"


def host_batch(value: Any, argument: str, sample: tuple[int, ...],
               dtype: np.dtype) -> np.ndarray:
    """A batch of samples of shape `sample`, contiguous, of the module's dtype."""
    array = as_array(value, argument)
    if array.ndim != len(sample) + 1:
        hint = "; for one sample, add a batch axis: x[None]" if array.shape == sample else ""
        raise refuse(f"{argument} must have shape {_shown(sample)}, got {array.shape}{hint}")
    if array.shape[1:] != sample:
        raise refuse(f"{argument} must have shape {_shown(sample)}, got {array.shape}")
    if array.shape[0] == 0:
        raise refuse(f"{argument} is an empty batch (N = 0); give at least one sample")
    try:
        return np.ascontiguousarray(converted(array, dtype, argument))
    except MemoryError:
        raise refuse(f"{argument}: a batch of {array.shape[0]} does not fit in memory") \
            from None


def device_batch(array: Any, sample: tuple[int, ...], dtype: np.dtype) -> Any:
    """A device array of samples, used in place: after the checks a numpy array gets, but
    never converted or copied."""
    if array.ndim != len(sample) + 1 or tuple(array.shape[1:]) != sample:
        raise refuse(f"x must have shape {_shown(sample)}, got {array.shape}")
    if array.shape[0] == 0:
        raise refuse("x is an empty batch (N = 0); give at least one sample")
    if np.dtype(array.dtype) != dtype:
        raise refuse(f"x must have dtype {dtype.name}, got {np.dtype(array.dtype).name} (a "
                     "device array is not converted)")
    if not array.is_c_contiguous():
        raise refuse("x must be C-contiguous on the device")
    return array


def labels_or_targets(value: Any, batch: int, labels: bool, output: tuple[int, ...],
                      dtype: np.dtype) -> np.ndarray:
    """Class labels in range, for a loss that compares with labels (cross-entropy); else
    targets of the output's shape (mse)."""
    array = as_array(value, "y")
    if labels:
        classes = output[0]
        if array.shape != (batch,):
            raise refuse(f"y must hold one class label a sample, shape ({batch},), "
                         f"got {array.shape}")
        if array.dtype.kind not in "iu":
            raise refuse(f"y must hold integer class labels, got dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() >= classes):
            bad = array[(array < 0) | (array >= classes)][0]
            raise refuse(f"y holds the label {bad}, outside the classes 0..{classes - 1}")
        return np.ascontiguousarray(array, dtype=np.int64)
    wanted = (batch, *output)
    if array.shape != wanted:
        raise refuse(f"y must have shape {wanted} like the output, got {array.shape}")
    return np.ascontiguousarray(converted(array, dtype, "y"))


def positive_rate(value: Any) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise refuse(f"lr must be a number, got {value!r}") from None
    if not np.isfinite(rate) or rate <= 0:
        raise refuse(f"lr must be a finite number above 0, got {value!r}")
    return rate


def step_count(value: Any) -> int:
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "iu" or int(array) < 0:
        raise refuse(f"set_optimizer_state: optimizer.step must be a count, got {value!r}")
    return int(array)


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """Weights from an .npz: a regular file only, every array's size checked before it is
    read (npzfile), never pickle."""
    return read_npz(path, "weights from", CnncRuntimeError)
