"""A typed graph's inference pass as an ONNX model (`to_onnx`), and a network file written as
one (`export`, what `cnnc export` runs).

The model computes what `Module.forward` computes: batch norm with its running statistics
(`BatchNormalization`, not folded, so the file keeps the parameters a user trained), no
dropout. The forward nodes are translated one by one, each by the rule of its op in `RULES`;
a conv or dense op whose only reader is its bias becomes one `Conv` or `Gemm` with the bias
as its third input. Names are cnnc's: the input is the network's input, every value the
tensor's name (the output the last layer's), every initializer a parameter's name
(`c1.weight`), so a model and a weights file line up name for name. The batch dimension is
the symbol `N`; every other dimension is fixed.

Windows are written with their padding worked out for the input's size (`ops.window.resolve`):
`same` padding, and the last window of a ceil-mode pool, as plain pads that read the same
positions, so no runtime's rounding rule is relied upon.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as missing:  # the optional extra is not installed: say how to get it
    raise ImportError("cnnc's ONNX export needs the onnx package: "
                      "pip install 'cnnc[onnx]'") from missing

from cnnc.diagnostics import CnncInputError
from cnnc.graph.ir import BATCH, DType, Graph, Node, Phase, Role
from cnnc.ops.window import pads, resolve
from cnnc.version import __version__

MIN_OPSET, MAX_OPSET = 11, 21
DEFAULT_OPSET = 17
_ELEMENT = {DType.F32: TensorProto.FLOAT, DType.F64: TensorProto.DOUBLE}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")
TRACKED = ".num_batches_tracked"  # torch's count of batch norm steps, in weights files


def check_opset(opset: object) -> int:
    if type(opset) is not int or not MIN_OPSET <= opset <= MAX_OPSET:
        raise CnncInputError.single(f"opset {opset!r} is not supported; cnnc exports opsets "
                                    f"{MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    return opset


def to_onnx(graph: Graph, values: Mapping[str, np.ndarray],
            opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The inference pass of `graph` (cnnc.check's result) with the parameters and buffers
    `values` (Module.params and Module.buffers, or initial_parameters) as an ONNX model of
    the default domain at `opset` (11 to 21)."""
    check_opset(opset)
    arrays = checked_values(graph, values, "the values given")
    builder = _Builder(graph, arrays, opset)
    forward = [n for n in graph.nodes if n.phase is Phase.FORWARD]
    unknown = sorted({n.op for n in forward} - RULES.keys())
    if unknown:
        raise CnncInputError.single(
            f"network {graph.name} cannot be exported to ONNX: no ONNX form is known for the "
            f"op{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    for node in forward:
        if node not in builder.done:
            RULES[node.op](builder, node)
    return builder.model()


def export(network: str | Path, path: str | Path, weights: str | Path | None = None,
           opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Write `network` (a .cnn path or program text, a .cnnm module file or an .onnx model,
    imported) to `path` as
    ONNX, atomically, and return the model. The weights are those of the .npz `weights`
    when given, else a module file's stored parameters and buffers, else the program's
    initial (seeded) ones."""
    check_opset(opset)
    graph, values = network_values(network, weights)
    model = to_onnx(graph, values, opset)
    write_model(model, path)
    return model


def write_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Atomically: a failed write leaves any old file as it was."""
    from cnnc.support.files import write_atomically

    write_atomically(path, model.SerializeToString(), CnncInputError)


# -- the network and its weights ------------------------------------------------------------

def network_values(network: str | Path, weights: str | Path | None = None
                   ) -> tuple[Graph, dict[str, np.ndarray]]:
    """The typed graph of `network` and the weights `export` writes (see there)."""
    graph, values = _network(network)
    if weights is not None:
        values = checked_values(graph, read_weights(weights), str(weights))
    return graph, values


def _network(network: str | Path) -> tuple[Graph, dict[str, np.ndarray]]:
    from cnnc.driver.pipeline import front_end
    from cnnc.frontend.source import is_onnx, to_source
    from cnnc.onnx.importer import imported_source
    from cnnc.passes.initialise import initial_parameters

    if isinstance(network, (str, Path)) and "\n" not in str(network) and \
            str(network).endswith(".cnnm"):
        return _module_network(Path(network))
    if is_onnx(network):  # imported, with its own weights: e.g. to see what cnnc makes of it
        source, imported = imported_source(network)
        graph = front_end(source)
        return graph, checked_values(graph, {**initial_parameters(graph), **imported},
                                     str(network))
    graph = front_end(to_source(network))
    return graph, initial_parameters(graph)


def _module_network(path: Path) -> tuple[Graph, dict[str, np.ndarray]]:
    """A module file's stored program through the whole front end, and its stored
    parameters; none of its code is loaded."""
    from cnnc.artifact import format as artifact
    from cnnc.artifact.checks import check_fields
    from cnnc.diagnostics import CnncError, Source
    from cnnc.driver.pipeline import front_end

    file = artifact.read(path)
    check_fields(file.manifest, str(path))
    try:
        program = Source(file.sections["program"].decode("utf-8"), f"{path} (stored program)")
        graph = front_end(program, file.manifest["dtype"])
    except (UnicodeDecodeError, CnncError):
        raise artifact.CnncModuleError.single(
            f"cannot export {path}: its stored program is not a valid program; compile the "
            "program again") from None
    stored = artifact.params_from_bytes(file.sections["params"],
                                        f"the parameters stored in {path}")
    return graph, checked_values(graph, stored, f"the parameters stored in {path}")


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    from cnnc.support.npzfile import read_npz

    return read_npz(path, "weights", CnncInputError)


def checked_values(graph: Graph, values: Mapping[str, object],
                   where: str) -> dict[str, np.ndarray]:
    """Every parameter and buffer of `graph` from `values`, as an array of the graph's dtype
    and the parameter's shape; anything missing, misshapen or unknown is a CnncInputError.
    num_batches_tracked (torch's, in cnnc's weights files too) is accepted and left out."""
    if not isinstance(values, Mapping):
        raise CnncInputError.single(f"{where} must map parameter names to arrays, not "
                                    f"{type(values).__name__}")
    wanted = {t.name: t for t in graph.params + graph.buffers}
    tracked = {name.removesuffix(".running_mean") + TRACKED for name in wanted
               if name.endswith(".running_mean")}
    missing = [name for name in wanted if name not in values]
    if missing:
        raise CnncInputError.single(f"{where}: no array for {_listed(missing)} of network "
                                    f"{graph.name}")
    unknown = [str(name) for name in values if name not in wanted and name not in tracked]
    if unknown:
        raise CnncInputError.single(f"{where}: {_listed(unknown, 'array')} of no parameter "
                                    f"of network {graph.name}")
    dtype = np.float64 if graph.dtype is DType.F64 else np.float32
    arrays = {}
    for name, tensor in wanted.items():
        array = np.asarray(values[name])
        if array.dtype.kind not in "fiu":
            raise CnncInputError.single(f"{where}: {name} must hold numbers, not "
                                        f"{array.dtype}")
        if array.shape != tuple(tensor.shape):
            raise CnncInputError.single(f"{where}: {name} must have shape "
                                        f"{tuple(tensor.shape)}, got {array.shape}")
        arrays[name] = np.ascontiguousarray(array, dtype=dtype)
    return arrays


def _listed(names: list[str], what: str = "parameter") -> str:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"the {what}{'s' if len(names) > 1 else ''} {shown}"


# -- building the model ---------------------------------------------------------------------

class _Builder:
    """The ONNX nodes, initializers and value shapes so far, and the names taken."""

    def __init__(self, graph: Graph, values: dict[str, np.ndarray], opset: int) -> None:
        self.graph, self.values, self.opset = graph, values, opset
        self.element = _ELEMENT[graph.dtype]
        self.dtype = np.float64 if graph.dtype is DType.F64 else np.float32
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.shapes: dict[str, tuple] = {}  # every value a node writes
        self.done: set[Node] = set()  # forward nodes already translated with another
        self.taken = {t.name for t in graph.tensors}
        self.node_names: set[str] = set()
        self.constants: dict[tuple, str] = {}
        self.renamed: dict[str, str] = {}  # a value left out (dropout) -> the one it is
        self.output = self._unique(_UNSAFE.sub("_", graph.output) or "output",
                                   exclude={graph.output})
        self.readers: dict[str, list[Node]] = {}
        for node in graph.nodes:
            if node.phase is Phase.FORWARD:
                for name in node.inputs:
                    self.readers.setdefault(name, []).append(node)

    def _unique(self, base: str, exclude: set[str] = frozenset()) -> str:
        name, count = base, 1
        while name in self.taken - exclude:
            count += 1
            name = f"{base}_{count}"
        self.taken.add(name)
        return name

    def name(self, tensor: str) -> str:
        """The ONNX value of cnnc tensor `tensor`; a parameter becomes an initializer."""
        tensor = self.renamed.get(tensor, tensor)
        role = self.graph.tensor(tensor).role
        if role in (Role.PARAM, Role.BUFFER) and tensor not in self.initializers:
            self.initializers[tensor] = numpy_helper.from_array(self.values[tensor], tensor)
        return self.output if tensor == self.graph.output else tensor

    def fresh(self, base: str) -> str:
        return self._unique(base)

    def constant(self, key: str, value: np.ndarray | float) -> str:
        """An initializer holding `value` (a scalar of the graph's dtype for a float), shared
        by every node that needs the same one."""
        array = np.asarray(value, dtype=self.dtype) if isinstance(value, float) else value
        ident = (key, array.dtype.str, array.shape, array.tobytes())
        if ident not in self.constants:
            name = self._unique(key)
            self.initializers[name] = numpy_helper.from_array(array, name)
            self.constants[ident] = name
        return self.constants[ident]

    def emit(self, op_type: str, inputs: list[str], output: str, shape: tuple, layer: str,
             **attributes) -> str:
        """One ONNX node writing `output`, whose shape (batch dimension first) is `shape`."""
        name, count = f"{layer}/{op_type}", 1
        while name in self.node_names:
            count += 1
            name = f"{layer}/{op_type}_{count}"
        self.node_names.add(name)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name,
                                           **attributes))
        self.shapes[output] = tuple(shape)
        return output

    def shape(self, tensor: str) -> tuple:
        return tuple(self.graph.tensor(tensor).shape)

    def only_reader(self, tensor: str) -> Node | None:
        """The one forward node reading `tensor`, when exactly one does and `tensor` is not
        the network's output."""
        readers = self.readers.get(tensor, [])
        if len(readers) != 1 or tensor == self.graph.output:
            return None
        return readers[0]

    def model(self) -> onnx.ModelProto:
        graph = self.graph
        if self.output not in self.shapes:  # the output is another value's (a dropout's)
            self.emit("Identity", [self.name(graph.output)], self.output,
                      self.shape(graph.output), graph.output)
        values = [self._info(name, shape) for name, shape in self.shapes.items()
                  if name != self.output]
        body = helper.make_graph(
            self.nodes, graph.name,
            [self._info(graph.input, self.shape(graph.input))],
            [self._info(self.output, self.shape(graph.output))],
            initializer=list(self.initializers.values()), value_info=values)
        opsets = [helper.make_opsetid("", self.opset)]
        # the oldest IR version the opset allows: older runtimes open the file too
        return helper.make_model(body, opset_imports=opsets, producer_name="cnnc",
                                 producer_version=__version__,
                                 ir_version=helper.find_min_ir_version_for(opsets),
                                 doc_string=f"network {graph.name}, the inference pass")

    def _info(self, name: str, shape: tuple) -> onnx.ValueInfoProto:
        dims = ["N" if d == BATCH else d for d in shape]
        return helper.make_tensor_value_info(name, self.element, dims)


