"""The fuzzer's findings against the `cnnc` command, each kept as a regression test: output
that cannot be written, writes that fail midway, permissions, leftover temporary files,
paths too long or impossible, Ctrl-C during training, flag ranges, mutated programs.

Whatever goes wrong, the promise is an exit code of 1 (2 for usage, 130 for Ctrl-C) with a
one-line message, nothing half-written, and never a traceback or a native crash. Most of
these run the real command in a subprocess, since what fails is the process's own file
descriptors, limits and signals.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic import SMALL, synthetic

import cnnc
from cnnc.cli.main import main
from conftest import EXAMPLES, run_cli

CNNC = (sys.executable, "-m", "cnnc")
LENET = str(EXAMPLES / "lenet.cnn")
LONG = "a" * 5000  # longer than any path the system takes (PATH_MAX is 4096)
TIMEOUT = 120


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """small.cnn, its module file and a dataset, made once."""
    folder = tmp_path_factory.mktemp("shared")
    (folder / "small.cnn").write_text(SMALL)
    cnnc.compile(SMALL, opt_level=1).save(folder / "small.cnnm")
    data = synthetic(80, 5)
    np.savez(folder / "d.npz", x=data.x, y=data.y)
    return folder


@pytest.fixture
def work(tmp_path, shared, monkeypatch) -> Path:
    """A fresh current folder holding copies of the shared files."""
    for name in ("small.cnn", "small.cnnm", "d.npz"):
        (tmp_path / name).write_bytes((shared / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cnnc_run(*args: str | bytes, cwd: Path | None = None, **options) -> subprocess.CompletedProcess:
    """The command in a subprocess; stdout and stderr captured as bytes unless redirected."""
    options.setdefault("stdout", subprocess.PIPE)
    options.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([*CNNC, *args], cwd=cwd, timeout=TIMEOUT, check=False, **options)


def text_of(stream: bytes | str | None) -> str:
    if isinstance(stream, bytes):
        return stream.decode("utf-8", errors="backslashreplace")
    return stream or ""


def assert_clean(stderr: bytes | str | None) -> None:
    err = text_of(stderr)
    assert "Traceback" not in err and "internal error" not in err, err
    assert "Exception ignored" not in err, err  # a failed flush as the interpreter exits


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    """Exit 1 and exactly `error: EXPECTED` on stderr (EXPECTED may end with "...": then
    the message starts with it)."""
    err = text_of(result.stderr)
    assert result.returncode == 1, (result.returncode, err)
    assert_clean(err)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    if expected.endswith("..."):
        assert err.startswith(f"error: {expected[:-3]}"), err
    else:
        assert err == f"error: {expected}\n"


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def close_stdout() -> None:
    os.close(1)


# --- output streams ----------------------------------------------------------------------

PRINTING = {  # commands whose whole output goes to stdout, some of it a lot
    "check": ("check", "small.cnn"),
    "summary": ("summary", LENET),
    "loops": ("compile", LENET, "--emit", "loops", "-O1"),  # about 100 KB
    "inspect": ("inspect", "small.cnnm"),
    "version": ("--version",),
}


@pytest.mark.parametrize("command", PRINTING)
def test_closed_stdout_is_one_line_and_exit_1(work, command):
    result = cnnc_run(*PRINTING[command], cwd=work, stdout=subprocess.DEVNULL,
                      preexec_fn=close_stdout)
    assert_one_line_error(result, "cannot write to standard output: it is closed")


@pytest.mark.parametrize("command", PRINTING)
def test_full_stdout_is_one_line_and_exit_1(work, command):
    with open("/dev/full", "wb") as full:
        result = cnnc_run(*PRINTING[command], cwd=work, stdout=full)
    assert_one_line_error(result, "cannot write to standard output: No space left on device")


def test_stdout_that_cannot_encode_the_file_name(work):
    (work / "ü.cnn").write_text(SMALL)
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = cnnc_run("check", "ü.cnn", cwd=work, env=env)
    assert_one_line_error(result, "cannot write to standard output: its encoding (ascii) "
                                  "cannot show '\\xfc'; set PYTHONIOENCODING=utf-8")
    # an error message naming such a file still gets through, escaped
    (work / "réseau.cnn").write_text("network n\ninput: 1x4x4\nconv c: 2 9x9\n")
    result = cnnc_run("check", "réseau.cnn", cwd=work, env=env)
    assert result.returncode == 1 and result.stdout == b""
    assert_clean(result.stderr)
    assert result.stderr.startswith(b"r\\xe9seau.cnn:3:1: error: conv c needs an input")


def test_undecodable_file_names_are_printed_as_their_bytes(work):
    """A name that is not UTF-8 reaches Python with surrogates for its bytes (PEP 383);
    stdout gives the bytes back instead of failing on them, as `ls` does."""
    name = b"\xff.cnn"
    (work / os.fsdecode(name)).write_text(SMALL)
    result = cnnc_run("check", name, cwd=work, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"\xff.cnn: ok: network small")


@pytest.mark.parametrize("command", ["check", "loops"])
def test_a_reader_that_stopped_reading_is_not_an_error(work, command):
    """`cnnc ... | head`: the pipe's reader is gone before the output is written."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = cnnc_run(*PRINTING[command], cwd=work, stdout=writer)
    finally:
        os.close(writer)
    assert result.returncode == 0 and result.stderr == b""  # no "Exception ignored" either


