"""What translating an ONNX graph makes and says: the .cnn lines being built, the problems
found, and how a number is written. A leaf, so that the op rules (layers.py) and the walk
(translate.py) both read it without importing each other."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class Unsupported(Exception):
    """A node cnnc cannot translate; the message says why."""


class BrokenInput(Unsupported):
    """A node that reads what an untranslated node made: that node's error says it all."""




@dataclass
class Line:
    """One statement being built (mutable while the graph is read, then only printed)."""

    kind: str
    name: str
    inputs: list[str]
    args: list[str] = field(default_factory=list)
    options: list[tuple[str, str]] = field(default_factory=list)
    activation: str | None = None
    nodes: list[str] = field(default_factory=list)  # the ONNX nodes it stands for


@dataclass
class Problem:
    op_type: str
    node: str
    reason: str


def number(value: float) -> str:
    """A number as the .cnn language writes it: the shortest text that gives the same
    float32 when the value is one (ONNX keeps float attributes so), else the float's."""
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    single = np.float32(value)
    return str(single) if float(single) == value else repr(value)

