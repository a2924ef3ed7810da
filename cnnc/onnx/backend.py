"""cnnc as an `onnx.backend.base.Backend`, so that ONNX's own backend tests run against it.

A cnnc network has one input; its weights are constants. A backend test feeds every graph
input at run time (a Conv test feeds the image and the filter), so `run` takes the first
input as the network's input and compiles the model with the others as its constants,
once for each distinct set of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import ModelProto, numpy_helper
from onnx.backend.base import Backend, BackendRep

from cnnc.diagnostics import Source


class CnncRep(BackendRep):
    """A prepared model: compiled on first run, for the constants that run gives."""

    def __init__(self, model: ModelProto) -> None:
        self.model = model
        self.modules: dict[bytes, Any] = {}

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        arrays = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
        if not isinstance(inputs, (list, tuple, dict)):
            arrays = [inputs]
        x, constants = np.asarray(arrays[0]), [np.asarray(a) for a in arrays[1:]]
        key = b"".join(c.tobytes() + str(c.shape).encode() for c in constants)
        if key not in self.modules:
            self.modules[key] = compile_with_constants(self.model, constants)
        return (self.modules[key].forward(x),)


def compile_with_constants(model: ModelProto, constants: list[np.ndarray]) -> Any:
    """The model compiled with its graph inputs after the first as initializers."""
    import cnnc
    from cnnc.onnx.importer import import_model

    proto = ModelProto()
    proto.CopyFrom(model)
    initialized = {t.name for t in proto.graph.initializer}
    fed = [i for i in proto.graph.input if i.name not in initialized]
    for value, array in zip(fed[1:], constants, strict=False):
        proto.graph.initializer.append(numpy_helper.from_array(array, value.name))
    imported = import_model(proto.graph.name or "model", proto)
    module = cnnc.compile(Source(imported.text, f"{proto.graph.name} (as imported)"))
    module.set_params(imported.weights)
    return module


class CnncBackend(Backend):
    """ONNX models on cnnc's CPU target."""

    @classmethod
    def prepare(cls, model: ModelProto, device: str = "CPU", **kwargs: Any) -> CnncRep:
        super().prepare(model, device, **kwargs)
        return CnncRep(model)

    @classmethod
    def run_model(cls, model: ModelProto, inputs: Any, device: str = "CPU",
                  **kwargs: Any) -> tuple[np.ndarray, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"
