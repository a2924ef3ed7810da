"""The training loop: mini-batches in a seeded order, one compiled step each, evaluation
every epoch, an atomic checkpoint after each epoch, resume, and a stop with the layer named
when a loss or gradient stops being finite.

The loop also implements the batch gradient descent of the specification: it stops after
`max_iter` steps (MAX), or when no parameter changed by more than `tol` (ε) in one step.
"""

from __future__ import annotations

import json
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import CnncDataError, Dataset
from .diagnostics import CnncError
from .module import params_to_bytes, write_atomically
from .runtime import Module


class CnncTrainingError(CnncError):
    """Training cannot go on: the loss or a gradient is no longer finite."""


@dataclass
class TrainOptions:
    epochs: int = 1
    batch: int = 64
    lr: float | None = None  # None: the train line's
    seed: int = 0
    max_iter: int | None = None
    tol: float = 0.0
    checkpoint: Path | None = None
    resume: Path | None = None
    progress: bool = True


@dataclass
class EpochResult:
    epoch: int
    loss: float  # mean training loss of the epoch
    accuracy: float | None  # on the held-out data (cross-entropy networks)
    held_out_loss: float


@dataclass
class TrainResult:
    history: list[EpochResult] = field(default_factory=list)
    steps: int = 0
    stopped: str = "epochs"  # epochs, max_iter or tol


def check_data(module: Module, data: Dataset, name: str) -> None:
    if len(data) == 0:
        raise CnncDataError.single(f"the {name} data has no samples")
    if tuple(data.x.shape[1:]) != module.input_shape:
        raise CnncDataError.single(
            f"the {name} samples have shape {tuple(data.x.shape[1:])}, but network "
            f"{module.name} takes {module.input_shape}")


def evaluate(module: Module, data: Dataset, batch: int = 500) -> tuple[float, float | None]:
    """(mean loss, accuracy or None) over `data`, in batches."""
    total, correct = 0.0, 0
    classify = module.manifest["loss"]["kind"] == "cross_entropy"
    for start in range(0, len(data), batch):
        x, y = data.x[start:start + batch], data.y[start:start + batch]
        total += module.loss(x, y) * len(x)
        if classify:
            correct += int((module(x).argmax(axis=1) == y).sum())
    accuracy = correct / len(data) if classify else None
    return total / len(data), accuracy


class Solo:
    """Training in one process: the team of `train` when no MPI ranks share the work
    (`distributed.MpiTeam` is the other)."""

    rank, size, is_root = 0, 1, True

    def shard(self, indices: np.ndarray) -> np.ndarray:
        return indices

    def begin(self, module: Module, rng: np.random.Generator, start: tuple[int, TrainResult],
              error: CnncError | None) -> tuple[int, TrainResult]:
        if error is not None:
            raise error
        return start

    def step(self, module: Module, x: np.ndarray, y: np.ndarray, lr: float | None) -> float:
        return module.train_step(x, y, lr=lr)

    def agree(self, module: Module, train_data: Dataset, held_out: Dataset,
              options: TrainOptions) -> None:
        """Nobody to disagree with."""

    def evaluate(self, module: Module, held_out: Dataset) -> tuple[float, float | None]:
        return evaluate(module, held_out)

    def check_identical(self, module: Module) -> None:
        """One copy of the parameters."""

    def finish(self, module: Module) -> str | None:
        return None


def train(module: Module, train_data: Dataset, held_out: Dataset, options: TrainOptions,
          report: Callable[[str], None] = print, team: Any = None) -> TrainResult:
    """Train for `options.epochs`; with an MPI `team`, data-parallel (`distributed`), where
    `options.batch` is each rank's share of a step and only rank 0 reports and writes."""
    team = team if team is not None else Solo()
    check_data(module, train_data, "training")
    check_data(module, held_out, "held-out")
    team.agree(module, train_data, held_out, options)
    rng = np.random.default_rng(options.seed)
    first_epoch, result = _start(module, rng, options, team, report)
    for epoch in range(first_epoch, options.epochs + 1):
        order = rng.permutation(len(train_data))
        epoch_loss = _epoch(module, train_data, order, epoch, options, result, team)
        team.check_identical(module)  # ranks that drifted apart stop within an epoch
        held_loss, accuracy = team.evaluate(module, held_out)
        result.history.append(EpochResult(epoch, epoch_loss, accuracy, held_loss))
        shown = f", accuracy {accuracy:.2%}" if accuracy is not None else ""
        if team.is_root:
            report(f"epoch {epoch}/{options.epochs}: training loss {epoch_loss:.4f}, held-out "
                   f"loss {held_loss:.4f}{shown}")
            if options.checkpoint is not None:
                save_checkpoint(module, rng, epoch, result, options.checkpoint, team.size,
                                options.batch * team.size)
        if result.stopped != "epochs":
            if team.is_root:
                report(f"stopped early: {result.stopped} reached after {result.steps} steps")
            break
    agreed = team.finish(module)
    if agreed and team.is_root:
        report(agreed)
    return result


