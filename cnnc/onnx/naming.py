"""Layer names for an imported model, taken from the ONNX graph and made valid .cnn names.

The best name is the one PyTorch gave the module: its weight initializer is called
`layer1.0.conv1.weight`, so the layer is `layer1.0.conv1` and the parameters keep torch's
state_dict names. Without one, the node's scope (`/layer1/layer1.0/relu/Relu` →
`layer1.0.relu`), and failing that the op (`add`, `add_2`, ...).
"""

from __future__ import annotations

import re

from cnnc.onnx.fold import Op

MAX_NAME = 64  # frontend.irgen.MAX_NAME
_SEGMENT = re.compile(r"[^A-Za-z0-9_]")
PARAM_SUFFIXES = (".weight", ".bias")


def _keywords() -> set[str]:
    from cnnc.frontend.parse_errors import statement_keywords

    return {*statement_keywords(), "in", "none", "activation", "pad"}


class Names:
    """Hands out unique, valid layer names (a builder used for one import)."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.keywords = _keywords()

    def network(self, stem: str) -> str:
        name = _SEGMENT.sub("_", stem) or "imported"
        if not (name[0].isalpha() or name[0] == "_"):
            name = "net_" + name
        return name[:MAX_NAME]

    def input(self, name: str) -> str:
        return self._unique(self._valid(name, "x"))

    def layer(self, op: Op, weight: str | None = None) -> str:
        return self._unique(self._valid(self._wanted(op, weight), op.op_type.lower()))

    def _wanted(self, op: Op, weight: str | None) -> str:
        if weight and "::" not in weight:
            for suffix in PARAM_SUFFIXES:
                if weight.endswith(suffix) and len(weight) > len(suffix):
                    return weight[: -len(suffix)]
        return _from_scope(op.name, op.op_type)

    def _valid(self, wanted: str, fallback: str) -> str:
        segments = [_SEGMENT.sub("_", s) for s in wanted.split(".") if s]
        segments = [s for s in segments if s.strip("_")] or [fallback]
        if not (segments[0][0].isalpha() or segments[0][0] == "_"):
            segments[0] = "n" + segments[0]
        name = ".".join(segments)[:MAX_NAME].rstrip(".")
        return name + "_1" if name in self.keywords else name

    def _unique(self, name: str) -> str:
        chosen, count = name, 1
        while chosen in self.taken:
            count += 1
            chosen = f"{name[: MAX_NAME - len(str(count)) - 1]}_{count}"
        self.taken.add(chosen)
        return chosen


def _from_scope(node: str, op_type: str) -> str:
    """`/layer1/layer1.0/conv1/Conv` → `layer1.0.conv1`: torch names each scope by its
    qualified module name, so a scope that extends the one before replaces it."""
    unnamed = re.fullmatch(r"[A-Za-z.]+\(([^,)]*).*\)", node)  # fold.decode's "Op(output)"
    if unnamed:
        return unnamed.group(1)
    if "/" not in node:  # torch.export's "node_conv2d_1": the op and a count
        return node.removeprefix("node_")
    parts = [p for p in node.split("/") if p]
    if parts and re.fullmatch(r"[A-Z][A-Za-z0-9]*(_\d+)?", parts[-1]):  # the op: /fc/Gemm
        parts = parts[:-1]
    path = ""
    for part in parts:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path or op_type.lower()
