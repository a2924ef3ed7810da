"""`cnnc import`: an ONNX model as a readable .cnn program and its weights.

    read (model.py) → fold constants (fold.py) → rewrite patterns (patterns.py)
    → translate node by node (translate.py, layers.py) → print the program

The program keeps one line a layer, named after the ONNX graph (naming.py), with `from=`
only where the graph branches and a comment naming the ONNX node(s) each line stands for,
so that an error in the imported program names the node too. The weights use the
program's parameter names, ready for `load_weights` / `--weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnc.diagnostics import CnncInputError, Source
from cnnc.onnx.fold import fold
from cnnc.onnx.lines import Line, Problem
from cnnc.onnx.model import OnnxModel, checked_model, read_model
from cnnc.onnx.naming import Names
from cnnc.onnx.patterns import Graph, rewrite
from cnnc.onnx.translate import Translator


@dataclass(frozen=True)
class Imported:
    """A translated model: the program's text and its weights by parameter name."""

    name: str  # the network's name
    text: str
    weights: dict[str, np.ndarray]


def import_model(path: str | Path, proto: object = None) -> Imported:
    """The program and weights of the ONNX model at `path` (or of the ModelProto `proto`,
    which `path` then only names); a CnncInputError listing every node cnnc cannot
    translate (op type, node name and why) otherwise."""
    model = read_model(path) if proto is None else checked_model(proto, str(path))
    ops, constants, model = fold(model)
    graph = rewrite(Graph([op for op, _ in ops], constants, model.output))
    names = Names()
    input_name = names.input(model.input)
    translator = Translator(model, graph, names, input_name)
    translator.run()
    if translator.problems:
        raise CnncInputError.single(_problems_text(model, translator.problems))
    if graph.output == model.input:  # Identity or Dropout only: a layer that copies
        translator.lines.append(Line("dropout", names.layer(ops[0][0]), [input_name], ["0"],
                                     nodes=[op.name for op, _ in ops]))
        translator.tensors[graph.output] = translator.lines[-1].name
    lines = _needed(translator.lines, translator.tensors[graph.output])
    network = names.network(Path(path).stem)
    text = _program(model, network, input_name, lines)
    used = {f"{line.name}." for line in lines}
    weights = {k: v for k, v in translator.weights.items()
               if any(k.startswith(prefix) for prefix in used)}
    return Imported(network, text, weights)


def _problems_text(model: OnnxModel, problems: list[Problem]) -> str:
    count = len(problems)
    head = (f"{model.path}: {count} node{'s' if count > 1 else ''} cannot be imported "
            "(nothing was written):")
    return "\n".join([head, *(f"  {p.op_type} {p.node!r}: {p.reason}" for p in problems)])


def _needed(lines: list[Line], output: str) -> list[Line]:
    """The lines the output depends on, in the graph's (topological) order: the output's
    line is then the last, as a cnnc network's output is its last layer."""
    by_name = {line.name: line for line in lines}
    needed, stack = set(), [output]
    while stack:
        name = stack.pop()
        if name in by_name and name not in needed:
            needed.add(name)
            stack.extend(by_name[name].inputs)
    return [line for line in lines if line.name in needed]


def _program(model: OnnxModel, network: str, input_name: str, lines: list[Line]) -> str:
    producer = model.proto.producer_name or "an unknown producer"
    version = f" {model.proto.producer_version}" if model.proto.producer_version else ""
    sample = "x".join(str(d) for d in model.shapes[model.input][1:])
    dtype = "" if model.dtype == np.float32 else " dtype=f64"
    text = [f"# imported from {Path(model.path).name} ({producer}{version}, opset "
            f"{model.opset}) by cnnc import",
            f"network {network}", "", f"input {input_name}: {sample}{dtype}", ""]
    before = input_name
    for line in lines:
        text.append(_statement(line, before))
        before = line.name
    return "\n".join(_aligned(text)) + "\n"


def _statement(line: Line, before: str) -> str:
    if line.kind in ("add", "mul", "concat"):
        words = [line.kind, f"{line.name}:", ", ".join(line.inputs)]
    else:
        words = [line.kind, f"{line.name}:", *line.args]
        if line.inputs[0] != before:
            words.append(f"from={line.inputs[0]}")
    words += [f"{key}={value}" for key, value in line.options]
    if line.activation is not None:
        words += ["->", line.activation]
    return " ".join(words) + "\t# " + ", ".join(line.nodes)


def _aligned(text: list[str]) -> list[str]:
    """Each layer line's comment (after a tab) starts in one column."""
    width = max((len(t.split("\t")[0]) for t in text if "\t" in t), default=0)
    width = min(width, 72)
    return [f"{t.split(chr(9))[0]:<{width}}  {t.split(chr(9))[1]}" if "\t" in t else t
            for t in text]


def write_import(imported: Imported, program: Path, weights: Path | None = None) -> Path:
    """The program at `program` and its weights beside it (NET.weights.npz), each written
    whole or not at all. Returns the weights' path."""
    from cnnc.artifact.format import params_to_bytes, write_atomically

    weights = weights or program.with_name(program.stem + ".weights.npz")
    write_atomically(weights, params_to_bytes(imported.weights))
    write_atomically(program, imported.text.encode("utf-8"))
    return weights


def imported_source(path: str | Path, loss: str | None = None
                    ) -> tuple[Source, dict[str, np.ndarray]]:
    """The program of the ONNX model at `path` as a Source (named after the file, so that
    errors say which model), with a `loss NAME` line added if `loss` is given, and its
    weights."""
    imported = import_model(path)
    text = imported.text if loss is None else with_loss(imported.text, loss, str(path))
    return Source(text, f"{path} (as imported)"), imported.weights


def with_loss(text: str, loss: str, name: str) -> str:
    """The program with the line `loss LOSS` added at its end; an error if it has one."""
    import re

    if re.search(r"^\s*loss\b", text, re.MULTILINE):
        raise CnncInputError.single(f"{name} already has a loss line; --loss adds one to a "
                                    "program without")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\s+[A-Za-z_][A-Za-z0-9_]*=\S+)*", loss):
        raise CnncInputError.single(f"--loss takes a loss name and its options, like "
                                    f"cross_entropy or 'mse', not {loss!r}")
    return text.rstrip("\n") + f"\n\nloss {loss}\n"
