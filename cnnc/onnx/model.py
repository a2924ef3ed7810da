"""An ONNX file read, checked and made ready to translate: its model-local functions inlined,
its batch dimension made symbolic, every tensor's static shape inferred.

What cnnc can take is checked here, before any translation: one float input whose sample
dimensions are fixed, one output, an opset of the default domain from 11 to 21.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnc.diagnostics import CnncInputError

# The default domain's opsets cnnc imports: 11 to 21 as exporters write them, and the newer
# ones (22 to 25 added element types such as bfloat16 to the ops cnnc takes, not meanings);
# the conformance tests (tests/onnx/test_conformance.py) run at each op's newest.
OPSETS = range(11, 26)
MAX_MODEL_BYTES = 2**31  # protobuf's own limit for one message
BATCH = "N"  # the name the batch dimension gets


def need_onnx(what: str) -> Any:
    """The onnx package, or an error saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise CnncInputError.single(f"{what} needs the onnx package: pip install 'cnnc[onnx]'"
                                    ) from None
    return onnx


@dataclass(frozen=True)
class OnnxModel:
    """A checked model. `shapes` maps every tensor with a known static shape to it, the
    batch dimension (of the input and whatever follows it) as None; `fixed_batch` is the
    batch size the file fixed, if it fixed one."""

    proto: Any  # onnx.ModelProto, functions inlined, batch symbolic
    path: str
    opset: int
    input: str
    output: str
    dtype: np.dtype
    shapes: dict[str, tuple[int | None, ...]]
    fixed_batch: int | None


def read_model(path: str | Path) -> OnnxModel:
    """The model in the file `path`, or a CnncInputError saying why cnnc cannot take it."""
    onnx = need_onnx("importing an ONNX model")
    return checked_model(_parse(onnx, Path(path), str(path)), str(path))


def checked_model(model: Any, name: str) -> OnnxModel:
    """A ModelProto (changed in place: functions inlined, batch made symbolic) checked as
    `read_model` checks a file's; `name` is what errors call it."""
    onnx = need_onnx("importing an ONNX model")
    opset = _opset(model, name)
    if model.functions:
        from onnx.inliner import inline_local_functions

        model = inline_local_functions(model)
    initialized = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialized]
    if len(inputs) != 1:
        raise CnncInputError.single(f"{name}: cnnc networks take one input; this model takes "
                                    f"{len(inputs)} ({', '.join(i.name for i in inputs)})")
    if len(model.graph.output) != 1:
        raise CnncInputError.single(
            f"{name}: cnnc networks make one output; this model makes "
            f"{len(model.graph.output)} ({', '.join(o.name for o in model.graph.output)})")
    dtype, fixed = _check_input(onnx, inputs[0], name)
    for value in model.graph.output:  # an exporter's stale output shape would clash
        value.type.tensor_type.ClearField("shape")
    shapes = infer_shapes(model, name)
    return OnnxModel(model, name, opset, inputs[0].name, model.graph.output[0].name, dtype,
                     shapes, fixed)


def _parse(onnx: Any, path: Path, name: str) -> Any:
    try:
        if not path.is_file():
            raise CnncInputError.single(f"cannot read {name}: "
                                        + ("no such file" if not path.exists()
                                           else "it is not a regular file"))
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise CnncInputError.single(f"cannot read {name}: it is larger than 2 GiB; models "
                                        "that large are not supported")
        if path.stat().st_size == 0:
            raise CnncInputError.single(f"cannot read {name}: the file is empty")
        model = onnx.load_model(str(path))  # with external data from the file's folder
    except OSError as error:
        raise CnncInputError.single(f"cannot read {name}: {error.strerror or error}") from None
    except CnncInputError:
        raise
    except Exception as error:  # protobuf's DecodeError and friends: not an ONNX file
        raise CnncInputError.single(f"{name} is not an ONNX model ({type(error).__name__}: "
                                    f"{str(error)[:200]})") from None
    if not model.graph.node and not model.graph.output:
        raise CnncInputError.single(f"{name} is not an ONNX model (it holds no graph)")
    return model


def _opset(model: Any, name: str) -> int:
    versions = {o.domain: o.version for o in model.opset_import}
    opset = versions.get("", versions.get("ai.onnx"))
    if opset is None:
        raise CnncInputError.single(f"{name} imports no opset of the default ONNX domain")
    if opset not in OPSETS:
        raise CnncInputError.single(f"{name} uses opset {opset}; cnnc imports opsets "
                                    f"{OPSETS.start} to {OPSETS.stop - 1} (convert it with "
                                    "onnx.version_converter first)")
    return opset


def _check_input(onnx: Any, value: Any, name: str) -> tuple[np.dtype, int | None]:
    """The input's dtype, and the batch size if the file fixes one; its dimension 0 is made
    symbolic (a fixed batch is taken as any batch, as in every cnnc module)."""
    kind = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not kind.HasField("shape"):
        raise CnncInputError.single(f"{name}: the input {value.name!r} has no tensor shape")
    dtypes = {onnx.TensorProto.FLOAT: np.dtype(np.float32),
              onnx.TensorProto.DOUBLE: np.dtype(np.float64)}
    if kind.elem_type not in dtypes:
        element = onnx.TensorProto.DataType.Name(kind.elem_type).lower()
        raise CnncInputError.single(f"{name}: the input {value.name!r} holds {element}; cnnc "
                                    "networks take float or double")
    dims = list(kind.shape.dim)
    if not 2 <= len(dims) <= 4:
        raise CnncInputError.single(
            f"{name}: the input {value.name!r} has rank {len(dims)}; cnnc takes a batch of "
            "features (N x F), of 2-D samples or of images (N x C x H x W)")
    for axis, dim in enumerate(dims[1:], start=1):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            raise CnncInputError.single(
                f"{name}: dimension {axis} of the input {value.name!r} is not fixed "
                f"({dim.dim_param or '?'}); only the batch dimension may be symbolic")
    fixed = dims[0].dim_value if dims[0].HasField("dim_value") else None
    dims[0].Clear()
    dims[0].dim_param = BATCH
    return dtypes[kind.elem_type], fixed


def infer_shapes(model: Any, name: str) -> dict[str, tuple[int | None, ...]]:
    """Every tensor's shape that ONNX shape inference works out, the batch as None."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as error:  # onnx's InferenceError: the model is inconsistent
        raise CnncInputError.single(f"{name}: ONNX shape inference failed: "
                                    f"{str(error)[:400]}") from None
    shapes: dict[str, tuple[int | None, ...]] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        kind = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not kind.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim]
        shapes[value.name] = tuple(dims)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes
