"""Data-parallel training on MPI, through mpi4py: `mpirun -n P cnnc train NET.cnn --data …`,
or `train_data_parallel` from Python.

Every rank runs the same training loop (`training.loop.train`) with an `MpiTeam`:

- At the start rank 0 broadcasts the parameters, the optimizer state and the data-order
  generator (after resuming from a checkpoint, which only rank 0 reads), so every rank
  begins identical.
- Every epoch's permutation is the same on every rank (same seed). A step takes the next
  P × batch samples of it, and rank r computes the gradients of its r-th share with the
  compiled code. `--batch` is per rank; the learning rate is used as given, and the loop
  computes each step's by the train line's schedule, the same on every rank.
- The gradients, each weighted by its share's sample count, go into one flat contiguous
  buffer with the loss and the count: one MPI Allreduce (a sum) a step. Dividing by the
  global count gives the mean gradient of the whole P × batch samples, exactly what one
  process would compute for that batch, and every rank applies the same update.
- Only rank 0 reports progress, evaluates the held-out data (and broadcasts the result), and
  writes checkpoints and weights, atomically.
- At the end, a checksum of the parameters, reduced across ranks, proves they are identical.

Faults: every collective waits at most `timeout` seconds (polling a non-blocking request). A
rank that died or hangs leaves the others waiting; the first to time out says so and
aborts the whole job (MPI_Abort), which ends every rank with a non-zero exit. Checkpoints
are only ever replaced by an atomic rename, so the last one stays intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cnnc.diagnostics import CnncError
from cnnc.runtime.module import Module

# how long a collective may wait for the other ranks before the job is aborted; a step, an
# evaluation on rank 0 or a checkpoint write must fit in it
DEFAULT_TIMEOUT_S = 120.0
# a collective is polled without pause for SPIN_S (the usual wait is the other rank finishing
# its share: a millisecond or two, where sleeping would add its own latency; measured 8% of a
# LeNet-5 step), then every POLL_S, leaving the core to a rank that still computes
SPIN_S, POLL_S = 0.01, 0.0002
EXIT_ABORTED = 1
ABORT_GRACE_S = 0.5

# set by the launchers of MPICH, Intel MPI, Open MPI and MVAPICH for every process they start
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

NO_MPI4PY = ("cnnc train was started as {size} MPI processes, but mpi4py cannot be imported "
             "({error}), so they cannot work together. Install MPI support with: pip install "
             "'cnnc[mpi]' (mpi4py and MPICH from PyPI wheels, no system packages), then run "
             "mpirun -n {size} cnnc train ...")


class CnncDistributedError(CnncError):
    """Data-parallel training cannot start or go on."""


def launched_ranks() -> int:
    """How many processes an MPI launcher started this one among (1: not under mpirun)."""
    for variable in LAUNCHER_SIZE_VARIABLES:
        text = os.environ.get(variable, "")
        if text.isdigit():
            return int(text)
    return 1


def world_team(timeout: float = DEFAULT_TIMEOUT_S) -> MpiTeam | None:
    """The team of every process mpirun started, or None when this one runs alone."""
    size = launched_ranks()
    if size <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise CnncDistributedError.single(NO_MPI4PY.format(size=size, error=error)) from None
    if MPI.COMM_WORLD.Get_size() != size:
        raise CnncDistributedError.single(
            f"mpirun started {size} processes, but mpi4py's MPI sees "
            f"{MPI.COMM_WORLD.Get_size()}: the mpirun on PATH belongs to another MPI than the "
            "one mpi4py uses. Use the mpirun that came with it (pip install 'cnnc[mpi]' "
            "brings MPICH's), or rebuild mpi4py for yours")
    return MpiTeam(MPI.COMM_WORLD, timeout)


class MpiTeam:
    """The ranks of one MPI communicator training one network together (see the module
    docstring); `training.loop.train` calls these at the points where ranks must agree."""

    def __init__(self, comm: Any, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        from mpi4py import MPI

        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise CnncDistributedError.single(f"the timeout must be a number of seconds above "
                                              f"0, got {timeout!r}")
        self._mpi = MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout = float(timeout)
        # ranks on this machine: they share its cores and GPUs
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        self.allreduce_seconds = 0.0  # waiting in the gradient Allreduce, for benchmarks
        self.allreduce_bytes = 0  # the buffer of one step

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's share of one global batch: consecutive, sizes differing by at most 1."""
        return np.array_split(indices, self.size)[self.rank]

    # -- collectives that time out ----------------------------------------------------------
    def _wait(self, request: Any, what: str) -> None:
        """Wait for a non-blocking collective, or abort the job after `timeout` seconds."""
        started = time.monotonic()
        deadline = started + self.timeout
        while not request.Test():
            now = time.monotonic()
            if now > deadline:
                self.abort(f"error: no answer from the other ranks for {self.timeout:g} s "
                           f"while {what}: a rank has died or hangs. Stopping every rank; the "
                           "last checkpoint is intact")
            if now > started + SPIN_S:
                time.sleep(POLL_S)

    def abort(self, message: str) -> None:
        """Say why on stderr (which rank, then `message`), then end every rank of the job
        (MPI_Abort)."""
        sys.stderr.write(f"rank {self.rank} of {self.size}: {message}\n")
        sys.stderr.flush()
        # the launcher forwards a rank's output through a pipe and stops forwarding when the
        # abort reaches it: give the message time to get through (it was lost under load)
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(EXIT_ABORTED)

    def _broadcast(self, array: np.ndarray, what: str) -> np.ndarray:
        self._wait(self.comm.Ibcast(array, root=0), what)
        return array

    def _broadcast_json(self, value: Any, what: str) -> Any:
        data = json.dumps(value).encode() if self.is_root else b""
        length = self._broadcast(np.array([len(data)], dtype=np.int64), what)
        buffer = np.frombuffer(data, np.uint8).copy() if self.is_root else \
            np.empty(int(length[0]), np.uint8)
        return json.loads(self._broadcast(buffer, what).tobytes())

    def _same_everywhere(self, checksums: list[int], what: str) -> list[bool]:
        """For each checksum, whether every rank has the same (one Allreduce of MAX over the
        checksums and their negatives)."""
        extremes = np.array(checksums + [-c for c in checksums], dtype=np.int64)
        self._wait(self.comm.Iallreduce(self._mpi.IN_PLACE, extremes, op=self._mpi.MAX), what)
        count = len(checksums)
        return [bool(extremes[i] == -extremes[count + i]) for i in range(count)]

    # -- the points where ranks agree ------------------------------------------------------
    def agree(self, module: Module, train_data: Any, held_out: Any, options: Any) -> None:
        """Stop unless every rank has the same network, data and options: different ones
        would leave the ranks in different collectives, or silently train on a mixture."""
        _refuse_training_state(module)
        settings = {key: getattr(options, key) for key in
                    ("epochs", "batch", "lr", "seed", "max_iter", "tol")}
        network = {key: module.manifest.get(key) for key in
                   ("network", "dtype", "storage", "optimizer", "loss")}
        parts = {"network": _checksum(json.dumps(network, sort_keys=True).encode()),
                 "training data": _data_checksum(train_data),
                 "held-out data": _data_checksum(held_out),
                 "training options": _checksum(json.dumps(settings, default=str).encode())}
        same = self._same_everywhere(list(parts.values()), "comparing the inputs")
        differ = [name for name, agreed in zip(parts, same, strict=True) if not agreed]
        if differ:
            raise CnncDistributedError.single(
                f"the {self.size} processes were not given the same {' and '.join(differ)}: "
                "every process must train the same network on the same data with the same "
                "options (each machine reads its own copy of the data)")

    def begin(self, module: Module, rng: np.random.Generator, start: Any,
              error: CnncError | None) -> Any:
        """Every rank takes rank 0's starting point: `start` (epoch and history), the data
        order, the optimizer state and the parameters; rank 0's error stops every rank."""
        from cnnc.training.loop import EpochResult, TrainResult

        first_epoch, result = start
        meta = self._broadcast_json({
            "error": None if error is None else "; ".join(d.message for d in error.diagnostics),
            "epoch": first_epoch,
            "steps": result.steps, "history": [vars(e) for e in result.history],
            "rng": rng.bit_generator.state,
            "step": int(module.optimizer_state()["optimizer.step"])}, "starting")
        if meta["error"] is not None:
            raise error if error is not None else CnncDistributedError.single(
                f"rank 0 could not start: {meta['error']}")
        arrays = self._start_arrays(module)
        flat = self._broadcast(np.concatenate([v.reshape(-1) for v in arrays.values()]).astype(
            module.dtype), "broadcasting the parameters")
        if not self.is_root:
            taken = _unflatten(flat, {name: value.shape for name, value in arrays.items()})
            module.set_params({k[6:]: v for k, v in taken.items() if k.startswith("param/")})
            module.set_optimizer_state({**{k[6:]: v for k, v in taken.items()
                                           if k.startswith("state/")},
                                        "optimizer.step": meta["step"]})
            rng.bit_generator.state = meta["rng"]
        history = [EpochResult(**entry) for entry in meta["history"]]
        return meta["epoch"], TrainResult(history, int(meta["steps"]),
                                          checkpoint=result.checkpoint)

    @staticmethod
    def _start_arrays(module: Module) -> dict[str, np.ndarray]:
        """Parameters and optimizer state, by `param/` and `state/` names, in a fixed order."""
        # the floating-point arrays only: the counts travel in the start message
        state = {k: v for k, v in module.optimizer_state().items() if v.dtype.kind == "f"}
        buffers = {k: v for k, v in module.buffers.items() if v.dtype.kind == "f"}
        return {**{f"param/{k}": v for k, v in {**module.params, **buffers}.items()},
                **{f"state/{k}": v for k, v in state.items()}}

    def step(self, module: Module, x: np.ndarray, y: np.ndarray, lr: float | None) -> float:
        """The gradients of this rank's share, summed over ranks with one Allreduce of one
        flat buffer, then the same update on every rank; returns the global mean loss."""
        shapes = {entry["name"]: tuple(entry["shape"]) for entry in module.manifest["storage"]
                  if entry["role"] == "param"}
        if len(x):
            gradients, loss = module.gradients_and_loss(x, y)
        else:  # a last batch smaller than the ranks: this one has nothing to add
            gradients = {name: np.zeros(shape, module.dtype) for name, shape in shapes.items()}
            loss = 0.0
        count = len(x)
        flat = np.empty(sum(math.prod(shape) for shape in shapes.values()) + 2, module.dtype)
        for name, part in _unflatten(flat, shapes).items():
            np.multiply(gradients[name], count, out=part)
        flat[-2:] = (loss * count, count)
        started = time.perf_counter()
        self._wait(self.comm.Iallreduce(self._mpi.IN_PLACE, flat, op=self._mpi.SUM),
                   "averaging the gradients")
        self.allreduce_seconds += time.perf_counter() - started
        self.allreduce_bytes = flat.nbytes
        flat /= flat[-1]
        module.apply_gradients(_unflatten(flat, shapes), lr)
        return float(flat[-2])

    def evaluate(self, module: Module, held_out: Any) -> tuple[float, float | None]:
        """Rank 0 evaluates the held-out data; every rank gets its (loss, accuracy). The
        others wait for it: `timeout` must cover an evaluation."""
        from cnnc.training.loop import evaluate

        values = np.full(2, np.nan)
        if self.is_root:
            loss, accuracy = evaluate(module, held_out)
            values[:] = (loss, np.nan if accuracy is None else accuracy)
        self._broadcast(values, "waiting for rank 0's evaluation of the held-out data")
        return float(values[0]), None if np.isnan(values[1]) else float(values[1])

    def check_identical(self, module: Module) -> int:
        """The parameters' checksum, the same on every rank, or an error."""
        checksum = _checksum(*(np.ascontiguousarray(v).tobytes()
                               for v in module.params.values()))
        if not self._same_everywhere([checksum], "comparing the parameters")[0]:
            raise CnncDistributedError.single(
                f"the ranks hold different parameters (rank {self.rank}: checksum "
                f"{checksum:014x}). The update runs the same code on the same numbers on "
                "every rank; machines with different CPUs compile it differently, so compile "
                "once (cnnc compile NET.cnn -o NET.cnnm) and train NET.cnnm everywhere")
        return checksum

    def finish(self, module: Module) -> str:
        """Check that every rank holds the same parameters; the line rank 0 reports."""
        checksum = self.check_identical(module)
        return (f"all {self.size} ranks hold identical parameters (checksum {checksum:014x}); "
                f"rank 0 waited {self.allreduce_seconds:.2f} s in the gradient Allreduce")