@pytest.mark.parametrize("argv, code", [(["frobnicate"], 2), (["check", "absent.cnn"], 1)])
def test_the_exit_code_survives_a_full_stderr(work, argv, code):
    with open("/dev/full", "wb") as full:
        result = cnnc_run(*argv, cwd=work, stderr=full)
    assert result.returncode == code


class FullStream:
    """A stream on a full disk that counts the writes tried on it."""

    def __init__(self) -> None:
        self.tries = 0

    def write(self, text: str) -> int:
        self.tries += 1
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_a_full_stderr_does_not_stop_training(work, monkeypatch, capsys):
    """stderr only carries progress and messages: losing them must not lose the run."""
    full = FullStream()
    monkeypatch.setattr(sys, "stderr", full)
    code = main(["train", "small.cnn", "--data", "d.npz", "--epochs", "2", "--batch", "1",
                 "--progress-every", "0.000001", "--out", "w.npz"])
    assert full.tries > 0  # progress lines were tried, and failed
    assert code == 0 and (work / "w.npz").exists()
    assert "wrote w.npz" in capsys.readouterr().out


def test_closed_stderr_does_not_stop_training(work):
    result = cnnc_run("train", "small.cnn", "--data", "d.npz", "--epochs", "2", "--batch", "1",
                      "--progress-every", "0.000001", "--out", "w.npz", cwd=work,
                      stderr=subprocess.DEVNULL, preexec_fn=lambda: os.close(2))
    assert result.returncode == 0
    assert b"wrote w.npz" in result.stdout and (work / "w.npz").exists()


# --- writes that fail midway -------------------------------------------------------------

def file_size_limit(limit: int):
    """For preexec_fn: files may grow to `limit` bytes; past it, a write fails with EFBIG.
    (Python ignores SIGXFSZ itself; ignoring it here too says so, before the exec.)"""
    def limit_in_child() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return limit_in_child


KNOWN = b"known previous contents\n" * 8  # 192 bytes: under every limit used here


@pytest.mark.parametrize("output, args", [
    ("l.txt", ("compile", "small.cnn", "--emit", "loops", "-O1", "-o", "l.txt")),  # 25 KB
    ("m.cnnm", ("compile", "small.cnn", "-O1", "-o", "m.cnnm")),  # about 380 KB
], ids=["emit", "module"])
def test_a_write_cut_short_leaves_the_old_file_whole(work, output, args):
    (work / output).write_bytes(KNOWN)
    result = cnnc_run(*args, cwd=work, preexec_fn=file_size_limit(4096))
    assert_one_line_error(result, f"cannot write {output}: File too large")
    assert (work / output).read_bytes() == KNOWN
    assert temporaries(work) == []


