"""The manifest of a module file as typed records: what the runtime reads about a module.

`Manifest.from_json` takes the JSON object a module file holds once `artifact.checks` has
passed it, so it converts without checking again; `to_json` gives that object back, key for
key, in the order the compiler writes it. The code hash (`format.code_hash`) and the file
are made from the JSON, never from these records, so the format stays what it was.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cnnc.artifact.format import numpy_dtype_name
from cnnc.backends.cuda.launch import Launch, launch_from_json, launches_to_json

Setting = int | float | bool | str | None  # a train line's option, as JSON has it


# a row's fields as the manifest records them, each with the JSON type it must have
ROW_FIELDS = (("name", str), ("kind", str), ("output_shape", list), ("params", int),
              ("flops", int), ("param_bytes", int), ("activation_bytes", int))


@dataclass(frozen=True, slots=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    flops: int
    param_bytes: int = 0
    activation_bytes: int = 0  # a sample's

    @classmethod
    def from_json(cls, row: Any) -> LayerRow:
        """A row of the manifest's `layers`; ValueError for anything else (the field checks
        leave rows to the comparison with the program, which a module made in memory
        skips)."""
        if not isinstance(row, dict) or set(row) != {key for key, _ in ROW_FIELDS} or any(
                type(row[key]) is not kind for key, kind in ROW_FIELDS) or any(
                type(d) is not int for d in row["output_shape"]):
            raise ValueError("a layer row (name, kind, output_shape, params, flops, "
                             "param_bytes, activation_bytes)")
        return cls(**dict(row, output_shape=tuple(row["output_shape"])))

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), output_shape=list(self.output_shape))


@dataclass(frozen=True, slots=True)
class Port:
    """The network's input or output: its buffer and one sample's shape."""

    name: str
    shape: tuple[int, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Port:
        return cls(data["name"], tuple(data["shape"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class Buffer:
    """An entry of the buffer table: what the kernels' pointer table holds at its index."""

    name: str
    role: str  # graph.ir.Role's value: input, target, param, value, loss, state, ...
    dtype: str  # f32, f64, i32 or i64
    shape: tuple[int | str, ...]  # "N": the batch size

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Buffer:
        return cls(data["name"], data["role"], data["dtype"], tuple(data["shape"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "dtype": self.dtype,
                "shape": list(self.shape)}

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(numpy_dtype_name(self.dtype))

    def sized(self, batch: int) -> tuple[int, ...]:
        """The shape for a batch of `batch` (a scalar's is ())."""
        return tuple(batch if d == "N" else int(d) for d in self.shape)


@dataclass(frozen=True, slots=True)
class EntryPoint:
    """What one role (forward, loss, ...) runs: a native function on the CPU, or kernel
    launches in order on cuda."""

    role: str
    symbol: str | None = None
    launches: tuple[Launch, ...] = ()

    def to_json(self) -> str | list[dict[str, Any]]:
        if self.symbol is not None:
            return self.symbol
        return launches_to_json({self.role: self.launches})[self.role]


def _entry_point(role: str, value: str | list[dict[str, Any]]) -> EntryPoint:
    if isinstance(value, str):
        return EntryPoint(role, symbol=value)
    return EntryPoint(role, launches=tuple(launch_from_json(item) for item in value))


@dataclass(frozen=True, slots=True)
class Machine:
    """The cost model's inputs (schedule.cost.Machine) the buffer table was planned for."""

    vector_bits: int
    registers: int
    l1_bytes: int
    l2_bytes: int
    winograd: bool = True

    def to_json(self) -> dict[str, int | bool]:
        data: dict[str, int | bool] = {"vector_bits": self.vector_bits,
                                       "registers": self.registers,
                                       "l1_bytes": self.l1_bytes, "l2_bytes": self.l2_bytes}
        if not self.winograd:  # only then: the default build's record keeps its form
            data["winograd"] = False
        return data


@dataclass(frozen=True, slots=True)
class Build:
    """How the module was built beyond its program: on the CPU also whether it was
    scheduled and for which machine model (cuda records neither)."""

    program: str
    scheduled: bool | None = None
    machine: Machine | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Build:
        machine = data.get("machine")
        return cls(data["program"], data.get("scheduled"),
                   None if machine is None else Machine(**machine))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"program": self.program}
        if self.scheduled is not None:
            data["scheduled"] = self.scheduled
        if self.machine is not None:
            data["machine"] = self.machine.to_json()
        return data


@dataclass(frozen=True, slots=True)
class Loss:
    kind: str  # the loss op: cross_entropy, softmax_cross_entropy or mse
    target: str  # the buffer of labels or targets
    value: str  # the buffer of the mean loss

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "target": self.target, "value": self.value}


