"""Constant folding at import: every node whose inputs are all known is evaluated, whatever
its op, with ONNX's own reference implementation, and leaves the graph.

Exporters wrap padding, flattening and weight layouts in chains of Shape, Gather, Cast,
Slice, Transpose, ConstantOfShape, Concat and Reshape. Some of those chains read the shape
of a tensor computed at run time, whose batch dimension is not known. Such a chain is folded
twice, once for each of two probe batch sizes: where both results agree the value is a
constant; where they differ it depends on the batch, and a consumer (Reshape) may still
read it, an entry equal to the probe in both being "the batch".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnc.diagnostics import CnncInputError
from cnnc.onnx.model import OnnxModel

PROBES = (3, 5)  # two batch sizes that a model's own constants are unlikely to both hold
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
              "Bernoulli", "Multinomial"}


@dataclass(frozen=True)
class Op:
    """One node of the graph as the importer reads it: attributes decoded, inputs renamed
    through aliases, and the name of the ONNX node (or nodes, for a matched pattern) it
    stands for."""

    op_type: str
    name: str
    inputs: tuple[str, ...]  # "" where an optional input is left out
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


@dataclass(frozen=True)
class Constants:
    """What folding knows: each value under both probe batch sizes (the same array when it
    does not depend on the batch)."""

    first: dict[str, np.ndarray]
    second: dict[str, np.ndarray]

    def __contains__(self, name: str) -> bool:
        return name in self.first

    def constant(self, name: str) -> np.ndarray | None:
        """The value, if it is the same for any batch."""
        if name not in self.first:
            return None
        a, b = self.first[name], self.second[name]
        if a is b or (a.shape == b.shape and np.array_equal(a, b)):
            return a
        return None

    def batch_dependent(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        if name in self.first and self.constant(name) is None:
            return self.first[name], self.second[name]
        return None


def decode(node: Any) -> Op:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            attrs[key] = value.decode("utf-8", "replace")
    return Op(node.op_type, node.name or f"{node.op_type}({', '.join(node.output)})",
              tuple(node.input), tuple(node.output), attrs)


def fold(model: OnnxModel) -> tuple[list[tuple[Op, Any]], Constants, OnnxModel]:
    """The nodes left to translate (each with its NodeProto), every folded value, and the
    model with its shapes inferred again over the folded graph.

    Folding and shape inference feed each other: a Pad whose amounts are a folded chain has
    an output shape only once the chain is folded, and a Shape of that output folds only
    once its shape is known. So both run in turn until folding finds nothing new."""
    from onnx import numpy_helper

    graph = model.proto.graph
    initial = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants = Constants(dict(initial), dict(initial))
    order = list(graph.node)  # the original nodes, in the model's (topological) order
    pairs = [(decode(node), node) for node in order]
    while True:
        left = [(op, node) for op, node in pairs if not _try_fold(op, node, model, constants)]
        if len(left) == len(pairs):
            break
        pairs = left
        model = _reinfer(model, [node for _, node in pairs], constants, order)
    return pairs, constants, model


def _reinfer(model: OnnxModel, nodes: list[Any], constants: Constants,
             order: list[Any]) -> OnnxModel:
    """The model's shapes inferred again with every folded constant as an initializer;
    values that depend on the batch stay computed by the nodes that make them."""
    import dataclasses

    from onnx import numpy_helper

    from cnnc.onnx.model import infer_shapes

    proto = type(model.proto)()
    proto.CopyFrom(model.proto)
    kept = list(nodes)
    read = {name for node in kept for name in node.input if name}
    dependent = [node for node in order
                 if any(constants.batch_dependent(o) is not None for o in node.output)]
    kept = dependent + [n for n in kept if all(n is not d for d in dependent)]
    read |= {name for node in dependent for name in node.input if name}
    del proto.graph.node[:]
    proto.graph.node.extend(_ordered(kept, order))
    del proto.graph.initializer[:]
    made = {o for node in kept for o in node.output}
    proto.graph.initializer.extend(
        numpy_helper.from_array(constants.first[name], name) for name in sorted(read)
        if name in constants and name not in made and constants.constant(name) is not None)
    del proto.graph.value_info[:]
    return dataclasses.replace(model, proto=proto, shapes=infer_shapes(proto, model.path))


def _ordered(kept: list[Any], order: Any) -> list[Any]:
    ids = {id(node) for node in kept}
    return [node for node in order if id(node) in ids]


def _try_fold(op: Op, node: Any, model: OnnxModel, constants: Constants) -> bool:
    if op.op_type in RANDOM_OPS or node.domain not in ("", "ai.onnx"):
        return False
    if op.op_type in ("Shape", "Size") and op.inputs[0] not in constants:
        shape = model.shapes.get(op.inputs[0])
        if shape is None or any(d is None for d in shape[1:]):
            return False
        for values, probe in zip((constants.first, constants.second), PROBES, strict=True):
            values[op.outputs[0]] = _shape_value(op, shape, probe)
        return True
    known = [name for name in op.inputs if name]
    if not all(name in constants for name in known):
        return False
    first = _evaluate(node, model, constants.first)
    depends = any(constants.batch_dependent(name) is not None for name in known)
    second = _evaluate(node, model, constants.second) if depends else first
    for name, a, b in zip([n for n in op.outputs if n], first, second, strict=True):
        constants.first[name] = a
        constants.second[name] = b
    return True


def _shape_value(op: Op, shape: tuple[int | None, ...], probe: int) -> np.ndarray:
    dims = np.array([probe if d is None else d for d in shape], dtype=np.int64)
    if op.op_type == "Size":
        return np.array(np.prod(dims), dtype=np.int64)
    start, end = op.attr("start", 0), op.attr("end", None)
    return dims[start:end]


def _evaluate(node: Any, model: OnnxModel, values: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The node's outputs, by ONNX's reference implementation, in the model's opset."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    inputs = [name for name in node.input if name]
    feeds = {name: values[name] for name in inputs}
    graph = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype),
                                       feeds[name].shape) for name in inputs],
        [helper.make_empty_tensor_value_info(name) for name in node.output if name])
    small = helper.make_model(graph, opset_imports=list(model.proto.opset_import),
                              ir_version=model.proto.ir_version)
    try:
        results = ReferenceEvaluator(small).run(None, feeds)
    except Exception as error:  # the model's own constants do not evaluate: say which
        raise CnncInputError.single(
            f"{model.path}: folding the constant node {node.op_type} {node.name!r} failed: "
            f"{type(error).__name__}: {str(error)[:300]}") from None
    return [np.asarray(r) for r in results]
