"""`cnnc import MODEL.onnx [-o NET.cnn]`: an ONNX model as a .cnn program and its weights
(NET.weights.npz beside it), both written only once the program checks."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from cnnc.diagnostics import Source

EXIT_OK = 0


def run_import(args: argparse.Namespace) -> int:
    from cnnc.driver.pipeline import front_end
    from cnnc.onnx.importer import import_model, with_loss, write_import

    imported = import_model(args.model)
    if args.loss:
        imported = dataclasses.replace(imported,
                                       text=with_loss(imported.text, args.loss, args.model))
    program = Path(args.output) if args.output else Path(Path(args.model).stem + ".cnn")
    graph = front_end(Source(imported.text, str(program)))  # its errors name the nodes
    weights = write_import(imported, program)
    count = sum(p.size for p in graph.params)
    print(f"wrote {program} (network {graph.name}, {len(graph.layers) - 1} layers, "
          f"{count:,} parameters) and {weights}")
    return EXIT_OK