# -- one rule an op --------------------------------------------------------------------------

Rule = Callable[[_Builder, Node], None]


def _value(b: _Builder, node: Node, op_type: str, inputs: list[str], **attributes) -> str:
    """The ONNX node that computes `node`'s first output."""
    return b.emit(op_type, inputs, b.name(node.output), b.shape(node.output), node.layer,
                  **attributes)


def _helper(b: _Builder, node: Node, op_type: str, inputs: list[str], suffix: str,
            **attributes) -> str:
    """An ONNX node computing a step towards `node`'s output, shaped like it."""
    return b.emit(op_type, inputs, b.fresh(f"{node.output}.{suffix}"), b.shape(node.output),
                  node.layer, **attributes)


def _x(b: _Builder, node: Node) -> str:
    return b.name(node.inputs[0])


def _with_bias(b: _Builder, node: Node) -> tuple[Node, list[str]]:
    """A conv or dense node with the bias_add that alone reads its output, if one does:
    (the node whose output the ONNX node writes, [the bias] or [])."""
    reader = b.only_reader(node.output)
    if reader is not None and reader.op == "bias_add" and reader.inputs[0] == node.output:
        b.done.add(reader)
        return reader, [b.name(reader.inputs[1])]
    return node, []


def _window(window) -> dict:
    """A window's attributes; its pads as ONNX orders them, [top, left, bottom, right]."""
    attributes = {"kernel_shape": list(window.kernel), "strides": list(window.stride),
                  "pads": list(window.pad)}
    if window.dilation != (1, 1):
        attributes["dilations"] = list(window.dilation)
    return attributes


