"""Load a compiled LeNet-5 module and run it on a few inputs.

    cnnc compile examples/lenet.cnn -o lenet.cnnm
    python examples/run_lenet.py lenet.cnnm

The parameters are the module's initial ones (training comes with `cnnc train`), so the
classes it picks mean nothing yet; the point is the compiled code, checked here against the
numpy reference interpreter.
"""

import sys
from pathlib import Path

import numpy as np

import cnnc
from cnnc import reference


def main(path: str) -> None:
    module = cnnc.load(path)
    print(module)
    x = np.random.default_rng(0).random((4, *module.input_shape), dtype=np.float32)
    probabilities = module(x)
    graph = cnnc.check(Path(__file__).with_name("lenet.cnn"))
    expected = reference.forward(graph, x, module.params)
    for row, p in enumerate(probabilities):
        print(f"input {row}: class {int(p.argmax())} with p = {p.max():.4f}")
    difference = np.abs(probabilities - expected).max()
    print(f"largest difference from the numpy reference: {difference:.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lenet.cnnm")
