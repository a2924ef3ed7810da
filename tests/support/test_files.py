"""write_atomically: the old file or the new one, never half; the umask's permissions; both
the file and its folder flushed; temporary files of killed writers cleaned up; devices,
FIFOs, /dev/stdout and symlinks written through, not replaced."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cnnc.diagnostics import CnncError, CnncInputError
from cnnc.support import files
from cnnc.support.files import write_atomically


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def message(caught: pytest.ExceptionInfo) -> str:
    [diagnostic] = caught.value.diagnostics
    return diagnostic.message


def test_replaces_the_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    write_atomically(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_permissions_open_gives(tmp_path, umask, expected):
    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "new", b"x")
        with open(tmp_path / "by_open", "wb"):  # the oracle: what open() itself gives
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "by_open").stat().st_mode) == expected


def test_an_existing_file_keeps_its_mode(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    target.chmod(0o640)
    previous = os.umask(0o077)  # would give 0600 to a new file
    try:
        write_atomically(target, b"new")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_bytes() == b"new"


def test_a_failure_midway_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"previous contents")
    real_write = os.write
    calls = []

    def write_then_fill_the_disk(handle, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(handle, bytes(data[:10]))  # a short write: the rest comes later

    monkeypatch.setattr(files.os, "write", write_then_fill_the_disk)
    with pytest.raises(CnncInputError) as caught:
        write_atomically(target, b"n" * 1000, CnncInputError)
    assert message(caught) == f"cannot write {target}: No space left on device"
    assert calls == [1000, 990]  # the short write was continued, then failed
    assert target.read_bytes() == b"previous contents"
    assert temporaries(tmp_path) == []


def test_ctrl_c_midway_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"previous")

    def interrupted(handle):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"previous" and temporaries(tmp_path) == []


def test_the_file_and_then_its_folder_are_flushed(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(handle):
        info = os.fstat(handle)
        synced.append(("folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_size
                       if stat.S_ISREG(info.st_mode) else None, info.st_ino))
        real_fsync(handle)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    write_atomically(tmp_path / "f", b"12345")
    # the temporary file with all its bytes, then the folder that holds the new name
    assert [(kind, size) for kind, size, _ in synced] == [("file", 5), ("folder", None)]
    assert synced[0][2] == (tmp_path / "f").stat().st_ino
    assert synced[1][2] == tmp_path.stat().st_ino


def test_stale_temporaries_of_dead_writers_are_removed_others_kept(tmp_path):
    dead = dead_pid()
    alive = os.getppid()  # pytest's parent: alive while the test runs
    planted = {
        f".f.{dead}.0badc0de.tmp": False,  # a killed writer's: removed
        f".f.{alive}.0badc0de.tmp": True,  # a writer still at work: kept
        f".f.{os.getpid()}.0badc0de.tmp": True,  # this process's own: kept
        f".f.5.{dead}.0badc0de.tmp": True,  # a dead writer of another file, f.5: kept
        f".f.{dead}.tmp": True,  # not a name write_atomically gives: kept
        f".g.{dead}.0badc0de.tmp": True,  # another file's
    }
    for name in planted:
        (tmp_path / name).write_bytes(b"partial")
    write_atomically(tmp_path / "f", b"data")
    assert temporaries(tmp_path) == sorted(name for name, kept in planted.items() if kept)
    write_atomically(tmp_path / "f.5", b"data")  # f.5's dead writer's goes with f.5's write
    assert f".f.5.{dead}.0badc0de.tmp" not in temporaries(tmp_path)


def test_a_name_as_long_as_the_file_system_allows(tmp_path):
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    dead = dead_pid()
    suffix = f".{dead}.0badc0de.tmp".encode()
    cut = longest - len(suffix)  # where a temporary name cuts ".NAME"
    # é is two bytes: the lead "x" or none puts the cut in the middle of one
    lead = "x" * (cut % 2)
    name = lead + "é" * ((longest - 10 - len(lead)) // 2)
    name += "x" * (longest - len(os.fsencode(name)))
    assert len(os.fsencode(name)) == longest and os.fsencode(name)[cut - 2] == 0xc3
    stale = os.fsdecode((b"." + os.fsencode(name))[:cut] + suffix)
    (tmp_path / stale).write_bytes(b"partial")
    write_atomically(tmp_path / name, b"data")  # open() can write it, so this can too
    assert (tmp_path / name).read_bytes() == b"data"
    assert temporaries(tmp_path) == []  # the cut-short stale one was recognised


def test_a_name_longer_than_allowed_is_one_line(tmp_path):
    name = "a" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1)
    with pytest.raises(CnncError) as caught:
        write_atomically(tmp_path / name, b"x")
    assert message(caught) == f"cannot write {tmp_path / name}: File name too long"


def test_symlinks_are_written_through(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(b"old")
    real.chmod(0o640)
    link = tmp_path / "link"
    link.symlink_to("real")
    write_atomically(link, b"new")
    assert link.is_symlink() and os.readlink(link) == "real"
    assert real.read_bytes() == b"new" and stat.S_IMODE(real.stat().st_mode) == 0o640
    dangling = tmp_path / "dangling"
    dangling.symlink_to("made")
    write_atomically(dangling, b"made through the link")  # as open() would
    assert dangling.is_symlink() and (tmp_path / "made").read_bytes() == b"made through the link"


def test_devices_are_written_in_place_not_replaced():
    before = os.stat("/dev/null")
    write_atomically("/dev/null", b"discarded")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    with pytest.raises(CnncError) as caught:
        write_atomically("/dev/full", b"x")
    assert message(caught) == "cannot write /dev/full: No space left on device"


def test_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    write_atomically(fifo, b"through the pipe")
    reader.join(timeout=10)
    assert received == [b"through the pipe"] and stat.S_ISFIFO(fifo.stat().st_mode)
    assert temporaries(tmp_path) == []


def test_dev_stdout_when_it_is_a_pipe():
    """/dev/stdout is a link to /proc/self/fd/1, which for a pipe leads to no file at all:
    it is written in place, not renamed onto."""
    script = ("from cnnc.support.files import write_atomically; "
              "write_atomically('/dev/stdout', b'via /dev/stdout'); "
              "write_atomically('/dev/fd/1', b' and /dev/fd/1')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"via /dev/stdout and /dev/fd/1"


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(CnncInputError) as caught:
        write_atomically(tmp_path, b"x", CnncInputError)
    assert message(caught) == f"cannot write {tmp_path}: it is a directory"


@pytest.mark.parametrize("path, reason", [
    ("a\0b", "cannot write a\\x00b: the path contains a NUL byte"),
    ("", "cannot write '': the file name is empty"),
    ("folder/", "cannot write folder/: a file name cannot end in /"),
])
def test_paths_that_cannot_name_a_file(tmp_path, monkeypatch, path, reason):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CnncError) as caught:
        write_atomically(path, b"x")
    assert message(caught) == reason
    assert list(tmp_path.iterdir()) == []  # nothing written, "folder" included
