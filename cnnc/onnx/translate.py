"""The rewritten ONNX nodes, one at a time, as the lines of a .cnn program and their weights.

Each op type has a rule (`RULES`) that adds a line, attaches an activation to the line that
made its input, or names its output as a second name of its input. A rule that cannot
translate its node raises `Unsupported` with the reason; translation goes on, so that one
error lists every node cnnc cannot take.
"""

from __future__ import annotations

import numpy as np

from cnnc.onnx.fold import Op
from cnnc.onnx.layers import RULES
from cnnc.onnx.lines import BrokenInput, Line, Problem, Unsupported
from cnnc.onnx.model import OnnxModel
from cnnc.onnx.naming import Names
from cnnc.onnx.patterns import Graph

# Layers whose statement may end with `-> ACT`.
TAKES_ACTIVATION = {"conv", "maxpool", "avgpool", "dense", "add", "concat", "mul", "batchnorm",
                    "globalavgpool", "globalmaxpool"}
# Activations that only a dense line may end with (they need N x classes).
CLASS_ACTIVATIONS = {"softmax", "log_softmax"}


class Translator:
    """Builds the lines of one model; `tensors` maps each ONNX tensor to the line whose
    output it is (the input's name for the model's input)."""

    def __init__(self, model: OnnxModel, graph: Graph, names: Names, input_name: str) -> None:
        self.model = model
        self.graph = graph
        self.names = names
        self.lines: list[Line] = []
        self.weights: dict[str, np.ndarray] = {}
        self.problems: list[Problem] = []
        self.tensors: dict[str, str] = {model.input: input_name}
        self.pre_activation: set[str] = set()  # tensors whose line now ends in an activation
        self.readers = graph.readers()
        self.broken: set[str] = set()  # made by nodes that could not be translated

    # -- what rules ask ---------------------------------------------------------------------
    def shape(self, tensor: str) -> tuple[int | None, ...]:
        shape = self.model.shapes.get(tensor)
        if shape is None:
            raise Unsupported(f"the shape of {tensor!r} is not known (ONNX shape inference "
                              "could not work it out)")
        return shape

    def constant(self, op: Op, index: int, what: str) -> np.ndarray | None:
        """Input `index` of `op` as a constant; None when it is left out."""
        if index >= len(op.inputs) or not op.inputs[index]:
            return None
        value = self.graph.constant(op.inputs[index])
        if value is None:
            raise Unsupported(f"its {what} ({op.inputs[index]!r}) is computed at run time; "
                              "cnnc needs it constant")
        return value

    def source(self, tensor: str) -> str:
        """The line (or the input) whose output `tensor` is."""
        if self.graph.constant(tensor) is not None:
            raise Unsupported(f"its input {tensor!r} is a constant; cnnc layers read the "
                              "network's input or other layers")
        if tensor in self.pre_activation:
            raise Unsupported(f"it reads {tensor!r} before the activation that "
                              f"{self.tensors[tensor]} ends with, which cnnc cannot keep")
        if tensor in self.broken:
            raise BrokenInput(tensor)
        if tensor not in self.tensors:
            raise Unsupported(f"its input {tensor!r} is not made by any node")
        return self.tensors[tensor]

    # -- what rules do ----------------------------------------------------------------------
    def add_line(self, op: Op, kind: str, inputs: list[str], args: list[str] | None = None,
                 options: list[tuple[str, str]] | None = None,
                 weights: dict[str, np.ndarray] | None = None,
                 weight_name: str | None = None) -> Line:
        line = Line(kind, self.names.layer(op, weight_name), inputs, args or [],
                    options or [], None, list(dict.fromkeys([op.name, *op.attr("fused", ())])))
        self.lines.append(line)
        for suffix, value in (weights or {}).items():
            self.weights[f"{line.name}.{suffix}"] = np.ascontiguousarray(
                value.astype(self.model.dtype))
        self.tensors[op.outputs[0]] = line.name
        return line

    def alias(self, op: Op, tensor: str) -> None:
        self.tensors[op.outputs[0]] = self.source(tensor)

    def activate(self, op: Op, text: str) -> None:
        """`text` at the end of the line that made the input, or a line of its own."""
        tensor = op.inputs[0]
        name = self.source(tensor)
        line = next((ln for ln in reversed(self.lines) if ln.name == name), None)
        bare = text.split("(")[0]
        if (line is not None and line.kind in TAKES_ACTIVATION and line.activation is None
                and self.readers[tensor] == 1 and tensor != self.graph.output
                and (bare not in CLASS_ACTIVATIONS or line.kind == "dense")):
            line.activation = text
            line.nodes.extend(n for n in (op.name, *op.attr("fused", ())) if n not in line.nodes)
            self.pre_activation.add(tensor)
            self.tensors[op.outputs[0]] = line.name
            return
        self.add_line(op, "activation", [name], [text])

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> None:
        for op in self.graph.ops:
            rule = RULES.get(op.op_type)
            try:
                if rule is None:
                    raise Unsupported(f"{op.op_type} is not supported")
                rule(self, op)
            except Unsupported as problem:
                self.broken.update(op.outputs)
                if not isinstance(problem, BrokenInput):
                    self.problems.append(Problem(op.op_type, op.name, str(problem)))