def _conv(b: _Builder, node: Node) -> None:
    x, weight = node.inputs
    window = resolve(node.attrs.window, *b.shape(x)[2:])
    last, bias = _with_bias(b, node)
    _value(b, last, "Conv", [b.name(x), b.name(weight), *bias], **_window(window),
           group=node.attrs.groups)


def _flat(b: _Builder, tensor: str, layer: str) -> str:
    """`tensor` as N x features: itself where it is one already, else through Flatten."""
    shape = b.shape(tensor)
    if len(shape) == 2:
        return b.name(tensor)
    return b.emit("Flatten", [b.name(tensor)], b.fresh(f"{tensor}.flat"),
                  (BATCH, math.prod(shape[1:])), layer, axis=1)


def _dense(b: _Builder, node: Node) -> None:
    x, weight = node.inputs
    last, bias = _with_bias(b, node)
    _value(b, last, "Gemm", [_flat(b, x, node.layer), b.name(weight), *bias], transB=1)


def _bias_add(b: _Builder, node: Node) -> None:
    """A bias no conv or dense node took in: added per channel, axis 1."""
    x, bias = node.inputs
    shape, per_channel = b.shape(x), b.name(bias)
    if len(shape) > 2:
        trailing = (shape[1],) + (1,) * (len(shape) - 2)
        per_channel = b.emit("Reshape", [per_channel, b.constant(
            f"{bias}.shape", np.array(trailing, np.int64))], b.fresh(f"{bias}.per_channel"),
            trailing, node.layer)
    _value(b, node, "Add", [b.name(x), per_channel])