def test_training_whose_checkpoint_cannot_be_written(work):
    (work / "c.npz").write_bytes(KNOWN)
    result = cnnc_run("train", "small.cnn", "--data", "d.npz", "--epochs", "2", "--no-progress",
                      "--checkpoint", "c.npz", "--out", "w.npz", cwd=work,
                      preexec_fn=file_size_limit(512))  # the checkpoint is about 2 KB
    assert_one_line_error(result, "cannot write c.npz: File too large")
    assert (work / "c.npz").read_bytes() == KNOWN
    assert not (work / "w.npz").exists() and temporaries(work) == []


def test_training_whose_weights_cannot_be_written(work):
    (work / "w.npz").write_bytes(KNOWN)
    result = cnnc_run("train", "small.cnn", "--data", "d.npz", "--epochs", "1", "--no-progress",
                      "--checkpoint", "/dev/null", "--out", "w.npz", cwd=work,
                      preexec_fn=file_size_limit(512))  # /dev/null has no size limit
    assert_one_line_error(result, "cannot write w.npz: File too large")
    assert (work / "w.npz").read_bytes() == KNOWN and temporaries(work) == []


STUCK_WRITER = """
import os, sys, time
from cnnc.support.files import write_atomically

real_write = os.write

def stuck(handle, data):  # the first bytes, then hang until killed
    written = real_write(handle, bytes(data[:10]))
    print("writing", flush=True)
    time.sleep(TIMEOUT)
    return written

os.write = stuck
write_atomically(sys.argv[1], b"new contents " * 100)
""".replace("TIMEOUT", str(TIMEOUT))


def test_a_writer_killed_midway_leaves_a_temporary_that_the_next_write_removes(work, capsys):
    (work / "l.txt").write_bytes(KNOWN)
    child = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, "l.txt"], cwd=work,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        child.kill()
        child.wait()
    assert (work / "l.txt").read_bytes() == KNOWN
    [left] = temporaries(work)  # a SIGKILL leaves no chance to clean up
    assert re.fullmatch(rf"\.l\.txt\.{child.pid}\.[0-9a-f]{{8}}\.tmp", left)
    code, _, _ = run_cli(capsys, "compile", "small.cnn", "--emit", "ir", "-o", "l.txt")
    assert code == 0 and temporaries(work) == []
    assert (work / "l.txt").read_text().startswith("graph small dtype=f32\n")


# --- permissions -------------------------------------------------------------------------

WRITER = """
import sys
import cnnc
from cnnc.cli.main import main

codes = [
    main(["compile", "small.cnn", "-O1", "-o", "m.cnnm"]),
    main(["compile", "small.cnn", "--emit", "ir", "-o", "ir.txt"]),
    main(["train", "small.cnn", "--data", "d.npz", "--epochs", "1", "--no-progress",
          "--out", "w.npz", "--checkpoint", "c.npz", "--log", "log.jsonl",
          "--save-best", "best.npz"]),
]
cnnc.load("m.cnnm").save_weights("saved.npz")
print("codes", codes, file=sys.stderr)
"""
WRITTEN = ("m.cnnm", "ir.txt", "w.npz", "c.npz", "log.jsonl", "best.npz", "saved.npz")


def write_everything(folder: Path, umask: int) -> None:
    result = subprocess.run([sys.executable, "-c", WRITER], cwd=folder, capture_output=True,
                            text=True, timeout=TIMEOUT, check=False,
                            preexec_fn=lambda: os.umask(umask))
    assert result.returncode == 0 and "codes [0, 0, 0]" in result.stderr, result.stderr


