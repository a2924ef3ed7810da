"""`Module.fit` and `Module.evaluate`: training from Python with the loop `cnnc train` uses
(train.train), in the habits of Keras: arrays in, a history out."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnc.runtime.arguments import CnncRuntimeError
from cnnc.training.data import Dataset, hold_out
from cnnc.training.loop import EpochResult, TrainOptions, TrainResult, check_data, train
from cnnc.training.loop import evaluate as evaluate_data

if TYPE_CHECKING:  # the runtime imports training lazily, for Module.fit
    from cnnc.runtime.module import Module


def fit(module: Module, x: Any, y: Any, *, epochs: int | None = None,
        batch: int | None = None, lr: float | None = None,
        validation: tuple[Any, Any] | None = None, val_split: float | None = None,
        seed: int | None = None, checkpoint: str | Path | None = None,
        resume: str | Path | None = None, save_best: str | Path | None = None,
        log: str | Path | None = None, max_iter: int | None = None, tol: float = 0.0,
        callbacks: Iterable[Callable[[EpochResult], Any]] = (),
        verbose: bool = False) -> TrainResult:
    """Train `module` on samples `x` with labels or targets `y`.

    epochs, batch, seed, max_iter: the train line's unless given; lr: the base rate of the
    train line's schedule (training.schedule), its `lr` unless given. validation=(xv, yv)
    evaluates every epoch on those samples; val_split=F holds out a seeded fraction F of
    (x, y) instead, as `cnnc train --val-split` does; with neither, no epoch is evaluated.
    checkpoint / resume / save_best / log: files, as the `cnnc train` flags of those names.
    Each callback is called with the epoch's `EpochResult` after it; one that returns True
    stops training. verbose prints the epoch lines and a progress bar. Returns the history:
    `result.history` (one EpochResult an epoch), `result.metrics` (lists by metric),
    `result.steps`, `result.stopped`. Ctrl-C raises `train.TrainingInterrupted`.
    """
    settings = module.optimizer
    if not settings:
        raise CnncRuntimeError.single(f"network {module.name} has no loss line, so it "
                                      "cannot be trained")
    options = TrainOptions(
        epochs=_count("epochs", epochs, settings.get("epochs") or 1),
        batch=_count("batch", batch, settings.get("batch") or 64),
        lr=lr, seed=_seed(seed if seed is not None else settings.get("seed") or 0),
        max_iter=_count("max_iter", max_iter, settings.get("max_iter")),
        tol=tol, checkpoint=_path(checkpoint), resume=_path(resume),
        progress=verbose, save_best=_path(save_best), log=_path(log),
        callbacks=tuple(_callback(c) for c in callbacks))
    data = _dataset(module, x, y, "x", "y")
    held = None
    if validation is not None and val_split is not None:
        raise CnncRuntimeError.single("give validation=(x, y) or val_split, not both")
    if validation is not None:
        held = _validation(module, validation)
    elif val_split is not None:
        data, held = hold_out(data, _fraction(val_split), options.seed)
    return train(module, data, held, options, report=print if verbose else _quiet)


def evaluate(module: Module, x: Any, y: Any, batch: int = 500) -> dict[str, float]:
    """The mean loss over (x, y) and, for a cross-entropy network, the accuracy."""
    if "loss" not in module.manifest:
        raise CnncRuntimeError.single(f"network {module.name} has no loss line to evaluate")
    loss, accuracy = evaluate_data(module, _dataset(module, x, y, "x", "y"),
                                   _count("batch", batch, 500))
    return {"loss": loss} if accuracy is None else {"loss": loss, "accuracy": accuracy}


def _quiet(_: str) -> None:
    """fit's report when not verbose."""


def _dataset(module: Module, x: Any, y: Any, x_name: str, y_name: str) -> Dataset:
    """(x, y) checked whole, before any step: a bad label found half-way through an epoch
    would waste the steps before it."""
    x = module._checked_input(x, x_name)
    y = module._checked_target(y, len(x))
    data = Dataset(x, y)
    check_data(module, data, "training")
    return data


def _validation(module: Module, validation: Any) -> Dataset:
    if not isinstance(validation, (tuple, list)) or len(validation) != 2:
        raise CnncRuntimeError.single("validation must be a pair (x, y)")
    return _dataset(module, validation[0], validation[1], "validation x", "validation y")


def _count(name: str, value: Any, default: int | None) -> int | None:
    if value is None:
        return default
    if type(value) is not int and not isinstance(value, np.integer):
        raise CnncRuntimeError.single(f"{name} must be a whole number, got {value!r}")
    if not 1 <= int(value) <= 2**31 - 1:
        raise CnncRuntimeError.single(f"{name} must be from 1 to 2,147,483,647, got {value}")
    return int(value)


def _seed(value: Any) -> int:
    if (type(value) is not int and not isinstance(value, np.integer)) or \
            not 0 <= int(value) < 2**63:
        raise CnncRuntimeError.single(f"seed must be a whole number from 0 to 2**63 - 1, got "
                                      f"{value!r}")
    return int(value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise CnncRuntimeError.single(f"val_split must be a number between 0 and 1, got "
                                      f"{value!r}")
    return float(value)


def _path(value: str | Path | None) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, Path)):
        raise CnncRuntimeError.single(f"a file must be given as a path, got "
                                      f"{type(value).__name__}")
    return Path(value)


def _callback(callback: Any) -> Callable[[EpochResult], Any]:
    """A function of the EpochResult, or an object with Keras's on_epoch_end(epoch, logs)."""
    if hasattr(callback, "on_epoch_end"):
        return lambda entry: callback.on_epoch_end(entry.epoch, {
            k: v for k, v in vars(entry).items() if k != "epoch"})
    if not callable(callback):
        raise CnncRuntimeError.single(f"a callback must be callable, got {callback!r}")
    return callback
