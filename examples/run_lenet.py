"""Load a compiled LeNet-5 module and run it on a few inputs.

    cnnc compile examples/lenet.cnn -o lenet.cnnm
    python examples/run_lenet.py lenet.cnnm

A freshly compiled module holds its initial parameters (training comes with `cnnc train`), so
the classes it picks mean nothing yet, and the script says so; the point is the compiled
code, checked here against the numpy reference interpreter.
"""

import sys
from pathlib import Path

import numpy as np

import cnnc
from cnnc.passes import reference
from cnnc.passes.initialise import initial_parameters


def main(path: str) -> None:
    module = cnnc.load(path)
    print(module)
    graph = cnnc.check(Path(__file__).with_name("lenet.cnn"))
    if untrained(module, graph):
        print("note: these weights are the untrained initial ones (from the train line's "
              "seed), so the classes below mean nothing yet; to train them:\n"
              "    cnnc train examples/lenet.cnn --data ../shared/data/mnist")
    x = np.random.default_rng(0).random((4, *module.input_shape), dtype=np.float32)
    probabilities = module(x)
    expected = reference.forward(graph, x, module.params)
    for row, p in enumerate(probabilities):
        print(f"input {row}: class {int(p.argmax())} with p = {p.max():.4f}")
    difference = np.abs(probabilities - expected).max()
    print(f"largest difference from the numpy reference: {difference:.2e}")


def untrained(module: cnnc.Module, graph: cnnc.Graph) -> bool:
    """Whether the module still holds the parameters a compile starts from."""
    start = initial_parameters(graph)
    return all(np.array_equal(value, start[name]) for name, value in module.params.items())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lenet.cnnm")
