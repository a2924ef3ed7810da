"""Data-parallel training on MPI: 2 ranks on this machine, under the mpirun that
`pip install 'cnnc[mpi]'` brings (MPICH).

The oracle is single-process training, itself checked against the reference and finite
differences elsewhere: P ranks of batch B see the same samples each step as one process of
batch P·B, so they must end with the same parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import cnnc
from cnnc.cli.main import main
from cnnc.training.distributed import launched_ranks

try:
    import mpi4py  # noqa: F401
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False
# the mpich wheel puts mpirun beside the Python it was installed for, which may not be on PATH
MPIRUN = shutil.which("mpirun") or shutil.which("mpirun", path=str(Path(sys.executable).parent))
needs_mpi = pytest.mark.skipif(not (HAVE_MPI4PY and MPIRUN),
                               reason="needs mpi4py and mpirun: pip install 'cnnc[mpi]'")

NET = ("network t\ninput: 1x8x8\nconv c: 3 3x3 -> relu\nmaxpool 2x2\nflatten\n"
       "dense d: 3 -> softmax\nloss cross_entropy\ntrain {optimizer}\n")
SGD, ADAM = "sgd lr=0.1 momentum=0.9", "adam lr=0.01"
RANK_EXIT_BOUND_S = 30  # a dead rank: MPICH ends the job at once; a hung one: --mpi-timeout


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A folder with the network and 61 samples: 49 to train, so the last global batch of
    every epoch (49 = 8 * 6 + 1) leaves rank 1 with nothing."""
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path / "d.npz", 61)
    return tmp_path


def write_data(path: Path, samples: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.standard_normal((samples, 1, 8, 8)).astype(np.float32),
             y=rng.integers(0, 3, samples))


def write_net(folder: Path, optimizer: str = SGD) -> None:
    (folder / "t.cnn").write_text(NET.format(optimizer=optimizer))