def _unary(op_type: str, **fixed) -> Rule:
    def rule(b: _Builder, node: Node) -> None:
        _value(b, node, op_type, [_x(b, node)], **fixed)

    return rule


def _clip_between(b: _Builder, node: Node, low: float, high: float) -> None:
    """Clip with its bounds as inputs (from opset 11)."""
    _value(b, node, "Clip", [_x(b, node), b.constant("clip_min", float(low)),
                             b.constant("clip_max", float(high))])


def _clip(b: _Builder, node: Node) -> None:
    """torch.clamp's bounds; an infinite one is left out (Clip's optional input)."""
    low, high = float(node.attrs.min), float(node.attrs.max)
    bounds = ["" if low == -math.inf else b.constant("clip_min", low),
              "" if high == math.inf else b.constant("clip_max", high)]
    while bounds and bounds[-1] == "":
        bounds.pop()
    _value(b, node, "Clip", [_x(b, node), *bounds])


def _leaky_relu(b: _Builder, node: Node) -> None:
    _value(b, node, "LeakyRelu", [_x(b, node)], alpha=float(getattr(node.attrs, "slope", 0.01)))


def _hard_sigmoid_attrs(node: Node) -> dict:
    """torch's hardsigmoid, relu6(x + 3) / 6, is ONNX's max(0, min(1, αx + β)) with α = 1/6
    and β = 0.5."""
    return {"alpha": float(getattr(node.attrs, "alpha", 1 / 6)),
            "beta": float(getattr(node.attrs, "beta", 0.5))}


