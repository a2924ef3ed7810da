"""`cnnc export NET.cnn|NET.cnnm [--weights W.npz] -o model.onnx [--opset N]`: the network's
inference pass as an ONNX model (cnnc/onnx/export.py), written atomically."""

from __future__ import annotations

import argparse

from cnnc.diagnostics import CnncInputError

EXIT_OK = 0  # as in main.py (api.md)
NEEDS_ONNX = "cnnc export needs the onnx package: pip install 'cnnc[onnx]'"


def run_export(args: argparse.Namespace) -> int:
    try:
        import onnx  # noqa: F401  (whether it is installed; cnnc.onnx.export uses it)
    except ImportError:
        raise CnncInputError.single(NEEDS_ONNX) from None
    from cnnc.onnx.export import check_opset, network_values, to_onnx, write_model

    check_opset(args.opset)  # before any work
    graph, values = network_values(args.network, args.weights)
    model = to_onnx(graph, values, args.opset)
    write_model(model, args.output)
    parameters = sum(p.size for p in graph.params)
    print(f"wrote {args.output}: network {graph.name}, opset {args.opset}, "
          f"{len(model.graph.node)} nodes, {parameters:,} parameters")
    return EXIT_OK