def modes(folder: Path) -> dict[str, int]:
    return {name: stat.S_IMODE((folder / name).stat().st_mode) for name in WRITTEN}


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_written_files_get_the_umasks_permissions(work, umask):
    write_everything(work, umask)
    expected = 0o666 & ~umask  # what open() gives a new file
    assert modes(work) == dict.fromkeys(WRITTEN, expected)
    assert temporaries(work) == []


def test_rewritten_files_keep_their_mode(work):
    for name in WRITTEN:
        (work / name).write_bytes(b"before")
        (work / name).chmod(0o640)
    write_everything(work, 0o077)  # a new file would get 0600
    assert modes(work) == dict.fromkeys(WRITTEN, 0o640)
    assert (work / "ir.txt").read_text().startswith("graph small")


# --- devices, links and odd paths --------------------------------------------------------

def test_emit_to_dev_null_keeps_the_device(work, capsys):
    before = os.stat("/dev/null")
    code, out, err = run_cli(capsys, "compile", "small.cnn", "--emit", "ir", "-o", "/dev/null")
    assert (code, out, err) == (0, "", "")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


def test_emit_to_dev_stdout_when_stdout_is_a_pipe(work, capsys):
    code, expected, _ = run_cli(capsys, "compile", "small.cnn", "--emit", "ir")
    assert code == 0
    result = cnnc_run("compile", "small.cnn", "--emit", "ir", "-o", "/dev/stdout", cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected


def test_emit_through_a_symlink(work, capsys):
    (work / "real.txt").write_text("old")
    (work / "link.txt").symlink_to("real.txt")
    code, _, _ = run_cli(capsys, "compile", "small.cnn", "--emit", "ir", "-o", "link.txt")
    assert code == 0 and (work / "link.txt").is_symlink()
    assert (work / "real.txt").read_text().startswith("graph small dtype=f32\n")


def test_long_paths_in_a_subprocess(work):
    before = sorted(os.listdir(work))
    assert_one_line_error(cnnc_run("check", LONG, cwd=work),
                          f"cannot read {LONG}: file name too long")
    assert_one_line_error(cnnc_run("train", "small.cnn", "--data", LONG, cwd=work),
                          "cannot read aaaa...")
    assert sorted(os.listdir(work)) == before  # no checkpoint, no weights


@pytest.mark.parametrize("argv, expected", [
    (["check", LONG], f"cannot read {LONG}: file name too long"),
    (["summary", LONG + ".cnnm"], f"cannot load {LONG}.cnnm: File name too long"),
    (["inspect", LONG], f"cannot load {LONG}: File name too long"),
    (["compile", "small.cnn", "--emit", "ir", "-o", LONG], f"cannot write {LONG}: File name "
                                                           "too long"),
    (["eval", "small.cnn", "--weights", LONG, "--data", "d.npz"], "cannot read weights from "
                                                                  "aaaa..."),
    (["train", "small.cnn", "--data", "d.npz", "--resume", LONG, "--no-progress"],
     f"cannot resume from {LONG}..."),
    (["train", "small.cnn", "--data", "d.npz", "--epochs", "1", "--no-progress",
      "--checkpoint", LONG], f"cannot write {LONG}: File name too long"),
], ids=["check", "summary", "inspect", "emit", "eval", "resume", "checkpoint"])
def test_long_paths(work, capsys, argv, expected):
    code, out, err = run_cli(capsys, *argv)
    result = subprocess.CompletedProcess(argv, code, out, err)
    assert_one_line_error(result, expected)


NUL_CASES = [
    (["check", "a\0b.cnn"], "cannot read a\\x00b.cnn: the path contains a NUL byte"),
    (["summary", "a\0b.cnnm"], "cannot read a\\x00b.cnnm: the path contains a NUL byte"),
    (["inspect", "a\0b"], "cannot read a\\x00b: the path contains a NUL byte"),
    (["compile", "small.cnn", "--emit", "ir", "-o", "x\0y"],
     "cannot write x\\x00y: the path contains a NUL byte"),
    (["compile", "small.cnn", "-O1", "-o", "x\0y"],
     "cannot write x\\x00y: the path contains a NUL byte"),
    (["train", "small.cnn", "--data", "d\0.npz"],
     "cannot read d\\x00.npz: the path contains a NUL byte"),
    (["train", "small.cnn", "--data", "d.npz", "--out", "w\0.npz"],
     "cannot write w\\x00.npz: the path contains a NUL byte"),
    (["train", "small.cnn", "--data", "d.npz", "--checkpoint", "c\0.npz"],
     "cannot write c\\x00.npz: the path contains a NUL byte"),
    (["train", "small.cnn", "--data", "d.npz", "--log", "l\0.jsonl"],
     "cannot write l\\x00.jsonl: the path contains a NUL byte"),
    (["train", "small.cnn", "--data", "d.npz", "--save-best", "b\0.npz"],
     "cannot write b\\x00.npz: the path contains a NUL byte"),
    (["eval", "small.cnn", "--weights", "w\0.npz", "--data", "d.npz"],
     "cannot read w\\x00.npz: the path contains a NUL byte"),
    (["plot", "log.jsonl", "-o", "x\0.png"], "cannot write x\\x00.png: the path contains a "
                                             "NUL byte"),
    (["download", "d\0ir"], "cannot use d\\x00ir: the path contains a NUL byte"),
    (["compile", "small.cnn", "-O1", "-o", ""], "cannot write '': the file name is empty"),
    (["train", "small.cnn", "--data", "d.npz", "--out", ""],
     "cannot write '': the file name is empty"),
    (["compile", "small.cnn", "--emit", "ir", "-o", "out/"],
     "cannot write out/: a file name cannot end in /"),
]


@pytest.mark.parametrize("argv, expected", NUL_CASES, ids=lambda v: " ".join(v)[:40]
                         if isinstance(v, list) else None)
def test_paths_that_cannot_name_a_file_are_refused_before_any_work(work, capsys, argv,
                                                                   expected):
    """A NUL byte cannot come from a shell, but main() takes any str."""
    before = sorted(os.listdir(work))
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(subprocess.CompletedProcess(argv, code, out, err), expected)
    assert out == "" and sorted(os.listdir(work)) == before  # nothing compiled, trained, made


# --- Ctrl-C ------------------------------------------------------------------------------

def checkpoint_epoch(path: Path) -> int:
    with np.load(path, allow_pickle=False) as saved:
        return json.loads(saved["meta"].tobytes())["epoch"]


def test_ctrl_c_after_a_checkpoint_names_it_and_resume_continues(work, capsys):
    child = _interruptible([*CNNC, "train", "small.cnn", "--data", "d.npz", "--epochs",
                              "100000", "--no-progress", "--checkpoint", "c.npz", "--out",
                              "w.npz"], cwd=work, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        # From epoch 2 on, so that a Ctrl-C just after a checkpoint's rename, before
        # training notes it, still has an earlier one to name (see below).
        wait_for(lambda: child.poll() is not None or ((work / "c.npz").exists()
                                                      and checkpoint_epoch(work / "c.npz") >= 2))
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=TIMEOUT)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert_clean(err)
    found = re.fullmatch(r"\ninterrupted; last checkpoint: epoch (\d+) at c\.npz\n", err)
    assert found, err
    named = int(found[1])
    printed = max(int(n) for n in re.findall(r"^epoch (\d+)/100000", out, re.MULTILINE))
    assert named in (printed - 1, printed)  # each epoch's line comes before its checkpoint
    # (a Ctrl-C just after the rename, before it is noted, names the previous one)
    saved = checkpoint_epoch(work / "c.npz")
    assert saved in (named, named + 1)
    assert not (work / "w.npz").exists()  # the final weights are for a finished run
    code, out, _ = run_cli(capsys, "train", "small.cnn", "--data", "d.npz", "--resume",
                            "c.npz", "--epochs", str(saved + 1), "--no-progress",
                            "--checkpoint", "c.npz", "--out", "w.npz")
    assert code == 0 and f"epoch {saved + 1}/{saved + 1}: training loss" in out
    assert f"epoch {saved}/" not in out and checkpoint_epoch(work / "c.npz") == saved + 1


def _interruptible(command: list[str], **options) -> subprocess.Popen:
    """The child with SIGINT's default action, as a terminal's Ctrl-C finds it: a suite run
    as a background job inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt."""
    return subprocess.Popen(command, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                      signal.SIG_DFL),
                            **options)