def _hardsigmoid(b: _Builder, node: Node) -> None:
    _value(b, node, "HardSigmoid", [_x(b, node)], **_hard_sigmoid_attrs(node))


def _hardswish(b: _Builder, node: Node) -> None:
    """HardSwish from opset 14; before it x · HardSigmoid(x) (α = 1/6, β = 0.5)."""
    x = _x(b, node)
    if b.opset >= 14:
        _value(b, node, "HardSwish", [x])
        return
    gate = _helper(b, node, "HardSigmoid", [x], "gate", alpha=1 / 6, beta=0.5)
    _value(b, node, "Mul", [x, gate])


def _silu(b: _Builder, node: Node) -> None:
    x = _x(b, node)
    _value(b, node, "Mul", [x, _helper(b, node, "Sigmoid", [x], "sigmoid")])


def _gelu(b: _Builder, node: Node) -> None:
    """Gelu from opset 20; before it the exact form in cnnc's order,
    x · 0.5 · (1 + erf(x · √½))."""
    x = _x(b, node)
    if b.opset >= 20:
        _value(b, node, "Gelu", [x])
        return
    scaled = _helper(b, node, "Mul", [x, b.constant("sqrt_half", math.sqrt(0.5))], "scaled")
    erf = _helper(b, node, "Erf", [scaled], "erf")
    shifted = _helper(b, node, "Add", [erf, b.constant("one", 1.0)], "cdf2")
    half = _helper(b, node, "Mul", [x, b.constant("half", 0.5)], "half")
    _value(b, node, "Mul", [half, shifted])


def _over_sample(op_type: str) -> Rule:
    """Softmax (or LogSoftmax) over each sample's values, axis 1 of N x classes: on 2-D
    input the opsets before 13 (which flatten from the axis on) and from 13 (one axis) agree.
    A 2-D sample (N x A x B) is one distribution: flattened, and shaped back (its batch
    dimension copied, Reshape's 0)."""
    def rule(b: _Builder, node: Node) -> None:
        x, shape = node.inputs[0], b.shape(node.output)
        if len(shape) == 2:
            _value(b, node, op_type, [b.name(x)], axis=1)
            return
        rows = _helper(b, node, op_type, [_flat(b, x, node.layer)], "rows", axis=1)
        b.shapes[rows] = (BATCH, math.prod(shape[1:]))
        target = b.constant(f"{node.output}.shape", np.array([0, *shape[1:]], np.int64))
        _value(b, node, "Reshape", [rows, target])

    return rule


def _maxpool(b: _Builder, node: Node) -> None:
    x = node.inputs[0]
    window = resolve(node.attrs.window, *b.shape(x)[2:])
    _value(b, node, "MaxPool", [b.name(x)], **_window(window))


def _avgpool(b: _Builder, node: Node) -> None:
    """count_pad=true counts the padding in each divisor, count_pad=false the input
    positions alone. A ceil-mode last window that hangs past the padding never counts the
    overhang (as PyTorch): there the padding is made values with Pad, and the overhang is
    ONNX's padding that does not count."""
    x, attrs = node.inputs[0], node.attrs
    height, width = b.shape(x)[2:]
    window, asked = resolve(attrs.window, height, width), pads(attrs.window, height, width)
    source, count = b.name(x), int(attrs.count_pad)
    if attrs.count_pad and window.pad != asked:
        top, left, bottom, right = asked
        if any(asked):
            padding = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
            shape = (BATCH, b.shape(x)[1], height + top + bottom, width + left + right)
            source = b.emit("Pad", [source, b.constant(f"{node.layer}.pads", padding)],
                            b.fresh(f"{x}.padded"), shape, node.layer)
        overhang = (0, 0, window.pad[2] - bottom, window.pad[3] - right)
        window = dataclasses.replace(window, pad=overhang)
        count = 0
    _value(b, node, "AveragePool", [source], **_window(window), count_include_pad=count)


