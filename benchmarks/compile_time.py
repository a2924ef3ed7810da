"""Compile time of a network in two checkouts of cnnc, side by side in one run; or, with
--cache, one checkout's compile from an empty compile cache and from a full one.

    python benchmarks/compile_time.py BEFORE_CHECKOUT AFTER_CHECKOUT [--repeat 7]
        [--program examples/lenet.cnn]
    python benchmarks/compile_time.py --cache [CHECKOUT] [--repeat 3]
        [--program examples/resnet20.cnn]

Each measurement is a fresh Python process (so the parser and the op registry are built
each time, as for a user's first compile) that imports cnnc from the checkout and times
`cnnc.compile` of the program (forward and backward, -O3, scheduled). The runs of the two
checkouts alternate, so both see the same machine load; the table shows medians and their
ratio (above 1: the second checkout is faster). Checkouts are compared without the compile
cache (`cache=False` where a checkout has it), and no run touches ~/.cache/cnnc: each
process gets an empty CNNC_CACHE_DIR of its own.

With --cache, each repeat gives a new empty cache folder to two processes one after the
other: `cold` compiles and stores the module, `cached` finds it there. Their bytecode is
cached as for an installed cnnc (PYTHONDONTWRITEBYTECODE is unset for them, the bytecode
kept in a temporary PYTHONPYCACHEPREFIX).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
import inspect, sys, time
sys.path.insert(0, {checkout!r})
started = time.perf_counter()
import cnnc
imported = time.perf_counter()
cache = {{"cache": {cache!r}}} if "cache" in inspect.signature(cnnc.compile).parameters else {{}}
cnnc.compile({program!r}, **cache)
done = time.perf_counter()
assert cnnc.__file__.startswith({checkout!r}), cnnc.__file__
print(imported - started, done - imported)
"""


def measure(checkout: Path, program: Path, cache: Path | None = None,
            bytecode: Path | None = None) -> tuple[float, float]:
    """(import, compile) seconds in a fresh process: with the cache in `cache`, or none;
    with Python's bytecode cache in `bytecode`, or as the environment says."""
    with tempfile.TemporaryDirectory(prefix="cnnc-cache-") as empty:
        code = PROBE.format(checkout=str(checkout), program=str(program),
                            cache=cache is not None)
        env = {**os.environ, "CNNC_CACHE_DIR": str(cache or empty)}
        if bytecode is not None:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(bytecode)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True, cwd=checkout, env=env)
    first, second = result.stdout.split()
    return float(first), float(second)


def compare_cache(checkout: Path, program: Path, repeat: int) -> None:
    """Cold (an empty cache: compile, then store) and cached (the next process), medians.
    Python's own bytecode is cached as for an installed cnnc (the first cold run writes
    it), so that the cached row is the compile cache's and the front end's time, not the
    byte-compiling of cnnc's modules."""
    times: dict[str, list[tuple[float, float]]] = {"cold": [], "cached": []}
    with tempfile.TemporaryDirectory(prefix="cnnc-bytecode-") as bytecode:
        for _ in range(repeat):
            with tempfile.TemporaryDirectory(prefix="cnnc-cache-") as folder:
                for key in ("cold", "cached"):
                    times[key].append(measure(checkout, checkout / program, Path(folder),
                                              Path(bytecode)))
    print(f"{program} (forward and backward, -O3), medians of {repeat} fresh processes each")
    print(f"{'':<8} {'import s':>9} {'compile s':>10}")
    medians = {key: (statistics.median(r[0] for r in runs),
                     statistics.median(r[1] for r in runs)) for key, runs in times.items()}
    for key, (imported, compiled) in medians.items():
        print(f"{key:<8} {imported:>9.3f} {compiled:>10.3f}")
    print(f"{'ratio':<8} {'':>9} {medians['cold'][1] / medians['cached'][1]:>10.1f}   "
          "(cold / cached)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, nargs="?")
    parser.add_argument("after", type=Path, nargs="?")
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--program", type=Path)
    parser.add_argument("--cache", action="store_true",
                        help="cold vs cached compile of one checkout (default: this one)")
    args = parser.parse_args()
    if args.cache:
        if args.after is not None:
            parser.error("--cache takes one checkout")
        checkout = (args.before or Path(__file__).resolve().parent.parent).resolve()
        compare_cache(checkout, args.program or Path("examples/resnet20.cnn"),
                      args.repeat or 3)
        return
    if args.after is None:
        parser.error("give two checkouts (or --cache)")
    args.repeat = args.repeat or 7
    args.program = args.program or Path("examples/lenet.cnn")
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