def test_ctrl_c_before_any_checkpoint_says_so(work):
    data = synthetic(20000, 6)  # with --batch 1, an epoch of several seconds
    np.savez(work / "big.npz", x=data.x, y=data.y)
    child = _interruptible([*CNNC, "train", "small.cnn", "--data", "big.npz", "--batch", "1",
                              "--progress-every", "0.05", "--checkpoint", "c.npz"], cwd=work,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = child.stderr.readline()  # a progress line: the first epoch is under way
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=TIMEOUT)
    finally:
        child.kill()
    assert child.returncode == 130, first + err
    assert_clean(err)
    assert first.startswith("epoch 1/1: ") and " samples, loss " in first, first
    progress, message = err.rsplit("\n\n", 1) if "\n\n" in err else ("", err.lstrip("\n"))
    assert message == "interrupted; no checkpoint written yet\n", err
    assert all(line.startswith("epoch 1/1: ") for line in progress.splitlines()), err
    assert not (work / "c.npz").exists() and temporaries(work) == []


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- flag ranges -------------------------------------------------------------------------

INTEGER = "an integer from 1 to 2,147,483,647"
FLAGS = [
    (["--max-iter", "0"], f"--max-iter expects {INTEGER}, got 0"),
    (["--max-iter", "2147483648"], f"--max-iter expects {INTEGER}, got 2147483648"),
    (["--epochs", "0"], f"--epochs expects {INTEGER}, got 0"),
    (["--batch", "-1"], f"--batch expects {INTEGER}, got -1"),
    (["--lr", "inf"], "--lr expects a finite number above 0, got inf"),
    (["--lr", "0"], "--lr expects a finite number above 0, got 0"),
    (["--tol", "nan"], "--tol expects a finite number of at least 0, got nan"),
    (["--val-split", "1.5"], "--val-split expects a number between 0 and 1 (not including "
                             "them), got 1.5"),
    (["--seed", "-1"], "--seed expects an integer from 0 to 2**63 - 1, got -1"),
    (["--progress-every", "0"], "--progress-every expects a number of seconds above 0, at "
                                "most 86400, got 0"),
    (["--mpi-timeout", "0"], "--mpi-timeout expects a number of seconds above 0, at most "
                             "604800, got 0"),
]


