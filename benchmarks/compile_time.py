"""Compile time of a network in two checkouts of cnnc, side by side in one run.

    python benchmarks/compile_time.py BEFORE_CHECKOUT AFTER_CHECKOUT [--repeat 7]
        [--program examples/lenet.cnn]

Each measurement is a fresh Python process (so the parser and the op registry are built
each time, as for a user's first compile) that imports cnnc from the checkout and times
`cnnc.compile` of the program (forward and backward, -O3, scheduled). The runs of the two
checkouts alternate, so both see the same machine load; the table shows medians and their
ratio (above 1: the second checkout is faster).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = """
import sys, time
sys.path.insert(0, {checkout!r})
started = time.perf_counter()
import cnnc
imported = time.perf_counter()
cnnc.compile({program!r})
done = time.perf_counter()
assert cnnc.__file__.startswith({checkout!r}), cnnc.__file__
print(imported - started, done - imported)
"""


def measure(checkout: Path, program: Path) -> tuple[float, float]:
    code = PROBE.format(checkout=str(checkout), program=str(program))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=checkout)
    first, second = result.stdout.split()
    return float(first), float(second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--program", type=Path, default=Path("examples/lenet.cnn"))
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for _ in range(args.repeat):
        for key in ("before", "after"):
            checkout = getattr(args, key).resolve()
            times[key].append(measure(checkout, checkout / args.program))
    print(f"{args.program}, medians of {args.repeat} fresh processes each")
    print(f"{'':<8} {'import s':>9} {'compile s':>10}")
    medians = {}
    for key, runs in times.items():
        medians[key] = (statistics.median(r[0] for r in runs),
                        statistics.median(r[1] for r in runs))
        print(f"{key:<8} {medians[key][0]:>9.3f} {medians[key][1]:>10.3f}")
    print(f"{'ratio':<8} {medians['before'][0] / medians['after'][0]:>9.2f} "
          f"{medians['before'][1] / medians['after'][1]:>10.2f}   (before / after)")


if __name__ == "__main__":
    main()
