"""The work behind `cnnc train`, `cnnc eval` and `cnnc check --grad`."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnc.artifact.checks import NETWORK_NAME
from cnnc.diagnostics import CnncError, Source
from cnnc.driver.load import load as load_module
from cnnc.frontend.options import MAX_SIZE
from cnnc.graph.ir import Graph
from cnnc.runtime.module import Module
from cnnc.runtime.threads import thread_count
from cnnc.training.data import (
    CnncDataError,
    Dataset,
    data_kind,
    hold_out,
    load,
    load_mnist_split,
    load_npz,
)

if TYPE_CHECKING:
    from cnnc.training.loop import TrainOptions

EXIT_OK, EXIT_FAILED = 0, 1
MAX_COUNT = MAX_SIZE


def open_network(path: str, dtype: str | None = None, target: str = "cpu",
                 trust: str = "code", report: Callable[[str], None] | None = None,
                 loss: str | None = None, cache: bool = True) -> Module:
    """A compiled module file (trust: see `cnnc.load`), or a .cnn program or .onnx model
    compiled now for `target`, saying so and how long it took through `report`. `loss`
    adds the line `loss LOSS` to a program (or an imported model) that has none; `cache`
    (False: --no-cache) whether the compile may use the compile cache."""
    from cnnc import compile as compile_program

    started = time.perf_counter()
    if path.endswith(".cnnm"):
        if loss is not None:
            raise CnncError.single(f"--loss changes the program; {path} is compiled already "
                                   "(give its .cnn program, or compile one with a loss line)")
        module = load_module(path, trust=trust)
        if trust == "rebuild" and report is not None:
            report(f"compiled the program stored in {path} again, ignoring its code, in "
                   f"{time.perf_counter() - started:.1f} s")
        if module.target != target and target != "cpu":
            raise CnncError.single(f"{path} is a {module.target} module; compile the .cnn "
                                   f"program with --target {target} to run it there")
        return module
    weights = None
    program: Source | Path = Path(path)
    if loss is not None:
        program, weights = _program_with_loss(path, loss)
    module = compile_program(program, target=target, dtype=dtype, cache=cache)
    if weights:
        module.set_params({name: value.astype(module.dtype) for name, value in weights.items()})
    if report is not None:
        report(f"compiled {path} for {target} in {time.perf_counter() - started:.1f} s")
    return module


def _program_with_loss(path: str, loss: str) -> tuple[Source, dict | None]:
    """The program at `path` (a .cnn file, or the program an .onnx model imports as, with
    its weights) with the line `loss LOSS` added."""
    from cnnc.frontend.source import is_onnx, read_source
    from cnnc.onnx.importer import imported_source, with_loss

    if is_onnx(path):
        return imported_source(path, loss)
    source = read_source(path)
    return Source(with_loss(source.text, loss, path), source.name), None


def output_file(module: Module, suffix: str) -> Path:
    """NETWORK + suffix in the current folder. A network's name is a .cnn identifier (a
    module file's is checked against its program), so it can never name another folder;
    this says so in code, not just in the grammar."""
    if not NETWORK_NAME.fullmatch(module.name):
        raise CnncError.single(f"the network name {module.name!r} cannot name a file; give "
                               "the file names (--out, --checkpoint)")
    return Path(module.name + suffix)


def run_train(args: argparse.Namespace) -> int:
    from cnnc.training.distributed import world_team

    _check_flags(args)  # before any process waits for another
    team = world_team(args.mpi_timeout)  # None: this process trains alone
    if team is None:
        return _train(args, None)
    try:
        return _train(args, team)
    except BaseException as error:  # every rank must stop now, not after a timeout
        if isinstance(error, CnncError):
            message = error.render()
        elif isinstance(error, KeyboardInterrupt):
            message = "interrupted"
        else:
            message = (f"cnnc: internal error: {type(error).__name__}: {error} (this is a bug "
                       "in cnnc; please report it with the program)")
        team.abort(message)
        raise  # not reached: the abort ends this process


def _train(args: argparse.Namespace, team: Any) -> int:
    """`cnnc train` alone (team None) or as one process of an MPI job."""
    from cnnc.training.loop import train

    if team is not None and args.target == "cuda":
        from cnnc.runtime.cuda import select_gpu

        select_gpu(team.local_rank)
    root = team is None or team.is_root
    module = open_network(args.network, target=args.target, trust=_trust(args),
                          report=print if root else None, loss=args.loss,
                          cache=not getattr(args, "no_cache", False))
    if args.weights:  # the starting point: e.g. what `cnnc import` wrote beside a program
        module.load_weights(args.weights)
    if "loss" not in module.manifest:
        raise CnncError.single(f"network {module.name} has no loss line; training needs one")
    options = _train_options(args, module)
    train_data, held_out = load(args.data, args.val_split, options.seed)
    if team is not None and not os.environ.get("CNNC_NUM_THREADS"):
        module.set_threads(max(1, thread_count(None) // team.local_size))  # they share cores
    size = 1 if team is None else team.size
    if root:
        print(_training_line(module, options, train_data, held_out, size), flush=True)
    train(module, train_data, held_out, options, team=team)
    if not root:
        return EXIT_OK
    out = Path(args.out) if args.out else output_file(module, ".weights.npz")
    module.save_weights(out)
    print(f"wrote {out} (checkpoints: {options.checkpoint})")
    return EXIT_OK


def _trust(args: argparse.Namespace) -> str:
    return "rebuild" if getattr(args, "rebuild", False) else "code"


def _train_options(args: argparse.Namespace, module: Module) -> TrainOptions:
    from cnnc.training.loop import TrainOptions

    settings = module.optimizer  # the flags were checked by run_train
    save_best = args.save_best
    if save_best == "":  # --save-best without a file name
        save_best = output_file(module, ".best.weights.npz")
    return TrainOptions(
        epochs=args.epochs if args.epochs is not None else settings.get("epochs") or 1,
        batch=args.batch if args.batch is not None else settings.get("batch") or 64,
        lr=args.lr, seed=args.seed if args.seed is not None else settings.get("seed") or 0,
        max_iter=args.max_iter if args.max_iter is not None else settings.get("max_iter"),
        tol=args.tol if args.tol is not None else settings.get("tol") or 0.0,
        checkpoint=Path(args.checkpoint) if args.checkpoint else
        output_file(module, ".ckpt.npz"),
        resume=Path(args.resume) if args.resume else None, progress=not args.no_progress,
        progress_every=args.progress_every,
        save_best=Path(save_best) if save_best else None,
        log=Path(args.log) if args.log else None)


# (flag, lowest, highest, whether the bounds themselves are allowed, what it expects):
# refused like the language's own options, with the range in the message.
COUNT = "an integer from 1 to 2,147,483,647"
TRAIN_FLAGS = (
    ("epochs", 1, MAX_COUNT, (True, True), COUNT),
    ("batch", 1, MAX_COUNT, (True, True), COUNT),
    ("max_iter", 1, MAX_COUNT, (True, True), COUNT),
    ("seed", 0, 2**63 - 1, (True, True), "an integer from 0 to 2**63 - 1"),
    ("lr", 0.0, math.inf, (False, False), "a finite number above 0"),
    ("tol", 0.0, math.inf, (True, False), "a finite number of at least 0"),
    ("val_split", 0.0, 1.0, (False, False), "a number between 0 and 1 (not including them)"),
    ("progress_every", 0.0, 86400.0, (False, True),
     "a number of seconds above 0, at most 86400"),
    ("mpi_timeout", 0.0, 86400.0 * 7, (False, True),
     "a number of seconds above 0, at most 604800"),
)


def _check_flags(args: argparse.Namespace) -> None:
    for name, low, high, (with_low, with_high), expected in TRAIN_FLAGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        above_low = value >= low if with_low else value > low
        below_high = value <= high if with_high else value < high
        if not (above_low and below_high):  # NaN fails both comparisons
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise CnncError.single(f"--{name.replace('_', '-')} expects {expected}, "
                                   f"got {shown}")


def _training_line(module: Module, options: TrainOptions, train_data: Dataset,
                   held_out: Dataset, processes: int) -> str:
    """What is trained how; under mpirun, what the batch and learning rate mean there."""
    from cnnc.training.schedule import describe

    settings = module.optimizer
    rate = options.lr if options.lr is not None else settings["lr"]
    extras = "".join(f" {k}={settings[k]}" for k in ("momentum", "beta1", "beta2")
                     if k in settings)
    extras += f" weight_decay={settings['weight_decay']}" if settings.get("weight_decay") else ""
    extras += " nesterov" if settings.get("nesterov") else ""
    where, batch = module.target, f"batch {options.batch}"
    if processes > 1:
        threads = f"{module.threads} thread{'s' if module.threads > 1 else ''}"
        where += f", {processes} MPI processes of {threads}"
        extras += " (as given: not scaled with the processes)"
        batch += f" a process = {options.batch * processes} a step"
    extras += f", {describe(settings)}" if describe(settings) else ""
    return (f"training {module.name} on {where}: {settings['kind']} lr={rate}{extras}, "
            f"{batch}, {options.epochs} epochs, {len(train_data):,} samples "
            f"({len(held_out):,} held out)")


def run_eval(args: argparse.Namespace) -> int:
    from cnnc.training.loop import check_data, evaluate

    _check_flags(argparse.Namespace(val_split=args.val_split, seed=args.seed))
    module = open_network(args.network, trust=_trust(args), report=print, loss=args.loss,
                          cache=not getattr(args, "no_cache", False))
    if "loss" not in module.manifest:
        raise CnncError.single(f"network {module.name} has no loss line to evaluate; "
                               "--loss adds one")
    module.load_weights(args.weights)
    seed = args.seed if args.seed is not None else module.optimizer.get("seed") or 0
    data, which = evaluation_data(Path(args.data), args.split, args.val_split, seed)
    check_data(module, data, "evaluation")
    loss, accuracy = evaluate(module, data)
    shown = f", accuracy {accuracy:.2%}" if accuracy is not None else ""
    print(f"{module.name} on {len(data):,} {which}: loss {loss:.4f}{shown}")
    return EXIT_OK


def evaluation_data(path: Path, split: str, val_split: float, seed: int
                    ) -> tuple[Dataset, str]:
    """The samples `cnnc eval --split` scores, and words that say which they are.

    heldout (the default) is what `cnnc train` held out with the same seed and --val-split:
    a folder's t10k files when it has both splits, else the seeded fraction of its one
    split (or of an .npz); train is what it trained on; test the t10k files; all
    everything."""
    kind = data_kind(path)
    if kind == "folder":
        train, test = load_mnist_split(path, "train"), load_mnist_split(path, "test")
        if train is None and test is None:
            load(path)  # raises the error that says what the folder lacks
        if train is not None and test is not None:
            return _both_splits(path, train, test, split)
        whole, files = (train, "train-*") if train is not None else (test, "t10k-*")
        return _one_split(whole, f"{path}'s {files} files", split, val_split, seed)
    if kind == "file":
        if split == "test":
            raise CnncDataError.single(f"{path} is one set of samples with no test split; "
                                       "--split heldout, train or all")
        return _one_split(load_npz(path), str(path), split, val_split, seed)
    return load(path)[1], ""  # raises the right error


def _both_splits(path: Path, train: Dataset, test: Dataset, split: str) -> tuple[Dataset, str]:
    if split in ("heldout", "test"):
        return test, f"held-out samples ({path}'s t10k-* files)"
    if split == "train":
        return train, f"training samples ({path}'s train-* files)"
    return (Dataset(np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y])),
            f"samples (all of {path}: train-* and t10k-* files)")


def _one_split(whole: Dataset, where: str, split: str, val_split: float, seed: int
               ) -> tuple[Dataset, str]:
    if split in ("all", "test"):
        return whole, f"samples (all of {where})"
    trained, held = hold_out(whole, val_split, seed)
    rule = f"--val-split {val_split:g} with seed {seed}"
    if split == "train":
        return trained, f"training samples (those {rule} leaves of the {len(whole):,} in " \
                        f"{where})"
    return held, f"held-out samples ({rule} of the {len(whole):,} in {where}, as train " \
                 "holds them out)"


def run_gradient_check(graph: Graph, source: Source, tolerance: float,
                       samples: int = 1000) -> int:
    from cnnc.driver.modules import compile_module
    from cnnc.training.gradcheck import check_gradients

    if graph.loss is None:
        raise CnncError.single(f"network {graph.name} has no loss line, so no gradients")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise CnncError.single(f"--tolerance must be a finite number above 0, got {tolerance}")
    if not 1 <= samples <= MAX_COUNT:
        raise CnncError.single(f"--samples expects an integer from 1 to 2,147,483,647, got "
                               f"{samples}")
    f64 = graph if graph.dtype.value == "f64" else None
    if f64 is None:
        from cnnc.driver.pipeline import front_end

        f64 = front_end(source, "f64")
    module = Module(compile_module(f64, source, opt_level=1))
    reports = check_gradients(module, samples=samples)
    width = max(len(r.name) for r in reports)
    print(f"{'parameter':<{width}}  relative error  elements checked")
    for report in reports:
        flag = "" if report.worst_relative_error <= tolerance else "  <- above tolerance"
        checked = f"all {report.size:,}" if report.checked == report.size else \
            f"{report.checked:,} of {report.size:,} (sampled)"
        print(f"{report.name:<{width}}  {report.worst_relative_error:.3e}       "
              f"{checked}{flag}")
    failed = [r for r in reports if r.worst_relative_error > tolerance]
    sampled = sum(r.checked < r.size for r in reports)
    note = f"; {sampled} sampled at {samples:,} elements (--samples)" if sampled else \
        "; every element checked"
    print(f"{len(reports) - len(failed)} of {len(reports)} parameters within "
          f"{tolerance:g}{note}")
    return EXIT_FAILED if failed else EXIT_OK