@pytest.mark.parametrize("flag, expected", FLAGS, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else None)
def test_train_flags_out_of_range(work, capsys, flag, expected):
    before = sorted(os.listdir(work))
    code, out, err = run_cli(capsys, "train", "small.cnn", "--data", "d.npz", *flag)
    assert (code, out, err) == (1, "", f"error: {expected}\n")
    assert sorted(os.listdir(work)) == before  # no checkpoint, no weights


def test_other_flags_out_of_range(work, capsys):
    code, out, err = run_cli(capsys, "download", "mnist", "--timeout", "inf")
    assert (code, out) == (1, "")
    assert err == "error: the timeout must be more than 0 and at most 86400 seconds (one " \
                  "day), not inf\n"
    assert not (work / "mnist").exists()
    code, out, err = run_cli(capsys, "check", "--grad", "--samples", "0", "small.cnn")
    assert (code, out, err) == (1, "", f"error: --samples expects {INTEGER}, got 0\n")
    code, out, err = run_cli(capsys, "eval", "small.cnn", "--weights", "w.npz", "--data",
                              "d.npz", "--val-split", "0")
    assert (code, out) == (1, "") and err.startswith("error: --val-split expects a number")


# --- mutated programs --------------------------------------------------------------------

NUMBERS = ["0", "-1", "99999999999999999999", "2147483648", "1.5", "1e9", "nan", "007"]
TOKENS = ["->", "x", ":", "=", "conv", "dense", "maxpool", "relu", "softmax", "#", "\t", "é",
          "→", "\u200b", "\ufeff", "💥", "\x00", "\r", "input", "loss", "train", "pad=same",
          "stride=0", "3x3", "network", "-", "\\", "\"", "'"]