def _refuse_training_state(module: Module) -> None:
    """A step here is each rank's gradients, averaged, then one update: nothing updates batch
    norm's running statistics or draws dropout's next mask, so such a network would train
    to something its inference does not compute. Refused until the ranks share them."""
    roles = {entry["role"] for entry in module.manifest["storage"]}
    kinds = [what for role, what in (("buffer", "batch norm"), ("noise", "dropout"))
             if role in roles]
    if kinds:
        raise CnncDistributedError.single(
            f"network {module.name} has {' and '.join(kinds)}, which data-parallel training "
            "does not support yet (the running statistics and dropout masks are not shared "
            "between processes); train it in one process")


def _unflatten(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Views of the leading parts of `flat`, one of each shape, in order."""
    views, at = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        views[name] = flat[at:at + size].reshape(shape)
        at += size
    return views


def _checksum(*chunks: bytes) -> int:
    """56 bits of SHA-256: fits in an int64 with its negative."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return int.from_bytes(digest.digest()[:7], "little")


def _data_checksum(data: Any) -> int:
    x, y = np.ascontiguousarray(data.x), np.ascontiguousarray(data.y)
    return _checksum(str((x.shape, x.dtype.str, y.shape, y.dtype.str)).encode(), x.tobytes(),
                     y.tobytes())


def train_data_parallel(module: Module, train_data: Any, held_out: Any, options: Any,
                        comm: Any = None, timeout: float = DEFAULT_TIMEOUT_S,
                        report: Callable[[str], None] = print) -> Any:
    """Train `module` data-parallel on every rank of `comm` (default MPI.COMM_WORLD); every
    rank calls this with the same data and `options` (`train.TrainOptions`, whose `batch` is
    per rank). Returns the same `TrainResult` on every rank; only rank 0 reports and writes
    the checkpoint."""
    from cnnc.training.loop import train

    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError as error:
            raise CnncDistributedError.single(NO_MPI4PY.format(size="several", error=error)) \
                from None
        comm = MPI.COMM_WORLD
    return train(module, train_data, held_out, options, report=report,
                 team=MpiTeam(comm, timeout))


__all__ = ["DEFAULT_TIMEOUT_S", "CnncDistributedError", "MpiTeam", "launched_ranks",
           "train_data_parallel", "world_team"]
