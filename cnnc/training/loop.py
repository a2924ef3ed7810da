"""The training loop: mini-batches in a seeded order, one compiled step each, evaluation
every epoch, an atomic checkpoint after each epoch, resume, and a stop with the layer named
when a loss or gradient stops being finite.

The loop also implements the batch gradient descent of the specification: it stops after
`max_iter` steps (MAX), or when no parameter changed by more than `tol` (ε) in one step.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from cnnc.artifact.format import params_to_bytes, write_atomically
from cnnc.diagnostics import CnncError
from cnnc.support.npzfile import read_npz
from cnnc.training.data import CnncDataError, Dataset
from cnnc.training.progress import Progress
from cnnc.training.schedule import learning_rate, varies

if TYPE_CHECKING:  # the runtime imports training lazily, for Module.fit
    from cnnc.runtime.module import Module


class CnncTrainingError(CnncError):
    """Training cannot go on: the loss or a gradient is no longer finite."""


@dataclass
class TrainOptions:
    epochs: int = 1
    batch: int = 64
    lr: float | None = None  # the base rate of the schedule; None: the train line's
    seed: int = 0
    max_iter: int | None = None
    tol: float = 0.0
    checkpoint: Path | None = None
    resume: Path | None = None
    progress: bool = True
    progress_every: float = 30.0  # seconds between progress lines when not on a terminal
    save_best: Path | None = None  # weights of the epoch with the lowest held-out loss
    log: Path | None = None  # one JSON line an epoch
    # each called with the epoch's EpochResult after it; one that returns True stops training
    callbacks: tuple[Callable[[EpochResult], Any], ...] = ()


@dataclass
class EpochResult:
    epoch: int
    loss: float  # mean training loss of the epoch
    accuracy: float | None  # on the held-out data (cross-entropy networks)
    held_out_loss: float | None  # None: no held-out data
    time: float = 0.0  # seconds the epoch took, its training and evaluation
    lr: float | None = None  # the rate of the epoch's last step (the schedule's)


@dataclass
class TrainResult:
    history: list[EpochResult] = field(default_factory=list)
    steps: int = 0
    stopped: str = "epochs"  # epochs, max_iter, tol or callback
    checkpoint: tuple[int, Path] | None = None  # the last one written: (epoch, path)

    @property
    def metrics(self) -> dict[str, list[Any]]:
        """The history by metric, one entry an epoch (Keras's `History.history`)."""
        keys = ("epoch", "loss", "held_out_loss", "accuracy", "time", "lr")
        return {key: [getattr(e, key) for e in self.history] for key in keys}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; says where the last checkpoint is."""

    def __init__(self, result: TrainResult) -> None:
        if result.checkpoint is None:
            where = "no checkpoint written yet"
        else:
            epoch, path = result.checkpoint
            where = f"last checkpoint: epoch {epoch} at {path}"
        self.result = result
        super().__init__(f"interrupted; {where}")


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
    classify = module.takes_labels
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


def train(module: Module, train_data: Dataset, held_out: Dataset | None,
          options: TrainOptions, report: Callable[[str], None] = print,
          team: Any = None) -> TrainResult:
    """Train for `options.epochs`; with an MPI `team`, data-parallel (`distributed`), where
    `options.batch` is each rank's share of a step and only rank 0 reports and writes.
    Without held-out data (None) no epoch is evaluated. Ctrl-C raises TrainingInterrupted,
    which names the last checkpoint."""
    team = team if team is not None else Solo()
    check_data(module, train_data, "training")
    if held_out is not None:
        check_data(module, held_out, "held-out")
    elif options.save_best is not None:
        raise CnncError.single("keeping the best epoch's weights needs held-out data")
    rng = np.random.default_rng(options.seed)
    result, log = TrainResult(), None
    try:
        team.agree(module, train_data, held_out, options)
        first_epoch, result = _start(module, rng, options, team, report)
        log = _open_log(options.log, resumed=first_epoch > 1) if team.is_root else None
        for epoch in range(first_epoch, options.epochs + 1):
            if _run_epoch(module, (train_data, held_out), rng, epoch, options, result, team,
                          (report, log)):
                break
    except KeyboardInterrupt:
        raise TrainingInterrupted(result) from None
    finally:
        if log is not None:
            log.close()
    agreed = team.finish(module)
    if agreed and team.is_root:
        report(agreed)
    return result


def _run_epoch(module: Module, data: tuple[Dataset, Dataset | None], rng: np.random.Generator,
               epoch: int, options: TrainOptions, result: TrainResult, team: Any,
               outputs: tuple[Callable[[str], None], TextIO | None]) -> bool:
    """One epoch, its evaluation and what follows it; True when training should stop."""
    train_data, held_out = data
    started = time.perf_counter()
    order = rng.permutation(len(train_data))
    epoch_loss, rate = _epoch(module, train_data, order, epoch, options, result, team)
    team.check_identical(module)  # ranks that drifted apart stop within an epoch
    held_loss, accuracy = (None, None) if held_out is None else team.evaluate(module, held_out)
    entry = EpochResult(epoch, epoch_loss, accuracy, held_loss,
                        time.perf_counter() - started, rate)
    result.history.append(entry)
    report, log = outputs
    if team.is_root:
        _after_epoch(module, rng, entry, options, result, team, report)
        if log is not None:
            _log_line(log, entry, result.steps, options.log)
    answers = [callback(entry) for callback in options.callbacks]  # each sees every epoch
    if any(answer is True for answer in answers) and result.stopped == "epochs":
        result.stopped = "callback"
    if result.stopped != "epochs" and team.is_root:
        reason = "a callback asked to stop" if result.stopped == "callback" else \
            f"{result.stopped} reached"
        report(f"stopped early: {reason} after {result.steps} steps")
    return result.stopped != "epochs"


def _after_epoch(module: Module, rng: np.random.Generator, entry: EpochResult,
                 options: TrainOptions, result: TrainResult, team: Any,
                 report: Callable[[str], None]) -> None:
    """Rank 0's part: the epoch line, the checkpoint and the best weights so far."""
    shown = "" if entry.held_out_loss is None else f", held-out loss {entry.held_out_loss:.4f}"
    shown += f", accuracy {entry.accuracy:.2%}" if entry.accuracy is not None else ""
    shown += f", lr {entry.lr:.4g}" if varies(module.optimizer) else ""
    report(f"epoch {entry.epoch}/{options.epochs}: training loss {entry.loss:.4f}{shown} "
           f"({entry.time:.1f} s)")
    if options.checkpoint is not None:
        with interrupts_deferred():  # so that the message names what the file holds
            save_checkpoint(module, rng, entry.epoch, result, options.checkpoint, team.size,
                            options.batch * team.size)
            result.checkpoint = (entry.epoch, options.checkpoint)
    if options.save_best is not None and _is_best(result.history):
        module.save_weights(options.save_best)
        report(f"held-out loss {entry.held_out_loss:.4f} is the lowest so far: wrote "
               f"{options.save_best}")


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside takes effect at its end: a checkpoint is written and recorded as one
    step. Only the main thread receives signals, and only Python's own handler is
    deferred (a program's own SIGINT handler is left alone)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _is_best(history: list[EpochResult]) -> bool:
    """Whether the last epoch's held-out loss is below every earlier one's."""
    earlier = [e.held_out_loss for e in history[:-1] if e.held_out_loss is not None]
    return not earlier or history[-1].held_out_loss < min(earlier)


def _open_log(path: Path | None, resumed: bool) -> TextIO | None:
    """The metrics log: appended to when training resumes, else started afresh."""
    if path is None:
        return None
    try:
        return open(path, "a" if resumed else "w", encoding="utf-8")
    except OSError as error:
        raise CnncError.single(f"cannot write the log {path}: "
                               f"{error.strerror or error}") from None


def _log_line(log: TextIO, entry: EpochResult, steps: int, path: Path | None) -> None:
    record = {**asdict(entry), "steps": steps}
    try:
        log.write(json.dumps(record) + "\n")
        log.flush()  # a line an epoch, whatever happens to the run later
    except OSError as error:
        raise CnncError.single(f"cannot write the log {path}: "
                               f"{error.strerror or error}") from None


def _start(module: Module, rng: np.random.Generator, options: TrainOptions, team: Any,
           report: Callable[[str], None]) -> tuple[int, TrainResult]:
    """Resume on rank 0 when asked; then every rank starts from rank 0's point."""
    start, error = (1, TrainResult()), None
    if team.is_root and options.resume is not None:
        try:
            epoch, result, meta = _resume(module, rng, options.resume)
            result.checkpoint = (epoch - 1, options.resume)
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
           options: TrainOptions, result: TrainResult, team: Any) -> tuple[float, float]:
    """The epoch's mean training loss, and the learning rate of its last step."""
    total, seen = 0.0, 0
    step_size = options.batch * team.size
    per_epoch = -(-len(order) // step_size)
    shown = options.progress and team.is_root
    progress = Progress(epoch, options.epochs, len(order), every=options.progress_every) \
        if shown else None
    settings, rate = module.optimizer, 0.0
    for position, start in enumerate(range(0, len(order), step_size)):
        indices = order[start:start + step_size]
        mine = team.shard(indices)
        x, y = data.x[mine], data.y[mine]
        before = {**module.params, **module.buffers}  # copies: the last good ones
        # by the place in the run, not result.steps: a run resumed with another batch size
        # goes on where the schedule is for its epoch
        rate = learning_rate(settings, (epoch - 1) * per_epoch + position, per_epoch,
                             options.epochs, lr=options.lr, max_iter=options.max_iter)
        loss = team.step(module, x, y, rate)
        after = module.params
        if not np.isfinite(loss) or not _all_finite(after):
            module.set_params(before)  # diagnose (and leave the module) as it was
            raise _not_finite(module, x, y, epoch, result.steps + 1, loss)
        result.steps += 1
        total += loss * len(indices)
        seen += len(indices)
        if progress is not None:
            progress.update(seen, total / seen)
        if options.max_iter is not None and result.steps >= options.max_iter:
            result.stopped = "max_iter"
            break
        if options.tol > 0 and _largest_change(before, after) < options.tol:
            result.stopped = "tol"
            break
    if progress is not None:
        progress.close()
    return total / max(seen, 1), rate


def _all_finite(params: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(value).all() for value in params.values())


def _largest_change(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(after[name] - before[name]).max()) for name in before)


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
    # the parameters and the buffers saved with them (batch norm's running statistics)
    arrays = {f"param/{k}": v for k, v in {**module.params, **module.buffers}.items()}
    arrays |= {f"state/{k}": v for k, v in module.optimizer_state().items()}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_atomically(Path(path), params_to_bytes(arrays))


def _resume(module: Module, rng: np.random.Generator,
            path: Path) -> tuple[int, TrainResult, dict[str, Any]]:
    try:
        arrays = read_npz(path, "checkpoint", CnncDataError)
    except CnncDataError as error:
        reason = error.diagnostics[0].message.split(": ", 1)[-1]
        raise CnncDataError.single(f"cannot resume from {path}: {reason}") from None
    try:
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
