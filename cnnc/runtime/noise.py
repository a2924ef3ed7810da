"""Dropout's random numbers: uniform in [0, 1), drawn by the runtime for each training call
from a counter-based generator (numpy's Philox) keyed by the train line's seed, with the
train step and the noise buffer's place in the counter. A mask depends on nothing else:
not on the thread count, not on the device, and `gradients(x, y)` sees the mask of the
`train_step(x, y)` that follows it. Also the names torch gives batch norm's step count."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cnnc.artifact.manifest import Manifest

# the train_steps taken, in optimizer_state: the step dropout draws for, and batch norm's
# num_batches_tracked
STEP = "train_step.count"


class NoiseSource:
    """The noise buffers of a module and how to fill them for one call."""

    def __init__(self, manifest: Manifest) -> None:
        self._buffers = manifest.buffers("noise")
        self._dtype = manifest.numpy_dtype
        settings = manifest.optimizer.to_json() if manifest.optimizer else {}
        self._seed = int(settings.get("seed", 0) or 0)

    @property
    def needed(self) -> bool:
        return bool(self._buffers)

    def draw(self, batch: int, step: int) -> dict[str, np.ndarray]:
        """Each noise buffer's numbers for a batch of `batch` at train step `step`."""
        drawn = {}
        for index, buffer in enumerate(self._buffers):
            # the counter's high words say which step and buffer; the low words count draws
            bits = np.random.Philox(key=self._seed, counter=[0, 0, index, step])
            shape = buffer.sized(batch)
            drawn[buffer.name] = np.random.Generator(bits).random(shape, dtype=self._dtype)
        return drawn


def sliced(drawn: Mapping[str, np.ndarray], part: slice) -> dict[str, np.ndarray]:
    """The numbers of the samples in `part`, for a thread's share of the batch."""
    return {name: np.ascontiguousarray(values[part]) for name, values in drawn.items()}


def tracked_names(buffers: Mapping[str, object]) -> list[str]:
    """`LAYER.num_batches_tracked` for each batch norm (one with a running mean), as torch
    names its count of training steps."""
    suffix = ".running_mean"
    return [name[: -len(suffix)] + ".num_batches_tracked" for name in buffers
            if name.endswith(suffix)]