def mpirun(folder: Path, *arguments: str, ranks: int = 2, program: tuple[str, ...] = (),
           timeout: float = 180) -> subprocess.CompletedProcess:
    command = program or (sys.executable, "-m", "cnnc", "train", "t.cnn", "--data", "d.npz",
                          "--no-progress")
    return subprocess.run([MPIRUN, "-n", str(ranks), *command, *arguments], cwd=folder,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CNNC_NUM_THREADS": "1"})


def alone(*arguments: str) -> int:
    return main(["train", "t.cnn", "--data", "d.npz", "--no-progress", *arguments])


def assert_same_weights(got: Path, want: Path) -> None:
    got_arrays, want_arrays = np.load(got), np.load(want)
    assert sorted(got_arrays.files) == sorted(want_arrays.files)
    for name in want_arrays.files:
        np.testing.assert_allclose(got_arrays[name], want_arrays[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)


@needs_mpi
@pytest.mark.parametrize(("optimizer", "samples"), [(SGD, 61), (ADAM, 61), (SGD, 56)])
def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(job, optimizer, samples):
    """61 samples: 49 to train, the last step of an epoch 1 sample (shares of 1 and 0); 56:
    45 to train, the last step 5 samples (shares of 3 and 2)."""
    write_net(job, optimizer)
    write_data(job / "d.npz", samples)
    run = mpirun(job, "--epochs", "2", "--batch", "4", "--out", "two.npz")
    assert run.returncode == 0, run.stderr
    assert "2 MPI processes of 1 thread" in run.stdout
    assert "batch 4 a process = 8 a step" in run.stdout
    assert "all 2 ranks hold identical parameters" in run.stdout
    assert run.stdout.count("epoch 2/2") == 1  # rank 0 alone reports
    assert alone("--epochs", "2", "--batch", "8", "--out", "one.npz",
                 "--checkpoint", "one.ckpt.npz") == 0
    assert_same_weights(job / "two.npz", job / "one.npz")
    initial = cnnc.compile(job / "t.cnn").params
    assert not np.allclose(initial["d.weight"], np.load("two.npz")["d.weight"], atol=1e-3)
    state = np.load("t.ckpt.npz")
    np.testing.assert_array_equal(state["state/optimizer.step"], 14 if samples == 61 else 12)
    meta = json.loads(state["meta"].tobytes())
    assert meta["ranks"] == 2 and meta["global_batch"] == 8


WORKER = '''
import json, sys
import numpy as np
import cnnc
from mpi4py import MPI
from cnnc.training.data import load
from cnnc.training.distributed import CnncDistributedError, MpiTeam, train_data_parallel
from cnnc.training.loop import TrainOptions

rank = MPI.COMM_WORLD.Get_rank()
module = cnnc.compile("t.cnn", threads=1)
first = module.params
train, held_out = load("d.npz", 0.2, 0)
result = train_data_parallel(module, train, held_out, TrainOptions(epochs=2, batch=3,
                             progress=False, checkpoint=None), report=lambda line: None)
np.savez(f"rank{rank}.npz", **module.params)
np.savez(f"first{rank}.npz", **first)
# every field but each rank's own timing
json.dump([{k: v for k, v in vars(e).items() if k != "time"} for e in result.history]
          + [result.steps], open(f"result{rank}.json", "w"))
if rank == 1:  # a rank whose parameters differ must be caught
    module.set_params({"d.bias": module.params["d.bias"] + 1})
try:
    MpiTeam(MPI.COMM_WORLD).finish(module)
    outcome = "not caught"
except CnncDistributedError as error:
    outcome = f"caught: {error}"
open(f"outcome{rank}.txt", "w").write(outcome)
'''


@needs_mpi
def test_every_rank_ends_identical_and_a_difference_is_caught(job):
    write_net(job)
    (job / "worker.py").write_text(WORKER)
    run = mpirun(job, program=(sys.executable, "worker.py"))
    assert run.returncode == 0, run.stderr
    for rank in (0, 1):
        assert (job / f"outcome{rank}.txt").read_text().startswith(
            f"caught: error: the ranks hold different parameters (rank {rank}: ")
    ranks = [np.load(job / f"rank{r}.npz") for r in (0, 1)]
    for name in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
        assert not np.array_equal(ranks[0][name], np.load(job / "first0.npz")[name])
    results = [json.loads((job / f"result{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1] and results[0][-1] == 2 * 9  # ceil(49 / 6) steps


def _rank_pid(marker: str, rank: int, deadline: float) -> int:
    """The process mpirun started as `rank` of the job whose environment holds `marker`."""
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environment = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in environment and f"PMI_RANK={rank}".encode() in environment:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process found")


def _start_long_job(folder: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    marker = f"CNNC_TEST_JOB={uuid.uuid4().hex}"
    key, value = marker.split("=")
    process = subprocess.Popen(
        [MPIRUN, "-n", "2", sys.executable, "-m", "cnnc", "train", "t.cnn", "--data", "d.npz",
         "--no-progress", "--epochs", "100000", "--batch", "4", "--checkpoint", "ck.npz",
         *extra], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CNNC_NUM_THREADS": "1", key: value})
    deadline = time.monotonic() + 120
    while not (folder / "ck.npz").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    return process, marker


def _resumes_in_one_process(folder: Path) -> None:
    """The last checkpoint is whole: one more epoch from it runs."""
    with np.load(folder / "ck.npz") as checkpoint:
        epoch = json.loads(checkpoint["meta"].tobytes())["epoch"]
    assert alone("--epochs", str(epoch + 1), "--batch", "8", "--resume", "ck.npz",
                 "--checkpoint", "after.npz", "--out", "w.npz") == 0


@needs_mpi
@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_rank_ends_the_job_and_the_checkpoint_survives(job, capsys, rank):
    """Rank 0 writes the checkpoints, maybe at the moment it is killed."""
    write_net(job)
    process, marker = _start_long_job(job)
    time.sleep(0.5)  # mid-training, past the first checkpoint
    os.kill(_rank_pid(marker, rank, time.monotonic() + 10), signal.SIGKILL)
    killed = time.monotonic()
    process.communicate(timeout=RANK_EXIT_BOUND_S + 30)
    assert process.returncode != 0
    assert time.monotonic() - killed < RANK_EXIT_BOUND_S
    _resumes_in_one_process(job)
    assert "epoch" in capsys.readouterr().out


@needs_mpi
def test_a_hung_rank_ends_the_job_after_the_timeout(job, capsys):
    write_net(job)
    process, marker = _start_long_job(job, "--mpi-timeout", "3")
    time.sleep(0.5)
    hung = _rank_pid(marker, 1, time.monotonic() + 10)
    os.kill(hung, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=RANK_EXIT_BOUND_S + 30)
    finally:
        if process.poll() is None:
            os.kill(hung, signal.SIGCONT)
            process.kill()
    assert process.returncode != 0
    assert 3 <= time.monotonic() - stopped < RANK_EXIT_BOUND_S
    assert "rank 0 of 2: error: no answer from the other ranks for 3 s" in stderr
    assert "the last checkpoint is intact" in stderr
    _resumes_in_one_process(job)
    capsys.readouterr()


@needs_mpi
def test_resume_across_rank_counts_continues_as_one_run(job):
    """Epoch 1 on 2 ranks then epoch 2 in 1 process, and the reverse, each equal to 2
    epochs in one process at the same global batch."""
    write_net(job, ADAM)
    assert alone("--epochs", "2", "--batch", "8", "--out", "straight.npz",
                 "--checkpoint", "straight.ckpt.npz") == 0
    run = mpirun(job, "--epochs", "1", "--batch", "4", "--checkpoint", "by2.npz")
    assert run.returncode == 0, run.stderr
    assert alone("--epochs", "2", "--batch", "8", "--resume", "by2.npz",
                 "--checkpoint", "then1.ckpt.npz", "--out", "then1.npz") == 0
    assert_same_weights(job / "then1.npz", job / "straight.npz")
    assert alone("--epochs", "1", "--batch", "8", "--checkpoint", "by1.npz",
                 "--out", "unused.npz") == 0
    run = mpirun(job, "--epochs", "2", "--batch", "4", "--resume", "by1.npz",
                 "--checkpoint", "then2.ckpt.npz", "--out", "then2.npz")
    assert run.returncode == 0, run.stderr
    assert "epoch 2/2" in run.stdout and "epoch 1/2" not in run.stdout
    assert_same_weights(job / "then2.npz", job / "straight.npz")


@needs_mpi
def test_a_bad_checkpoint_on_rank_0_stops_every_rank(job):
    write_net(job)
    (job / "bad.npz").write_bytes(b"not a checkpoint")
    run = mpirun(job, "--resume", "bad.npz", timeout=60)
    assert run.returncode != 0
    assert "cannot resume from bad.npz" in run.stderr
    assert "Traceback" not in run.stderr


def test_under_mpirun_without_mpi4py_the_error_says_how_to_install_it(job, monkeypatch,
                                                                      capsys):
    write_net(job)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails as if not installed
    assert alone() == 1
    error = capsys.readouterr().err
    assert "started as 2 MPI processes, but mpi4py cannot be imported" in error
    assert "pip install 'cnnc[mpi]'" in error


def test_launchers_are_recognised_and_alone_trains_as_before(job, monkeypatch, capsys):
    for variable in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    assert launched_ranks() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_ranks() == 4
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # not needed when not under mpirun
    write_net(job)
    assert alone("--epochs", "1") == 0
    assert "MPI" not in capsys.readouterr().out
    assert alone("--mpi-timeout", "0") == 1
    assert "--mpi-timeout expects a number of seconds above 0, at most 604800, got 0" in \
        capsys.readouterr().err


@needs_mpi
def test_an_overflow_stops_every_rank_with_the_layer_named(job):
    (job / "t.cnn").write_text("network blowup\ninput: 4\ndense h: 16 -> relu\ndense out: 2\n"
                               "loss mse\ntrain sgd lr=1e30\n")
    rng = np.random.default_rng(0)
    np.savez(job / "d.npz", x=rng.standard_normal((32, 4)).astype(np.float32) * 100,
             y=rng.standard_normal((32, 2)).astype(np.float32))
    (job / "ck.npz").write_bytes(b"previous checkpoint")
    run = mpirun(job, "--checkpoint", "ck.npz", "--epochs", "3", "--batch", "2", timeout=60)
    assert run.returncode != 0
    assert "of 2: error: training stopped at epoch 1, step " in run.stderr
    assert "not finite appear in the" in run.stderr and "Traceback" not in run.stderr
    assert (job / "ck.npz").read_bytes() == b"previous checkpoint"


@needs_mpi
def test_two_ranks_on_the_cuda_target_equal_one_cpu_process(job):
    """In Numba's CUDA simulator here (each rank takes GPU local rank % GPUs on a machine
    with GPUs); two steps, as the simulator is slow."""
    write_net(job)
    run = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-m", "cnnc", "train", "t.cnn",
                          "--data", "d.npz", "--no-progress", "--target", "cuda", "--batch",
                          "4", "--max-iter", "2", "--out", "gpu.npz"], cwd=job,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CNNC_NUM_THREADS": "1",
                              "NUMBA_ENABLE_CUDASIM": os.environ.get("NUMBA_ENABLE_CUDASIM",
                                                                     "1")})
    assert run.returncode == 0, run.stderr
    assert "on cuda, 2 MPI processes" in run.stdout
    assert alone("--batch", "8", "--max-iter", "2", "--out", "cpu.npz",
                 "--checkpoint", "cpu.ckpt.npz") == 0
    assert_same_weights(job / "gpu.npz", job / "cpu.npz")


def _mpmd(folder: Path, first: list[str], second: list[str], timeout: float = 120
          ) -> subprocess.CompletedProcess:
    """Rank 0 runs `cnnc train` with `first`, rank 1 with `second` (MPI's MPMD form)."""
    train = [sys.executable, "-m", "cnnc", "train", "t.cnn", "--no-progress"]
    return subprocess.run([MPIRUN, "-n", "1", *train, *first, ":", "-n", "1", *train,
                           *second], cwd=folder, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CNNC_NUM_THREADS": "1"})


@needs_mpi
def test_an_error_on_one_rank_stops_the_job_at_once(job):
    write_net(job)
    started = time.monotonic()
    run = _mpmd(job, ["--data", "d.npz"], ["--data", "missing.npz"])
    assert run.returncode != 0
    assert time.monotonic() - started < 60  # not the 120 s of --mpi-timeout
    assert "rank 1 of 2: error: no data at missing.npz" in run.stderr
    assert "Traceback" not in run.stderr


@needs_mpi
def test_ranks_given_different_data_or_options_refuse_to_train(job):
    write_net(job)
    write_data(job / "other.npz", 61, seed=1)
    run = _mpmd(job, ["--data", "d.npz"], ["--data", "other.npz"])
    assert run.returncode != 0
    assert "were not given the same training data and held-out data" in run.stderr
    run = _mpmd(job, ["--data", "d.npz", "--lr", "0.1"], ["--data", "d.npz", "--lr", "0.2"])
    assert run.returncode != 0 and "not given the same training options" in run.stderr
    assert not (job / "t.weights.npz").exists()


@needs_mpi
def test_tol_stops_every_rank_at_the_step_one_process_stops(job, capsys):
    write_net(job, "sgd lr=0.0000001")
    assert alone("--epochs", "3", "--batch", "8", "--tol", "1e-3", "--out", "one.npz",
                 "--checkpoint", "one.ckpt.npz") == 0
    assert "stopped early: tol reached after 1 steps" in capsys.readouterr().out
    run = mpirun(job, "--epochs", "3", "--batch", "4", "--tol", "1e-3", "--out", "two.npz")
    assert run.returncode == 0, run.stderr
    assert "stopped early: tol reached after 1 steps" in run.stdout
    assert_same_weights(job / "two.npz", job / "one.npz")


def test_a_launcher_of_another_mpi_is_refused(job):
    """Open MPI's mpirun with mpi4py built for MPICH: each process sees a world of 1."""
    if not HAVE_MPI4PY:
        pytest.skip("mpi4py is not installed: pip install 'cnnc[mpi]'")
    write_net(job)
    run = subprocess.run([sys.executable, "-m", "cnnc", "train", "t.cnn", "--data", "d.npz"],
                         cwd=job, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMPI_COMM_WORLD_SIZE": "2"})
    assert run.returncode == 1
    assert "mpirun started 2 processes, but mpi4py's MPI sees 1" in run.stderr


@pytest.mark.parametrize("line, kind", [("batchnorm b", "batch norm"), ("dropout 0.5", "dropout")])
def test_networks_with_training_state_are_refused_before_any_step(line, kind):
    """Nothing shares batch norm's running statistics or dropout's masks between ranks yet:
    such a network is refused with the reason, not trained into a wrong inference."""
    from cnnc.training.distributed import CnncDistributedError, _refuse_training_state

    module = cnnc.compile(f"network t\ninput x: 4\n{line}\ndense d: 2\nloss mse\n",
                          opt_level=0)
    with pytest.raises(CnncDistributedError, match=f"network t has {kind}, which data-"):
        _refuse_training_state(module)
    _refuse_training_state(cnnc.compile("network t\ninput x: 4\ndense d: 2\nloss mse\n",
                                        opt_level=0))  # nothing to refuse
