"""A plain numpy interpreter of the graph IR: the oracle of the numeric tests, never the
fast path. Each op's semantics are its `OpDef.reference` (in cnnc/ops/), written from the
same definitions as the compiled kernels (language.md), corner cases included.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cnnc.graph.ir import BATCH, Graph, Node, Phase
from cnnc.ops import registry
from cnnc.ops.registry import Mode

INFERENCE = Mode(training=False)
TRAINING = Mode(training=True)


def run(graph: Graph, x: np.ndarray, params: Mapping[str, np.ndarray],
        target: np.ndarray | None = None, mode: Mode = INFERENCE) -> dict[str, np.ndarray]:
    """Every tensor of the graph, computed from input `x` (N x sample shape) and `params`.

    With `target` (labels or regression targets) and a loss line, the loss is computed too.
    `mode` says whether ops that behave differently in training (dropout) run as in a
    training step or as in inference.
    """
    values: dict[str, np.ndarray] = {graph.input: x, **params}
    if target is not None and graph.target is not None:
        values[graph.target] = target
    for node in _nodes(graph, mode):
        if any(name not in values for name in node.inputs):
            continue  # the loss, when no target was given
        batch = x.shape[0]
        shape = tuple(batch if d == BATCH else d for d in graph.tensor(node.output).shape)
        result = evaluate(node, [values[name] for name in node.inputs], shape, mode)
        values.update(zip(node.outputs, result if isinstance(result, tuple) else (result,),
                          strict=True))
    return values


def _nodes(graph: Graph, mode: Mode) -> tuple[Node, ...]:
    """The forward pass of the mode, the loss, and the backward pass, which differentiates
    the training pass (so it runs at inference only where both passes are one)."""
    backward = mode.training or graph.inference is None
    rest = tuple(n for n in graph.nodes if n.phase is Phase.LOSS or
                 (backward and n.phase is Phase.BACKWARD))
    return graph.forward_nodes(mode.training) + rest


def forward(graph: Graph, x: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
    return run(graph, x, params)[graph.output]


def evaluate(node: Node, args: list[np.ndarray], shape: tuple[int, ...] | None = None,
             mode: Mode = INFERENCE) -> np.ndarray | tuple[np.ndarray, ...]:
    """One op, by its registered numpy semantics; an op with several outputs returns them as
    a tuple. `shape` is the first output's, batch included (a gradient's shape cannot always
    be told from δ's)."""
    return registry.get(node.op).reference(node, args, shape, mode)
