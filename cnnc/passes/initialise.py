"""Deterministic initial parameters (and buffers: running statistics) from the train line's
seed, each by its op's rule
(`ParamDef.init`): conv and dense weights by their fans (He's scale before a relu, Glorot's
otherwise), biases at zero.

The same seed gives the same parameters on every machine: one numpy PCG64 generator, drawn
in float64 in the graph's parameter order, then rounded.
"""

from __future__ import annotations

import numpy as np

from cnnc.artifact.format import numpy_dtype
from cnnc.graph.ir import Graph, Node
from cnnc.ops import registry
from cnnc.ops.registry import InitContext, ParamDef


def initial_parameters(graph: Graph) -> dict[str, np.ndarray]:
    seed = graph.train.get("seed") if graph.train is not None else 0
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(graph.dtype)
    params: dict[str, np.ndarray] = {}
    for tensor in graph.params + graph.buffers:
        node, param = _owner(graph, tensor.name)
        context = InitContext(tuple(tensor.shape), dtype, node, graph, rng)
        params[tensor.name] = param.init(context)
    return params


def _owner(graph: Graph, name: str) -> tuple[Node, ParamDef]:
    """The node that owns parameter `name` and its definition: params are a node's last
    inputs, in the order its op declares them."""
    for node in graph.nodes:
        declared = registry.get(node.op).params
        owned = node.inputs[len(node.inputs) - len(declared):] if declared else ()
        if name in owned:
            return node, declared[owned.index(name)]
    raise AssertionError(f"no op owns the parameter {name}")
