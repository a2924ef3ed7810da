"""Central finite differences in float64: the independent oracle of every gradient."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numeric_gradient(loss: Callable[[], float], array: np.ndarray, step: float = 1e-6,
                     limit: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices, ∂loss/∂array at them) by (f(a + h) − f(a − h)) / 2h, changing `array`
    in place and restoring it; at most `limit` elements, drawn at random."""
    flat = array.reshape(-1)
    count = flat.size
    rng = np.random.default_rng(seed)
    indices = np.arange(count) if count <= limit else rng.choice(count, limit, replace=False)
    values = np.empty(len(indices))
    for position, index in enumerate(indices):
        kept = flat[index]
        flat[index] = kept + step
        plus = loss()
        flat[index] = kept - step
        minus = loss()
        flat[index] = kept
        values[position] = (plus - minus) / (2 * step)
    return indices, values


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """‖a − n‖ / max(‖a‖ + ‖n‖, 1e-12): small when they agree, whatever the scale."""
    scale = max(float(np.linalg.norm(analytic) + np.linalg.norm(numeric)), 1e-12)
    return float(np.linalg.norm(analytic - numeric)) / scale
