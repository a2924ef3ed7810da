"""A small network and a synthetic dataset it can learn, shared by the training and CLI tests."""

from __future__ import annotations

import numpy as np

from cnnc.training.data import Dataset

SMALL = ("network small\ninput: 1x6x6\nconv c: 3 3x3 -> relu\nmaxpool 2x2\n"
         "dense out: 3 -> softmax\nloss cross_entropy\ntrain sgd lr=0.1 momentum=0.9 seed=4\n")


def synthetic(count: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, count)
    x = rng.standard_normal((count, 1, 6, 6)).astype(np.float32) * 0.3
    x[np.arange(count), 0, y, y] += 2.0  # a learnable signal
    return Dataset(x, y)
