"""Time every kernel of a network on its own: where the time of a step goes.

    python benchmarks/kernels.py NET.cnn|MODEL.onnx [--batch 64] [--repeats 7] [--plain]
        [--no-winograd] [--threads 1]

With --threads T above 1 each call gets a thread team of T threads, as a call that runs in
one piece does (a batch of one), so the kernels' shared loops run on all of them; each
call then includes the team's start, some tens of microseconds.

Each kernel is compiled as an entry point of its own and run on buffers of the right shapes
(random values; argmax positions and labels kept in range). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cnnc.artifact.format import numpy_dtype
from cnnc.backends.llvm.codegen import compile_functions
from cnnc.backends.target import host_cpu
from cnnc.driver.pipeline import Options, Stage, run
from cnnc.frontend.source import Source, is_onnx, to_source
from cnnc.runtime.loader import native_entries_from_object, team_worker
from cnnc.runtime.team import TEAM_MIN_FLOPS, Team


def _source(program: str) -> Source:
    """A .cnn program's source, or the program an ONNX model imports as."""
    if is_onnx(program):
        from cnnc.onnx.importer import imported_source

        return imported_source(program)[0]
    return to_source(program)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--plain", action="store_true", help="unscheduled loops")
    parser.add_argument("--no-winograd", action="store_true", help="direct convolutions only")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of each call's team (default 1: no team)")
    args = parser.parse_args()
    target = host_cpu().with_winograd(not args.no_winograd)
    build = run(_source(args.program), Options(target, scheduled=not args.plain),
                until=Stage.LOWER)
    graph, functions, storage = build.graph, build.lowered.functions, build.lowered.storage
    names = [t.name for t in storage]
    alone = {f"run_{f.name}": [f.name] for f in functions}
    code = compile_functions(functions, names, 3, alone, target=target)
    entries, engine = native_entries_from_object(code.object_code, list(alone))
    arrays = [_buffer(t, args.batch, graph) for t in storage]
    # the last slot: the thread team (backends.llvm.team); none, so every kernel runs here
    table = (ctypes.c_void_p * (len(arrays) + 1))(*[a.ctypes.data for a in arrays], 0)
    teams = _Teams(engine, args.threads)
    total = 0.0
    print(f"{'kernel':<40} {'ms':>8}")
    for function in functions:
        call = entries[f"run_{function.name}"]
        teams.run(call, args.batch, table)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            teams.run(call, args.batch, table)
            times.append(time.perf_counter() - start)
        median = statistics.median(times) * 1e3
        total += median
        print(f"{function.name:<40} {median:>8.3f}")
    print(f"{'total':<40} {total:>8.3f}")
    teams.close()
    del engine


class _Teams:
    """Each call's thread team, as the runtime gives one to a call run in one piece
    (runtime.team), from a pool of threads - 1 helpers; with one thread, no team."""

    def __init__(self, engine, threads: int) -> None:
        self.threads, self.worker = threads, team_worker(engine)
        self.flops = TEAM_MIN_FLOPS  # every call is big enough for a team
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def thread_pool(self) -> ThreadPoolExecutor:
        return self._pool

    def run(self, call, batch: int, table) -> None:
        team = Team.start(self, 1) if self._pool is not None else None
        table[len(table) - 1] = None if team is None else team.address
        try:
            call(batch, table)
        finally:
            if team is not None:
                team.finish()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _buffer(tensor, batch: int, graph) -> np.ndarray:
    shape = tuple(batch if d == "N" else d for d in (tensor.shape or (1,))) or (1,)
    dtype = numpy_dtype(tensor.dtype)
    rng = np.random.default_rng(0)
    if tensor.role.value == "target" and dtype.kind == "i":
        return rng.integers(0, 2, shape).astype(dtype)
    if tensor.name.endswith(".argmax"):
        return np.zeros(shape, dtype)
    return rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)


if __name__ == "__main__":
    main()