def _pad(b: _Builder, node: Node) -> None:
    """Pad in constant mode: its pads input lists the starts of N, C, H, W, then their ends;
    the value is a scalar input of the graph's dtype (left out for 0, Pad's default)."""
    top, left, bottom, right = node.attrs.pads
    sides = b.constant(f"{node.layer}.pads", np.array([0, 0, top, left, 0, 0, bottom, right],
                                                      np.int64))
    value = float(node.attrs.value)
    _value(b, node, "Pad", [_x(b, node), sides, *([b.constant("pad_value", value)] if value
                                                  else [])], mode="constant")


def _sum(b: _Builder, node: Node) -> None:
    inputs = [b.name(x) for x in node.inputs]
    _value(b, node, "Add" if len(inputs) == 2 else "Sum", inputs)


def _binary(op_type: str, **fixed) -> Rule:
    def rule(b: _Builder, node: Node) -> None:
        _value(b, node, op_type, [b.name(x) for x in node.inputs], **fixed)

    return rule


def _upsample(b: _Builder, node: Node) -> None:
    """Resize, nearest, with integer scales: output row oh reads input row floor(oh / F),
    cnnc's rule exactly, with the asymmetric transformation and floor rounding. Before
    opset 13 the region of interest is a required input (unused here). ONNX's shape rule
    scales every dimension, so its inference gives the batch dimension after a Resize a
    symbol of its own; the value's declared shape keeps N."""
    fh, fw = node.attrs.factor
    scales = b.constant(f"{node.layer}.scales", np.array([1, 1, fh, fw], np.float32))
    roi = b.constant("roi", np.zeros(0, np.float32)) if b.opset < 13 else ""
    _value(b, node, "Resize", [_x(b, node), roi, scales], mode="nearest",
           coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def _batchnorm(b: _Builder, node: Node) -> None:
    """Inference form, with the running statistics. ONNX's momentum weighs the running
    value (running · m + batch · (1 − m)), torch's and cnnc's the batch's."""
    x, weight, bias, mean, var = (b.name(t) for t in node.inputs)
    _value(b, node, "BatchNormalization", [x, weight, bias, mean, var],
           epsilon=float(node.attrs.eps), momentum=1.0 - float(node.attrs.momentum))


def _dropout(b: _Builder, node: Node) -> None:
    """The identity at inference: left out, its readers read its input."""
    x = node.inputs[0]
    b.renamed[node.output] = b.renamed.get(x, x)


RULES: dict[str, Rule] = {
    "conv2d": _conv, "dense": _dense, "bias_add": _bias_add,
    "relu": _unary("Relu"), "sigmoid": _unary("Sigmoid"), "tanh": _unary("Tanh"),
    "relu6": lambda b, node: _clip_between(b, node, 0.0, 6.0), "leaky_relu": _leaky_relu,
    "hardsigmoid": _hardsigmoid, "hardswish": _hardswish, "silu": _silu, "gelu": _gelu,
    "clip": _clip, "softmax": _over_sample("Softmax"),
    "log_softmax": _over_sample("LogSoftmax"),
    "maxpool2d": _maxpool, "avgpool2d": _avgpool,
    "global_avgpool2d": _unary("GlobalAveragePool"), "global_maxpool2d": _unary("GlobalMaxPool"),
    "add": _sum, "concat": _binary("Concat", axis=1), "mul": _binary("Mul"),
    "flatten": _unary("Flatten", axis=1), "upsample_nearest": _upsample, "pad2d": _pad,
    "batchnorm": _batchnorm, "dropout": _dropout,
}
