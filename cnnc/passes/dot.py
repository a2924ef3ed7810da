"""The layer graph of a typed graph as Graphviz dot text (`cnnc compile --emit dot`).

One box a layer (the input line included) with its name, the ops it became, one sample's
output shape and its parameter count; one edge for each layer whose values another reads,
so `from=`, add, concat and mul show as forks and joins. `dot -Tsvg` draws it.
"""

from __future__ import annotations

from cnnc.graph.ir import Graph, Layer, Phase, Role, format_shape


def format_dot(graph: Graph) -> str:
    lines = [f"digraph {_quoted(graph.name)} {{", "  rankdir=TB;",
             '  node [shape=box, style=rounded, fontname="Helvetica"];']
    for layer in graph.layers:
        lines.append(f"  {_quoted(layer.name)} [label={_quoted(_label(graph, layer))}];")
    for source, target in layer_edges(graph):
        lines.append(f"  {_quoted(source)} -> {_quoted(target)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def layer_edges(graph: Graph) -> list[tuple[str, str]]:
    """(source layer, reading layer) once for each pair, in the order of the readers."""
    made_by = {layer.output: layer.name for layer in graph.layers}
    for node in graph.nodes:
        made_by.update(dict.fromkeys(node.outputs, node.layer))
    edges: dict[tuple[str, str], None] = {}
    for node in graph.nodes:
        if node.phase is not Phase.FORWARD or not graph.has_layer(node.layer):
            continue
        for name in node.inputs:
            source = made_by.get(name)
            if source is not None and source != node.layer:
                edges[(source, node.layer)] = None
    return list(edges)


def _label(graph: Graph, layer: Layer) -> str:
    """`conv c1`, its ops (`conv2d + bias_add + relu`), `6x28x28`, `156 parameters`; the
    input line's name and shape alone."""
    shape = format_shape(graph.tensor(layer.output).shape[1:], "x")
    nodes = [n for n in graph.nodes_of(layer.name) if n.phase is Phase.FORWARD]
    if layer.output == graph.input:
        return f"{layer.display}\n{shape}"
    params = {p for n in nodes for p in n.inputs if graph.tensor(p).role is Role.PARAM}
    count = sum(graph.tensor(p).size for p in params)
    ops = " + ".join(n.op for n in nodes) or layer.kind
    return "\n".join([layer.display, ops, shape, f"{count:,} parameters"])


def _quoted(text: str) -> str:
    """A dot string: backslashes and quotes escaped, line breaks as dot's \\n."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
