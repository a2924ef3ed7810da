"""PyTorch → ONNX → cnnc → train → ONNX → ONNX Runtime, with LeNet-5 on MNIST.

    python examples/onnx_lenet.py export lenet5.onnx
    cnnc import lenet5.onnx -o lenet5.cnn --loss cross_entropy
    cnnc train lenet5.cnn --weights lenet5.weights.npz --data ../shared/data/mnist \\
        --epochs 3 --lr 0.05 --out trained.weights.npz
    cnnc export lenet5.cnn --weights trained.weights.npz -o trained.onnx
    python examples/onnx_lenet.py check trained.onnx --data ../shared/data/mnist

`export` writes an untrained torch LeNet-5 (the ReLU variant of examples/lenet.cnn, torch's
own initialisation, seeded) as ONNX, the batch dimension symbolic. `check` runs an ONNX
file in ONNX Runtime on the samples `cnnc train` held out (the same seeded split) and
prints its accuracy, and the largest difference from cnnc's own outputs for those weights.
Needs torch (for export), onnx and onnxruntime.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def lenet5():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def export(path: str) -> None:
    import warnings

    import torch

    # the TorchScript exporter: it needs no onnxscript (torch says it is the older one)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.manual_seed(0)
    model = lenet5().eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), path, dynamo=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
    print(f"wrote {path}: an untrained PyTorch LeNet-5")


def check(path: str, data: str, seed: int) -> None:
    import onnxruntime

    import cnnc
    from cnnc.training.data import load

    _, held_out = load(data, 0.2, seed)
    x, y = held_out.x.astype(np.float32), held_out.y
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    accuracy = float(np.mean(logits.argmax(axis=1) == y))
    mine = cnnc.compile(path).forward(x)
    print(f"{path} in ONNX Runtime: {accuracy:.2%} of the {len(y):,} held-out digits; "
          f"largest difference from cnnc's outputs {np.abs(mine - logits).max():.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exporting = commands.add_parser("export", help="write an untrained torch LeNet-5")
    exporting.add_argument("path")
    checking = commands.add_parser("check", help="accuracy of an ONNX file in ONNX Runtime")
    checking.add_argument("path")
    checking.add_argument("--data", required=True, help="an MNIST folder or an .npz")
    checking.add_argument("--seed", type=int, default=0, help="the seed train used")
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.path)
    else:
        check(args.path, args.data, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
