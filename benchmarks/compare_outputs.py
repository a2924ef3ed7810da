"""Whether two checkouts of cnnc compute the same numbers, bit for bit, on every example.

    python benchmarks/compare_outputs.py OLD_CHECKOUT NEW_CHECKOUT

For lenet, mlp and vgg_small, scheduled at -O3 and plain at -O0, each checkout (in a fresh
process of its own) compiles the example, runs forward, loss and every gradient on a fixed
batch, takes two training steps and saves every array; the two sets are then compared with
`np.array_equal`. A refactor that moves code between LLVM modules changes the object code
(and the module code hash) but must not change one of these bits.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROBE = """
import sys
import numpy as np
sys.path.insert(0, {checkout!r})
import cnnc
assert cnnc.__file__.startswith({checkout!r}), cnnc.__file__
results = {{}}
for name in ("lenet", "mlp", "vgg_small"):
    for scheduled in (True, False):
        module = cnnc.compile({checkout!r} + f"/examples/{{name}}.cnn", schedule=scheduled,
                              opt_level=3 if scheduled else 0)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((5, *module.input_shape)).astype(np.float32)
        y = rng.integers(0, module.output_shape[0], 5)
        key = f"{{name}}-{{'scheduled' if scheduled else 'plain'}}"
        results[key + "-forward"] = module.forward(x)
        gradients, loss = module.gradients_and_loss(x, y)
        results[key + "-loss"] = np.asarray(loss)
        results.update({{f"{{key}}-grad-{{k}}": v for k, v in gradients.items()}})
        module.train_step(x, y)
        module.train_step(x, y)
        results.update({{f"{{key}}-stepped-{{k}}": v for k, v in module.params.items()}})
np.savez({out!r}, **results)
"""


def arrays(checkout: Path, out: Path) -> dict[str, np.ndarray]:
    code = PROBE.format(checkout=str(checkout.resolve()), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=checkout)
    with np.load(out) as data:
        return {key: data[key] for key in data.files}


def main() -> int:
    old_checkout, new_checkout = (Path(arg) for arg in sys.argv[1:3])
    with tempfile.TemporaryDirectory() as folder:
        old = arrays(old_checkout, Path(folder) / "old.npz")
        new = arrays(new_checkout, Path(folder) / "new.npz")
    if old.keys() != new.keys():
        print("the checkouts name different arrays:", sorted(old.keys() ^ new.keys()))
        return 1
    differing = [key for key in old if not np.array_equal(old[key], new[key])]
    print(f"{len(old)} arrays, {len(differing)} differ" + (f": {differing}" if differing else ""))
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
