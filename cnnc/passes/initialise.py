"""Deterministic initial parameters from the train line's seed.

Weights feeding a relu are drawn with He's scale, N(0, 2 / fan_in); all others with
Glorot's, U(±sqrt(6 / (fan_in + fan_out))); biases start at zero. The same seed gives the
same parameters on every machine (numpy's PCG64 generator, drawn in float64, then rounded).
"""

from __future__ import annotations

import math

import numpy as np

from cnnc.artifact.format import numpy_dtype
from cnnc.graph.ir import Graph, Op


def initial_parameters(graph: Graph) -> dict[str, np.ndarray]:
    seed = graph.train.get("seed") if graph.train is not None else 0
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(graph.dtype)
    params: dict[str, np.ndarray] = {}
    for tensor in graph.params:
        shape = tuple(tensor.shape)
        if tensor.name.endswith(".bias"):
            params[tensor.name] = np.zeros(shape, dtype=dtype)
            continue
        fan_in = math.prod(shape[1:])
        fan_out = shape[0] * math.prod(shape[2:])
        if _feeds_relu(graph, tensor.name):
            values = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
        else:
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            values = rng.uniform(-limit, limit, size=shape)
        params[tensor.name] = values.astype(dtype)
    return params


def _feeds_relu(graph: Graph, weight: str) -> bool:
    layer = next(n.layer for n in graph.nodes if weight in n.inputs)
    return any(n.op is Op.RELU for n in graph.nodes_of(layer))

