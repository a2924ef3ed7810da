"""`cnnc check --grad`: every generated gradient against central finite differences.

The network is compiled in float64; on seeded random data each parameter's compiled
gradient is compared with (J(p + h) − J(p − h)) / 2h at every element of a parameter of up
to `samples` elements, and at `samples` drawn ones of a larger parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnc.runtime.module import Module


@dataclass(frozen=True)
class GradientReport:
    name: str
    worst_relative_error: float  # over the checked elements of this parameter
    checked: int
    size: int  # the parameter's elements; checked < size: a drawn sample of them


def check_gradients(module: Module, batch: int = 2, samples: int = 1000, step: float = 1e-6,
                    seed: int = 0) -> list[GradientReport]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *module.input_shape))
    if module.takes_labels:
        y = rng.integers(0, module.output_shape[0], batch)
    else:
        y = rng.standard_normal((batch, *module.output_shape))
    analytic = module.gradients(x, y)
    reports = []
    for name, value in module.params.items():
        flat = value.reshape(-1)
        chosen = np.arange(flat.size) if flat.size <= samples else \
            rng.choice(flat.size, samples, replace=False)
        numeric = np.array([_central_difference(module, name, value, int(index), step, x, y)
                            for index in chosen])
        exact = analytic[name].reshape(-1)[chosen]
        reports.append(GradientReport(name, relative_error(exact, numeric), len(chosen),
                                      flat.size))
    return reports


def relative_error(exact: np.ndarray, numeric: np.ndarray) -> float:
    """‖a − n‖ / (‖a‖ + ‖n‖) over the checked elements: elementwise ratios would be ruled
    by the finite difference's rounding on gradients near 0, this is not."""
    scale = float(np.linalg.norm(exact) + np.linalg.norm(numeric))
    return float(np.linalg.norm(exact - numeric)) / scale if scale > 0 else 0.0


def _central_difference(module: Module, name: str, value: np.ndarray, index: int,
                        step: float, x: np.ndarray, y: np.ndarray) -> float:
    probe = value.copy()
    flat = probe.reshape(-1)
    flat[index] = value.reshape(-1)[index] + step
    # the loss of a training call, which `gradients` differentiates: batch norm's batch
    # statistics and the dropout mask of the next train step
    module.set_params({name: probe})
    plus = module.loss(x, y, training=True)
    flat[index] = value.reshape(-1)[index] - step
    module.set_params({name: probe})
    minus = module.loss(x, y, training=True)
    module.set_params({name: value})
    return (plus - minus) / (2 * step)