def _start(module: Module, rng: np.random.Generator, options: TrainOptions, team: Any,
           report: Callable[[str], None]) -> tuple[int, TrainResult]:
    """Resume on rank 0 when asked; then every rank starts from rank 0's point."""
    start, error = (1, TrainResult()), None
    if team.is_root and options.resume is not None:
        try:
            epoch, result, meta = _resume(module, rng, options.resume)
            start = (epoch, result)
            step_batch = options.batch * team.size
            saved = meta.get("global_batch")
            if saved is not None and saved != step_batch:
                report(f"note: {options.resume} was trained with {saved} "
                       f"samples a step ({meta.get('ranks', 1)} processes); this run takes "
                       f"{step_batch} ({team.size} of --batch {options.batch})")
        except CnncError as failure:
            error = failure
    return team.begin(module, rng, start, error)


def _epoch(module: Module, data: Dataset, order: np.ndarray, epoch: int,
           options: TrainOptions, result: TrainResult, team: Any) -> float:
    total, seen, started = 0.0, 0, time.perf_counter()
    step_size = options.batch * team.size
    for start in range(0, len(order), step_size):
        indices = order[start:start + step_size]
        mine = team.shard(indices)
        x, y = data.x[mine], data.y[mine]
        before = module.params  # a copy: the last good parameters
        loss = team.step(module, x, y, options.lr)
        after = module.params
        if not np.isfinite(loss) or not _all_finite(after):
            module.set_params(before)  # diagnose (and leave the module) as it was
            raise _not_finite(module, x, y, epoch, result.steps + 1, loss)
        result.steps += 1
        total += loss * len(indices)
        seen += len(indices)
        if options.progress and team.is_root:
            _progress(epoch, options.epochs, seen, len(order), total / seen, started)
        if options.max_iter is not None and result.steps >= options.max_iter:
            result.stopped = "max_iter"
            break
        if options.tol > 0 and _largest_change(before, after) < options.tol:
            result.stopped = "tol"
            break
    if options.progress and team.is_root:
        sys.stderr.write("\n")
    return total / max(seen, 1)


def _all_finite(params: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(value).all() for value in params.values())


def _largest_change(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(after[name] - before[name]).max()) for name in before)


def _progress(epoch: int, epochs: int, seen: int, total: int, loss: float,
              started: float) -> None:
    width = 24
    done = int(width * seen / total)
    rate = seen / max(time.perf_counter() - started, 1e-9)
    sys.stderr.write(f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (width - done)}] "
                     f"{seen}/{total} loss {loss:.4f} {rate:,.0f} samples/s")
    sys.stderr.flush()


def _not_finite(module: Module, x: np.ndarray, y: np.ndarray, epoch: int, step: int,
                loss: float) -> CnncTrainingError:
    """Name the first layer whose forward values, or else whose gradients, are not finite."""
    where = "the loss itself"
    if len(x) == 0:  # a rank whose share of the step was empty: the others' shares did it
        where = "the other ranks' shares of this step"
    else:
        where = _first_not_finite(module, x, y) or where
    what = f"the loss became {loss}" if not np.isfinite(loss) else \
        "a gradient stopped being finite"
    return CnncTrainingError.single(
        f"training stopped at epoch {epoch}, step {step}: {what}; the first "
        f"values that are not finite appear in {where}. The last checkpoint is unchanged; "
        "a smaller learning rate (--lr) usually helps")


def _first_not_finite(module: Module, x: np.ndarray, y: np.ndarray) -> str | None:
    for name, value in module.activations(x).items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"the forward pass, in layer {name.split('.')[0]} (tensor {name})"
    for name, value in module.gradients(x, y).items():
        if not np.isfinite(value).all():
            return f"the backward pass, in layer {name.split('.')[0]} (gradient of {name})"
    return None


def save_checkpoint(module: Module, rng: np.random.Generator, epoch: int,
                    result: TrainResult, path: Path, ranks: int = 1,
                    global_batch: int | None = None) -> None:
    """Parameters, optimizer state, data-order generator and history, written atomically.
    `ranks` and `global_batch` (samples a step) are for information: any number of
    processes may resume, with any batch."""
    meta = {"epoch": epoch, "steps": result.steps, "network": module.name, "ranks": ranks,
            "global_batch": global_batch,
            "rng": rng.bit_generator.state,
            "history": [vars(e) for e in result.history]}
    arrays = {f"param/{k}": v for k, v in module.params.items()}
    arrays |= {f"state/{k}": v for k, v in module.optimizer_state().items()}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_atomically(Path(path), params_to_bytes(arrays))


def _resume(module: Module, rng: np.random.Generator,
            path: Path) -> tuple[int, TrainResult, dict[str, Any]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(arrays.pop("meta").tobytes())
        if meta.get("network") != module.name:
            raise CnncDataError.single(f"{path} is a checkpoint of network "
                                       f"{meta.get('network')}, not {module.name}")
        history = [EpochResult(**entry) for entry in meta["history"]]
        result, epoch = TrainResult(history, int(meta["steps"])), int(meta["epoch"])
        module.set_params({k[6:]: v for k, v in arrays.items() if k.startswith("param/")})
        module.set_optimizer_state({k[6:]: v for k, v in arrays.items()
                                    if k.startswith("state/")})
        rng.bit_generator.state = meta["rng"]
    except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError,
            zipfile.BadZipFile) as error:
        raise CnncDataError.single(f"cannot resume from {path}: it is not a usable "
                                   f"checkpoint ({type(error).__name__}: {error})") from None
    return epoch + 1, result, meta
