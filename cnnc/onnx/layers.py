"""One rule an ONNX op type: how its node becomes a .cnn line (or an activation at the end
of one, or a second name for its input), with the attributes cnnc refuses and why."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from cnnc.onnx.fold import PROBES, Op
from cnnc.onnx.lines import Line, Unsupported, number
from cnnc.onnx.patterns import pad_value, spatial_pads

if TYPE_CHECKING:
    from cnnc.onnx.translate import Translator


def _dims(values: list[int] | tuple[int, ...]) -> str:
    return "x".join(str(v) for v in values)


def _pad_text(pads: tuple[int, int, int, int]) -> str:
    top, left, bottom, right = pads
    if top == bottom and left == right:
        return str(top) if top == left else f"{top}x{left}"
    return _dims(pads)


def _image(t: Translator, op: Op, tensor: str | None = None) -> tuple[int | None, ...]:
    shape = t.shape(tensor or op.inputs[0])
    if len(shape) != 4:
        raise Unsupported(f"{op.op_type} of a rank-{len(shape)} tensor; cnnc takes "
                          "N x C x H x W images here (2-D windows only)")
    return shape


def _window(t: Translator, op: Op, kernel: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) padding, with auto_pad worked out from the input size."""
    auto = op.attr("auto_pad", "NOTSET")
    strides = op.attr("strides", [1, 1])
    dilations = op.attr("dilations", [1, 1])
    if auto in ("NOTSET", "VALID"):
        pads = op.attr("pads", [0, 0, 0, 0]) if auto == "NOTSET" else [0, 0, 0, 0]
        if len(pads) != 4:
            raise Unsupported(f"pads {pads} are not those of a 2-D window")
        return tuple(int(p) for p in pads)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"auto_pad {auto} is not an ONNX padding mode")
    size = _image(t, op)[2:]
    total = [max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
             for n, s, k, d in zip(size, strides, kernel, dilations, strict=True)]
    small = [p // 2 for p in total]
    big = [p - p // 2 for p in total]
    begin, end = (small, big) if auto == "SAME_UPPER" else (big, small)
    return begin[0], begin[1], end[0], end[1]


def _window_options(op: Op, kernel: tuple[int, int], pads: tuple[int, int, int, int],
                    default_stride: tuple[int, int]) -> list[tuple[str, str]]:
    options = []
    strides = tuple(op.attr("strides", [1, 1]))
    if len(strides) != 2:
        raise Unsupported(f"strides {list(strides)} are not those of a 2-D window")
    if strides != default_stride:
        options.append(("stride", _dims(strides) if strides[0] != strides[1]
                        else str(strides[0])))
    if any(pads):
        options.append(("pad", _pad_text(pads)))
    return options


# -- convolution and dense ------------------------------------------------------------------

def conv(t: Translator, op: Op) -> None:
    weight = t.constant(op, 1, "weight")
    bias = t.constant(op, 2, "bias")
    _image(t, op)
    if weight.ndim != 4:
        raise Unsupported(f"a {weight.ndim - 2}-D convolution; cnnc convolves images (2-D)")
    kernel = tuple(int(k) for k in weight.shape[2:])
    options = _window_options(op, kernel, _window(t, op, kernel), (1, 1))
    dilations = tuple(op.attr("dilations", [1, 1]))
    if dilations != (1, 1):
        options.append(("dilation", _dims(dilations)))
    if op.attr("group", 1) != 1:
        options.append(("groups", str(op.attr("group"))))
    if bias is None:
        options.append(("bias", "false"))
    weights = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    t.add_line(op, "conv", [t.source(op.inputs[0])], [str(weight.shape[0]), _dims(kernel)],
               options, weights, op.inputs[1])


def gemm(t: Translator, op: Op) -> None:
    """Gemm(A, B, C) = alpha·A·B' + beta·C as a dense layer: weight alpha·B' (out x in)."""
    weight = t.constant(op, 1, "weight B")
    bias = t.constant(op, 2, "bias C")
    if op.attr("transA", 0):
        raise Unsupported("Gemm with transA=1 transposes the batch; cnnc cannot")
    shape = t.shape(op.inputs[0])
    if weight.ndim != 2 or (len(shape) != 2 and not op.attr("from_matmul")):
        raise Unsupported(f"{'MatMul' if op.attr('from_matmul') else 'Gemm'} of shapes "
                          f"{list(shape)} and {list(weight.shape)}; cnnc's dense layers "
                          "multiply N x features by a matrix")
    if len(shape) != 2:
        raise Unsupported(f"MatMul of a rank-{len(shape)} tensor; cnnc's dense layers take "
                          "N x features")
    matrix = weight if op.attr("transB", 0) else weight.T
    matrix = matrix * op.attr("alpha", 1.0)
    outputs = matrix.shape[0]
    weights = {"weight": matrix}
    options = []
    if bias is not None and (bias.size > 1 or bias.reshape(-1)[0] != 0 or op.attr("beta")):
        weights["bias"] = _row_bias(bias * op.attr("beta", 1.0), outputs)
    else:
        options.append(("bias", "false"))
    name = op.inputs[1] if op.attr("transB", 0) else None
    t.add_line(op, "dense", [t.source(op.inputs[0])], [str(outputs)], options, weights, name)


def _row_bias(bias: np.ndarray, outputs: int) -> np.ndarray:
    if bias.ndim == 2 and bias.shape[0] > 1:
        if not np.all(bias == bias[:1]):
            raise Unsupported(f"a bias of shape {list(bias.shape)} differs from one sample "
                              "to the next; cnnc's dense bias is one row")
        bias = bias[:1]
    try:
        return np.broadcast_to(bias.reshape(-1) if bias.ndim else bias, (outputs,)).copy()
    except ValueError:
        raise Unsupported(f"a bias of shape {list(bias.shape)} does not fit {outputs} "
                          "outputs") from None


def batchnorm(t: Translator, op: Op) -> None:
    scale, shift = t.constant(op, 1, "scale"), t.constant(op, 2, "bias")
    mean, var = t.constant(op, 3, "mean"), t.constant(op, 4, "variance")
    shape = t.shape(op.inputs[0])
    if len(shape) not in (2, 4):
        raise Unsupported(f"BatchNormalization of a rank-{len(shape)} tensor; cnnc "
                          "normalizes N x C x H x W or N x features")
    if any(name and t.readers[name] for name in op.outputs[1:]):
        raise Unsupported("its running-statistics outputs are read; cnnc keeps them as the "
                          "layer's buffers instead")
    options = []
    eps = float(op.attr("epsilon", 1e-5))
    if not math.isclose(eps, 1e-5, rel_tol=1e-6):
        options.append(("eps", number(eps)))
    # ONNX's momentum is what the running statistics keep, torch's (and cnnc's) what they
    # take in; ONNX stores it as a float32, so 6 digits are all it holds (0.9 gives 0.1)
    momentum = float(f"{1.0 - op.attr('momentum', 0.9):.6g}")
    if not math.isclose(momentum, 0.1, rel_tol=1e-6):
        options.append(("momentum", number(momentum)))
    weights = {"weight": scale, "bias": shift, "running_mean": mean, "running_var": var}
    t.add_line(op, "batchnorm", [t.source(op.inputs[0])], [], options, weights, op.inputs[1])


# -- pooling ------------------------------------------------------------------------------

def pool(t: Translator, op: Op) -> None:
    _image(t, op)
    kernel = tuple(int(k) for k in op.attr("kernel_shape", []))
    if len(kernel) != 2:
        raise Unsupported(f"kernel_shape {list(kernel)} is not a 2-D window")
    if tuple(op.attr("dilations", [1, 1])) != (1, 1):
        raise Unsupported(f"{op.op_type} with dilations {op.attr('dilations')} is not "
                          "supported")
    if len(op.outputs) > 1 and op.outputs[1] and t.readers[op.outputs[1]]:
        raise Unsupported("MaxPool's Indices output is not supported")
    pads = _window(t, op, kernel)
    options = _window_options(op, kernel, pads, kernel)  # ONNX's default stride is 1,
    # cnnc's the window: a stride that differs from the window is always written
    if op.attr("ceil_mode", 0):
        options.append(("ceil", "true"))
    kind = "maxpool" if op.op_type == "MaxPool" else "avgpool"
    if kind == "avgpool" and not op.attr("count_include_pad", 0) and \
            (any(pads) or op.attr("ceil_mode", 0)):
        options.append(("count_pad", "false"))
    t.add_line(op, kind, [t.source(op.inputs[0])], [_dims(kernel)], options)


def global_pool(t: Translator, op: Op) -> None:
    _image(t, op)
    kind = "globalavgpool" if op.op_type == "GlobalAveragePool" else "globalmaxpool"
    line = t.add_line(op, kind, [t.source(op.inputs[0])])
    if op.attr("keepdims", 1) == 0:  # a ReduceMean that drops the 1 x 1
        t.lines.append(Line("flatten", t.names.layer(op), [line.name],
                                  nodes=[op.name]))
        t.tensors[op.outputs[0]] = t.lines[-1].name


def upsample(t: Translator, op: Op) -> None:
    shape = _image(t, op)
    if op.attr("mode", "nearest") != "nearest":
        raise Unsupported(f"{op.op_type} with mode {op.attr('mode')} is not supported "
                          "(only nearest)")
    scales = _resize_scales(t, op, shape)
    if scales[:2] != (1, 1) or any(s < 1 or s != int(s) for s in scales[2:]):
        raise Unsupported(f"{op.op_type} by scales {list(scales)} is not supported: cnnc "
                          "upsamples height and width by whole factors")
    transform = op.attr("coordinate_transformation_mode", "half_pixel")
    nearest = op.attr("nearest_mode", "round_prefer_floor")
    if op.op_type == "Resize" and (transform, nearest) not in NEAREST_AS_COPY:
        raise Unsupported(f"Resize with coordinate_transformation_mode {transform} and "
                          f"nearest_mode {nearest} is not supported")
    t.add_line(op, "upsample", [t.source(op.inputs[0])],
               [_dims([int(s) for s in scales[2:]])])


# With a whole scale s these map output position o to input floor(o / s): a plain copy.
NEAREST_AS_COPY = {("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                   ("half_pixel", "round_prefer_ceil"), ("pytorch_half_pixel",
                                                         "round_prefer_floor"),
                   ("pytorch_half_pixel", "round_prefer_ceil"),
                   ("tf_half_pixel_for_nn", "round_prefer_floor"),
                   ("tf_half_pixel_for_nn", "round_prefer_ceil")}


def _resize_scales(t: Translator, op: Op, shape: tuple) -> tuple[float, ...]:
    if op.op_type == "Upsample":
        scales = op.attr("scales") or t.constant(op, 1, "scales")
        return tuple(float(s) for s in np.asarray(scales).reshape(-1))
    scales = t.constant(op, 2, "scales")
    sizes = t.constant(op, 3, "sizes")
    axes = op.attr("axes")
    if scales is not None and scales.size:
        values = [float(s) for s in scales.reshape(-1)]
    elif sizes is not None:  # the batch's size is unknown here: it must stay as it is
        dims = [shape[a] for a in (axes or range(4))]
        values = [1.0 if d is None else float(n) / d
                  for n, d in zip(sizes.reshape(-1), dims, strict=True)]
    else:
        raise Unsupported("Resize needs scales or sizes")
    if axes:
        full = [1.0] * 4
        for axis, value in zip(axes, values, strict=True):
            full[axis % 4] = value
        values = full
    return tuple(values)


def pad(t: Translator, op: Op) -> None:
    amounts = spatial_pads(t.graph, op)
    if op.attr("mode", "constant") != "constant":
        raise Unsupported(f"Pad with mode {op.attr('mode')} is not supported (only constant)")
    if amounts is None:
        raise Unsupported("Pad of other axes than height and width, or by a negative or "
                          "computed amount, is not supported")
    value = pad_value(t.graph, op)
    if value is None or not math.isfinite(value):
        raise Unsupported(f"Pad with the value {value} is not supported here (a -inf pad "
                          "is taken only in front of a MaxPool)")
    _image(t, op)
    options = [] if value == 0 else [("value", number(value))]
    t.add_line(op, "pad", [t.source(op.inputs[0])], [_pad_text(amounts)], options)


# -- shapes ------------------------------------------------------------------------------

def flatten(t: Translator, op: Op) -> None:
    shape = t.shape(op.inputs[0])
    axis = op.attr("axis", 1) % max(len(shape), 1)
    if axis != 1:
        raise Unsupported(f"Flatten with axis {op.attr('axis', 1)} does not keep the batch "
                          "dimension alone in front; cnnc flattens at axis 1")
    _flat(t, op, shape)


def _flat(t: Translator, op: Op, shape: tuple) -> None:
    if len(shape) == 2:
        t.alias(op, op.inputs[0])
    else:
        t.add_line(op, "flatten", [t.source(op.inputs[0])])


def reshape(t: Translator, op: Op) -> None:
    """A Reshape to N x features is a flatten; to the shape it has, nothing."""
    shape = t.shape(op.inputs[0])
    target = _reshape_target(t, op, shape)
    if target == list(shape[1:]):
        t.alias(op, op.inputs[0])
    elif target == [int(np.prod(shape[1:]))]:
        _flat(t, op, shape)
    else:
        raise Unsupported(f"Reshape of {_shown(shape)} to N x {_dims(target)} is not "
                          "supported: cnnc reshapes only to N x features")


def _reshape_target(t: Translator, op: Op, shape: tuple) -> list[int]:
    """The target's sample dimensions, or an error when its first is not the batch."""
    allowzero = op.attr("allowzero", 0)
    pair = t.graph.constants.batch_dependent(op.inputs[1])
    if pair is not None:
        a, b = (v.reshape(-1) for v in pair)
        batch = [i for i in range(len(a)) if (int(a[i]), int(b[i])) == PROBES]
        if batch != [0] or any(a[i] != b[i] for i in range(1, len(a))):
            raise Unsupported("Reshape to a shape that depends on the batch other than as "
                              "its first dimension")
        target = [int(v) for v in a]
    else:
        target = [int(v) for v in t.constant(op, 1, "shape").reshape(-1)]
        first = target[0]
        keeps = (first == 0 and not allowzero) or first == -1 or (
            t.model.fixed_batch is not None and first == t.model.fixed_batch)
        if not keeps:
            raise Unsupported(f"Reshape to {target} changes the batch dimension")
    rest = [shape[i + 1] if v == 0 and not allowzero and i + 1 < len(shape) else v
            for i, v in enumerate(target[1:])]
    if -1 in rest:
        if target[0] == -1 or rest.count(-1) > 1:
            raise Unsupported(f"Reshape to {target} leaves the batch dimension unknown")
        known = int(np.prod([d for d in rest if d != -1]))
        rest[rest.index(-1)] = int(np.prod(shape[1:])) // known if known else 0
    return rest


def squeeze(t: Translator, op: Op) -> None:
    """Squeeze of the 1 x 1 after a global pool (axes 2 and 3): a flatten."""
    shape = t.shape(op.inputs[0])
    axes = op.attr("axes")
    if axes is None and len(op.inputs) > 1 and op.inputs[1]:
        axes = [int(a) for a in t.constant(op, 1, "axes").reshape(-1)]
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    if sorted(a % len(shape) for a in axes) != list(range(2, len(shape))) or \
            any(shape[a % len(shape)] != 1 for a in axes):
        raise Unsupported(f"Squeeze of axes {axes} of {_shown(shape)}: cnnc takes only the "
                          "Squeeze to N x features")
    _flat(t, op, shape)


def _shown(shape: tuple) -> str:
    return "x".join("N" if d is None else str(d) for d in shape)


def cast(t: Translator, op: Op) -> None:
    target = op.attr("to")
    if np.dtype(_onnx_dtype(target)) != t.model.dtype:
        raise Unsupported(f"Cast of the network's values to another type ({target}) is "
                          "not supported")
    t.alias(op, op.inputs[0])


def _onnx_dtype(code: int) -> np.dtype:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(code)


def dropout(t: Translator, op: Op) -> None:
    """A dropout layer: a copy at inference, as ONNX's Dropout outside training, and the
    same rate when the imported network is trained (whatever training_mode the export
    wrote)."""
    if len(op.outputs) > 1 and op.outputs[1] and t.readers[op.outputs[1]]:
        raise Unsupported("Dropout's mask output is read; cnnc draws and keeps its masks "
                          "itself")
    # training_mode true (a training-mode export) is the same layer: cnnc's dropout drops
    # values in training calls, and inference is a copy, as the model is meant to be run
    t.constant(op, 2, "training_mode")
    ratio = t.constant(op, 1, "ratio")
    rate = float(op.attr("ratio", 0.5)) if ratio is None else float(ratio.reshape(()))
    t.add_line(op, "dropout", [t.source(op.inputs[0])], [number(rate)])


# -- merges -------------------------------------------------------------------------------

def merge(t: Translator, op: Op) -> None:
    kind = {"Add": "add", "Mul": "mul", "Concat": "concat", "Sum": "add"}[op.op_type]
    if kind == "concat":
        rank = len(t.shape(op.inputs[0]))
        if op.attr("axis", 1) % rank != 1:
            raise Unsupported(f"Concat along axis {op.attr('axis')}; cnnc concatenates "
                              "channels (axis 1)")
    constants = [name for name in op.inputs if t.graph.constant(name) is not None]
    if constants:
        raise Unsupported(f"{op.op_type} of a layer and a constant ({constants[0]!r}); "
                          f"cnnc's {kind} takes two layers")
    if len(op.inputs) < 2:
        t.alias(op, op.inputs[0])
        return
    t.add_line(op, kind, [t.source(name) for name in op.inputs])


# -- activations --------------------------------------------------------------------------

def _plain(text: str) -> Callable[[Translator, Op], None]:
    def rule(t: Translator, op: Op) -> None:
        t.activate(op, text)
    return rule


def leaky_relu(t: Translator, op: Op) -> None:
    t.activate(op, f"leaky_relu({number(op.attr('alpha', 0.01))})")


def hardsigmoid(t: Translator, op: Op) -> None:
    alpha, beta = op.attr("alpha", 0.2), op.attr("beta", 0.5)
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        t.activate(op, "hardsigmoid")
    else:
        t.activate(op, f"hardsigmoid({number(alpha)}, {number(beta)})")


def gelu(t: Translator, op: Op) -> None:
    if op.attr("approximate", "none") != "none":
        raise Unsupported(f"Gelu with approximate={op.attr('approximate')} is not supported "
                          "(only the exact, erf form)")
    t.activate(op, "gelu")


def clip(t: Translator, op: Op) -> None:
    if len(op.inputs) > 1 or "min" not in op.attrs:
        low, high = t.constant(op, 1, "min"), t.constant(op, 2, "max")
    else:  # opset 6 to 10 kept them as attributes
        low, high = np.array(op.attr("min")), np.array(op.attr("max"))
    low = -math.inf if low is None else float(low.reshape(()))
    high = math.inf if high is None else float(high.reshape(()))
    if (low, high) == (0.0, 6.0):
        t.activate(op, "relu6")
    elif (low, high) == (0.0, math.inf):
        t.activate(op, "relu")
    else:
        t.activate(op, f"clip({number(low)}, {number(high)})")


def softmax(t: Translator, op: Op) -> None:
    shape = t.shape(op.inputs[0])
    axis = op.attr("axis", 1 if t.model.opset < 13 else -1) % len(shape)
    whole = axis == 1 if t.model.opset < 13 else (len(shape) == 2 and axis == 1)
    if not whole or len(shape) != 2:
        raise Unsupported(f"{op.op_type} along axis {op.attr('axis', -1)} of "
                          f"{_shown(shape)}; cnnc takes it over the features of N x "
                          "features")
    t.activate(op, "softmax" if op.op_type == "Softmax" else "log_softmax")


RULES: dict[str, Callable[[Translator, Op], None]] = {
    "Conv": conv, "Gemm": gemm, "BatchNormalization": batchnorm,
    "MaxPool": pool, "AveragePool": pool,
    "GlobalAveragePool": global_pool, "GlobalMaxPool": global_pool,
    "Resize": upsample, "Upsample": upsample, "Pad": pad,
    "Dropout": dropout, "Flatten": flatten, "Reshape": reshape, "Squeeze": squeeze, "Cast": cast,
    "Add": merge, "Mul": merge, "Concat": merge, "Sum": merge,
    "Relu": _plain("relu"), "Sigmoid": _plain("sigmoid"), "Tanh": _plain("tanh"),
    "HardSwish": _plain("hardswish"), "cnnc.silu": _plain("silu"),
    "LeakyRelu": leaky_relu, "HardSigmoid": hardsigmoid, "Gelu": gelu, "Clip": clip,
    "Softmax": softmax, "LogSoftmax": softmax,
}
