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


def check_graph_gradients(graph, batch: int = 2, seed: int = 0) -> None:
    """Every gradient a differentiated graph names (its input's and its parameters') against
    central finite differences of the reference's loss, at realistic parameter scales (He or
    Glorot) with nonzero biases, so that no bias rule hides behind zeros."""
    from cnnc.graph.ir import DType, Role
    from cnnc.passes import reference
    from cnnc.passes.initialise import initial_parameters
    from cnnc.passes.reference import TRAINING

    rng = np.random.default_rng(seed)
    params = {name: value + 0.1 * rng.standard_normal(value.shape)
              for name, value in initial_parameters(graph).items()}
    for tensor in graph.tensors:  # dropout's random numbers, fixed for the whole check
        if tensor.role is Role.NOISE:
            params[tensor.name] = rng.random((batch, *tensor.shape[1:]))
    x = rng.standard_normal((batch, *graph.tensor(graph.input).shape[1:]))
    out_shape = graph.tensor(graph.output).shape[1:]
    if graph.tensor(graph.target).dtype is DType.I64:  # class labels
        target = rng.integers(0, out_shape[0], batch)
    else:
        target = rng.standard_normal((batch, *out_shape))
    values = reference.run(graph, x, params, target, mode=TRAINING)

    def loss() -> float:
        return float(reference.run(graph, x, params, target, mode=TRAINING)[graph.loss])

    assert graph.gradients, "the graph has nothing to differentiate"
    for name, gradient in graph.gradients:
        array = x if name == graph.input else params[name]
        indices, numeric = numeric_gradient(loss, array, seed=seed)
        analytic = values[gradient].reshape(-1)[indices]
        assert relative_error(analytic, numeric) < 1e-6, name