@dataclass(frozen=True, slots=True)
class Optimizer:
    """The train line's optimizer and its settings, in the order the line's table has
    them."""

    kind: str  # sgd, adam or adamw
    settings: tuple[tuple[str, Setting], ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Optimizer:
        return cls(data["kind"], tuple((k, v) for k, v in data.items() if k != "kind"))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **dict(self.settings)}

    def get(self, key: str, default: Setting = None) -> Setting:
        return dict(self.settings).get(key, default)


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # cpu or cuda
    triple: str
    cpu: str
    features: tuple[str, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Target:
        return cls(data["kind"], data["triple"], data["cpu"], tuple(data["features"]))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "triple": self.triple, "cpu": self.cpu,
                "features": list(self.features)}


@dataclass(frozen=True, slots=True)
class Section:
    """Where a section's bytes are in the file (after the manifest) and their SHA-256."""

    name: str
    offset: int
    length: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "length": self.length, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Manifest:
    """Every field of a module file's manifest; the training fields (loss, gradients,
    optimizer) are there for a network with a loss line, and `sections` for a manifest read
    from a file (a module made in memory has no section table yet)."""

    cnnc_version: str
    network: str
    dtype: str  # f32 or f64: the input's, output's and parameters'
    input: Port
    output: Port
    storage: tuple[Buffer, ...]  # in the order of the kernels' pointer table
    entry_points: tuple[EntryPoint, ...]
    kernels: tuple[str, ...]
    activations: tuple[str, ...]  # the buffers the forward kernels write
    opt_level: int
    build: Build
    layers: tuple[LayerRow, ...]
    loss: Loss | None
    gradients: tuple[tuple[str, str], ...]  # a parameter's (or the input's) gradient buffer
    optimizer: Optimizer | None
    target: Target
    code_sha256: str
    sections: tuple[Section, ...] | None = None
    # by entry point's role: regions of its buffers that may share memory (driver.memory)
    shared: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """The records of a manifest that passed `artifact.checks.check_fields`. A layer row
        those checks leave to the comparison with the program is a ValueError here."""
        rows = []
        for index, row in enumerate(data["layers"]):
            try:
                rows.append(LayerRow.from_json(row))
            except ValueError as error:
                raise ValueError(f"layers[{index}] must be {error}") from None
        loss, optimizer, table = data.get("loss"), data.get("optimizer"), data.get("sections")
        return cls(
            data["cnnc_version"], data["network"], data["dtype"],
            Port.from_json(data["input"]), Port.from_json(data["output"]),
            tuple(Buffer.from_json(entry) for entry in data["storage"]),
            tuple(_entry_point(role, value) for role, value in data["entry_points"].items()),
            tuple(data["kernels"]), tuple(data["activations"]), data["opt_level"],
            Build.from_json(data["build"]), tuple(rows),
            None if loss is None else Loss(loss["kind"], loss["target"], loss["value"]),
            tuple(data.get("gradients", {}).items()),
            None if optimizer is None else Optimizer.from_json(optimizer),
            Target.from_json(data["target"]), data["code_sha256"],
            None if table is None else tuple(Section(name, **where)
                                             for name, where in table.items()),
            tuple((role, tuple(tuple(region) for region in found))
                  for role, found in data.get("shared", {}).items()))

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON object, as the compiler writes it."""
        data: dict[str, Any] = {
            "cnnc_version": self.cnnc_version,
            "network": self.network,
            "dtype": self.dtype,
            "input": self.input.to_json(),
            "output": self.output.to_json(),
            "storage": [entry.to_json() for entry in self.storage],
            "entry_points": {entry.role: entry.to_json() for entry in self.entry_points},
            **({"shared": {role: [list(region) for region in found]
                           for role, found in self.shared}} if self.shared else {}),
            "kernels": list(self.kernels),
            "activations": list(self.activations),
            "opt_level": self.opt_level,
            "build": self.build.to_json(),
            "layers": [row.to_json() for row in self.layers],
        }
        if self.loss is not None:
            data["loss"] = self.loss.to_json()
            data["gradients"] = dict(self.gradients)
        if self.optimizer is not None:
            data["optimizer"] = self.optimizer.to_json()
        data["target"] = self.target.to_json()
        data["code_sha256"] = self.code_sha256
        if self.sections is not None:
            data["sections"] = {s.name: s.to_json() for s in self.sections}
        return data

    # -- what the runtime asks ------------------------------------------------------------
    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(numpy_dtype_name(self.dtype))

    @property
    def roles(self) -> tuple[str, ...]:
        """The entry points' roles: forward, and with a loss line loss, gradients, ..."""
        return tuple(entry.role for entry in self.entry_points)

    def entry(self, role: str) -> EntryPoint:
        return next(entry for entry in self.entry_points if entry.role == role)

    def buffer(self, name: str) -> Buffer:
        return next(entry for entry in self.storage if entry.name == name)

    def buffers(self, role: str) -> tuple[Buffer, ...]:
        return tuple(entry for entry in self.storage if entry.role == role)

    @property
    def output_index(self) -> int:
        """The output's index in the buffer table."""
        return [entry.name for entry in self.storage].index(self.output.name)

    def gradient(self, name: str) -> str:
        """The buffer of the gradient of parameter (or input) `name`."""
        return dict(self.gradients)[name]