def mutate(text: str, rng: random.Random) -> str:
    """One to three of: delete, duplicate or swap lines; change a number; insert a token;
    truncate."""
    for _ in range(rng.randint(1, 3)):
        lines = text.split("\n")
        kind = rng.choice(["delete", "duplicate", "swap", "number", "number", "insert",
                           "insert", "truncate"])
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[j])
        elif kind == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        text = "\n".join(lines)
        if kind == "number":
            numbers = list(re.finditer(r"\d+(\.\d+)?", text))
            if numbers:
                hit = rng.choice(numbers)
                text = text[:hit.start()] + rng.choice(NUMBERS) + text[hit.end():]
        elif kind == "insert":
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(TOKENS) + rng.choice(["", " "]) + text[at:]
        elif kind == "truncate":
            text = text[:rng.randrange(len(text) + 1)]
    return text


def mutated_programs(count: int, seed: int = 20240601) -> list[str]:
    rng = random.Random(seed)
    originals = [(EXAMPLES / f"{name}.cnn").read_text() for name in ("lenet", "mlp",
                                                                     "vgg_small")]
    return [mutate(rng.choice(originals), rng) for _ in range(count)]


LOOP = """
import contextlib, io, json, sys
from cnnc.cli.main import main

for path in sys.argv[1:]:
    codes, texts = [], []
    for argv in (["check", path], ["summary", path], ["compile", path, "--emit", "ir"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
        codes.append(code)
        texts.append(err.getvalue())
    print(json.dumps({"codes": codes, "errors": texts}), flush=True)
"""


def test_mutated_programs_never_crash_the_command(tmp_path):
    programs = mutated_programs(150)
    paths = []
    for number, text in enumerate(programs):
        path = tmp_path / f"case{number:03d}.cnn"
        path.write_bytes(text.encode("utf-8"))
        paths.append(str(path))
    result = subprocess.run([sys.executable, "-c", LOOP, *paths], capture_output=True,
                            text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]  # negative: killed by a signal
    assert_clean(result.stderr)
    cases = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(cases) == len(programs)
    for path, case in zip(paths, cases, strict=True):
        codes, errors = case["codes"], case["errors"]
        assert set(codes) <= {0, 1}, (path, codes, errors)  # 2 would be a usage error
        # the three commands run the same front end: they accept or refuse alike
        assert len(set(codes)) == 1, (path, codes, errors)
        for code, err in zip(codes, errors, strict=True):
            assert_clean(err)
            assert (err == "") if code == 0 else ("error" in err), (path, err)
    accepted = sum(case["codes"][0] == 0 for case in cases)
    assert 10 < accepted < len(cases) - 10, accepted  # the mutations test both outcomes
    console = Path(sys.executable).parent / "cnnc"
    if console.exists():  # the installed console script agrees with main() on a few
        for path, case in list(zip(paths, cases, strict=True))[:4]:
            real = subprocess.run([str(console), "check", path], capture_output=True,
                                  text=True, timeout=TIMEOUT, check=False)
            assert real.returncode == case["codes"][0], (path, real.stderr)
            assert real.stderr == case["errors"][0]
