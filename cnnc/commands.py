"""The work behind `cnnc train`, `cnnc eval` and `cnnc check --grad`."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import Dataset, load, load_mnist_split, load_npz
from .diagnostics import CnncError, Source
from .ir import Graph
from .runtime import Module, thread_count
from .runtime import load as load_module

if TYPE_CHECKING:
    from .train import TrainOptions

EXIT_OK, EXIT_FAILED = 0, 1


def open_network(path: str, dtype: str | None = None, target: str = "cpu") -> Module:
    """A compiled module file as it is, or a .cnn program compiled now for `target`."""
    from . import compile as compile_program

    if path.endswith(".cnnm"):
        module = load_module(path)
        if module.target != target and target != "cpu":
            raise CnncError.single(f"{path} is a {module.target} module; compile the .cnn "
                                   f"program with --target {target} to run it there")
        return module
    return compile_program(Path(path), target=target, dtype=dtype)


def run_train(args: argparse.Namespace) -> int:
    from .distributed import world_team

    if not (math.isfinite(args.mpi_timeout) and args.mpi_timeout > 0):
        raise CnncError.single("--mpi-timeout must be a number of seconds above 0")
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
    from .train import train

    if team is not None and args.target == "cuda":
        from .runtime_cuda import select_gpu

        select_gpu(team.local_rank)
    module = open_network(args.network, target=args.target)
    if "loss" not in module.manifest:
        raise CnncError.single(f"network {module.name} has no loss line; training needs one")
    options = _train_options(args, module)
    train_data, held_out = load(args.data, args.val_split, options.seed)
    if team is not None and not os.environ.get("CNNC_NUM_THREADS"):
        module.set_threads(max(1, thread_count(None) // team.local_size))  # they share cores
    size = 1 if team is None else team.size
    if team is None or team.is_root:
        print(_training_line(module, options, train_data, held_out, size))
    train(module, train_data, held_out, options, team=team)
    if team is not None and not team.is_root:
        return EXIT_OK
    out = Path(args.out or f"{module.name}.weights.npz")
    module.save_weights(out)
    print(f"wrote {out} (checkpoints: {options.checkpoint})")
    return EXIT_OK


def _train_options(args: argparse.Namespace, module: Module) -> TrainOptions:
    from .train import TrainOptions

    settings = module.optimizer
    options = TrainOptions(
        epochs=args.epochs if args.epochs is not None else settings.get("epochs") or 1,
        batch=args.batch if args.batch is not None else settings.get("batch") or 64,
        lr=args.lr, seed=args.seed if args.seed is not None else settings.get("seed") or 0,
        max_iter=args.max_iter if args.max_iter is not None else settings.get("max_iter"),
        tol=args.tol if args.tol is not None else settings.get("tol") or 0.0,
        checkpoint=Path(args.checkpoint or f"{module.name}.ckpt.npz"),
        resume=Path(args.resume) if args.resume else None, progress=not args.no_progress)
    if (min(options.epochs, options.batch, options.max_iter or 1) < 1 or options.seed < 0
            or not math.isfinite(options.tol) or options.tol < 0
            or (options.lr is not None and not (math.isfinite(options.lr) and options.lr > 0))):
        raise CnncError.single("--epochs, --batch and --max-iter must be at least 1, --seed at "
                               "least 0, --lr a finite number above 0 and --tol at least 0")
    return options


def _training_line(module: Module, options: TrainOptions, train_data: Dataset,
                   held_out: Dataset, processes: int) -> str:
    """What is trained how; under mpirun, what the batch and learning rate mean there."""
    settings = module.optimizer
    rate = options.lr if options.lr is not None else settings["lr"]
    extras = "".join(f" {k}={settings[k]}" for k in ("momentum", "beta1", "beta2")
                     if k in settings)
    where, batch = module.target, f"batch {options.batch}"
    if processes > 1:
        threads = f"{module.threads} thread{'s' if module.threads > 1 else ''}"
        where += f", {processes} MPI processes of {threads}"
        extras += " (as given: not scaled with the processes)"
        batch += f" a process = {options.batch * processes} a step"
    return (f"training {module.name} on {where}: {settings['kind']} lr={rate}{extras}, "
            f"{batch}, {options.epochs} epochs, {len(train_data):,} samples "
            f"({len(held_out):,} held out)")


def run_eval(args: argparse.Namespace) -> int:
    from .train import check_data, evaluate

    module = open_network(args.network)
    if "loss" not in module.manifest:
        raise CnncError.single(f"network {module.name} has no loss line to evaluate")
    module.load_weights(args.weights)
    data = _evaluation_data(Path(args.data))
    check_data(module, data, "evaluation")
    loss, accuracy = evaluate(module, data)
    shown = f", accuracy {accuracy:.2%}" if accuracy is not None else ""
    print(f"{module.name} on {len(data):,} samples: loss {loss:.4f}{shown}")
    return EXIT_OK


def _evaluation_data(path: Path) -> Dataset:
    """An MNIST folder's test split (its train split if that is all), or a whole .npz."""
    if path.is_dir():
        for split in ("test", "train"):
            data = load_mnist_split(path, split)
            if data is not None:
                return data
    elif path.is_file():
        return load_npz(path)
    return load(path)[1]  # raises the right error


def run_gradient_check(graph: Graph, source: Source, tolerance: float) -> int:
    from .gradcheck import check_gradients
    from .pipeline import compile_module

    if graph.loss is None:
        raise CnncError.single(f"network {graph.name} has no loss line, so no gradients")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise CnncError.single(f"--tolerance must be a finite number above 0, got {tolerance}")
    f64 = graph if graph.dtype.value == "f64" else None
    if f64 is None:
        from .pipeline import front_end

        f64 = front_end(source, "f64")
    module = Module(compile_module(f64, opt_level=1))
    reports = check_gradients(module)
    width = max(len(r.name) for r in reports)
    print(f"{'parameter':<{width}}  relative error  (elements checked)")
    for report in reports:
        flag = "" if report.worst_relative_error <= tolerance else "  <- above tolerance"
        print(f"{report.name:<{width}}  {report.worst_relative_error:.3e}  "
              f"({report.checked}){flag}")
    failed = [r for r in reports if r.worst_relative_error > tolerance]
    print(f"{len(reports) - len(failed)} of {len(reports)} parameters within {tolerance:g}")
    return EXIT_FAILED if failed else EXIT_OK
