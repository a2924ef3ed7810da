"""Data-parallel scaling on this machine: one process of 2 threads against 2 MPI processes of
1 thread, at the same global batch, side by side in one run.

    python benchmarks/mpi_bench.py [--steps 30] [--repeats 3] [--json results.json]

For LeNet-5 (global batch 256) and vgg_small (global batch 64), each configuration runs in
fresh processes (the 2 ranks under mpirun) and times training steps after a warm-up:
steps a second, and for the ranks the time a step waits in the gradient Allreduce (which
includes waiting for the slower rank) and the time of the same Allreduce alone, after a
barrier (the pure cost of moving the buffer). Then, for every example network, the bytes a
step exchanges and the network bandwidth below which communication would take longer than
the step's computation on several machines. Not a test: nothing here asserts a speed.
Needs `pip install 'cnnc[mpi]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = [("LeNet-5", ROOT / "examples/lenet.cnn", 256),
             ("vgg_small", ROOT / "examples/vgg_small.cnn", 64),
             ("mlp", ROOT / "examples/mlp.cnn", 256)]


def worker(network: Path, global_batch: int, steps: int, threads: int) -> dict:
    """Time `steps` training steps here: alone (module.train_step), or as one rank of the
    job mpirun started (the MpiTeam step `cnnc train` uses)."""
    import numpy as np

    import cnnc
    from cnnc.training.distributed import launched_ranks

    module = cnnc.compile(network, threads=threads)
    ranks = launched_ranks()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((global_batch, *module.input_shape)).astype(np.float32)
    y = rng.integers(0, module.output_shape[0], global_batch)
    if ranks == 1:
        def step() -> None:
            module.train_step(x, y)
        team = None
    else:
        from mpi4py import MPI

        from cnnc.training.distributed import MpiTeam

        team = MpiTeam(MPI.COMM_WORLD)
        mine = team.shard(np.arange(global_batch))

        def step() -> None:
            team.step(module, x[mine], y[mine], None)
    for _ in range(3):
        step()
    if team is not None:
        team.comm.Barrier()
        team.allreduce_seconds = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - started
    result = {"steps_per_s": steps / elapsed, "ms_per_step": 1e3 * elapsed / steps}
    if team is not None:
        result["allreduce_ms"] = 1e3 * team.allreduce_seconds / steps
        result["allreduce_alone_ms"] = _allreduce_alone(team, team.allreduce_bytes)
        result["bytes"] = team.allreduce_bytes
    return result


def _allreduce_alone(team, nbytes: int, repeats: int = 20) -> float:
    """Median ms of one Allreduce of `nbytes`, the ranks lined up by a barrier first."""
    import numpy as np
    from mpi4py import MPI

    buffer = np.ones(nbytes // 4, np.float32)
    times = []
    for _ in range(repeats):
        team.comm.Barrier()
        started = time.perf_counter()
        team.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def run_config(network: Path, batch: int, steps: int, ranks: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", str(network), str(batch), str(steps),
               str(threads)]
    if ranks > 1:
        command = [_mpirun(), "-n", str(ranks), *command]
    env = {**os.environ, "CNNC_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[0])  # rank 0's


def _mpirun() -> str | None:
    """mpirun on PATH, or the one the mpich wheel put beside this Python."""
    return shutil.which("mpirun") or shutil.which("mpirun", path=str(Path(sys.executable).parent))


def parameter_count(network: Path) -> int:
    import cnnc

    return sum(value.size for value in cnnc.compile(network, threads=1).params.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        network, batch, steps, threads = args.worker
        result = worker(Path(network), int(batch), int(steps), int(threads))
        if os.environ.get("PMI_RANK", "0") == "0":
            print(json.dumps(result), flush=True)
        return
    if _mpirun() is None:
        raise SystemExit("no mpirun here: pip install 'cnnc[mpi]'")
    rows = []
    for name, network, batch in WORKLOADS:
        alone, ranked = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine
            alone.append(run_config(network, batch, args.steps, 1, 2))
            ranked.append(run_config(network, batch, args.steps, 2, 1))
        rows.append(_row(name, batch, alone, ranked))
    print_table(rows)
    estimates = [_estimate(name, path, rows) for name, path in
                 [("LeNet-5", ROOT / "examples/lenet.cnn"),
                  ("vgg_small", ROOT / "examples/vgg_small.cnn"),
                  ("mlp", ROOT / "examples/mlp.cnn")]]
    print_estimates(estimates)
    if args.json:
        Path(args.json).write_text(json.dumps({"scaling": rows, "estimates": estimates},
                                              indent=2))


def _row(name: str, batch: int, alone: list[dict], ranked: list[dict]) -> dict:
    def median(results: list[dict], key: str) -> float:
        return statistics.median(result[key] for result in results)

    return {"network": name, "global_batch": batch,
            "alone_steps_per_s": median(alone, "steps_per_s"),
            "ranks_steps_per_s": median(ranked, "steps_per_s"),
            "ranks_ms_per_step": median(ranked, "ms_per_step"),
            "alone_ms_per_step": median(alone, "ms_per_step"),
            "allreduce_ms": median(ranked, "allreduce_ms"),
            "allreduce_alone_ms": median(ranked, "allreduce_alone_ms"),
            "bytes": ranked[0]["bytes"]}


def print_table(rows: list[dict]) -> None:
    print("| network | global batch | 1 process x 2 threads, steps/s | 2 ranks x 1 thread, "
          "steps/s | ratio | in Allreduce a step (share) | Allreduce alone | bytes a step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        share = row["allreduce_ms"] / row["ranks_ms_per_step"]
        print(f"| {row['network']} | {row['global_batch']} | "
              f"{row['alone_steps_per_s']:.1f} | {row['ranks_steps_per_s']:.1f} | "
              f"{row['ranks_steps_per_s'] / row['alone_steps_per_s']:.2f}x | "
              f"{row['allreduce_ms']:.2f} ms ({share:.0%}) | "
              f"{row['allreduce_alone_ms']:.3f} ms | {row['bytes']:,} |")


def _estimate(name: str, path: Path, rows: list[dict]) -> dict:
    """Bytes a step and the bandwidth at which a ring Allreduce on P machines (each rank
    sends and receives 2 (P - 1) / P of the buffer) takes as long as the step this machine
    computes alone (each machine runs the measured batch: the global batch grows with P)."""
    count = parameter_count(path)
    nbytes = 4 * count + 8  # float32 gradients, the loss and the sample count
    measured = next((row for row in rows if row["network"] == name), None)
    estimate = {"network": name, "parameters": count, "bytes": nbytes}
    if measured is not None:
        compute_s = measured["alone_ms_per_step"] / 1e3
        for machines in (2, 8, 64):
            sent = 2 * (machines - 1) / machines * nbytes
            estimate[f"break_even_gbit_s_{machines}"] = 8 * sent / compute_s / 1e9
    return estimate


def print_estimates(estimates: list[dict]) -> None:
    print("\n| network | parameters | bytes a step | bandwidth where communication = "
          "computation, 2 / 8 / 64 machines |")
    print("| --- | --- | --- | --- |")
    for item in estimates:
        levels = [item.get(f"break_even_gbit_s_{m}") for m in (2, 8, 64)]
        shown = " / ".join(f"{v:.2f} Gbit/s" for v in levels if v is not None) or \
            "(no step time measured)"
        print(f"| {item['network']} | {item['parameters']:,} | {item['bytes']:,} | {shown} |")


if __name__ == "__main__":
    main()
