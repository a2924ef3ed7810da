"""How large a network cnnc accepts: checked after shapes, before anything is allocated.

A program is a few lines, but `dense 2147483647` asks for billions of parameters. Such a
program is refused with the sizes said, rather than failing with MemoryError while its
parameters are initialised or its buffers allocated.
"""

from __future__ import annotations

from cnnc.artifact.summary import human_bytes
from cnnc.diagnostics import CnncSemanticError, Diagnostic, Note, Source
from cnnc.graph.ir import Graph
from cnnc.passes.summary import summarize

MAX_PARAMETER_BYTES = 2 * 2**30  # all parameters, in the network's dtype
MAX_SAMPLE_BYTES = 2**30  # the tensors one sample's forward pass writes


def check_sizes(graph: Graph, source: Source) -> None:
    """Refuse a network above either limit, naming the largest layer."""
    rows = summarize(graph).rows
    errors = []
    for limit, field, what in ((MAX_PARAMETER_BYTES, "param_bytes", "parameters"),
                               (MAX_SAMPLE_BYTES, "activation_bytes",
                                "activations of one sample")):
        total = sum(getattr(r, field) for r in rows)
        if total <= limit:
            continue
        largest = max(rows, key=lambda r: getattr(r, field))
        layer = graph.layer(largest.name)
        errors.append(Diagnostic(
            f"the {what} of network {graph.name} need {human_bytes(total)}, more than the "
            f"{human_bytes(limit)} cnnc accepts", layer.span,
            (Note(f"{layer.display} alone needs {human_bytes(getattr(largest, field))}"),)))
    if errors:
        raise CnncSemanticError(errors, source)
