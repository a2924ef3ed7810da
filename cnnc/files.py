"""Writing files the way a user can rely on: atomically, durably, with ordinary permissions.

Every file cnnc writes (module files, weights, checkpoints, downloads, `--emit -o`) goes
through `write_atomically`: the bytes go to a temporary file beside the target, which is
flushed to disk, given the permissions `open()` would have given the target, and renamed
over it; then the folder itself is flushed, so the rename survives a power loss too. A
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from .diagnostics import CnncError

# `.NAME.PID.TOKEN.tmp`: the PID says whether the writer is still alive, so the next write
# of the same file can remove what a killed writer left behind.
_TEMPORARY = "{hidden}.{pid}.{token}.tmp"


def write_atomically(path: str | Path, data: bytes, error: type[CnncError] = CnncError) -> None:
    """Replace `path` by `data` atomically and durably; failures raise `error` in one line.

    A path that is not a regular file, such as /dev/stdout or a FIFO, is written to
    directly: renaming over a device would replace the device, not write to it.
    """
    path = Path(path)
    try:
        target = Path(os.path.realpath(path))  # through a symlink, as open() would write
        existing = _existing_mode(target)
        if existing is not None and not stat.S_ISREG(existing):
            if stat.S_ISDIR(existing):
                raise error.single(f"cannot write {path}: it is a directory")
            _write_in_place(target, data)
            return
        _remove_stale_temporaries(target)
        _write_and_rename(target, data, existing)
    except OSError as failure:
        raise error.single(f"cannot write {path}: {_reason(failure)}") from None


def _existing_mode(path: Path) -> int | None:
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        return None


def _write_in_place(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _write_and_rename(target: Path, data: bytes, existing: int | None) -> None:
    hidden = "." + target.name
    temporary = target.parent / _TEMPORARY.format(hidden=hidden, pid=os.getpid(),
                                                  token=secrets.token_hex(4))
    # 0o666 through the umask, as open() gives a new file; an existing file keeps its mode
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if existing is not None:
            os.fchmod(handle, stat.S_IMODE(existing))
        _write_all(handle, data)
        os.fsync(handle)
    except BaseException:
        os.close(handle)
        _unlink_quietly(temporary)
        raise
    os.close(handle)
    try:
        os.replace(temporary, target)
    except BaseException:
        _unlink_quietly(temporary)
        raise
    _sync_folder(target.parent)


def _write_all(handle: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(handle, view)
        view = view[written:]


def _sync_folder(folder: Path) -> None:
    """Flush the folder's entry for the renamed file; some file systems cannot, which is
    no reason to fail the write."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError as failure:
        if failure.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(handle)


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary files of `target` whose writer process no longer exists."""
    prefix = "." + target.name + "."
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return  # the write itself will say what is wrong with the folder
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):-len(".tmp")].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            _unlink_quietly(Path(entry.path))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _reason(failure: OSError) -> str:
    return failure.strerror or str(failure)
